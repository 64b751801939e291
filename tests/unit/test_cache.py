"""The machine's cache of derived files (graph/cache.py) and the two indexes kept in it: the
faiss inverted file over item embeddings and the BM25 index of the catalogue's texts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from graph import cache as C
from graph.retrieval import IVF_MIN_ITEMS, ann_index
from graph.search import _bm25_index, _stemmer, analyze


class Builds:
    """A cache entry that counts how often it was built and writes one text file."""

    def __init__(self, value: str = "v") -> None:
        self.value, self.count = value, 0

    def build(self) -> str:
        self.count += 1
        return self.value

    @staticmethod
    def save(obj: str, path: Path) -> None:
        (path / "value.txt").write_text(obj)

    @staticmethod
    def load(path: Path) -> str:
        text = (path / "value.txt").read_text()
        if not text.startswith("v"):
            raise ValueError(f"damaged: {text!r}")
        return text


def test_an_entry_is_built_once_then_loaded(tmp_path: Path) -> None:
    b = Builds()
    key = C.digest(["params", b"\x00\x01"])
    assert C.cached("thing", key, b.build, b.save, b.load, root=tmp_path) == "v"
    assert C.cached("thing", key, b.build, b.save, b.load, root=tmp_path) == "v"
    assert b.count == 1
    assert [p.name for p in (tmp_path / "thing").iterdir()] == [key]  # no temporary left


def test_digest_separates_its_parts() -> None:
    assert C.digest(["ab", "c"]) != C.digest(["a", "bc"])
    assert C.digest([np.arange(4).data]) == C.digest([np.arange(4).tobytes()])


def test_a_damaged_entry_is_reported_and_rebuilt(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    b = Builds()
    C.cached("thing", "k", b.build, b.save, b.load, root=tmp_path)
    (tmp_path / "thing" / "k" / "value.txt").write_text("garbage")
    with caplog.at_level(logging.WARNING, logger="graph.cache"):
        assert C.cached("thing", "k", b.build, b.save, b.load, root=tmp_path) == "v"
    assert b.count == 2 and "cannot be loaded" in caplog.text
    assert (tmp_path / "thing" / "k" / "value.txt").read_text() == "v"  # replaced


def test_an_unwritable_folder_is_reported_and_the_build_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    b = Builds()
    with caplog.at_level(logging.WARNING, logger="graph.cache"):
        assert C.cached("thing", "k", b.build, b.save, b.load, root=blocker) == "v"
    assert "cannot keep the thing" in caplog.text and C.CACHE_DIR_ENV in caplog.text


def test_each_kind_keeps_its_most_recently_used_entries(tmp_path: Path) -> None:
    b = Builds()
    for n in range(C.KEEP_PER_KIND + 3):
        C.cached("thing", f"k{n}", b.build, b.save, b.load, root=tmp_path)
        os.utime(tmp_path / "thing" / f"k{n}", (1000.0 + n, 1000.0 + n))
    C.cached("thing", "k0", b.build, b.save, b.load, root=tmp_path)  # used again: kept
    kept = {p.name for p in (tmp_path / "thing").iterdir()}
    assert len(kept) == C.KEEP_PER_KIND and "k0" in kept and "k1" not in kept


def test_the_cached_inverted_file_answers_as_the_freshly_trained_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    emb = np.random.default_rng(0).standard_normal((IVF_MIN_ITEMS, 8)).astype(np.float32)
    fresh = ann_index(emb, cache=False)
    stored = ann_index(emb)  # trained and kept
    loaded = ann_index(emb)  # read back
    assert len(list((tmp_path / "ann-index").iterdir())) == 1
    q = emb[:64] + 0.01
    want = fresh.search(q, 20)
    for index in (stored, loaded):
        assert index.nprobe == fresh.nprobe
        got = index.search(q, 20)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    other = ann_index(emb[::-1].copy())  # other embeddings: another entry, never the first one
    assert len(list((tmp_path / "ann-index").iterdir())) == 2 and other.ntotal == len(emb)


def test_the_cached_bm25_index_scores_as_the_fresh_one(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(tmp_path))
    docs = [f"item {i} {'whole milk' if i % 3 else 'kids cereal'} brand{i % 17}" for i in range(300)]
    stemmer = _stemmer()
    built, loaded = _bm25_index(docs, stemmer), _bm25_index(docs, stemmer)
    assert len(list((tmp_path / "bm25").iterdir())) == 1
    for query in ("kids cereal", "milk brand3", "nothing here"):
        tokens = analyze([query], stemmer)[0]
        np.testing.assert_array_equal(loaded.get_scores(tokens), built.get_scores(tokens))
    _bm25_index(docs[:-1], stemmer)  # another catalogue: another entry
    assert len(list((tmp_path / "bm25").iterdir())) == 2
