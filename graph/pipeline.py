"""The offline pipeline: data → graph → GNN (Ray Train) → signals → learned ranker → evaluation
→ versioned artifact. ``train_job.py`` is a thin CLI over :func:`run_pipeline`.

Leakage guard, in order:

1. ``train`` = events before ``split_at``; ``test`` = events from it on (only evaluation reads them).
2. ``val_cut`` splits ``train`` again. The GNN and a first set of signals are fitted on events
   before ``val_cut``; the LightGBM ranker (and, with ``ablations``, its ablations) is fitted on
   candidates of the validation window ``[val_cut, split_at)`` (``graph.ranker_fit``). Nothing
   after ``split_at`` influences any fitted number.
3. Signals are then refitted on all of ``train``, and the trained GNN is propagated over the
   full training graph (LightGCN's propagation has no parameters, so the newest edges still shape
   the final embeddings without retraining). The ranker's features are computed from those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from graph import schema as S
from graph.artifacts import write_artifact
from graph.config import TrainConfig
from graph.data import Dataset, load_builtin, load_files, temporal_split
from graph.errors import ConfigError
from graph.forgotten import read_forgotten
from graph.interactions import Interactions, build_interactions
from graph.machine import machine_facts
from graph.text import ItemText, own_title_share, wants_text_input

if TYPE_CHECKING:
    from graph.ltr import LearnedRanker
    from graph.recommend import Recommender
    from graph.signals import RankingSignals

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
# Rows of the evaluation table for the ablations of graph.ltr.ABLATIONS.
ABLATION_ROWS: dict[str, str] = {
    "intentrec_no_gnn": "no_gnn", "intentrec_no_session": "no_session",
    "intentrec_no_context": "no_context",
}


class PipelineConfig(BaseModel):
    """Everything one training run needs. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    events: str | None = Field(None, description="canonical events file (Parquet/CSV)")
    items: str | None = Field(None, description="canonical items file (Parquet/CSV)")
    max_users: int | None = Field(None, ge=10, description="seeded sample of users (small runs)")
    split_at: datetime | None = Field(None, description="test split; default per data set")
    val_days: float = Field(28.0, gt=0, le=365, description="validation window before the split")
    output: str = Field("artifacts", description="artifact root (folder or URI)")
    eval_max_users: int | None = Field(None, ge=1, description="cap users evaluated per task")
    eval_max_baskets: int | None = Field(None, ge=1, description="cap baskets in in-session tasks")
    skip_eval: bool = False
    eval_workers: int | None = Field(
        None, ge=1, description="Ray actors ranking the evaluation's requests (graph.parallel); "
        "None: one per free CPU of the cluster, 1: in the driver")
    ablations: bool = Field(False, description="also fit and evaluate the ablation rankers")
    anonymous_twins: float = Field(
        0.0, ge=0.0, le=1.0, description="share of the next-basket and in-session validation "
        "requests the ranker is also fitted on without their shopper (graph.ranker_fit."
        "validation_requests)")
    require_lead: float | None = Field(
        None, ge=0.0, le=1.0, description="publish gate: move LATEST only if intentrec's "
        "recall@20 beats every baseline's by more than this in every task (graph.evaluate."
        "lead_shortfalls); otherwise the version is written but not made current. None: no gate")
    require_no_regression: float | None = Field(
        None, ge=0.0, le=1.0, description="publish gate: evaluate the version LATEST names (the "
        "one serving) on this run's tasks, and move LATEST only if intentrec's recall@20 is at "
        "most this much below its in every task (graph.evaluate.regression_shortfalls). None: "
        "no comparison")
    forgotten: str | None = Field(
        None, description="forgotten-users file (path or URI) whose users' events are dropped "
        "before anything is fitted or written; None: exclude nobody")
    online_events: str | None = Field(
        None, description="canonical events file of online events (train_job.py --online-events "
        "exports it from the session log): added to the training part only (graph/online_events.py)")
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("items")
    @classmethod
    def _pair(cls, v: str | None, info: Any) -> str | None:
        if (v is None) != (info.data.get("events") is None):
            raise ValueError("give both --events and --items, or neither (built-in data)")
        return v

    @model_validator(mode="after")
    def _gate_needs_evaluation(self) -> PipelineConfig:
        for flag, value in (("--require-lead", self.require_lead),
                            ("--require-no-regression", self.require_no_regression)):
            if value is not None and self.skip_eval:
                raise ValueError(f"{flag} judges the evaluation, which --skip-eval skips: "
                                 "drop one of them")
        return self


@dataclass
class PipelineResult:
    version: str
    output: str
    metrics: dict[str, Any]
    table: str
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # Why the publish gate (PipelineConfig.require_lead, .require_no_regression) kept LATEST
    # where it was; [] = published.
    shortfalls: list[str] = field(default_factory=list)

    @property
    def published(self) -> bool:
        """Whether ``LATEST`` now names this version."""
        return not self.shortfalls


def load_dataset(cfg: PipelineConfig, forgotten: frozenset[str] = frozenset()) -> Dataset:
    """The run's data: its user sample drawn first, then every event of a ``forgotten`` user
    dropped, so that forgetting a user removes exactly that user from an otherwise identical run.
    """
    if cfg.events is None or cfg.items is None:
        return load_builtin(max_users=cfg.max_users, seed=cfg.train.seed, exclude_users=forgotten)
    ds = load_files(cfg.events, cfg.items)
    keep = None
    if cfg.max_users is not None:
        keep = set(pd.Series(ds.events[S.USER_COL].unique()).sample(
            n=min(cfg.max_users, ds.events[S.USER_COL].nunique()), random_state=cfg.train.seed
        ))
    return ds.select_users(drop=forgotten, keep=keep)


@dataclass
class PreparedData:
    """The data of one run, split and turned into graphs: everything before training.

    ``inter_full`` is the graph of all of ``train``; ``inter_fit`` the graph of ``fit_part`` (the
    events before the validation cut), indexed by the same users and items.
    """

    ds: Dataset
    split_at: pd.Timestamp
    val_cut: pd.Timestamp
    train: pd.DataFrame
    test: pd.DataFrame
    fit_part: pd.DataFrame
    val_part: pd.DataFrame
    inter_full: Interactions
    inter_fit: Interactions
    seconds: float


def prepare_data(cfg: PipelineConfig, progress: Progress = print) -> PreparedData:
    """Load, sample and split the data and build the graphs. Needs no Ray: ``train_job.py`` runs
    it before starting Ray, so bad input fails in seconds.

    Raises:
        DataError: unreadable or invalid events/items (names the file, column and fix).
        ConfigError: a split or validation window that leaves no data on one side.
    """
    t0 = time.perf_counter()
    # Forgotten users first: their events are gone before anything is sampled from, fitted on
    # or written (DELETE /v1/users/{id} lists them; graph/forgotten.py).
    forgotten = read_forgotten(cfg.forgotten) if cfg.forgotten is not None else frozenset()
    ds = load_dataset(cfg, forgotten)
    if cfg.forgotten is None:
        progress("[forget] no forgotten-users file given (train_job.py --forgotten): no user excluded")
    else:
        progress(f"[forget] excluded {ds.excluded_users:,} forgotten user(s) with "
                 f"{ds.excluded_events:,} events ({len(forgotten):,} listed in {cfg.forgotten})")
    split_at = pd.Timestamp(cfg.split_at).tz_localize(None) if cfg.split_at else ds.default_split_at
    train, test = temporal_split(ds.events, split_at)
    val_cut = split_at - pd.Timedelta(days=cfg.val_days)
    fit_part, val_part = train[train[S.TS_COL] < val_cut], train[train[S.TS_COL] >= val_cut]
    if fit_part.empty or val_part.empty:
        raise ConfigError(
            f"validation window of {cfg.val_days} days before {split_at} leaves "
            f"{len(fit_part)} fit / {len(val_part)} validation events; choose --val-days so both "
            "are non-empty",
            field="val_days",
        )
    progress(
        f"[data] {ds.name}: {len(ds.events):,} events, {ds.events[S.USER_COL].nunique():,} users, "
        f"{len(ds.items):,} items | train < {split_at:%Y-%m-%d} ({len(train):,}), "
        f"validation from {val_cut:%Y-%m-%d} ({len(val_part):,}), test ({len(test):,})"
    )
    if cfg.online_events is not None:
        # After the validation split: online events are training data, never validation labels.
        from graph.online_events import merge_online, read_online_events

        train, merged = merge_online(train, read_online_events(cfg.online_events), ds.items,
                                     split_at, forgotten)
        progress(f"[online] {merged.describe()}")
    inter_full = build_interactions(train, ds.items)
    inter_fit = build_interactions(fit_part, ds.items, user_ids=inter_full.user_ids,
                                   now=fit_part[S.TS_COL].max())
    progress(
        f"[graph] {inter_full.num_users:,} users x {inter_full.num_items:,} items, "
        f"{inter_full.num_edges:,} edges ({inter_fit.num_edges:,} before the validation cut)"
    )
    return PreparedData(ds=ds, split_at=split_at, val_cut=val_cut, train=train, test=test,
                        fit_part=fit_part, val_part=val_part, inter_full=inter_full,
                        inter_fit=inter_fit, seconds=time.perf_counter() - t0)


def fit_recommender(
    d: PreparedData,
    fit_emb: tuple[np.ndarray, np.ndarray],
    full_emb: tuple[np.ndarray, np.ndarray],
    *,
    seed: int = 0,
    ablations: Sequence[str] = (),
    anonymous_twins: float = 0.0,
    progress: Progress = print,
    text: ItemText | None = None,
) -> tuple[Recommender, dict[str, LearnedRanker]]:
    """Embed the item texts (unless given), fit the learned ranker on the validation window, then
    build the recommender to publish.

    Args:
        d: The run's data.
        fit_emb: ``(user_emb, item_emb)`` trained on events before the validation cut only.
        full_emb: The same model's embeddings over the whole training graph.
        seed: Seed of everything random in the ranker's fitting.
        ablations: Which of :data:`graph.ltr.ABLATIONS` to fit besides ``full``.
        progress: Called with one line per step.
        text: The catalogue's text embeddings, if already computed (:class:`ItemText`).

    Returns:
        The recommender on all training events with the full ranker, and every fitted ranker
        by ablation name.
    """
    from graph.evaluate import validation_tasks
    from graph.features import item_features
    from graph.ltr import importance
    from graph.ranker_fit import fit_on_validation
    from graph.ranking import Ranker
    from graph.recommend import Recommender
    from graph.signals import fit_signals

    if text is None:
        t0 = time.perf_counter()
        text = ItemText.build(d.ds.items, progress=progress)
        progress(f"[text] {len(text.texts):,} distinct texts of {text.num_items:,} items embedded "
                 f"with {text.model} in {time.perf_counter() - t0:.0f}s")
    progress("[ranker] fitting the LightGBM ranker on candidates of the validation window")
    # The published signals need only the data: fitted on another CPU meanwhile.
    full_signals = signals_in_background(d.train, d.inter_full)
    val_ranker = Ranker(*fit_emb, fit_signals(d.fit_part, d.inter_full))
    val_rec = Recommender.build(d.ds.items, val_ranker,
                                item_features(d.fit_part, d.ds.items, val_ranker), text=text)
    tasks = validation_tasks(d.fit_part, d.val_part, d.inter_full, d.val_cut,
                             country=val_ranker.signals.params.country, seed=seed)
    rankers = fit_on_validation(val_rec, tasks, seed=seed, ablations=ablations,
                                anonymous_share=anonymous_twins, progress=progress)
    progress("[ranker] top features by gain: " + ", ".join(
        f"{f} {g:.0%}" for f, g in importance(rankers["full"], 8)))
    del val_rec, val_ranker
    ranker = Ranker(*full_emb, full_signals())
    rec = Recommender.build(d.ds.items, ranker, item_features(d.train, d.ds.items, ranker),
                            rankers["full"], text=text)
    return rec, rankers


def _fit_signals_task(train: pd.DataFrame, inter: Interactions, blas_threads: int
                      ) -> RankingSignals:
    import scipy.linalg  # noqa: F401  (loads LAPACK's BLAS now: a library loaded later is not limited)
    from threadpoolctl import threadpool_limits

    from graph.signals import fit_signals

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return fit_signals(train, inter)


def signals_in_background(train: pd.DataFrame, inter: Interactions,
                          ) -> Callable[[], RankingSignals]:
    """Start :func:`graph.signals.fit_signals` as a Ray task (one CPU) and return what waits for
    its result; without Ray, what fits them when called.

    The task uses as many BLAS threads as this process: EASE's Cholesky inverse
    (``graph.signals.spd_inverse``) rounds differently with another thread count, and the
    signals must not depend on where they were fitted. The result is copied out of the object
    store (its arrays would be read-only there).
    """
    import copy

    import ray
    from threadpoolctl import threadpool_info

    from graph.signals import fit_signals

    if not ray.is_initialized():
        return lambda: fit_signals(train, inter)
    threads = max((int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"),
                  default=1)
    ref = ray.remote(num_cpus=1)(_fit_signals_task).remote(train, inter, threads)
    return lambda: copy.deepcopy(ray.get(ref))


def _plots(history: list[dict[str, Any]], metrics: dict[str, Any],
           progress: Progress) -> dict[str, bytes]:
    """The version's plots (:mod:`graph.plots`): the training curve, and the metrics chart when
    the run was evaluated. A plot that cannot be drawn is reported, never fatal."""
    from graph.plots import METRICS_CHART, TRAINING_CURVE, metrics_chart_png, training_curve_png

    out: dict[str, bytes] = {}
    try:
        if history:
            out[TRAINING_CURVE] = training_curve_png(history)
        if metrics:
            out[METRICS_CHART] = metrics_chart_png(metrics)
    except Exception as exc:  # a missing font or backend must not cost the trained model
        progress(f"[plots] not drawn: {exc}")
    return out


def published_to_compare(cfg: PipelineConfig, split_at: pd.Timestamp) -> str | None:
    """The version ``LATEST`` names, which ``--require-no-regression`` evaluates beside this
    run's model; None without the gate or before the first published version.

    Raises:
        ConfigError: the version's training events reach past this run's split (its split is
            later: its figures on this test window would include what it learned from), or its
            manifest does not say when its training events end.
    """
    from graph.artifacts import has_latest, latest_version, read_manifest

    if cfg.require_no_regression is None or not has_latest(cfg.output):
        return None
    version = latest_version(cfg.output)
    theirs = read_manifest(cfg.output, version).get("data", {}).get("split_at")
    if theirs is None:
        raise ConfigError(
            f"--require-no-regression compares with the published version {version} under "
            f"{cfg.output}, whose manifest does not say when its training events end; publish "
            "a version of this release first (train without the flag), or drop the flag",
            field="require_no_regression")
    if pd.Timestamp(theirs) > split_at:
        raise ConfigError(
            f"--require-no-regression compares with the published version {version}, trained "
            f"on events before {pd.Timestamp(theirs):%Y-%m-%d %H:%M}, after this run's split "
            f"({split_at:%Y-%m-%d %H:%M}): its figures on this test window would include what "
            "it was trained on. Split at or after its split (--split-at), or write to another "
            "--output", field="require_no_regression")
    return version


def latest_moved(root: str, compared_with: str | None) -> list[str]:
    """[] while ``LATEST`` under ``root`` still names ``compared_with`` (None: no ``LATEST``);
    otherwise one sentence for the publish gate: the run was compared with a version that is no
    longer the one serving (a rollback or another job published meanwhile), so its verdict does
    not hold for the version serving now."""
    from graph.artifacts import has_latest, latest_version

    now = latest_version(root) if has_latest(root) else None
    if now == compared_with:
        return []
    return [f"LATEST moved while this run trained, from {compared_with or 'nothing'} to {now}: "
            "the comparison was with the former; retrain to compare with the version serving now"]


def run_pipeline(
    cfg: PipelineConfig, progress: Progress = print, data: PreparedData | None = None
) -> PipelineResult:
    """Run the whole offline job. Ray must already be initialised (``train_job.py`` does it).

    Args:
        cfg: The run's configuration.
        progress: Called with one line per step (data, each epoch, ranker, evaluation, artifact).
        data: The output of :func:`prepare_data` for ``cfg`` if the caller ran it already.

    Returns:
        The published version, its metrics table and timings.
    """
    from graph.cold_items import COLD_KEY, MAX_BASKETS, evaluate_cold_items, format_cold_items
    from graph.evaluate import (
        PUBLISHED,
        evaluate,
        format_ablations,
        format_anonymous,
        format_candidates,
        format_contributions,
        format_segments,
        format_table,
        format_uncertainty,
        lead_shortfalls,
        regression_shortfalls,
    )
    from graph.parallel import ranking_pool
    from graph.search_eval import format_search
    from graph.train_loop import embed, fit, format_progress, resolve_workers
    from graph.validation import validation_sample

    t0 = time.perf_counter()
    d = data if data is not None else prepare_data(cfg, progress)
    timings: dict[str, float] = {"data_s": d.seconds}
    ds, split_at, val_cut = d.ds, d.split_at, d.val_cut
    train, test, inter_full = d.train, d.test, d.inter_full
    # Before any training: a comparison that cannot be made fails in seconds.
    compared_with = published_to_compare(cfg, split_at)

    t2 = time.perf_counter()
    # First: the GNN's layer 0 reads the items' text vectors (TrainConfig.text_input).
    text = ItemText.build(ds.items, progress=progress)
    timings["text_s"] = time.perf_counter() - t2
    progress(f"[text] {len(text.texts):,} distinct texts of {text.num_items:,} items embedded "
             f"with {text.model} in {timings['text_s']:.0f}s")

    t1 = time.perf_counter()
    # Each epoch's validation recall@20 of the embeddings: users who bought in the validation
    # window, which the GNN does not train on (graph.validation).
    val = validation_sample(d.fit_part, d.val_part, d.inter_fit, val_cut, seed=cfg.train.seed)
    share = own_title_share(ds.items)
    use_text = wants_text_input(cfg.train.text_input, share)
    progress(f"[train] item text vectors in the GNN's layer 0: {'yes' if use_text else 'no'} "
             f"(--text-input {cfg.train.text_input}; {share:.0%} of the items have a title of "
             "their own)")
    train_cfg = resolve_workers(cfg.train)
    progress(f"[train] Ray Train: {train_cfg.num_workers} worker(s) x "
             f"{train_cfg.cpus_per_worker} CPU(s){' + 1 GPU' if train_cfg.use_gpu else ''}, "
             f"{train_cfg.batch_size * train_cfg.num_workers:,} edges per step")
    result = fit(d.inter_fit, train_cfg, progress=lambda m: progress("[train] " + format_progress(m)),
                 validation=val, text=text if use_text else None)
    timings["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    rec, rankers = fit_recommender(
        d, (result.user_emb, result.item_emb), embed(result, inter_full), seed=cfg.train.seed,
        ablations=tuple(ABLATION_ROWS.values()) if cfg.ablations and not cfg.skip_eval else (),
        anonymous_twins=cfg.anonymous_twins, progress=progress, text=text)
    timings["ranker_s"] = time.perf_counter() - t2

    from graph.item_encoder import ItemEncoder

    assert result.model is not None  # fit() always returns its model
    encoder = ItemEncoder.from_gnn(result.model, inter_full, ds.items)
    metrics: dict[str, Any] = {}
    table = "(evaluation skipped)"
    if not cfg.skip_eval:
        t3 = time.perf_counter()
        with ranking_pool(rec, cfg.eval_workers) as pool:
            if pool is not None:
                progress(f"evaluate: requests and baselines ranked by {pool.size} Ray actors, one "
                         "CPU each (--eval-workers)")
            metrics = evaluate(
                train, test, inter_full, rec, split_at,
                ablations={row: rankers[name] for row, name in ABLATION_ROWS.items()
                           if name in rankers},
                seed=cfg.train.seed, max_users=cfg.eval_max_users,
                max_baskets=cfg.eval_max_baskets, progress=progress, pool=pool,
            )
        if compared_with is not None:
            metrics[PUBLISHED] = _evaluate_published(
                cfg, compared_with, d, rec.ranker.signals.params.country, progress)
        t4 = time.perf_counter()
        cold = evaluate_cold_items(rec, encoder, ds.items, train, test, seed=cfg.train.seed,
                                   max_baskets=cfg.eval_max_baskets or MAX_BASKETS,
                                   progress=progress)
        if cold:
            metrics[COLD_KEY] = cold
        progress(f"[cold items] evaluated in {time.perf_counter() - t4:.0f}s")
        main = format_table(metrics)
        if compared_with is not None:
            main += (f"\n{PUBLISHED} = version {compared_with} (LATEST when this run started) on "
                     "the same requests")
        table = "\n\n".join(t for t in (main, format_uncertainty(metrics),
                                          format_segments(metrics), format_anonymous(metrics),
                                          format_candidates(metrics),
                                          format_contributions(metrics),
                                          format_ablations(metrics), format_search(metrics),
                                          format_cold_items(metrics)) if t)
        timings["eval_s"] = time.perf_counter() - t3

    shortfalls = ([] if cfg.require_lead is None
                  else lead_shortfalls(metrics, cfg.require_lead))
    if cfg.require_no_regression is not None:
        shortfalls += regression_shortfalls(metrics, cfg.require_no_regression)
        shortfalls += latest_moved(cfg.output, compared_with)
    manifest = {
        "gate": {"require_lead": cfg.require_lead,
                 "require_no_regression": cfg.require_no_regression,
                 "compared_with": compared_with, "passed": not shortfalls,
                 "shortfalls": shortfalls},
        "data": {"name": ds.name, "fingerprint": ds.fingerprint(), "split_at": str(split_at),
                 "val_cut": str(val_cut), "num_events": len(ds.events),
                 # Counts only: a manifest never names a forgotten user.
                 "forgotten_users_excluded": ds.excluded_users,
                 "forgotten_events_excluded": ds.excluded_events},
        "config": cfg.model_dump(mode="json"),
        "training": {"seconds": round(timings["train_s"], 2), "epochs": len(result.history),
                     "history": result.history},
        "ranker": rankers["full"].info,
        "text": {"model": text.model, "texts": len(text.texts), "seconds": round(timings["text_s"], 2),
                 "gnn_input": use_text, "own_title_share": round(share, 4)},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "machine": machine_facts(),
    }
    version = write_artifact(
        cfg.output, user_ids=inter_full.user_ids, items=ds.items, user_emb=rec.ranker.user_emb,
        item_emb=rec.ranker.item_emb, signals=rec.ranker.signals, metrics=metrics,
        manifest=manifest,
        learned=rec.learned, item_static=rec.item_static, text=rec.text,
        item_encoder=encoder,
        extra_files=_plots(result.history, metrics, progress),
        set_latest=not shortfalls,
    )
    timings["total_s"] = time.perf_counter() - t0 + (d.seconds if data is not None else 0.0)
    if shortfalls:
        progress(f"[artifact] wrote version {version} under {cfg.output}; LATEST NOT moved: "
                 f"the publish gate is not met in {len(shortfalls)} task(s)")
    else:
        progress(f"[artifact] published version {version} under {cfg.output} (LATEST updated)")
    return PipelineResult(version=version, output=cfg.output, metrics=metrics, table=table,
                          history=result.history, timings=timings, shortfalls=shortfalls)


def _evaluate_published(cfg: PipelineConfig, version: str, d: PreparedData, country: str,
                        progress: Progress) -> dict[str, dict[str, float]]:
    """The published ``version`` on this run's tasks (:func:`graph.evaluate.evaluate_version`),
    ranked on its own pool of actors once this run's pool is closed."""
    from actors.loaded_model import LoadedModel
    from graph.artifacts import read_artifact
    from graph.evaluate import IndexMap, evaluate_version
    from graph.parallel import ranking_pool

    t = time.perf_counter()
    art = read_artifact(cfg.output, version)
    old = LoadedModel.build(art).rec
    index = IndexMap.between(d.inter_full.user_ids, d.inter_full.item_ids, art.user_ids,
                             art.items[S.ITEM_COL].to_numpy())
    known = float((index.users >= 0).mean()) if len(index.users) else 0.0
    progress(f"evaluate: the published version {version} (LATEST when this run started) on "
             f"the same tasks; it knows {known:.0%} of this run's shoppers and "
             f"{float((index.items >= 0).mean()):.0%} of its items; loaded in "
             f"{time.perf_counter() - t:.0f}s")
    with ranking_pool(old, cfg.eval_workers) as pool:
        return evaluate_version(
            old, index, d.train, d.test, d.inter_full, d.split_at,
            country=country, seed=cfg.train.seed,
            max_users=cfg.eval_max_users, max_baskets=cfg.eval_max_baskets, progress=progress,
            pool=pool)
