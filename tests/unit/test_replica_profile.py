"""bench/replica_profile.py: how a py-spy sample is classed (innermost frame that has a class)."""

from __future__ import annotations

import pytest

from bench.replica_profile import classify, summarize

pytestmark = pytest.mark.unit

THREAD = "Thread.run (threading.py:982);0x7f08b46a71f5 (libc.so.6)"
RANKER = ("Replica.handle_request (ray/serve/_private/replica.py:10);"
          "RankerService.recommend (actors/ranker.py:400);build_features (graph/features.py:20)")
INGRESS = "FastAPI.__call__ (fastapi/applications.py:1);Ingress.recommend (serve_app.py:566)"


def test_numpy_under_the_ranking_is_ours_and_serve_above_it_does_not_count() -> None:
    assert classify([*RANKER.split(";"), "argpartition (numpy/_core/fromnumeric.py:9)"]) \
        == "user code"
    assert classify([*RANKER.split(";")[:1], "dumps (ray/cloudpickle/cloudpickle.py:1)"]) \
        == "Serve / HTTP (Python)"


def test_a_ray_actor_call_made_by_our_code_is_ray() -> None:
    frames = [*INGRESS.split(";"), "ActorMethod.remote (ray/actor.py:1)",
              "ray::core::CoreWorker::SubmitActorTask (ray/_raylet.so)", "0x7f (libc.so.6)"]
    assert classify(frames) == "Ray core worker"
    assert classify([*INGRESS.split(";")[:1], "UnaryUnaryCall._invoke (grpc/aio/_call.py:1)"]) \
        == "gRPC (native)"
    assert classify(THREAD.split(";")) == "other"


def test_summarize_leaves_waiting_threads_out_of_the_shares() -> None:
    raw = "\n".join([
        f"{RANKER} 6",
        f"{RANKER};IndexIVF.search (faiss/swigfaiss.py:1) 2",
        "Replica.handle_request (ray/serve/_private/replica.py:10) 2",
        f"{THREAD};epoll_wait (libc.so.6) 50",
        "Thread.run (threading.py:982);Event.wait (threading.py:1);Condition.wait "
        "(threading.py:2);lock_PyThread_acquire_lock (libpython3.11.so.1.0);"
        "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7f08b46a3f16 (libc.so.6) 40",
        "",
    ])
    out = summarize(raw)
    assert (out["samples"], out["waiting"], out["active"]) == (100, 90, 10)
    share = out["share"]
    assert isinstance(share, dict)
    assert share["user code"] == pytest.approx(0.8)
    assert share["Serve / HTTP (Python)"] == pytest.approx(0.2)
    assert sum(share.values()) == pytest.approx(1.0)
