"""One storage root for every piece of state (graph/storage.py): relative locations go under the
cluster's shared storage when there is one, and stay in the working directory otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from graph import storage

S3 = "s3://bucket/intentrec?endpoint_override=127.0.0.1:9000&scheme=http"


def test_join_keeps_a_uris_options() -> None:
    assert storage.join(S3, "state", "sessions") == (
        "s3://bucket/intentrec/state/sessions?endpoint_override=127.0.0.1:9000&scheme=http")
    assert storage.join("gs://b/p/", "/artifacts") == "gs://b/p/artifacts"
    assert storage.join("/srv/state", "forgotten_users.txt") == "/srv/state/forgotten_users.txt"


def test_place_puts_relative_locations_under_the_root(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.place("artifacts", None) == str(tmp_path / "artifacts")  # single machine
    assert storage.place("artifacts", "s3://b/root") == "s3://b/root/artifacts"
    assert storage.place("/abs/models", "s3://b/root") == "/abs/models"  # given: kept
    assert storage.place("gs://other/models", "s3://b/root") == "gs://other/models"
    assert storage.place("state", "shared") == str(tmp_path / "shared" / "state")


def test_the_app_places_all_its_state_under_one_root(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import serve_app

    monkeypatch.chdir(tmp_path)
    local = serve_app.AppArgs().resolved(environ={})
    assert local.artifacts_root == str(tmp_path / "artifacts") and local.storage == ""
    assert local.session.wal_uri == str(tmp_path / "state" / "sessions")
    on_cluster = serve_app.AppArgs().resolved(environ={storage.STORAGE_ENV: "s3://b/intentrec"})
    assert on_cluster.artifacts_root == "s3://b/intentrec/artifacts"
    assert on_cluster.state_dir == "s3://b/intentrec/state"
    assert on_cluster.session.wal_uri == "s3://b/intentrec/state/sessions"
    assert on_cluster.tombstones_path == "s3://b/intentrec/state/forgotten_users.txt"
    explicit = serve_app.AppArgs(storage=S3).resolved(environ={})
    assert explicit.artifacts_root == storage.join(S3, "artifacts")
    # Resolving again (the ingress replica re-validates the resolved args) changes nothing.
    assert explicit.resolved(environ={}) == explicit


def test_train_job_writes_under_the_cluster_storage(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import train_job

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(storage.STORAGE_ENV, str(tmp_path / "shared"))
    args = train_job.build_parser().parse_args([])
    cfg = train_job.config_from_args(args)
    assert cfg.output == str(tmp_path / "shared" / "artifacts")
    assert cfg.train.storage_path == str(tmp_path / "shared" / "checkpoints")
    assert cfg.forgotten is None  # nobody forgotten yet
    forgotten = tmp_path / "shared" / "state" / "forgotten_users.txt"
    forgotten.parent.mkdir(parents=True)
    forgotten.write_text('"u1"\n')
    assert train_job.config_from_args(args).forgotten == str(forgotten)


def test_cluster_yaml_gives_every_node_one_shared_storage_uri() -> None:
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    uris = set()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        cmds = doc[key]
        written = [c for c in cmds if "intentrec-storage.env" in c and c.startswith("echo")]
        assert len(written) == 1, key
        uris.add(written[0].split(f"{storage.STORAGE_ENV}=")[1].split('"')[0])
        start = next(i for i, c in enumerate(cmds) if "ray start" in c)
        assert cmds.index(written[0]) < start
        assert ". ~/intentrec-storage.env" in cmds[start]  # exported into ray start's env
    (uri,) = uris  # the same single location on every node
    assert storage.is_uri(uri) and not storage.is_local(uri)
