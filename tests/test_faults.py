"""Faults on local Ray: a killed driver, a killed trial worker, a diverging trial."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest
import yaml

from conftest import tiny_study_dict
from test_fault_injection import _remove_ray_temp_dirs  # noqa: F401 (autouse: each run's own Ray temp dir goes)

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write(tmp_path, **overrides) -> pathlib.Path:
    data = tiny_study_dict(tmp_path, **overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# five kills at five different named steps (storage/faults.py), each on a fresh hit counter
FIVE_KILLS = ["driver.ray_started", "checkpoint.saved:2", "fs.temp_written:3", "ledger.appended:1", "checkpoint.saved:4"]


@pytest.mark.slow  # minutes of real Ray runs, killed and resumed (make test-all runs it)
def test_driver_killed_five_times_then_rerun_leaves_one_record_per_trial(tmp_path):
    from test_fault_injection import _run, _survivors

    from storage.ledger import Ledger
    from studies.plan import expand
    from studies.spec import load_study

    path = _write(tmp_path, seeds=[0, 1], train={**tiny_study_dict(tmp_path)["train"], "steps": 400, "eval_every": 40})
    study = load_study(path)
    planned = {t.key for t in expand(study)}
    assert len(planned) == 8
    left = []
    for fault in FIVE_KILLS:
        code, mark, err = _run(path, tmp_path, fault)
        if code == 0:
            break  # the study finished before this point was reached
        assert code == -9, err[-2000:]
        left += _survivors(mark, within_s=20)
    assert left == [], f"processes outlived their killed driver by 20 s: {left}"
    code, mark, err = _run(path, tmp_path, None)
    assert code == 0, err[-3000:]
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


@pytest.mark.slow  # a Ray study (~50 s); the divergence rule itself: tests/test_fidelity.py, test_workers.py
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
