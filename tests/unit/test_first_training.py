"""First boot: the first training job is submitted once, and only while no model exists
(scripts/first_training.py, run by cluster.yaml after `serve deploy`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from graph import storage

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "first_training.py"


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("first_training", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class JobsOnADashboard:
    """The two JobSubmissionClient calls the script makes, over an in-memory job table."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}
        self.entrypoints: list[str] = []

    def get_job_status(self, job_id: str) -> str:
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return self.jobs[job_id]

    def submit_job(self, *, entrypoint: str, submission_id: str) -> str:
        if submission_id in self.jobs:
            raise RuntimeError(f"job {submission_id} already exists")
        self.jobs[submission_id] = "PENDING"
        self.entrypoints.append(entrypoint)
        return submission_id


def test_submitted_once_on_an_empty_bucket_and_never_after_a_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from graph.artifacts import LATEST

    script = _script()
    monkeypatch.setenv(storage.STORAGE_ENV, str(tmp_path / "bucket"))
    jobs = JobsOnADashboard()
    assert script.main(["--", "--gpus", "--epochs", "3"], client=jobs) == "submit"
    (entry,) = jobs.entrypoints
    assert f"--output {tmp_path / 'bucket' / 'artifacts'}" in entry and entry.endswith("--gpus --epochs 3")
    # A second `ray up` while it runs: not submitted again.
    jobs.jobs[script.SUBMISSION_ID] = "RUNNING"
    assert script.main([], client=jobs) == "already submitted (RUNNING)"
    # Once a model is published, nothing is submitted, whatever happened to the job.
    (tmp_path / "bucket" / "artifacts").mkdir(parents=True)
    (tmp_path / "bucket" / "artifacts" / LATEST).write_text("v1\n")
    assert script.main([], client=JobsOnADashboard()) == "model exists"
    assert len(jobs.entrypoints) == 1
