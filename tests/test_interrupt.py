"""A study interrupted by a signal on local Ray loses (almost) nothing: running trials save a
checkpoint at the step they are on, the driver writes no report and prints its own resume command
(not Ray's), and running the command again resumes every trial mid-way to the result an unbroken
run gives. The signal is sent by the trial itself at a named step, so the test is deterministic."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from conftest import tiny_study_dict

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # two real Ray runs (about 40 s on 2 idle cores)
TESTS = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_saves_checkpoints_and_the_rerun_resumes_mid_trial(tmp_path, monkeypatch, capfd, sig):
    from storage.ledger import Ledger
    from studies.plan import expand
    from studies.runner import run_study
    from studies.spec import parse_study
    from workers import run_trial

    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("SCALING_TEST_DRIVER_PID", str(os.getpid()))
    monkeypatch.setenv("SCALING_TEST_SIGNAL", sig)
    monkeypatch.setenv("SCALING_TEST_SIGNAL_AT_STEP", "20")
    data = tiny_study_dict(tmp_path, variants=[{"name": "softmax"}])
    data["train"] = {**data["train"], "steps": 3000, "eval_every": 1000}
    data["resources"] = {"cpus_per_trial": 1, "max_concurrent_trials": 1}
    study = parse_study(data)
    (spec,) = expand(study)
    storage = pathlib.Path(study.storage_uri())
    command = "scaling run study.yaml --address auto"

    result = run_study(study, num_cpus=2, progress=False, resume_command=command,
                       trial_fn="interrupt_helpers:run_trial_signalling_driver")
    err = capfd.readouterr().err
    assert result.interrupted == sig and not result.ok and result.report_path is None
    assert not (storage / "report.html").exists()  # nothing fitted from partial data
    assert f"Resume with:\n  {command}" in err and "Tuner.restore" not in err
    saved = torch.load(storage / "checkpoints" / spec.key / "last.pt", weights_only=False)["step"]
    assert 20 <= saved < 1000  # the step it was on when stopped, not an evaluation point
    progress = json.loads((storage / "progress" / f"{spec.key}.json").read_text())
    assert progress["state"] == "interrupted" and progress["step"] == saved
    assert not Ledger(str(storage)).rows()  # an interruption is not a failure

    monkeypatch.setenv("SCALING_TEST_SIGNAL_AT_STEP", "-1")
    again = run_study(study, num_cpus=2, progress=False, report=False)
    assert again.ok and again.ran == 1
    (row,) = Ledger(str(storage)).rows()
    log = (storage / "logs" / f"{spec.key}.log").read_text()
    assert f"resumed from the checkpoint at step {saved} of 3000" in log and row["steps"] == 3000
    reference = run_trial(spec, storage_uri=str(tmp_path / "reference"), cache_uri=study.cache, num_threads=1)
    assert row["metric_value"] == reference.metric_value
    assert json.loads(row["metrics_json"]) == json.loads(reference.metrics_json)
