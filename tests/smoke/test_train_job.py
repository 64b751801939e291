"""``python train_job.py`` end to end on a small slice of the real (built-in) data.

One training run for the module (300 seeded users, 3 epochs, seed 0; deterministic on the CPU),
then checks in the Microsoft Recommenders smoke-test style: the command exits 0, prints the
evaluation table and the published version, writes a complete artifact that ``LATEST`` names,
and its metrics clear fixed bounds (``recall@20 >= x``) measured on this same configuration with
a safety margin. The same command again, with publish gates no model passes, must leave
``LATEST`` alone and write the same model bit for bit. Bad input exits non-zero with a message a
person can act on.

Every run passes ``--address local``: without it ``train_job.py`` joins any Ray cluster it finds on
the machine (``ray.init(address="auto")``), e.g. this pytest session's integration cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from graph import schema as S

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_TIMEOUT_S = 600
MAX_USERS, EPOCHS, SEED = 300, 3, 0

# Measured with MAX_USERS, EPOCHS and SEED above on 2 shared CPUs (LightGBM ranker, 2026-11-29):
# intentrec recall@20 next_basket_all 0.1234, in_session 0.1931, in_session_blind 0.1680
# (buy_again 0.1198 / 0.1722 / 0.1722; itemknn 0.0874 / 0.1492 / 0.1291); with --text-input on
# (2026-11-30) 0.1276 and 0.2024. Bounds are ~80% of the lower values.
BOUNDS = {
    ("intentrec", "next_basket_all", "recall@20"): 0.10,
    ("intentrec", "in_session", "recall@20"): 0.155,
}
# intentrec with the session signal must beat itself without it: measured +0.0251 recall@20,
# under half of it required.
SESSION_GAIN_MIN = 0.01


def _train_job(*args: str, timeout: float = TRAIN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train_job.py", "--address", "local", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    output: Path
    seconds: float

    @property
    def log(self) -> str:
        return f"--- stdout\n{self.proc.stdout[-6000:]}\n--- stderr\n{self.proc.stderr[-6000:]}"


# --text-input on: the built-in titles are only category paths, so the default (auto) leaves the
# text out of the GNN; the other smoke runs (job submit, demo, batch) cover the default.
RUN_ARGS = ("--max-users", str(MAX_USERS), "--epochs", str(EPOCHS), "--seed", str(SEED),
            "--text-input", "on")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("train_job")
    t0 = time.monotonic()
    proc = _train_job(*RUN_ARGS, "--output", str(tmp / "artifacts"), "--storage", str(tmp / "ckpt"))
    result = Run(proc, tmp / "artifacts", time.monotonic() - t0)
    print(f"train_job.py: {result.seconds:.0f}s")
    return result


@dataclass
class GatedRerun:
    """The module run's command again, into the same output folder, with publish gates that no
    model passes."""

    proc: subprocess.CompletedProcess[str]
    latest_before: str  # the version LATEST named before it (the module run's)
    versions_before: set[str]

    @property
    def log(self) -> str:
        return f"--- stdout\n{self.proc.stdout[-4000:]}\n--- stderr\n{self.proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def gated_rerun(run: Run) -> GatedRerun:
    assert run.proc.returncode == 0, run.log
    before = (run.output / "LATEST").read_text().strip()
    versions = {p.name for p in run.output.iterdir() if p.is_dir()}
    # Its own checkpoint folder: the same folder would resume the module run's last epoch.
    proc = _train_job(*RUN_ARGS, "--output", str(run.output),
                      "--storage", str(run.output.parent / "ckpt_gate"),
                      "--require-lead", "1.0", "--require-no-regression", "1.0")  # fmt: skip
    return GatedRerun(proc, before, versions)


@pytest.fixture(scope="module")
def metrics(run: Run) -> dict:
    assert run.proc.returncode == 0, run.log
    version = (run.output / "LATEST").read_text().strip()
    return json.loads((run.output / version / "metrics.json").read_text())


def test_exits_0_prints_the_table_and_publishes_latest(run: Run) -> None:
    assert run.proc.returncode == 0, run.log
    out = run.proc.stdout
    lines = out.splitlines()
    # The table: one header naming every task, one row per model, intentrec last.
    header = next((ln for ln in lines if "next_basket_all (n=" in ln), None)
    assert header is not None, run.log
    for task in S.TASKS:
        assert f"{task} (n=" in header, f"{task} missing from the table header:\n{header}"
    # The main table ends at the first blank line; the tables after it have rows of their own
    # with the same names (the shoppers withheld, the search task).
    start = lines.index(header)
    stop = next((i for i, ln in enumerate(lines) if i > start and not ln.strip()), len(lines))
    end = next((i for i, ln in enumerate(lines) if i > start and ln.startswith("search (")),
               len(lines))
    rows = [ln.split("|")[0].strip() for ln in lines[start:stop]
            if ln.split("|")[0].strip() in S.MODEL_NAMES]
    assert rows == [m for m in S.MODEL_NAMES if m != "intentrec"] + ["intentrec"], rows
    # By shopper history: a row per task and segment; and the in-session baskets again without
    # their shopper, every model.
    assert any(ln.startswith("by shopper history (recall@20") for ln in lines), run.log
    for task in S.TASKS:
        assert any(ln.startswith(task) and "| light (1-" in ln for ln in lines), (task, run.log)
    anon = next(i for i, ln in enumerate(lines) if ln.startswith("without a known shopper"))
    anon_rows = [ln.split("|")[0].strip() for ln in lines[anon:end]
                 if ln.split("|")[0].strip() in S.MODEL_NAMES]
    assert anon_rows == rows, lines[anon:end]
    assert "anonymous_session (n=" in lines[anon + 1] and "cold_start (n=" in lines[anon + 1]
    # The search task's table: every comparison, intentrec included.
    search = "\n".join(lines[end:])
    for name in ("popularity_in_category", "lexical", "semantic", "intentrec"):
        assert any(ln.split("|")[0].strip() == name for ln in lines[end:]), search[:2000]

    version = (run.output / "LATEST").read_text().strip()
    assert f"model version {version} published under {run.output}" in out, run.log
    vdir = run.output / version
    assert (vdir / "_COMPLETE").is_file()
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["version"] == version
    assert manifest["training"]["epochs"] == EPOCHS
    assert manifest["config"]["max_users"] == MAX_USERS
    # The machine it was trained on: runs on different CPUs may round differently.
    machine = manifest["machine"]
    assert machine["cpu"] and machine["logical_cpus"] >= 1, machine
    assert machine["packages"]["torch"].startswith("2.13.0"), machine
    assert machine["packages"]["lightgbm"] and machine["packages"]["faiss-cpu"], machine


def test_metrics_clear_the_smoke_bounds(metrics: dict) -> None:
    assert set(S.MODEL_NAMES) <= set(metrics), sorted(metrics)
    # The segments split every task's requests; the withheld-shopper tasks have every model.
    for task in S.TASKS:
        cells = metrics["segments"]["recall@20"][task]
        assert sum(c["n"] for c in cells.values()) == metrics["intentrec"][task]["n"], task
    assert set(metrics["anonymous"]) == set(S.MODEL_NAMES)
    got = {key: metrics[key[0]][key[1]][key[2]] for key in BOUNDS}
    print(json.dumps({"/".join(k): round(v, 4) for k, v in got.items()}))
    for key, bound in BOUNDS.items():
        assert got[key] >= bound, f"{'/'.join(key)} = {got[key]:.4f} < {bound}"


def test_the_session_signal_helps(metrics: dict) -> None:
    on = metrics["intentrec"]["in_session"]["recall@20"]
    off = metrics["intentrec"]["in_session_blind"]["recall@20"]
    assert on - off >= SESSION_GAIN_MIN, f"in_session {on:.4f} vs in_session_blind {off:.4f}"


def test_publish_gate_writes_the_version_but_keeps_latest(run: Run, metrics: dict,
                                                         gated_rerun: GatedRerun) -> None:
    """``--require-lead`` with a lead no model reaches: the new version is written and complete,
    ``LATEST`` still names the module run's version, and the job exits 3 naming every task.

    With ``--require-no-regression`` the published version (the module run's) is evaluated on
    this run's requests: the same users and split, so the same requests as its own evaluation,
    whatever this run trains; its row must equal the one it wrote then."""
    proc, before, versions = gated_rerun.proc, gated_rerun.latest_before, gated_rerun.versions_before
    log = gated_rerun.log
    assert proc.returncode == 3, log
    # The job's own stderr has no traceback (Ray's processes may log theirs, each line prefixed
    # with the process, e.g. "(PlacementGroupCleaner pid=...) Traceback ...").
    assert not any(line.startswith("Traceback") for line in proc.stderr.splitlines()), log
    assert (run.output / "LATEST").read_text().strip() == before
    new = {p.name for p in run.output.iterdir() if p.is_dir()} - versions
    assert len(new) == 1, (new, log)
    version = new.pop()
    assert (run.output / version / "_COMPLETE").is_file()
    gate = json.loads((run.output / version / "manifest.json").read_text())["gate"]
    assert gate["require_lead"] == 1.0 and gate["passed"] is False
    assert [g.split(":")[0] for g in gate["shortfalls"]] == list(S.TASKS)
    assert gate["require_no_regression"] == 1.0 and gate["compared_with"] == before
    assert f"model version {version} written under {run.output} but NOT published" in proc.stderr
    assert "--require-lead 1.0 --require-no-regression 1.0" in proc.stderr, log
    published = json.loads((run.output / version / "metrics.json").read_text())["published"]
    assert sorted(published) == sorted(S.TASKS)  # metrics.json is written with sorted keys
    for task in S.TASKS:
        for x in (*S.METRICS, "n"):
            assert published[task][x] == pytest.approx(metrics["intentrec"][task][x], abs=1e-12), \
                (task, x, log)
    assert any(line.startswith("published  |") for line in proc.stdout.splitlines()), log
    assert f"published = version {before} (LATEST when this run started)" in proc.stdout, log
    for task in S.TASKS:
        assert f"  - {task}: intentrec recall@20 " in proc.stderr, log
    assert f'{{"version": "{version}"}}' in proc.stderr, log
    # The run the module fixture made had no gate, and says so in its manifest.
    manifest = json.loads((run.output / before / "manifest.json").read_text())
    assert manifest["gate"] == {"require_lead": None, "require_no_regression": None,
                                "compared_with": None, "passed": True, "shortfalls": []}


def test_events_file_missing_a_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    events, items = tmp_path / "events.csv", tmp_path / "items.csv"
    items.write_text("item_id,title,category\nA,Apples,PRODUCE > FRUIT\nB,Bread,GROCERY > BREAD\n")
    # No ts column.
    events.write_text("user_id,item_id,event\nu1,A,purchase\nu1,B,view\nu2,B,purchase\n")
    proc = _train_job("--events", str(events), "--items", str(items), timeout=180)
    assert proc.returncode != 0, proc.stdout[-3000:]
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert str(events) in err and "'ts'" in err, err[-3000:]
    assert "[ray]" not in proc.stdout, "bad input must fail before Ray is started"


def test_split_after_the_data_names_the_fix() -> None:
    proc = _train_job("--max-users", "120", "--split-at", "2030-01-01", timeout=180)
    assert proc.returncode != 0, proc.stdout[-3000:]
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    assert "2030-01-01" in err and "--split-at" in err, err[-3000:]
    assert "[ray]" not in proc.stdout, "bad input must fail before Ray is started"


def test_the_same_command_on_the_same_data_trains_the_same_model(run: Run,
                                                                gated_rerun: GatedRerun) -> None:
    """Reproducible training: the gated rerun is the module run's command (same data, settings
    and seed; other checkpoint folder), so its version must hold the same model, bit for bit:
    embeddings, signals, ranker, item features, text vectors and item encoder, the evaluation's
    rows and the training history's losses. Only what names or times the run may differ (the
    version, its creation time, durations, the paths and the gate)."""
    import numpy as np

    assert gated_rerun.proc.returncode == 3, gated_rerun.log
    (second,) = {p.name for p in run.output.iterdir() if p.is_dir()} - gated_rerun.versions_before
    a, b = run.output / gated_rerun.latest_before, run.output / second
    varying = {"manifest.json", "metrics.json"}  # compared field by field below
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert {"user_emb.npy", "item_emb.npy", "ranker/model.txt", "ranker/item_features.npy",
            "ranker/feature_profile.json", "signals/signals.npz"} <= set(files), files
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    differ = [f for f in files if f not in varying and (a / f).read_bytes() != (b / f).read_bytes()]
    if differ:  # say by how much, for the arrays
        arrays = {f: (np.load(a / f), np.load(b / f)) for f in differ if f.endswith(".npy")}
        detail = {f: float(np.abs(x - y).max()) if x.shape == y.shape else f"{x.shape} {y.shape}"
                  for f, (x, y) in arrays.items()}
        raise AssertionError(f"the same command trained another model: {differ} differ {detail}")
    first_metrics, second_metrics = (json.loads((v / "metrics.json").read_text()) for v in (a, b))
    for model in S.MODEL_NAMES:
        assert first_metrics[model] == second_metrics[model], model
    first_manifest, second_manifest = (json.loads((v / "manifest.json").read_text())
                                       for v in (a, b))
    assert first_manifest["machine"] == second_manifest["machine"]
    first_training, second_training = first_manifest["training"], second_manifest["training"]
    assert [(h["epoch"], h["loss"], h["val_recall@20"]) for h in first_training["history"]] == [
        (h["epoch"], h["loss"], h["val_recall@20"]) for h in second_training["history"]]


def test_text_input_on_trains_through_ray_and_the_encoder_matches_the_export(run: Run) -> None:
    """``--text-input on``: Ray Train workers train the text projection, the version's item
    encoder carries it, and the cold-item check finds the encoder's vectors equal to what the
    model gives items without edges."""
    import numpy as np

    from graph.artifacts import read_artifact

    assert run.proc.returncode == 0, run.log
    assert "item text vectors in the GNN's layer 0: yes (--text-input on; 0% of the items" in (
        run.proc.stdout), run.log
    art = read_artifact(str(run.output))
    assert art.manifest["text"]["gnn_input"] is True
    enc = art.item_encoder
    assert enc is not None and enc.text_projection is not None
    assert enc.text_projection.shape == (art.text.vectors.shape[1], art.item_emb.shape[1])
    assert np.abs(enc.text_projection).sum() > 0
    cold = art.metrics["cold_items"]["info"]  # the slice has items first sold after the split
    assert cold["encoder_max_abs_diff"] < 1e-4, cold
