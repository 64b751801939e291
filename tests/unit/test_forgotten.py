"""Forgotten users in retraining: the file the serving app writes is what ``train_job.py`` reads,
and every event of those users is gone before anything is fitted (no Ray: the data stage)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from actors.tombstones import Tombstones
from graph import schema as S
from graph.errors import DataError
from graph.forgotten import FORGOTTEN_FILE, read_forgotten
from graph.pipeline import PipelineConfig, prepare_data


def test_training_reads_what_serving_writes(tmp_path: Path) -> None:
    path = tmp_path / FORGOTTEN_FILE
    path.write_text("old-plain-id\n")  # the earlier format: one raw id per line
    Tombstones(str(path)).add("a\nb")
    Tombstones(str(path)).add("shop/42")
    expected = {"old-plain-id", "a\nb", "shop/42"}
    assert read_forgotten(str(path)) == expected
    assert read_forgotten(path.as_uri()) == expected  # a URI goes through pyarrow.fs
    with pytest.raises(DataError, match=r"missing\.txt does not exist") as info:
        read_forgotten(str(tmp_path / "missing.txt"))
    assert info.value.field == "forgotten"


def test_a_forgotten_user_is_left_out_of_the_builtin_data(tmp_path: Path) -> None:
    """The same seeded sample minus exactly the forgotten user: events, graph, counts."""
    cfg = PipelineConfig(max_users=40)
    before = prepare_data(cfg, progress=lambda _line: None)
    user = str(before.inter_full.user_ids[3])
    theirs = int((before.ds.events[S.USER_COL] == user).sum())
    assert theirs > 0
    path = tmp_path / FORGOTTEN_FILE
    Tombstones(str(path)).add(user)
    Tombstones(str(path)).add("a-user-not-in-this-sample")

    lines: list[str] = []
    after = prepare_data(cfg.model_copy(update={"forgotten": str(path)}), progress=lines.append)
    assert user not in set(after.ds.events[S.USER_COL])
    for part in (after.train, after.test, after.fit_part, after.val_part):
        assert user not in set(part[S.USER_COL])
    assert set(after.inter_full.user_ids) == set(before.inter_full.user_ids) - {user}
    assert after.inter_full.num_users == before.inter_full.num_users - 1
    assert (after.ds.excluded_users, after.ds.excluded_events) == (1, theirs)
    assert len(after.ds.events) == len(before.ds.events) - theirs
    assert any(f"[forget] excluded 1 forgotten user(s) with {theirs} events (2 listed in {path})"
               in line for line in lines), lines


def test_files_forgotten_user_leaves_no_trace_in_the_split_and_the_sample_stays(
    tmp_path: Path,
) -> None:
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "category": ["X > Y", "X > Z", "W > V"]})
    days = pd.to_datetime("2024-01-01") + pd.to_timedelta(range(30), unit="D")
    rows = [(u, it, ts) for k, ts in enumerate(days) for u, it in
            (("u1", "a"), ("u2", "b"), ("u3", "c"), ("u4", "a" if k % 2 else "b"))]
    # The forgotten user's own events stretch the time span: the default split must not keep it.
    rows += [("gone", "c", pd.Timestamp("2024-01-31")), ("gone", "a", pd.Timestamp("2024-01-20"))]
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(event="purchase")
    ev.to_parquet(tmp_path / "events.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    path = tmp_path / FORGOTTEN_FILE
    Tombstones(str(path)).add("gone")
    base = PipelineConfig(events=str(tmp_path / "events.parquet"),
                          items=str(tmp_path / "items.parquet"), val_days=5, max_users=10)

    with_user = prepare_data(base, progress=lambda _line: None)
    without = prepare_data(base.model_copy(update={"forgotten": str(path)}),
                           progress=lambda _line: None)
    assert "gone" in set(with_user.ds.events[S.USER_COL])
    assert "gone" not in set(without.ds.events[S.USER_COL])
    kept = ev[ev["user_id"] != "gone"]["ts"]
    assert without.split_at == kept.min() + (kept.max() - kept.min()) * 0.9
    assert without.split_at < with_user.split_at
    # A sample smaller than the data: the same users, minus the forgotten one.
    small = base.model_copy(update={"max_users": 3})
    sample = set(prepare_data(small, progress=lambda _line: None).ds.events[S.USER_COL])
    sample_after = set(prepare_data(small.model_copy(update={"forgotten": str(path)}),
                                    progress=lambda _line: None).ds.events[S.USER_COL])
    assert sample_after == sample - {"gone"}


def test_train_job_reads_the_serving_default_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import train_job

    monkeypatch.chdir(tmp_path)
    args = train_job.build_parser().parse_args([])
    assert train_job.config_from_args(args).forgotten is None
    Tombstones(str(tmp_path / "state" / FORGOTTEN_FILE)).add("someone")  # as `serve run` here
    assert train_job.config_from_args(args).forgotten == str(tmp_path / "state" / FORGOTTEN_FILE)
    given = train_job.build_parser().parse_args(["--forgotten", "s3://bucket/state/f.txt"])
    assert train_job.config_from_args(given).forgotten == "s3://bucket/state/f.txt"

    # A file named explicitly must exist: the job stops before any data is read.
    assert train_job.main(["--forgotten", "nope.txt"]) == 1
    err = capsys.readouterr().err
    assert "nope.txt does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        train_job.build_parser().parse_args(["--help"])
    assert "state/forgotten_users.txt" in capsys.readouterr().out.replace("\n", " ").replace(
        "  ", " ")
