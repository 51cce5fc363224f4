"""workers.lifecycle: checkpoints on a wall-clock interval and on SIGTERM, resume mid-trial, train-metric
rows, the progress file and the trial's own log (plain processes, no Ray; a few seconds)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from conftest import tiny_spec
from workers import lifecycle, run_trial
from workers.trial import Checkpoints


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_checkpoint_policy_saves_on_the_interval_and_on_a_stop_request():
    clock = FakeClock()
    policy = lifecycle.CheckpointPolicy(60.0, clock=clock)
    assert not policy.due()
    clock.now = 59.9
    assert not policy.due()
    clock.now = 60.0
    assert policy.due()
    policy.saved()
    assert not policy.due()
    try:
        lifecycle.request_stop("test")
        assert policy.due() and lifecycle.stop_reason() == "test"
    finally:
        lifecycle.clear_stop()
    with pytest.raises(ValueError, match="every_seconds=0.*give a number of seconds > 0"):
        lifecycle.CheckpointPolicy(0)


def test_step_log_rows_average_the_window():
    clock = FakeClock()
    window = lifecycle.StepLog(2, tokens_per_step=100, clock=clock)
    window.add(1.0)
    window.add(3.0)
    clock.now = 0.5
    row = window.row(2, lr=0.1, grad_norm=0.7, tokens=200)
    assert row == {"step": 2, "train_loss": 2.0, "lr": 0.1, "tokens_per_s": 400.0, "tokens": 200, "grad_norm": 0.7}
    assert window.due(4) and not window.due(3) and window.due(3, last=True)
    with pytest.raises(ValueError, match="log_every=0"):
        lifecycle.StepLog(0)


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """One tiny trial run start to end: what every interrupted-and-resumed run must reproduce."""
    root = tmp_path_factory.mktemp("unbroken")
    spec = tiny_spec(train={**tiny_spec().train, "steps": 40, "eval_every": 10})
    cache = str(root / "c")
    return spec, cache, run_trial(spec, storage_uri=str(root / "full"), cache_uri=cache, num_threads=1)


def test_time_checkpoint_between_evaluations_resumes_bit_identical(tmp_path, unbroken):
    """With a (tiny) wall-clock interval every step is saved: a trial that dies at step 13 of 40
    (evaluations at 10, 20, ...) resumes from 12 (its last save), not 10, and ends exactly as an unbroken run."""
    spec, cache, full = unbroken

    class Crash(Exception):
        pass

    def crash_at_13(row):
        if row["step"] == 13:
            raise Crash

    part = str(tmp_path / "part")
    crashed = run_trial(spec, storage_uri=part, cache_uri=cache, num_threads=1, log=crash_at_13, log_every=1, checkpoint_every_s=1e-9)
    assert crashed.status == "failed" and "Crash" in crashed.error
    assert Checkpoints(part, spec.key).load()["step"] == 12  # the hook runs before step 13 is saved
    starts = []
    resumed = run_trial(spec, storage_uri=part, cache_uri=cache, num_threads=1, on_start=starts.append)
    assert starts[0]["resumed_from_step"] == 12 and starts[0]["total_steps"] == 40
    assert resumed.status == "completed" and resumed.metric_value == full.metric_value
    assert json.loads(resumed.metrics_json) == json.loads(full.metrics_json)


def test_sigterm_saves_and_interrupts_then_resume_is_bit_identical(tmp_path, unbroken):
    """SIGTERM at a named step (sent from the trial's own log hook, so it lands at the same point
    every run): the trial saves at that step, raises TrialInterrupted (no record), and the re-run
    continues from there to exactly the unbroken run's result."""
    spec, cache, full = unbroken
    storage = str(tmp_path / "part")
    rows = []

    def sigterm_at_15(row):
        rows.append(row)
        if row["step"] == 15:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(lifecycle.TrialInterrupted) as stopped:
            run_trial(spec, storage_uri=storage, cache_uri=cache, num_threads=1, log=sigterm_at_15, log_every=5)
    finally:
        lifecycle.clear_stop()
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert stopped.value.step == 15 and stopped.value.reason == "SIGTERM"
    assert Checkpoints(storage, spec.key).load()["step"] == 15  # not the evaluation at 10
    assert [r["step"] for r in rows] == [5, 10, 15]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(rows[-1])
    progress = json.loads((tmp_path / "part" / "progress" / f"{spec.key}.json").read_text())
    assert progress["state"] == "interrupted" and progress["step"] == 15 and progress["total_steps"] == 40
    assert progress["latest"]["val_loss"] > 0 and progress["pid"] == os.getpid()

    resumed = run_trial(spec, storage_uri=storage, cache_uri=cache, num_threads=1)
    assert resumed.status == "completed" and resumed.metric_value == full.metric_value
    assert json.loads(resumed.metrics_json) == json.loads(full.metrics_json)
    assert not (tmp_path / "part" / "progress" / f"{spec.key}.json").exists()  # removed when done
    log = (tmp_path / "part" / "logs" / f"{spec.key}.log").read_text()
    assert "interrupted at step 15 (SIGTERM)" in log and "resumed from the checkpoint at step 15" in log
    assert "finished: completed" in log and log.index("interrupted") < log.index("resumed")
