"""`ray up` / `ray down` for real: Ray's `local` provider over SSH to this machine, deploying
intentrec itself (serve_config.yaml) on an empty storage folder.

The cluster launcher is driven exactly as a user drives it: `ray up -y deploy/local_cluster.yaml`
SSHes to the head (127.0.0.1), rsyncs the project there (file_mounts), installs it
(setup_commands), runs `ray stop`, starts Ray, deploys the app and submits the first training job
(head_start_ray_commands). The test then checks the first boot as issue 11 asks: the endpoint
answers 200 with the cold-start answer before any model exists, the first training job's model
is picked up with zero failed requests while the test polls recommendations throughout, every
ranker replica (two) then serves that version, and a known shopper gets items from it. Then
`ray status` and `ray down -y`. It runs from a clean copy of the checkout, and changes three
things in the shipped cluster file: a small head (`--num-cpus=3`, logical CPUs: serving takes
1.35 with two rankers, the training worker 1), `pip install --no-build-isolation` (no network in
the namespace), and a small training slice for the first job (TRAIN_ARGS); and one in the
copy's `serve_config.yaml`: the ranker starts with two replicas (`min_replicas: 2`). The API
keys are written to the throwaway HOME's ~/intentrec.env, where the start commands read them, as
docs/DEPLOY.md tells an operator to.

`ray stop` kills every Ray process it can see, so everything runs inside fresh PID, network and
mount namespaces (``unshare --pid --net --mount --fork --mount-proc``), where the test process's
own Ray cluster and everyone else's are out of sight. Inside, only the namespace's view changes:
- loopback is brought up (a new network namespace starts with it down), so ports 22/6379/8000/
  8265 are free and private;
- a tmpfs over /tmp (Ray's /tmp/ray, SSH control sockets, config caches) and over /run (sshd's
  privilege-separation dir);
- a copy of /etc/passwd bind-mounted over it that gives root a throwaway HOME (not a mount over
  /root, which may hold the Python interpreter itself, e.g. pyenv): sshd reads authorized_keys
  there, and `ray up` writes ~/ray_bootstrap_config.yaml, ~/ray_bootstrap_key.pem and the
  synced project there;
- an overlay over the virtualenv, so `pip install -e ~/intentrec` from setup_commands lands in a
  throwaway upper layer, not in the shared venv.
When the namespace's first process exits the kernel kills everything left in it.

This file is both the test and (``python -m tests.integration.test_ray_up_local --inside DIR``)
the program that runs as PID 1 inside the namespace.

Needs root, util-linux `unshare`, iproute2 `ip`, `rsync`, and the OpenSSH server and client
(Debian: ``apt-get install -y openssh-server openssh-client rsync iproute2``); skips otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import wait_for_condition

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER_YAML = REPO_ROOT / "deploy" / "local_cluster.yaml"
SSHD = Path("/usr/sbin/sshd")
VENV = Path(sys.prefix)
RAY_CLI = Path(sys.executable).with_name("ray")

SERVE_DEPLOY_CMD = "serve deploy ~/intentrec/serve_config.yaml"
APP = "intentrec"  # the application's name in serve_config.yaml
RANKER = "GNNRanker"
RANKER_REPLICAS = 2
# How long the ranker replicas may take to all serve the first model once one does (each one
# follows LATEST on its own, reload_poll_s: 30 in serve_config.yaml).
ALL_REPLICAS_TIMEOUT_S = 120
FIRST_TRAINING_CMD = "scripts/first_training.py --"
# The first training job's slice: the point is the first-boot path, not model quality.
TRAIN_ARGS = ["--max-users", "50", "--epochs", "1", "--workers", "1", "--skip-eval"]
FIRST_TRAINING_JOB = "intentrec-first-training"
NAMESPACE_TIMEOUT_S = 840
# How long the first model may take from `ray up`'s end until it is served (training, then the
# ranker's LATEST poll, reload_poll_s: 30 in serve_config.yaml).
PICKUP_TIMEOUT_S = 480
HTTP = "http://127.0.0.1:8000"
NO_MODEL = "none (cold start: no model trained yet)"  # actors.ranker.NO_MODEL (no Ray import here)
CLIENT_KEY = "ray-up-client-key-0123456789abcdef"
ADMIN_KEY = "ray-up-admin-key-0123456789abcdef"
# A household id of the built-in data, asked for throughout; whether the 50-user slice knows it
# or not, every answer must be a 200.
POLL_USER = "1"

pytestmark = pytest.mark.timeout(NAMESPACE_TIMEOUT_S + 120)


# --------------------------------------------------------------------------- outside: pytest
def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "needs root: unshare of PID/network/mount namespaces and sshd logging in as root"
    for tool, package in (
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
        ("rsync", "rsync"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
    ):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: apt-get install -y {package}"
    if not SSHD.exists():
        return f"{SSHD} not found: apt-get install -y openssh-server"
    shadow = Path("/etc/shadow")
    root_entry = next(
        (ln for ln in shadow.read_text().splitlines() if ln.startswith("root:")) if shadow.exists() else (),
        "root:",
    )
    if root_entry.split(":")[1].startswith("!"):
        return "root's account is locked ('!' in /etc/shadow): sshd (UsePAM no) refuses its key logins"
    probe = subprocess.run(
        ["unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create PID/network/mount namespaces here: {probe.stderr.strip()}"
    return None


def _prepare(workdir: Path) -> None:
    """Everything that does not need the namespace: keys, sshd config, HOME, cluster config."""
    ssh_dir = workdir / "ssh"
    home = workdir / "home"
    (home / ".ssh").mkdir(parents=True)
    ssh_dir.mkdir()
    for d in (workdir / "venv_upper", workdir / "venv_work"):
        d.mkdir()
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    subprocess.run([*keygen, "-f", str(ssh_dir / "host_ed25519")], check=True)
    client_key = home / ".ssh" / "intentrec_cluster"  # the path deploy/local_cluster.yaml names
    subprocess.run([*keygen, "-f", str(client_key)], check=True)
    (home / ".ssh" / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    passwd = []
    for line in Path("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "root":
            fields[5] = str(home)
        passwd.append(":".join(fields))
    (workdir / "passwd").write_text("\n".join(passwd) + "\n")

    (ssh_dir / "sshd_config").write_text(
        textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            Port 22
            HostKey {ssh_dir / "host_ed25519"}
            PidFile {ssh_dir / "sshd.pid"}
            AuthorizedKeysFile .ssh/authorized_keys
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            UsePAM no
            # The work dir lives under world-writable /var/tmp.
            StrictModes no
            Subsystem sftp internal-sftp
            LogLevel VERBOSE
            """)
    )
    # Ray runs every remote command as `bash --login -c -i 'source ~/.bashrc; ...'`.
    (home / ".bashrc").write_text(
        textwrap.dedent(f"""\
            export PATH={VENV / "bin"}:$PATH
            export RAY_USAGE_STATS_ENABLED=0
            """)
    )
    # The app refuses to start without keys; the start commands export this file (DEPLOY.md).
    (home / "intentrec.env").write_text(
        f"INTENTREC_API_KEY={CLIENT_KEY}\nINTENTREC_ADMIN_KEY={ADMIN_KEY}\n")

    config = yaml.safe_load(LOCAL_CLUSTER_YAML.read_text())
    head = config["head_start_ray_commands"]
    assert SERVE_DEPLOY_CMD in head, f"{LOCAL_CLUSTER_YAML} no longer runs `{SERVE_DEPLOY_CMD}`"
    first = [i for i, cmd in enumerate(head) if FIRST_TRAINING_CMD in cmd]
    assert len(first) == 1 and first[0] > head.index(SERVE_DEPLOY_CMD), (
        f"{LOCAL_CLUSTER_YAML} no longer runs `{FIRST_TRAINING_CMD}` after `{SERVE_DEPLOY_CMD}`")
    # Two cores are shared with other work: keep the head small (logical CPUs: serving 0.85,
    # one training worker 1) and the first training job's slice small.
    config["head_start_ray_commands"] = [
        f"{cmd} --num-cpus=3 --object-store-memory=150000000" if "ray start --head" in cmd
        else f"{cmd} {' '.join(TRAIN_ARGS)}" if FIRST_TRAINING_CMD in cmd
        else cmd
        for cmd in head
    ]
    # Offline in the namespace: build the editable wheel with the venv's own setuptools.
    config["setup_commands"] = [
        cmd.replace("pip install", "pip install --no-build-isolation", 1)
        if "pip install" in cmd and "--no-build-isolation" not in cmd
        else cmd
        for cmd in config["setup_commands"]
    ]
    (workdir / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # `ray up` runs from a clean copy of the checkout, as after `git clone`: Ray hashes every file
    # under a file_mounts source (ignoring rsync filters) and would read the whole in-tree venv.
    src = workdir / "src"
    subprocess.run(
        ["rsync", "-a", "--exclude=.git", "--filter=:- .gitignore", f"{REPO_ROOT}/", f"{src}/"], check=True
    )
    # Two ranker replicas, so that "the new version is served" means by every replica.
    serve_config_path = src / "serve_config.yaml"
    serve_config = yaml.safe_load(serve_config_path.read_text())
    (app,) = [a for a in serve_config["applications"] if a["name"] == APP]
    (ranker,) = [d for d in app["deployments"] if d["name"] == RANKER]
    ranker["autoscaling_config"]["min_replicas"] = RANKER_REPLICAS
    serve_config_path.write_text(yaml.safe_dump(serve_config, sort_keys=False))
    # Stand-ins for what a real checkout has and the sync must leave behind (a stale model under
    # artifacts/ would also hide the first boot).
    for ignored in (".git/HEAD", ".venv/pyvenv.cfg", "artifacts/LATEST"):
        (src / ignored).parent.mkdir(exist_ok=True)
        (src / ignored).write_text("must not be synced\n")


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"({path.name} missing)"


def test_ray_up_serves_the_app_and_ray_down_tears_it_down() -> None:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    workdir = Path(tempfile.mkdtemp(prefix="irup", dir="/var/tmp"))
    try:
        _prepare(workdir)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        cmd = [
            "unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc", "--kill-child",
            sys.executable, "-m", "tests.integration.test_ray_up_local", "--inside", str(workdir),
        ]  # fmt: skip
        started = time.monotonic()
        out = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
            timeout=NAMESPACE_TIMEOUT_S + 60,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        result_file = workdir / "result.json"
        logs = "\n".join(
            f"--- {name}\n{_tail(workdir / name)}"
            for name in ("ray_up.log", "first_training_job.log", "ray_down.log", "sshd.log",
                         "head_logs.txt")
        )
        assert out.returncode == 0 and result_file.exists(), (
            f"namespace run failed (rc={out.returncode}) after {elapsed:.0f}s\n"
            f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{logs}"
        )
        result: dict[str, Any] = json.loads(result_file.read_text())
        print(json.dumps({k: round(v) for k, v in result["seconds"].items()}, indent=1))
        print("\n".join(result["job_log_tail"]))
        print("ranker replicas:", json.dumps(result.get("replicas")))

        # First boot: a 200 with the cold-start answer before any model, from the synced copy.
        assert result["healthz"]["model_version"] == NO_MODEL, result["healthz"]
        polls: list[list[Any]] = result["polls"]
        assert polls[0][1:] == [200, NO_MODEL, 0], polls[:3]
        # The first training job ran once, published a version, and the ranker picked it up
        # while requests kept coming: every poll, before, during and after, was a 200.
        assert result["job_status"] == "SUCCEEDED", result["job_status"]
        failed = [p for p in polls if p[1] != 200]
        assert failed == [], f"{len(failed)} of {len(polls)} polls failed: {failed[:5]}"
        version = result["latest"]
        assert version and version != NO_MODEL
        assert {p[2] for p in polls} <= {NO_MODEL, version}, {p[2] for p in polls}
        assert polls[-1][2] == version, polls[-3:]
        # Every ranker replica serves it, not only the ones the polls happened to reach.
        replicas = result["replicas"]
        assert len(replicas["seen"]) == RANKER_REPLICAS, replicas
        assert set(replicas["seen"].values()) == {version}, replicas
        assert result["model"]["version"] == version
        # A shopper of the slice gets items from that version.
        assert result["shopper_recs"]["model_version"] == version
        assert result["shopper_recs"]["user_known"] is True
        assert len(result["shopper_recs"]["items"]) > 0
        # rsync_filter (.gitignore) and rsync_exclude kept venv, artifacts and git history home.
        assert "pyproject.toml" in result["synced"]
        assert not {".venv", ".git", "artifacts"} & set(result["synced"]), result["synced"]
        assert result["ray_status_rc"] == 0, result["ray_status"]
        assert result["haproxy_processes"], (
            "no haproxy process while serving: RAY_SERVE_ENABLE_HA_PROXY=1 of the start commands "
            "did not reach Serve"
        )
        # `ray down` succeeded and stopped Ray on the head: no raylet or GCS left in the namespace.
        assert result["ray_down_rc"] == 0, logs
        assert result["ray_processes_after_down"] == []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- inside: PID 1
def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def _isolate(workdir: Path) -> None:
    _sh("ip", "link", "set", "lo", "up")
    # A private /tmp hides the real one; a checkout or venv that lives under /tmp (CI may clone
    # there) is bound back into it from a view of the old /tmp kept under the workdir.
    under_tmp = sorted({p for p in (REPO_ROOT, VENV) if Path("/tmp") in p.parents}, key=str)
    if under_tmp:
        old_tmp = workdir / "old_tmp"
        old_tmp.mkdir()
        _sh("mount", "--bind", "/tmp", str(old_tmp))
    _sh("mount", "-t", "tmpfs", "tmpfs", "/tmp")
    for path in under_tmp:
        if any(parent in under_tmp for parent in path.parents):
            continue  # already visible through a bound parent
        path.mkdir(parents=True, exist_ok=True)
        _sh("mount", "--bind", str(old_tmp / path.relative_to("/tmp")), str(path))
    _sh("mount", "-t", "tmpfs", "tmpfs", "/run")
    Path("/run/sshd").mkdir(mode=0o755)
    _sh("mount", "--bind", str(workdir / "passwd"), "/etc/passwd")
    _sh(
        "mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir={VENV},upperdir={workdir / 'venv_upper'},workdir={workdir / 'venv_work'}",
        str(VENV),
    )  # fmt: skip


def _run_logged(workdir: Path, name: str, cmd: list[str], timeout: float, env: dict) -> int:
    with (workdir / f"{name}.log").open("w") as log:
        return subprocess.run(
            cmd, cwd=workdir / "src", env=env, stdout=log, stderr=subprocess.STDOUT,
            timeout=timeout, check=False,
        ).returncode  # fmt: skip


def _ray_processes(names: tuple[str, ...] = ("raylet", "gcs_server")) -> list[str]:
    """Live (non-zombie) processes of this PID namespace whose command name is in ``names``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, state = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2]
        if state != "Z" and comm in names:
            found.append(comm)
    return found


def _http(path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """GET (or POST ``body``) with the client key; (status, JSON), or (-1, error) when the
    connection itself fails (counted as a failed request too)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(HTTP + path, data=data, headers={
        "X-API-Key": CLIENT_KEY, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:300]
    except OSError as exc:
        return -1, repr(exc)


def _poll_until_picked_up(polls: list[list[Any]], timeout: float) -> None:
    """Ask for one user's recommendations every half second until a model serves them, then
    a few more times; each poll is ``[seconds, status, model_version, number of items]``."""
    t0 = time.monotonic()
    after = 0
    while time.monotonic() - t0 < timeout and after < 6:
        status, body = _http("/v1/recommendations", {"user_id": POLL_USER, "k": 5})
        ok = status == 200 and isinstance(body, dict)
        version = body["model_version"] if ok else None
        polls.append([round(time.monotonic() - t0, 1), status, version,
                      len(body["items"]) if ok else 0])
        if version not in (None, NO_MODEL):
            after += 1
        time.sleep(0.5)


def _inside(workdir: Path) -> None:
    seconds: dict[str, float] = {}
    result: dict[str, Any] = {"seconds": seconds}
    t0 = time.monotonic()
    _isolate(workdir)
    _sh(str(SSHD), "-f", str(workdir / "ssh" / "sshd_config"), "-E", str(workdir / "sshd.log"))

    def sshd_listening() -> bool:
        with socket.create_connection(("127.0.0.1", 22), timeout=1):
            return True

    wait_for_condition(sshd_listening, timeout=20, what="sshd on 127.0.0.1:22")
    seconds["namespace_and_sshd"] = time.monotonic() - t0

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    home = workdir / "home"
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    config = str(workdir / "cluster.yaml")
    try:
        t = time.monotonic()
        rc = _run_logged(workdir, "ray_up", [str(RAY_CLI), "up", "-y", "--no-config-cache", config],
                         timeout=300, env=env)  # fmt: skip
        seconds["ray_up"] = time.monotonic() - t
        if rc != 0:
            raise RuntimeError(f"ray up exited {rc}")
        result["synced"] = sorted(os.listdir(home / "intentrec"))

        t = time.monotonic()
        wait_for_condition(lambda: _http("/healthz")[0] == 200, timeout=180, what="GET /healthz")
        result["healthz"] = _http("/healthz")[1]
        # The start commands export RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy, not Ray's Python proxy,
        # must be what answered.
        result["haproxy_processes"] = _ray_processes(("haproxy",))
        seconds["serve_ready_after_ray_up"] = time.monotonic() - t

        t = time.monotonic()
        result["polls"] = polls = []
        _poll_until_picked_up(polls, PICKUP_TIMEOUT_S)
        seconds["first_model_served"] = time.monotonic() - t
        latest = home / "intentrec-storage" / "artifacts" / "LATEST"
        t = time.monotonic()
        result["replicas"] = _replica_versions(
            latest.read_text().strip() if latest.exists() else "", env)
        seconds["every_replica_serves_it"] = time.monotonic() - t
        result["job_status"] = _job_status()
        result["latest"] = latest.read_text().strip() if latest.exists() else None
        result["model"] = _http("/v1/model")[1]
        shoppers = _http("/v1/catalogue/shoppers")[1]
        shopper = shoppers["users"][0] if isinstance(shoppers, dict) else None
        result["shopper_recs"] = _http("/v1/recommendations", {"user_id": shopper, "k": 10})[1]

        status = subprocess.run(
            [str(RAY_CLI), "status", "--address", "127.0.0.1:6379"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        result["ray_status_rc"], result["ray_status"] = status.returncode, status.stdout[-2000:]
    finally:
        job_logs = subprocess.run(
            [str(RAY_CLI), "job", "logs", FIRST_TRAINING_JOB, "--address", "http://127.0.0.1:8265"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        (workdir / "first_training_job.log").write_text(job_logs.stdout + job_logs.stderr)
        # train_job.py's last lines say where its time went (data, training, ranker).
        result["job_log_tail"] = job_logs.stdout.strip().splitlines()[-6:]
        head_logs = Path("/tmp/ray/session_latest/logs")
        if head_logs.is_dir():
            with (workdir / "head_logs.txt").open("w") as out:
                for log in sorted(head_logs.glob("*.err")) + sorted(head_logs.glob("serve/*")):
                    out.write(f"== {log.name}\n{_tail(log, 1500)}\n")
        t = time.monotonic()
        rc = _run_logged(workdir, "ray_down", [str(RAY_CLI), "down", "-y", config],
                         timeout=120, env=env)  # fmt: skip
        seconds["ray_down"] = time.monotonic() - t
        result["ray_down_rc"] = rc

    wait_for_condition(lambda: not _ray_processes(), timeout=30, what="raylet/gcs_server gone")
    result["ray_processes_after_down"] = _ray_processes()
    seconds["total_inside"] = time.monotonic() - t0
    (workdir / "result.json").write_text(json.dumps(result, indent=1))


# Run as a driver of the namespace's cluster: ask the ranker deployment, through a handle, which
# replica serves which version, until every replica serves argv[1] or argv[2] seconds pass.
# HTTP answers do not name the replica; a round of concurrent calls may not reach every replica
# (the router picks among them), so rounds repeat, keeping each replica's latest answer.
REPLICAS_DRIVER = f"""
import json, sys, time
import ray
from ray import serve

want, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
ray.init(address="127.0.0.1:6379", log_to_driver=False)
handle = serve.get_deployment_handle({RANKER!r}, {APP!r})
rounds, seen = 0, {{}}
while True:
    rounds += 1
    answers = [r.result() for r in [handle.serving.remote() for _ in range(24)]]
    seen.update({{a["replica"]: a["version"] for a in answers}})
    done = len(seen) == {RANKER_REPLICAS} and set(seen.values()) == {{want}}
    if done or time.monotonic() > deadline:
        break
    time.sleep(1)
print("RESULT " + json.dumps({{"rounds": rounds, "seen": seen}}))
"""


def _replica_versions(version: str, env: dict[str, str]) -> dict[str, Any]:
    """``{"rounds": n, "seen": {replica id: version}}``: each ranker replica's latest answer, once
    every one serves ``version`` or when ALL_REPLICAS_TIMEOUT_S ran out."""
    out = subprocess.run(
        [sys.executable, "-c", REPLICAS_DRIVER, version, str(ALL_REPLICAS_TIMEOUT_S)],
        env=env, capture_output=True, text=True, timeout=ALL_REPLICAS_TIMEOUT_S + 120,
    )  # fmt: skip
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"rounds": 0, "seen": {}, "error": (out.stdout + out.stderr)[-2000:]}
    return dict(json.loads(line.removeprefix("RESULT ")))


def _job_status() -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient("http://127.0.0.1:8265").get_job_status(FIRST_TRAINING_JOB).value)


def _as_init(main: Callable[[], None]) -> int:
    """Run ``main`` in a child while this process, PID 1 of the namespace, reaps orphans.

    Daemons (sshd, the head's Ray processes) are re-parented to PID 1; unreaped, they would stay
    zombies that `ray stop` waits out its whole grace period for.
    """
    child = os.fork()
    if child == 0:
        code = 1
        try:
            main()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        pid, status = os.wait()
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="run inside the test's namespaces (PID 1)")
    parser.add_argument("--inside", type=Path, required=True)
    workdir = parser.parse_args().inside
    sys.exit(_as_init(lambda: _inside(workdir)))
