"""Deterministic fault injection: the driver is SIGKILLed at a named step (storage/faults.py), never
after a sleep. After each kill: no process of that run survives (studies/reaper.py), and a re-run
leaves exactly one record per planned trial."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from conftest import tiny_study_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = "SCALING_TEST_RUN"  # put in each driver's environment: every process of its run inherits it


def _holds_file_under(pid: str, root: str) -> bool:
    try:
        links = [os.readlink(f"/proc/{pid}/cwd")]
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        return False
    return any(link == root or link.startswith(root + "/") for link in links)


def _marked(mark: str) -> list[str]:
    """Processes (pid and name) of one test run: its mark in their environment, or a file open in the
    run's own Ray temp dir. Both, because a process title set with setproctitle (Ray's agents) can
    overwrite what /proc/PID/environ shows."""
    needle = f"{MARK}={mark}".encode()
    root = os.path.realpath(_ray_tmp(mark))
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0") and not _holds_file_under(name, root):
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{name} {cmdline[:80]}")
        except OSError:
            continue
    return found


def _ray_tmp(mark: str) -> str:
    """Each run's own Ray temp root (short: Ray's socket paths must fit in 107 bytes)."""
    return f"/tmp/rt-{mark[:12]}"


@pytest.fixture(autouse=True)
def _remove_ray_temp_dirs():
    before = set(pathlib.Path("/tmp").glob("rt-*"))
    yield
    for path in set(pathlib.Path("/tmp").glob("rt-*")) - before:
        shutil.rmtree(path, ignore_errors=True)


def _survivors(mark: str, within_s: float) -> list[str]:
    """What of a run is still alive `within_s` after its driver ended (polls; returns early when none)."""
    deadline = time.monotonic() + within_s
    while (alive := _marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _run(path: pathlib.Path, tmp_path: pathlib.Path, fault: str | None) -> tuple[int, str, str]:
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": _ray_tmp(mark)}
    env.pop("SCALING_FAULT", None)
    if fault:
        env["SCALING_FAULT"] = fault
        env["SCALING_FAULT_COUNTER"] = str(tmp_path / f"fault-{mark}")
    proc = subprocess.run([sys.executable, "-m", "scaling.cli", "run", str(path), "--num-cpus", "2", "--no-progress", "--no-report"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    return proc.returncode, mark, proc.stderr


@pytest.fixture
def study(tmp_path):
    data = tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2]}])
    data["train"] = {**data["train"], "steps": 40, "eval_every": 20}
    data["resources"] = {**data["resources"], "max_concurrent_trials": 1}  # the n-th hit is the same step on every run
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _planned(path):
    from studies.plan import expand
    from studies.spec import load_study

    study = load_study(path)
    return study, {t.key for t in expand(study)}


@pytest.mark.ray
@pytest.mark.parametrize("fault", [
    "fs.temp_written:4",  # between a write and its rename: a stale temporary file is left behind
    pytest.param("ledger.appended:1", marks=pytest.mark.slow),  # test_faults.py (slow) kills at five more points
])
def test_driver_killed_at_a_named_step_leaves_no_process_and_a_rerun_completes(study, tmp_path, fault):
    from storage.ledger import Ledger

    spec, planned = _planned(study)
    code, mark, err = _run(study, tmp_path, fault)
    assert code == -9, f"the fault point {fault} was never reached (exit {code}): {err[-2000:]}"
    assert _survivors(mark, within_s=20) == [], "processes of the killed run outlived it by 20 s"
    ledger = Ledger(spec.storage_uri())
    assert len(ledger.keys()) < len(planned)  # killed mid-study
    code, mark, err = _run(study, tmp_path, None)
    assert code == 0, err[-3000:]
    assert _survivors(mark, within_s=5) == [], "a run that ended normally left processes behind"
    done = [r for r in Ledger(spec.storage_uri()).rows() if r["status"] != "failed"]
    assert sorted(r["key"] for r in done) == sorted(planned)  # nothing lost, nothing twice


def test_fault_point_counts_hits_across_processes(tmp_path):
    """The n-th hit is counted over every process of the run, and only the n-th one fires."""
    counter = tmp_path / "counter"
    code = (
        "import os, sys; from storage.faults import fault_point\n"
        "for _ in range(int(sys.argv[1])): fault_point('ledger.appended')\n"
    )
    env = {**os.environ, "SCALING_FAULT": "ledger.appended:3", "SCALING_FAULT_COUNTER": str(counter)}
    env.pop("SCALING_DRIVER_PID", None)
    first = subprocess.run([sys.executable, "-c", code, "2"], cwd=ROOT, env=env)
    assert first.returncode == 0 and counter.read_bytes() == b".."  # two hits: not yet
    second = subprocess.run([sys.executable, "-c", code, "5"], cwd=ROOT, env=env)
    assert second.returncode == -9 and counter.read_bytes() == b"..."  # the third hit, in another process
    other = subprocess.run([sys.executable, "-c", code, "5"], cwd=ROOT, env={**env, "SCALING_FAULT": "driver.ray_started"})
    assert other.returncode == 0  # another point's hits do not fire it


def test_reaper_ends_every_process_carrying_the_token_and_nothing_else(tmp_path):
    from studies.reaper import TOKEN_ENV, marked_processes, reap

    token = uuid.uuid4().hex
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    ours = [subprocess.Popen(sleeper, env={**os.environ, TOKEN_ENV: token}) for _ in range(2)]
    stranger = subprocess.Popen(sleeper, env={**os.environ, TOKEN_ENV: "another-run"})
    try:
        assert sorted(marked_processes(token)) == sorted(p.pid for p in ours)
        assert sorted(reap(token, grace_s=5)) == sorted(p.pid for p in ours)
        assert [p.wait(10) for p in ours] == [-15, -15]  # SIGTERM was enough
        assert stranger.poll() is None
    finally:
        for p in (*ours, stranger):
            p.kill()
            p.wait()


def test_reaper_ends_ray_processes_holding_the_session_dir_and_not_a_users_tail(tmp_path):
    """Without the token (a process title set with setproctitle can erase it from /proc/PID/environ):
    a Ray process with a file open in the run's session directory is reaped; a user's `tail -f` of a
    log there is not."""
    import shutil as sh

    from studies.reaper import reap

    if not os.path.isdir("/proc") or sh.which("tail") is None:
        pytest.skip("needs /proc and tail")
    session = tmp_path / "session_2026-01-01_00-00-00_000000_1"
    (session / "logs").mkdir(parents=True)
    log = session / "logs" / "worker.out"
    log.write_text("")
    fake = tmp_path / "site" / "ray" / "_private" / "workers" / "default_worker.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import sys, time\nf = open(sys.argv[1], 'a')\nprint('up', flush=True)\ntime.sleep(600)\n")
    worker = subprocess.Popen([sys.executable, str(fake), str(log)], stdout=subprocess.PIPE, text=True)
    tail = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL)
    try:
        assert worker.stdout.readline().strip() == "up"  # its file is open
        assert reap(uuid.uuid4().hex, grace_s=5, session_dirs=(str(session),)) == [worker.pid]
        assert worker.wait(10) == -15
        assert tail.poll() is None
    finally:
        for p in (worker, tail):
            p.kill()
            p.wait()
