"""The query encoder's traced transformer and its per-machine cache (graph/text.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from graph.cache import CACHE_DIR_ENV, cache_dir
from graph.text import QUERY_MAX_TOKENS, TextEncoder

QUERIES = ["milk", "Organic whole MILK 2%", "crème brûlée", "gluten-free/low-fat bread!",
           "日本語 テスト", "x" * 300, "  spaced   out  "]


def test_query_vectors_are_sentence_transformers_and_a_second_process_loads_the_trace(
        tmp_path: Path) -> None:
    first = TextEncoder(cache=tmp_path)
    vecs = np.stack([first.embed_query(q) for q in QUERIES[:5]])
    # The same vectors as sentence-transformers' own pipeline (these queries are not cut).
    np.testing.assert_allclose(vecs, first.encode(QUERIES[:5]), atol=1e-5)
    path = first.query_trace_path()
    assert path is not None and path.parent == tmp_path and path.is_file()

    second = TextEncoder(cache=tmp_path)  # what a restarted replica does
    again = np.stack([second.embed_query(q) for q in QUERIES[:5]])
    np.testing.assert_allclose(again, vecs, atol=1e-6)
    assert second._model is None  # it never loaded sentence-transformers


def test_word_pieces_are_those_of_the_sentence_transformers_tokenizer(tmp_path: Path) -> None:
    enc = TextEncoder(cache=None)
    ours, _ = enc._load_query_model()
    theirs = enc.model[0].tokenizer
    for q in [*QUERIES, "apple " * 100]:
        want = theirs([q], truncation=True, max_length=QUERY_MAX_TOKENS)["input_ids"][0]
        assert ours.encode(q).ids == want, q
    assert len(ours.encode("apple " * 100).ids) == QUERY_MAX_TOKENS


def test_a_damaged_trace_is_reported_traced_again_and_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = TextEncoder(cache=None).embed_query("apple juice")
    enc = TextEncoder(cache=tmp_path)
    path = enc.query_trace_path()
    assert path is not None
    path.write_bytes(b"not a TorchScript archive")
    with caplog.at_level(logging.WARNING, logger="graph.text"):
        np.testing.assert_allclose(enc.embed_query("apple juice"), good, atol=1e-6)
    assert "cannot be loaded" in caplog.text and str(path) in caplog.text
    np.testing.assert_allclose(TextEncoder(cache=tmp_path).embed_query("apple juice"), good,
                               atol=1e-6)  # the file was replaced by a good trace


def test_an_unwritable_cache_folder_is_reported_and_queries_still_work(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    enc = TextEncoder(cache=blocker / "cache")  # a folder under a file cannot be made
    with caplog.at_level(logging.WARNING, logger="graph.text"):
        vec = enc.embed_query("apple juice")
    assert vec.shape == (384,) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    assert "cannot keep the traced query model" in caplog.text and CACHE_DIR_ENV in caplog.text


def test_the_cache_folder_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "ours"))
    assert cache_dir() == tmp_path / "ours"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "intentrec"
    assert TextEncoder(cache=None).query_trace_path() is None
