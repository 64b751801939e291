"""LightGBM's tree traversal, compiled with numba, for the ranker's per-request batches.

A ranker replica asks for the leaves of a few hundred candidates in a few dozen trees, three
times per request (the cascade's stages, :meth:`graph.ltr.LearnedRanker.cascade`). LightGBM's
``predict(pred_leaf=True)`` spends a fixed cost per call on top of the walk; :class:`Forest`
holds the same trees as flat arrays and walks them in one compiled loop, 10–17% less CPU for a
request's three stages (``bench/ranker_steps.py``; ``docs/PERFORMANCE.md``), eight rows through
a tree at once (a quarter less again). The walk follows LightGBM's decision rules
(``Tree::NumericalDecision`` in LightGBM's ``tree.h``):

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


# The rows a walk advances together through one tree. A step's next node depends on a load
# and a comparison whose outcome the processor cannot predict; several independent walks in
# flight overlap those waits (a quarter less CPU than one row at a time on the shipped model).
_INTERLEAVE = 8


@_jit
def _walk(x: np.ndarray, root: np.ndarray, node: np.ndarray, threshold: np.ndarray, start: int,
          stop: int, zero: float, out: np.ndarray, value: np.ndarray, offset: np.ndarray,
          add_to: np.ndarray) -> None:  # pragma: no cover - compiled
    n = x.shape[0]
    at = np.empty(_INTERLEAVE, dtype=np.int64)
    for t in range(start, stop):
        top = root[t]
        for i0 in range(0, n, _INTERLEAVE):
            m = min(_INTERLEAVE, n - i0)
            live = m if top >= 0 else 0
            for k in range(m):
                at[k] = top
            while live > 0:
                live = 0
                for k in range(m):
                    a = at[k]
                    if a >= 0:
                        v = float(x[i0 + k, node[a, 0]])
                        # Column 1 left, 2 right (v <= threshold or not), 3 a NaN's child, 4 a
                        # zero's (|v| <= 1e-35 reads as 0.0), picked by arithmetic: written as
                        # one conditional expression the walk took twice as long.
                        col = np.int64(1) + np.int64(not (v <= threshold[a])) + np.int64(v != v)
                        if -zero <= v <= zero:
                            col = np.int64(4)
                        a = node[a, col]
                        at[k] = a
                        if a >= 0:
                            live += 1
            for k in range(m):
                out[i0 + k, t - start] = ~at[k]
            if len(add_to):  # the raw score: leaf values added tree by tree, as LightGBM does
                for k in range(m):
                    add_to[i0 + k] += value[offset[t] + ~at[k]]


@_jit
def _sum_leaf_rows(table: np.ndarray, leaves: np.ndarray, offset: np.ndarray,
                   out: np.ndarray) -> None:  # pragma: no cover - compiled
    for i in range(leaves.shape[0]):
        for t in range(leaves.shape[1]):
            row = leaves[i, t] + offset[t]
            for g in range(table.shape[1]):
                out[i, g] += table[row, g]


def sum_leaf_rows(table: np.ndarray, leaves: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Row ``i`` = the sum over trees ``t`` of ``table[leaves[i, t] + offset[t]]``, added in tree
    order (what a one-hot sparse product gives, bit for bit, without building the matrix).

    Shapes: ``table`` ``[total leaves, G]`` float64, ``leaves`` ``[n, T]``, ``offset`` ``[>= T]``
    → ``[n, G]`` float64.
    """
    out = np.zeros((leaves.shape[0], table.shape[1]), dtype=np.float64)
    # No conversion of the leaves or offsets (int32 or int64 both compile): this runs per request.
    _sum_leaf_rows(np.ascontiguousarray(table, dtype=np.float64), np.ascontiguousarray(leaves),
                   np.ascontiguousarray(offset), out)
    return out


_NO_VALUES = np.zeros(0, dtype=np.float64)
_NO_OFFSETS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Forest:
    """A LightGBM model's numerical trees as flat arrays, and their compiled traversal.

    Shapes:
        - **root** ``[trees]`` int64: each tree's root node, or ``~0`` for a tree that is one
          leaf;
        - **node** ``[internal nodes, 5]`` int32: a node's split feature, its left and right
          children (a node, or ``~leaf`` for a leaf), and the child a NaN and a zero go to
          (LightGBM's rules for the split's missing type and default side, resolved when the
          forest is built); one row per node, so a step of the walk reads one cache line and
          the threshold;
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
        rows: list[tuple[int, int, int, int, int]] = []
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
                left = cls._child(node["left_child"], base)
                right = cls._child(node["right_child"], base)
                default = left if node["default_left"] else right
                compared = left if float(node["threshold"]) >= 0.0 else right  # where 0.0 goes
                missing = _MISSING[node["missing_type"]]
                # None: a NaN reads as 0.0 and is compared; Zero: 0.0 and NaN take the
                # default side; NaN: a NaN takes the default side, 0.0 is compared.
                nan_child = compared if missing == 0 else default
                zero_child = default if missing == 1 else compared
                rows.append((int(node["split_feature"]), left, right, nan_child, zero_child))
                threshold.append(float(node["threshold"]))
            root[t] = base + int(top["split_index"])
        return cls(root, np.asarray(rows, dtype=np.int32).reshape(-1, 5),
                   np.asarray(threshold, dtype=np.float64), num_features)

    @staticmethod
    def _child(node: dict[str, Any], base: int) -> int:
        return base + int(node["split_index"]) if "split_index" in node else ~int(node["leaf_index"])

    @property
    def num_trees(self) -> int:
        return len(self.root)

    def leaves(self, x: np.ndarray, start: int = 0, stop: int | None = None, *,
               value: np.ndarray | None = None, offset: np.ndarray | None = None,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """The leaf each row reaches in trees ``start`` to ``stop``, as LightGBM's
        ``predict(pred_leaf=True)`` returns it.

        With ``add_to``, each row's leaf values (``value[offset[t] + leaf]``) are also added to
        it, tree after tree in the walk: the raw score of those trees, summed in LightGBM's
        order, without a second pass over the leaves.

        Shapes: ``x`` ``[n, num_features]`` float32 or float64 → ``[n, stop - start]`` int32;
        ``value`` ``[total leaves]`` float64, ``offset`` ``[num_trees]`` int64, ``add_to``
        ``[n]`` float64 (changed in place).
        """
        stop = self.num_trees if stop is None else stop
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"x has shape {x.shape}; the model reads {self.num_features} features")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        out = np.empty((len(x), stop - start), dtype=np.int32)
        if add_to is None:
            value, offset, add_to = _NO_VALUES, _NO_OFFSETS, _NO_VALUES
        elif value is None or offset is None or add_to.shape != (len(x),) \
                or add_to.dtype != np.float64:
            raise ValueError("add_to needs the leaf values and tree offsets, and one float64 "
                             "per row")
        _walk(np.ascontiguousarray(x), self.root, self.node, self.threshold, start, stop,
              ZERO_THRESHOLD, out, value, offset, add_to)
        return out
