"""Fault injection at named steps, for the fault tests: kill the study's driver at a chosen state.

Off unless `SCALING_FAULT` is set (one environment lookup per call otherwise). The value is
`<point>` or `<point>:<n>`: at the n-th time (default the first) any process of the run reaches
`fault_point("<point>")`, the driver (`SCALING_DRIVER_PID`, which the runner sets before it starts
Ray; this process when unset) is sent SIGKILL -- what a lost machine or an OOM kill does. Hits are
counted across processes in the file `SCALING_FAULT_COUNTER` (one byte appended per hit, O_APPEND),
so "the 2nd ledger record of the study" means the same thing whichever worker writes it.

Named points (grep `fault_point(` for the list):
  driver.ray_started     the driver has started its embedded Ray, before any trial
  fs.temp_written        an atomic write (ledger record, checkpoint) has its temporary file complete,
                         before the rename
  ledger.appended        a ledger record is in place
  checkpoint.saved       a trial checkpoint is in place
  driver.trials_done     every trial has ended, before the report
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "SCALING_FAULT"
COUNTER_ENV = "SCALING_FAULT_COUNTER"
DRIVER_ENV = "SCALING_DRIVER_PID"


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    n = int(nth or 1)
    hits = _count()
    if hits != n:
        return
    target = int(os.environ.get(DRIVER_ENV) or os.getpid())
    try:
        os.kill(target, signal.SIGKILL)
    except OSError:
        pass
    if target != os.getpid():  # a worker: stop here too, as it would when its machine is lost
        os.kill(os.getpid(), signal.SIGKILL)


def _count() -> int:
    path = os.environ.get(COUNTER_ENV)
    if not path:
        _count.local = getattr(_count, "local", 0) + 1  # type: ignore[attr-defined]
        return _count.local  # type: ignore[attr-defined]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
        return os.lseek(fd, 0, os.SEEK_CUR)  # the end of this process's own byte: its hit number
    finally:
        os.close(fd)
