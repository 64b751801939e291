"""LightGBM's tree traversal, compiled with numba, for the ranker's per-request batches.

A ranker replica asks for the leaves of a few hundred candidates in a few dozen trees, three
times per request (the cascade's stages, :meth:`graph.ltr.LearnedRanker.cascade`). LightGBM's
``predict(pred_leaf=True)`` spends a fixed cost per call on top of the walk; :class:`Forest`
holds the same trees as flat arrays and walks them in one compiled loop, 10–17% less CPU for a
request's three stages (``bench/ranker_steps.py``; ``docs/PERFORMANCE.md``). The walk follows
LightGBM's decision rules (``Tree::NumericalDecision`` in LightGBM's ``tree.h``):

- a value within ±1e-35 is read as 0.0 (LightGBM leaves such values out of a dense row:
  ``RowFunctionFromDenseMatric``);
- a NaN is read as 0.0 unless the split's missing type is NaN;
- a missing value (NaN for missing type NaN; zero for missing type Zero) goes to the split's
  default side;
- otherwise the row goes left when its value is ``<=`` the split's threshold.

Values are compared as float64, as LightGBM converts float32 inputs before comparing, and the
thresholds are the model's own float64 values (its JSON dump prints them with 17 digits, enough
to round-trip exactly). Unit tests compare the leaves with LightGBM's on rows at, just below and
just above every kind of threshold. A model with a categorical split or linear trees is not
compiled (:meth:`Forest.from_dump` returns None) and LightGBM keeps walking it.

The compiled code is cached next to this file (numba's ``cache=True``), or compiled at each
process start where no cache directory is writable; a replica's warm-up request compiles it
before the replica serves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

_MISSING = {"None": 0, "Zero": 1, "NaN": 2}
# LightGBM's kZeroThreshold is the float literal 1e-35f, compared in double precision.
ZERO_THRESHOLD = float(np.float32(1e-35))


def _jit(fn: Any) -> Any:
    try:
        return njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba found no writable cache directory: compile at each start
        return njit(nogil=True)(fn)


@_jit
def _walk(x: np.ndarray, root: np.ndarray, node: np.ndarray, threshold: np.ndarray, start: int,
          stop: int, zero: float, out: np.ndarray) -> None:  # pragma: no cover - compiled
    for i in range(x.shape[0]):
        for t in range(start, stop):
            at = root[t]
            while at >= 0:
                feature, flags, left, right = node[at, 0], node[at, 1], node[at, 2], node[at, 3]
                v = float(x[i, feature])
                if -zero <= v <= zero:
                    v = 0.0  # LightGBM drops |v| <= 1e-35 from a row: it reads as 0.0
                missing = flags >> 1
                if math.isnan(v) and missing != 2:
                    v = 0.0
                if (missing == 1 and v == 0.0) or (missing == 2 and math.isnan(v)):
                    at = left if flags & 1 else right
                elif v <= threshold[at]:
                    at = left
                else:
                    at = right
            out[i, t - start] = ~at


@dataclass(frozen=True)
class Forest:
    """A LightGBM model's numerical trees as flat arrays, and their compiled traversal.

    Shapes:
        - **root** ``[trees]`` int64: each tree's root node, or ``~0`` for a tree that is one
          leaf;
        - **node** ``[internal nodes, 4]`` int32: a node's split feature,
          ``default_left | missing type << 1`` (missing type 0 None, 1 Zero, 2 NaN), and its
          left and right children (a node, or ``~leaf`` for a leaf); one row per node, so a
          step of the walk reads one cache line and the threshold;
        - **threshold** ``[internal nodes]`` float64.
    """

    root: np.ndarray
    node: np.ndarray
    threshold: np.ndarray
    num_features: int

    @classmethod
    def from_dump(cls, trees: Sequence[dict[str, Any]], num_features: int) -> Forest | None:
        """Build from ``booster.dump_model()["tree_info"]``; None if a tree has a split this
        traversal does not implement (categorical, linear leaves)."""
        root = np.zeros(len(trees), dtype=np.int64)
        rows: list[tuple[int, int, int, int]] = []
        threshold: list[float] = []
        for t, tree in enumerate(trees):
            top = tree["tree_structure"]
            if "split_index" not in top:
                root[t] = ~0
                continue
            base = len(rows)
            stack, nodes = [top], {}
            while stack:
                node = stack.pop()
                if "leaf_coeff" in node or "leaf_features" in node:
                    return None  # a linear tree
                if "split_index" in node:
                    nodes[int(node["split_index"])] = node
                    stack.extend((node["left_child"], node["right_child"]))
            for s in range(len(nodes)):
                node = nodes[s]
                if node.get("decision_type") != "<=" or node.get("missing_type") not in _MISSING:
                    return None  # a categorical split
                flags = int(bool(node["default_left"])) | _MISSING[node["missing_type"]] << 1
                rows.append((int(node["split_feature"]), flags,
                             cls._child(node["left_child"], base),
                             cls._child(node["right_child"], base)))
                threshold.append(float(node["threshold"]))
            root[t] = base + int(top["split_index"])
        return cls(root, np.asarray(rows, dtype=np.int32).reshape(-1, 4),
                   np.asarray(threshold, dtype=np.float64), num_features)

    @staticmethod
    def _child(node: dict[str, Any], base: int) -> int:
        return base + int(node["split_index"]) if "split_index" in node else ~int(node["leaf_index"])

    @property
    def num_trees(self) -> int:
        return len(self.root)

    def leaves(self, x: np.ndarray, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The leaf each row reaches in trees ``start`` to ``stop``, as LightGBM's
        ``predict(pred_leaf=True)`` returns it.

        Shapes: ``x`` ``[n, num_features]`` float32 or float64 → ``[n, stop - start]`` int32.
        """
        stop = self.num_trees if stop is None else stop
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"x has shape {x.shape}; the model reads {self.num_features} features")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        out = np.empty((len(x), stop - start), dtype=np.int32)
        _walk(np.ascontiguousarray(x), self.root, self.node, self.threshold, start, stop,
              ZERO_THRESHOLD, out)
        return out
