"""Faults on local Ray: a killed driver, a killed trial worker, a diverging trial."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import tiny_study_dict

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write(tmp_path, **overrides) -> pathlib.Path:
    data = tiny_study_dict(tmp_path, **overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _scaling(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "scaling.cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then everything it started (its embedded Ray): a lost machine."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.5)


@pytest.mark.slow  # minutes of real Ray runs, killed and resumed (make test-all runs it)
def _progress(storage: pathlib.Path) -> tuple[int, float]:
    """What a study has written so far: ledger records, and the newest checkpoint's time."""
    records = len(list(storage.glob("ledger/*.parquet")))
    checkpoints = [p.stat().st_mtime for p in storage.glob("checkpoints/*/last.pt")]
    return records, max(checkpoints, default=0.0)


def _wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the study made no progress before the timeout"
        time.sleep(0.1)


def test_driver_killed_five_times_then_rerun_leaves_one_record_per_trial(tmp_path):
    from storage.ledger import Ledger
    from studies.plan import expand
    from studies.spec import load_study

    path = _write(tmp_path, seeds=[0, 1], train={**tiny_study_dict(tmp_path)["train"], "steps": 400, "eval_every": 40})
    study = load_study(path)
    planned = {t.key for t in expand(study)}
    assert len(planned) == 8
    storage = pathlib.Path(study.storage_uri())
    for _ in range(5):
        # the kill point is a state, not a time: right after the run has made progress (a new
        # checkpoint or ledger record), so every kill lands mid-study, between writes
        before = _progress(storage)
        proc = _scaling("run", str(path), "--num-cpus", "2", "--no-progress", "--no-report")
        _wait_until(lambda: _progress(storage) != before or proc.poll() is not None, timeout=120)
        if proc.poll() is None:
            _kill_group(proc)
    final = _scaling("run", str(path), "--num-cpus", "2", "--no-progress")
    assert final.wait(300) == 0
    ledger = Ledger(study.storage_uri())
    done = [r for r in ledger.rows() if r["status"] != "failed"]
    assert sorted(r["key"] for r in done) == sorted(planned)  # exactly one record per planned trial
    assert all(r["status"] == "completed" for r in done)
    assert not list(pathlib.Path(study.storage_uri(), "checkpoints").glob("*/last.pt"))


@pytest.mark.slow  # minutes of real Ray runs, killed and resumed (make test-all runs it)
def test_killed_worker_resumes_from_checkpoint_bit_identical(tmp_path):
    import psutil

    from storage.ledger import Ledger
    from studies.plan import expand
    from studies.runner import run_study
    from studies.spec import load_study
    from workers import run_trial

    train = {**tiny_study_dict(tmp_path)["train"], "steps": 3000, "eval_every": 100}
    path = _write(tmp_path, variants=[{"name": "softmax"}], train=train,
                  resources={"cpus_per_trial": 1, "max_concurrent_trials": 1, "max_failures": 2})
    study = load_study(path)
    (spec,) = expand(study)
    checkpoint = pathlib.Path(study.storage_uri(), "checkpoints", spec.key, "last.pt")
    killed = []

    def kill_worker_once() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint.exists():
            time.sleep(0.05)
        time.sleep(0.3)
        for proc in psutil.process_iter(["cmdline"]):
            if any("ImplicitFunc" in part or "_trainable" in part for part in (proc.info["cmdline"] or [])):
                proc.kill()
                killed.append(proc.pid)
                return

    killer = threading.Thread(target=kill_worker_once)
    killer.start()
    result = run_study(study, num_cpus=2, progress=False)
    killer.join()
    assert killed, "no trial worker process was found to kill"
    assert result.ok, result.counts
    (row,) = Ledger(study.storage_uri()).rows()
    reference = run_trial(spec, storage_uri=str(tmp_path / "reference"), cache_uri=study.cache, num_threads=1)
    assert row["metric_value"] == reference.metric_value
    assert json.loads(row["metrics_json"]) == json.loads(reference.metrics_json)


def test_diverging_trials_are_recorded_and_the_study_goes_on(tmp_path):
    from studies.runner import run_study
    from studies.spec import load_study

    train = {**tiny_study_dict(tmp_path)["train"], "lr": 1e30, "grad_clip": 0.0, "steps": 30}
    study = load_study(_write(tmp_path, train=train, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2]}]))
    result = run_study(study, num_cpus=2, progress=False)
    assert result.counts["diverged"] == 2 and result.counts["failed"] == 0 and result.ok
    from storage.ledger import Ledger

    rows = Ledger(study.storage_uri()).rows()
    assert all(r["status"] == "diverged" and 0 < r["steps"] <= 30 for r in rows)
    assert "diverged" in pathlib.Path(result.report_path).read_text()
