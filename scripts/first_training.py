"""Submit the first training job when the cluster's storage holds no model yet (first boot).

``cluster.yaml`` runs it on the head right after ``serve deploy``::

    python ~/intentrec/scripts/first_training.py -- <train_job.py arguments>

The serving app answers from the first second (the cold-start answer, ``model_version`` saying
so) and its ranker picks up the model this job publishes. It is safe to run on every ``ray up``:
nothing is submitted once ``LATEST`` exists, and the fixed submission id means a job submitted by
an earlier ``ray up`` (running, or failed: look at it with ``ray job logs intentrec-first-training``)
is never submitted twice.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUBMISSION_ID = "intentrec-first-training"


def decide(has_model: bool, existing_job: str | None) -> str:
    """``"submit"``, or why not: ``"model exists"`` or ``"already submitted (<status>)"``."""
    if has_model:
        return "model exists"
    if existing_job is not None:
        return f"already submitted ({existing_job})"
    return "submit"


def _job_status(client: Any, submission_id: str) -> str | None:
    try:
        return str(client.get_job_status(submission_id))
    except Exception:  # no such job (the client raises RuntimeError with the HTTP 404)
        return None


def main(argv: list[str] | None = None, client: Any = None) -> str:
    """Submit the first training job if needed; returns what was decided."""
    from graph.artifacts import has_latest
    from graph.storage import place, shared_root

    p = argparse.ArgumentParser(prog="scripts/first_training.py", description=__doc__.split("\n")[0])
    p.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard address")
    p.add_argument("--artifacts", default="artifacts",
                   help="artifact root the app reads (relative: under INTENTREC_STORAGE)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: arguments for train_job.py")
    args = p.parse_args(argv)
    artifacts = place(args.artifacts, shared_root())
    train_args = [a for a in args.train_args if a != "--"]
    if client is None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(args.address)
    decision = decide(has_latest(artifacts), _job_status(client, SUBMISSION_ID))
    if decision == "submit":
        entrypoint = shlex.join([sys.executable, str(REPO / "train_job.py"),
                                 "--output", artifacts, *train_args])
        client.submit_job(entrypoint=entrypoint, submission_id=SUBMISSION_ID)
        print(f"submitted {SUBMISSION_ID}: {entrypoint} (follow: ray job logs -f {SUBMISSION_ID})")
    else:
        print(f"first training not submitted: {decision}")
    return decision


if __name__ == "__main__":
    main()
