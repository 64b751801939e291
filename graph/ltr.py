"""The learned ranker: LightGBM LambdaRank over the candidates' features.

Why LightGBM's ``lambdarank``: it optimises NDCG directly on groups of candidates (one group per
request), handles missing values (a feature the request cannot have, such as a repurchase interval
for an item never bought) and mixed scales without normalisation, and trains on a million rows in
about a minute on two cores.

Reasons come from exact per-feature contributions: :class:`PathAttribution` credits each split's
change of the node value to the split's feature along an item's path through every tree
(Saabas' decomposition), tabulated per leaf once. Scoring finds each candidate's leaves with
LightGBM (``pred_leaf``) and sums their values, so the top items' leaves are already known and
explaining them is a gather, not a second traversal. The contributions plus the model's base
value add up to the score exactly,
like TreeSHAP's (LightGBM ``pred_contrib=True``), which measured 3 ms per item on this model:
too slow for the top 20 of every request.

:class:`LearnedRanker` is one fitted booster plus which features and candidate sources it uses;
an ablation (:data:`ABLATIONS`) is the same training on fewer features and sources.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graph.errors import ArtifactError, DataError
from graph.features import COMPONENT_OF, FEATURES
from graph.retrieval import SOURCES
from graph.skew import PROFILE_FILE, FeatureProfile

# What each ablation leaves out: (features, candidate sources).
_SESSION_FEATURES = ("session", "sess_sim_max", "sess_sim_mean", "cooc", "line", "intent",
                     "basket", "session_items", "session_query_lex", "session_query_sem",
                     "session_query_rrf", "src_ann_sess",
                     "src_cooc", "src_intent")
ABLATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "full": ((), ()),
    "no_gnn": (("gnn", "session", "sess_sim_max", "sess_sim_mean", "src_ann_user",
                "src_ann_sess"), ("ann_user", "ann_sess")),
    "no_session": (_SESSION_FEATURES, ("ann_sess", "cooc", "intent")),
    "no_context": (("context", "hour", "weekday", "holiday", "src_context"), ("context",)),
}
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [20],
    "lambdarank_truncation_level": 100,
    "learning_rate": 0.1,
    "num_leaves": 31,
    "min_data_in_leaf": 50,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "verbose": -1,
}
MAX_ROUNDS = 300
# After early stopping, refit on the training and the early-stopping requests together with the
# chosen rounds scaled by their ratio (held out on four quarters: +0.0014 / +0.0007 / +0.0007 /
# +0.0015, 13 of 16 task-quarters better; docs/EXPERIMENTS.md).
REFIT_ON_ALL = True
EARLY_STOPPING = 60
# Early-exit cascade (Cambazoglu et al., WSDM 2010): the first CASCADE_TREES trees score every
# candidate of a request, the next only its CASCADE_KEEP best (chosen on validation requests of
# the built-in data: 3.5x fewer tree evaluations, recall@20 within 0.001 of the whole model).
CASCADE_TREES = 20
CASCADE_KEEP = 100
# The stages: after the first `trees` trees, each request keeps its best `keep` rows (at least
# its k) for the trees after them. The last stage (the best 50 by 80 trees) was chosen on
# held-out validation shoppers (bench/ranker_holdout.py --cascade): recall@20 within 0.0003 of
# the cascade without it in every task, 17-20% less time in LightGBM.
CASCADE: tuple[tuple[int, int], ...] = ((CASCADE_TREES, CASCADE_KEEP), (80, 50))


@dataclass
class RankingData:
    """Labelled candidate rows of many requests, grouped by request.

    Shapes:
        - **x** ``[N, len(FEATURES)]`` float32; **y** ``[N]`` (1 = bought); **group** ``[R]`` rows
          per request, in order.
    """

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray

    def subset(self, requests: np.ndarray, rows: np.ndarray | None = None) -> RankingData:
        """The given requests (indices), optionally only ``rows`` (a row mask) of them."""
        starts = np.concatenate([[0], np.cumsum(self.group)])
        take = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in requests]) if len(
            requests) else np.zeros(0, dtype=np.int64)
        req_of = np.repeat(np.arange(len(requests)), self.group[requests])
        if rows is not None:
            keep = rows[take]
            take, req_of = take[keep], req_of[keep]
        group = np.bincount(req_of, minlength=len(requests))
        return RankingData(self.x[take], self.y[take], group)


@dataclass(frozen=True)
class Cascade:
    """What :meth:`LearnedRanker.cascade` computed.

    Shapes:
        - **scores** ``[n]`` float32, ``-inf`` for rows the cascade dropped;
        - **rows** ``[m]`` the rows scored in full, ascending;
        - **leaves** ``[m, trees]`` the leaf each of them reached in each tree.
    """

    scores: np.ndarray
    rows: np.ndarray
    leaves: np.ndarray

    def leaves_of(self, positions: np.ndarray) -> np.ndarray:
        """The leaves of rows scored in full, by position. Shapes: ``[m]`` → ``[m, trees]``."""
        return self.leaves[np.searchsorted(self.rows, positions)]


@dataclass
class LearnedRanker:
    """One fitted LambdaRank booster and the features and sources it was trained with.

    Args:
        booster: The LightGBM booster.
        features: Its input columns, a subset of :data:`graph.features.FEATURES` in that order.
        sources: Candidate sources it ranks (others' candidates are dropped first).
        info: How it was fitted (rows, requests, rounds, validation NDCG).
        profile: Its features' distribution over the training candidates
            (:class:`graph.skew.FeatureProfile`; None for an ablation, or a ranker written by a
            release before it).
    """

    booster: Any
    features: tuple[str, ...] = FEATURES
    sources: tuple[str, ...] = SOURCES
    info: dict[str, Any] = field(default_factory=dict)
    profile: FeatureProfile | None = None

    def __post_init__(self) -> None:
        self._cols = np.array([FEATURES.index(f) for f in self.features], dtype=np.int64)
        self._src = np.array([SOURCES.index(s) for s in self.sources], dtype=np.int64)
        self._component = [COMPONENT_OF[f] for f in self.features]
        self._paths: PathAttribution | None = None
        self._names: list[str] = list(dict.fromkeys(self._component))

    @property
    def components(self) -> tuple[str, ...]:
        """The reason components of its features (:data:`graph.features.COMPONENT_OF`), in the
        column order of :meth:`component_contributions`."""
        return tuple(self._names)

    def keep_candidates(self, sources: np.ndarray) -> np.ndarray | None:
        """Row mask of candidates proposed by one of this ranker's sources (None: all)."""
        if len(self._src) == len(SOURCES):
            return None
        return np.asarray(sources[:, self._src].any(axis=1))

    def score(self, x: np.ndarray, group: Sequence[int] | None = None,
              keep: Sequence[int] | None = None) -> np.ndarray:
        """Raw scores of full feature rows.

        Without ``group``, every tree scores every row. With ``group`` (rows per request, in
        order), the early-exit cascade runs (:meth:`cascade`): a row outside its request's best
        gets ``-inf``, a kept row's score is the whole model's.

        Shapes: ``x`` ``[n, len(FEATURES)]`` → ``[n]`` float32.
        """
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        if group is None:
            return np.asarray(self.booster.predict(x[:, self._cols]), dtype=np.float32)
        return self.cascade(x, group, keep).scores

    def cascade(self, x: np.ndarray, group: Sequence[int], keep: Sequence[int] | None = None
                ) -> Cascade:
        """The early-exit cascade over requests' candidates, with the leaves it reached.

        Stage by stage (:data:`CASCADE`): the trees up to a stage's ``trees`` score the rows
        still in, then each request keeps its best ``max(stage keep, keep[r])`` rows for the
        next trees; the last trees score the rows left, whose score is then the whole model's.
        LightGBM finds the leaves (``pred_leaf``, its own traversal and missing-value rules); a
        score is the sum of its leaves' values (:class:`PathAttribution`), which is LightGBM's
        raw score, and the kept rows' leaves give their contributions
        (:meth:`contributions_of`) without a second traversal.

        Args:
            x: Full feature rows, request after request.
            group: Rows per request, in order.
            keep: Per request, at least how many rows to score in full (its k).

        Shapes: ``x`` ``[n, len(FEATURES)]``.
        """
        paths = self.attribution()
        n, trees = len(x), len(paths.offset)
        if n == 0:
            return Cascade(np.zeros(0, np.float32), np.zeros(0, np.int64),
                           np.zeros((0, trees), np.int32))
        xs = x[:, self._cols]
        sizes = np.asarray(group, dtype=np.int64)
        request = np.repeat(np.arange(len(sizes)), sizes)
        least = (np.zeros(len(sizes), np.int64) if keep is None
                 else np.asarray(keep, dtype=np.int64))
        rows = np.arange(n)
        score = np.zeros(n, dtype=np.float64)
        leaves = np.zeros((n, 0), dtype=np.int32)
        start = 0
        for stop, m in [*((t, k) for t, k in CASCADE if t < trees), (trees, 0)]:
            if stop <= start:
                continue
            part = paths.leaves(xs[rows], start=start, stop=stop, add_to=score)
            leaves = np.concatenate([leaves, part], axis=1) if leaves.shape[1] else part
            start = stop
            if stop == trees:
                break
            # Rows are ascending, so each request's rows are one run of them.
            bounds = np.searchsorted(request[rows], np.arange(len(sizes) + 1))
            kept = []
            for r, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                want = max(m, int(least[r]))
                kept.append(np.arange(lo, hi) if hi - lo <= want
                            else lo + np.argpartition(-score[lo:hi], want - 1)[:want])
            sel = np.sort(np.concatenate(kept))
            rows, score, leaves = rows[sel], score[sel], leaves[sel]
        out = np.full(n, -np.inf, dtype=np.float64)
        out[rows] = score
        return Cascade(out.astype(np.float32), rows, leaves)

    def attribution(self) -> PathAttribution:
        """The per-leaf value and contribution tables (built once, on first use)."""
        if self._paths is None:
            names = self._names
            groups = np.zeros((len(self.features), len(names)))
            groups[np.arange(len(self.features)), [names.index(c) for c in self._component]] = 1
            self._paths = PathAttribution(self.booster, groups)
        return self._paths

    def contributions(self, x: np.ndarray) -> list[dict[str, float]]:
        """Per-component contributions of full feature rows (:class:`PathAttribution`); with
        ``"base"`` (the model's value before any split) they add up to :meth:`score`."""
        if len(x) == 0:
            return []
        return self.contributions_of(self.attribution().leaves(x[:, self._cols]))

    def contributions_of(self, leaves: np.ndarray) -> list[dict[str, float]]:
        """:meth:`contributions` of rows whose leaves are known (:attr:`Cascade.leaves`).

        Shapes: ``leaves`` ``[n, trees]``.
        """
        if len(leaves) == 0:
            return []
        raw = self.component_contributions(leaves)
        return [{"base": self.attribution().base, **dict(zip(self._names, row, strict=True))}
                for row in raw.tolist()]

    def component_contributions(self, leaves: np.ndarray) -> np.ndarray:
        """:meth:`contributions_of` as an array, one column per :attr:`components`.

        Shapes: ``leaves`` ``[n, trees]`` → ``[n, len(components)]``.
        """
        return self.attribution().explain_leaves(leaves)

    # --- persistence ---------------------------------------------------------------------
    def to_files(self) -> dict[str, bytes]:
        meta = {"features": list(self.features), "sources": list(self.sources), "info": self.info}
        files = {"model.txt": self.booster.model_to_string().encode(),
                 "meta.json": json.dumps(meta, indent=2, default=str).encode()}
        if self.profile is not None:
            files[PROFILE_FILE] = self.profile.to_json()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> LearnedRanker:
        import lightgbm as lgb

        try:
            meta = json.loads(files["meta.json"])
            booster = lgb.Booster(model_str=files["model.txt"].decode())
        except KeyError as exc:
            raise ArtifactError(f"learned ranker file {exc} missing; retrain with "
                                "`python train_job.py`") from exc
        unknown = set(meta["features"]) - set(FEATURES)
        if unknown:
            raise ArtifactError(f"learned ranker uses features {sorted(unknown)} this release does "
                                "not compute; serve it with its release or retrain")
        profile = None
        if PROFILE_FILE in files:
            try:
                profile = FeatureProfile.from_json(files[PROFILE_FILE])
            except (ValueError, KeyError, TypeError) as exc:
                raise ArtifactError(f"learned ranker's {PROFILE_FILE} cannot be read ({exc}); "
                                    "retrain with `python train_job.py`") from exc
            if profile.features != tuple(meta["features"]):
                raise ArtifactError(f"learned ranker's {PROFILE_FILE} is of other features than "
                                    "its model; retrain with `python train_job.py`")
        return cls(booster, tuple(meta["features"]), tuple(meta["sources"]), meta.get("info", {}),
                   profile)


def fit_ranker(
    train: RankingData,
    valid: RankingData,
    *,
    ablation: str = "full",
    sources: np.ndarray | None = None,
    valid_sources: np.ndarray | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    max_rounds: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> LearnedRanker:
    """Fit LambdaRank on ``train``, early-stopped on ``valid`` (NDCG@20), both from the
    validation window before the test split; then, with :data:`REFIT_ON_ALL`, refit on both with
    the chosen rounds scaled by ``(train + valid) / train`` requests (``info["rounds"]``; the
    early-stopped count is ``info["early_stopped_rounds"]``).

    Args:
        train, valid: Labelled candidate rows (requests without a bought candidate are dropped:
            they carry no ranking signal).
        ablation: A key of :data:`ABLATIONS`: which features and sources to leave out.
        sources: ``[N, len(SOURCES)]`` source flags of ``train``'s rows (needed when the
            ablation drops sources); **valid_sources** the same for ``valid``.
        seed: LightGBM seed (deterministic with one thread per run).
        params: Overrides of :data:`DEFAULT_PARAMS`.
        max_rounds: Boosting rounds at most (default :data:`MAX_ROUNDS`).
        progress: Called with one summary line.
    """
    import lightgbm as lgb

    drop_f, drop_s = ABLATIONS[ablation]
    feats = tuple(f for f in FEATURES if f not in drop_f)
    srcs = tuple(s for s in SOURCES if s not in drop_s)
    probe = LearnedRanker(None, feats, srcs)
    cols = probe._cols

    def prepared(d: RankingData, src: np.ndarray | None) -> RankingData:
        mask = probe.keep_candidates(src) if src is not None else None
        d = d.subset(np.arange(len(d.group)), mask) if mask is not None else d
        starts = np.concatenate([[0], np.cumsum(d.group)])
        useful = np.array([d.y[starts[r]: starts[r + 1]].any() for r in range(len(d.group))],
                          dtype=bool)
        return d.subset(np.flatnonzero(useful & (d.group > 1)))

    tr, va = prepared(train, sources), prepared(valid, valid_sources)
    max_rounds = MAX_ROUNDS if max_rounds is None else max_rounds
    p = {**DEFAULT_PARAMS, "seed": seed, "num_threads": 2, "deterministic": True,
         "force_row_wise": True, **(params or {})}
    if len(tr.group) == 0:
        raise DataError("no validation request has a bought item among its candidates: the "
                        "validation window is too small to fit the ranker; widen --val-days")
    dtrain = lgb.Dataset(tr.x[:, cols], tr.y, group=tr.group, feature_name=list(feats),
                         free_raw_data=True)
    if len(va.group):  # early stopping on held-out validation requests
        dvalid = lgb.Dataset(va.x[:, cols], va.y, group=va.group, reference=dtrain)
        booster = lgb.train(p, dtrain, num_boost_round=max_rounds, valid_sets=[dvalid],
                            valid_names=["validation"],
                            callbacks=[lgb.early_stopping(EARLY_STOPPING, verbose=False)])
    else:  # too few requests to hold any out (tiny data sets)
        booster = lgb.train(p, dtrain, num_boost_round=max_rounds // 4)
    best = booster.best_iteration or booster.current_iteration()
    ndcg = float(booster.best_score.get("validation", {}).get("ndcg@20", float("nan")))
    stopped = int(best)
    refit = bool(REFIT_ON_ALL and len(va.group))
    if refit:
        # The early-stopping requests hold a fifth of the shoppers: once they have chosen the
        # number of rounds, refit on every request with that number scaled to the larger set.
        group = np.concatenate([tr.group, va.group])
        best = max(1, round(stopped * len(group) / len(tr.group)))
        booster = lgb.train(p, lgb.Dataset(np.concatenate([tr.x[:, cols], va.x[:, cols]]),
                                           np.concatenate([tr.y, va.y]), group=group,
                                           feature_name=list(feats), free_raw_data=True),
                            num_boost_round=best)
    # rows / requests: what early stopping trained on; fitted_*: what the returned model learned
    # from; valid_ndcg@20: the early-stopped model's score on the held-out shoppers (after a
    # refit they are in the model too, so no held-out score of it exists).
    info = {"ablation": ablation, "rows": len(tr.y), "requests": len(tr.group),
            "valid_requests": len(va.group), "rounds": int(best), "early_stopped_rounds": stopped,
            "refit_on_all": refit, "fitted_rows": len(tr.y) + (len(va.y) if refit else 0),
            "fitted_requests": len(tr.group) + (len(va.group) if refit else 0),
            "valid_ndcg@20": ndcg, "params": {k: v for k, v in p.items() if k != "eval_at"}}
    model = booster if best == booster.current_iteration() else lgb.Booster(
        model_str=booster.model_to_string(num_iteration=best))
    if progress is not None:
        then = f", refitted on all {info['fitted_rows']:,} rows with {best} rounds" if refit else ""
        progress(f"[ranker] {ablation}: LambdaRank on {info['rows']:,} rows of "
                 f"{info['requests']:,} requests, {stopped} rounds, validation ndcg@20 "
                 f"{ndcg:.4f}{then}")
    return LearnedRanker(model, feats, srcs, info)


def importance(ranker: LearnedRanker, top: int = 10) -> Sequence[tuple[str, float]]:
    """The features with the largest total gain, as shares of the total."""
    gain = np.asarray(ranker.booster.feature_importance("gain"), dtype=np.float64)
    share = gain / max(gain.sum(), 1e-12)
    order = np.argsort(-share)[:top]
    return [(ranker.features[i], float(share[i])) for i in order]


class PathAttribution:
    """Exact per-feature decomposition of a LightGBM model's raw score (Saabas).

    Following a row down one tree, each split moves it from a node to a child; crediting the
    change of the expected value (``internal_value`` → child value) to the split's feature makes
    the tree's leaf value ``root value + Σ credits``. The credits depend only on the leaf the row
    reaches, so they are tabulated once per (tree, leaf) here, and a row's contributions are the
    sum over trees of its leaves' rows of the table. The leaves are LightGBM's own
    (``predict(pred_leaf=True)``, found by the same rules for missing values and thresholds):
    :class:`graph.forest.Forest` walks the trees in compiled code with those rules, without
    LightGBM's cost per call, and LightGBM walks them itself for a model that
    :class:`~graph.forest.Forest` does not compile (categorical splits, linear trees). So
    ``base + contributions.sum(1)`` equals the score.

    Args:
        booster: A LightGBM booster.
        groups: ``[F, G]`` 0/1 matrix summing features into G groups (reason components), so
            the table holds G columns, not F (None: one group per feature).

    Shapes:
        - **table** ``[total leaves, G]``; **value** ``[total leaves]`` each leaf's value;
          **offset** ``[T]`` first table row of each tree.
    """

    def __init__(self, booster: Any, groups: np.ndarray | None = None) -> None:
        self.booster = booster
        self.num_features = int(booster.num_feature())
        trees = booster.dump_model()["tree_info"]
        self.offset = np.zeros(len(trees), dtype=np.int64)
        rows: list[np.ndarray] = []
        base = 0.0

        def walk(node: dict[str, Any], acc: np.ndarray, value: float,
                 leaves: dict[int, tuple[np.ndarray, float]]) -> None:
            if "leaf_index" in node or "split_index" not in node:
                leaves[int(node.get("leaf_index", 0))] = (acc, value)
                return
            f = int(node["split_feature"])
            for side in ("left_child", "right_child"):
                child = node[side]
                cv = float(child.get("leaf_value", child.get("internal_value", 0.0)))
                nxt = acc.copy()
                nxt[f] += cv - value
                walk(child, nxt, cv, leaves)

        values: list[np.ndarray] = []
        for t, tree in enumerate(trees):
            root = tree["tree_structure"]
            value = float(root.get("leaf_value", root.get("internal_value", 0.0)))
            base += value
            leaves: dict[int, tuple[np.ndarray, float]] = {}
            walk(root, np.zeros(self.num_features), value, leaves)
            self.offset[t] = sum(len(r) for r in rows)
            rows.append(np.stack([leaves[i][0] for i in range(len(leaves))]))
            values.append(np.array([leaves[i][1] for i in range(len(leaves))]))
        table = np.concatenate(rows) if rows else np.zeros((0, self.num_features))
        self.table = table if groups is None else table @ groups
        self.value = np.concatenate(values) if values else np.zeros(0)
        self.base = base
        from graph.forest import Forest  # numba: only where a model ranks, not in every process

        self.forest = Forest.from_dump(trees, self.num_features)

    def leaves(self, x: np.ndarray, start: int = 0, stop: int | None = None, *,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """The leaf each row reaches in trees ``start`` to ``stop`` (LightGBM's traversal);
        with ``add_to`` (``[n]`` float64, changed in place) the leaves' values are added to it,
        tree by tree (:meth:`value_of` of the answer, summed in LightGBM's order).

        Shapes: ``x`` ``[n, F]`` (n > 0) → ``[n, stop - start]`` int32.
        """
        stop = len(self.offset) if stop is None else stop
        if self.forest is not None:
            return self.forest.leaves(x, start, stop, value=self.value, offset=self.offset,
                                      add_to=add_to)
        out = self.booster.predict(x, start_iteration=start, num_iteration=stop - start,
                                   pred_leaf=True)
        out = np.asarray(out, dtype=np.int32).reshape(len(x), stop - start)
        if add_to is not None:
            for t in range(out.shape[1]):
                add_to += self.value[out[:, t] + self.offset[start + t]]
        return out

    def value_of(self, leaves: np.ndarray, start: int = 0) -> np.ndarray:
        """Raw scores: the sum of the leaves' values (trees from ``start``). ``[n]`` float64."""
        t = leaves.shape[1]
        return np.asarray(self.value[leaves + self.offset[start: start + t]].sum(axis=1))

    def explain_leaves(self, leaves: np.ndarray) -> np.ndarray:
        """Contributions of rows whose leaves in every tree are known. ``[n, trees]`` →
        ``[n, G]``."""
        from graph.forest import sum_leaf_rows

        # The reached leaves' rows of the table, summed in one compiled loop (the one-hot sparse
        # product it replaces gave the same bits and cost 0.1 ms of a request in scipy's
        # checks; gathering [n, trees, G] and summing was 3x slower still).
        return sum_leaf_rows(self.table, leaves, self.offset[:leaves.shape[1]])
