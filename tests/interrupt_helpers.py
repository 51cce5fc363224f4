"""Trial functions for runner tests (imported by Ray workers: the tests put this folder on PYTHONPATH).

`run_trial_signalling_driver` is `workers.run_trial` that sends a signal to the driver process when the
trial logs a named step, so a test interrupts a study at a point that is the same on every run
(not after a sleep). Set SCALING_TEST_DRIVER_PID, SCALING_TEST_SIGNAL (name) and
SCALING_TEST_SIGNAL_AT_STEP in the driver's environment before Ray starts.
"""

from __future__ import annotations

import os
import signal


def run_trial_signalling_driver(spec, **kwargs):
    from workers import run_trial

    pid = int(os.environ["SCALING_TEST_DRIVER_PID"])
    at = int(os.environ["SCALING_TEST_SIGNAL_AT_STEP"])
    sig = getattr(signal, os.environ.get("SCALING_TEST_SIGNAL", "SIGTERM"))
    log = kwargs.get("log")

    def hook(row):
        if log:
            log(row)
        if row["step"] == at:
            os.kill(pid, sig)

    kwargs["log"] = hook
    return run_trial(spec, **kwargs)
