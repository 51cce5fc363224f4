"""A study across a two-node Ray cluster with token authentication, driven through the CLI.

Starts a head and a worker node with `ray start --block` (own temp dirs, own ports, one CPU each,
RAY_AUTH_MODE=token with a token file; HOME is a temporary directory, so ~/.ray/auth_token is
neither read nor written), then:

- `scaling jobs` without a token, and with a wrong one, is refused with the fix (no traceback);
- `scaling submit --token-file` ships the working tree and runs a four-trial study as a Ray job;
- every trial is in the ledger, and the trials ran on both nodes.

Which node ran a trial: the ledger's `node_id` when it has one; otherwise the pid in the trial's
Tune result (result.json under the study's ray_results/) mapped to its node through the cluster's
state API (/api/v0/actors). Only the two `ray start` processes this test started are stopped (by
their pid: SIGTERM makes `ray start --block` stop every process it started). About 1-2 minutes on
2 cores: marked `cluster`, outside `make test`.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from conftest import TINY_MQAR, TINY_MODEL, TINY_TRAIN

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_range(n: int = 40) -> tuple[int, int]:
    """n consecutive ports nobody listens on now (Ray's worker ports), from a random base."""
    for _ in range(200):
        base = random.randint(21000, 29000)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base, base + n - 1
    raise RuntimeError("no free port range for Ray's workers")


def _node_ports() -> list[str]:
    low, high = _port_range()
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}"]


class Cluster:
    def __init__(self, base: pathlib.Path):
        self.base = base
        self.token_file = base / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        (base / "home").mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        self.env.update(HOME=str(base / "home"), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT),
                        WANDB_MODE="offline", WANDB_SILENT="true", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        self.ray_env = {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> None:
        temp_dir = tempfile.mkdtemp(prefix=f"r{name[0]}", dir="/tmp")  # short: Ray's socket paths are capped
        self.temp_dirs = [*getattr(self, "temp_dirs", []), temp_dir]
        log = open(self.base / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
             *args, *_node_ports()],
            env=self.ray_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}"])
        self.wait(lambda: self.get("/api/version").status_code == 200, "the head's dashboard")
        self._start("worker", [f"--address=127.0.0.1:{self.gcs_port}"])
        self.wait(lambda: len(self.nodes()) == 2, "two alive nodes")

    def get(self, path: str):
        import requests

        return requests.get(self.address + path, headers={"Authorization": f"Bearer {self.token_file.read_text()}"},
                            timeout=10)

    def nodes(self) -> dict[str, bool]:
        """node id -> is head, for alive nodes (state API)."""
        r = self.get("/api/v0/nodes?detail=1&limit=100")
        if r.status_code != 200:
            return {}
        return {n["node_id"]: bool(n.get("is_head_node")) for n in r.json()["data"]["result"]["result"]
                if n["state"] == "ALIVE"}

    def wait(self, ready, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"`ray start` exited ({proc.returncode}) waiting for {what}: {self.logs()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"{what} not ready after {timeout}s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in sorted(self.base.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM to each `ray start --block` we started (it stops the processes it started);
        SIGKILL to its own process group if it has not stopped in 30 s."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for temp_dir in getattr(self, "temp_dirs", []):
            shutil.rmtree(temp_dir, ignore_errors=True)

    def scaling(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "scaling.cli", *args], env=env or self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cluster(tmp_path):
    started = time.perf_counter()
    c = Cluster(tmp_path)
    try:
        c.start()
        c.start_seconds = time.perf_counter() - started
        yield c
    finally:
        c.stop()
        print(f"\ncluster test: {time.perf_counter() - started:.0f}s in all")


def _trial_nodes(storage: pathlib.Path, cluster: Cluster, rows: list[dict]) -> dict[str, str]:
    """trial key -> the node that ran it: the ledger's node_id where recorded, else the Tune
    result's pid mapped to its node through the state API's actor list."""
    if rows and all(r.get("node_id") for r in rows):
        return {r["key"]: r["node_id"] for r in rows}
    pid_node = {}
    r = cluster.get("/api/v0/actors?detail=1&limit=1000")
    assert r.status_code == 200, r.text
    for actor in r.json()["data"]["result"]["result"]:
        if actor.get("pid"):
            pid_node[actor["pid"]] = actor["node_id"]
    out = {}
    for result in storage.glob("ray_results/*/*/result.json"):
        for line in result.read_text().splitlines():
            record = json.loads(line)
            if record.get("trial_key") and record.get("pid") in pid_node:
                out[record["trial_key"]] = pid_node[record["pid"]]
    return out


def test_study_across_two_nodes_with_token_auth(cluster, tmp_path):
    t0 = time.perf_counter()
    # token authentication from the CLI
    no_token = cluster.scaling("jobs", "--address", cluster.address)
    assert no_token.returncode == 2, no_token.stderr
    assert "requires Ray token authentication" in no_token.stderr and "no token was sent" in no_token.stderr
    assert "--token-file" in no_token.stderr and "Traceback" not in no_token.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text(secrets.token_hex(32))
    wrong.chmod(0o600)
    refused = cluster.scaling("jobs", "--address", cluster.address, "--token-file", str(wrong))
    assert refused.returncode == 2 and "the cluster refused it" in refused.stderr, refused.stderr
    listed = cluster.scaling("jobs", "--address", cluster.address, "--token-file", str(cluster.token_file))
    assert listed.returncode == 0 and "no jobs on" in listed.stdout, listed.stderr

    # a small study, submitted as a Ray job: 4 trials, 2 at a time, one CPU on each node. Each trial
    # trains long enough (600 steps, ~5-10 s) for the second node's trial actor to come up (runtime
    # env, imports) before the first node's actor has run every trial by itself
    storage = tmp_path / "shared" / "two-nodes"
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "two-nodes", "storage": str(storage), "cache": str(tmp_path / "shared" / "cache"),
        "tasks": [{"name": "mqar", "options": dict(TINY_MQAR)}], "variants": [{"name": "softmax"}],
        "model": dict(TINY_MODEL), "seeds": [0, 1, 2, 3], "train": {**TINY_TRAIN, "steps": 600, "eval_every": 200},
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2}, "tracking": {"wandb": {"mode": "offline"}},
    }))
    token = ["--address", cluster.address, "--token-file", str(cluster.token_file)]
    submitted = cluster.scaling("submit", str(study), *token, "--working-dir", str(ROOT))
    assert submitted.returncode == 0, submitted.stderr
    assert "working directory" in submitted.stdout and ".gitignore" in submitted.stdout
    job_id = submitted.stdout.split("as Ray job ")[1].split()[0]
    state = {}

    def finished() -> bool:
        state.update(cluster.get(f"/api/jobs/{job_id}").json())
        return state["status"] in ("SUCCEEDED", "FAILED", "STOPPED")

    cluster.wait(finished, f"job {job_id}", timeout=420)
    job_seconds = time.perf_counter() - t0
    logs = cluster.scaling("logs", job_id, *token).stdout
    assert state["status"] == "SUCCEEDED", logs[-4000:]
    assert "study two-nodes: 4 planned" in logs
    jobs = cluster.scaling("jobs", *token, "--format", "json")
    assert [j["study"] for j in json.loads(jobs.stdout) if j["job_id"] == job_id] == ["two-nodes"], jobs.stderr

    # every trial is in the ledger, and they ran on both nodes
    from storage.ledger import Ledger

    rows = [r for r in Ledger(str(storage)).rows() if r["status"] == "completed"]
    assert len({r["key"] for r in rows}) == 4
    nodes = cluster.nodes()
    ran_on = _trial_nodes(storage, cluster, rows)
    assert set(ran_on) == {r["key"] for r in rows}, (ran_on, [r["key"] for r in rows])
    assert set(ran_on.values()) == set(nodes), f"trials ran on {sorted(set(ran_on.values()))}, nodes {nodes}"
    print(f"\ncluster start {cluster.start_seconds:.0f}s; token checks, submit and study {job_seconds:.0f}s; "
          f"trials per node: { {n[:8]: list(ran_on.values()).count(n) for n in nodes} }")
