"""What a running trial does besides training, shared by every trainer (one model per trial in
`workers/trial.py`, and any trainer that follows it): when to checkpoint, how to stop cleanly on a
stop request, and what it tells the world while it runs. No Ray, no W&B: the runner wires them up.

- `CheckpointPolicy`: save at evaluation points, every `every_seconds` of wall clock in between,
  and at once when a stop is requested (SIGTERM, or the runner stopping the trial). A cancelled or
  preempted trial then loses at most `every_seconds` of work (60 by default).
- `request_stop` / `sigterm_flush`: a process-wide stop flag. The trainer polls it at every step
  boundary (an Event read, nothing more), saves, and raises `TrialInterrupted`; whoever asked
  waits (`wait_for_flush`) until every running trainer of the process has saved.
- `StepLog`: the train metrics of the steps since the last log row (mean loss, lr, grad norm,
  tokens/s), one row every `log_every` steps.
- `TrialProgress`: `<storage>/progress/<key>.json` (state, step/total, latest metric, host, Ray
  node, pid), written when the trial starts and every `every_seconds` after, removed when it ends;
  and the trial's own log, `<storage>/logs/<key>.log`, appended to by every attempt.

A trainer uses them as `workers.trial._train` does:

    policy = CheckpointPolicy(every_seconds)
    with running_trainer() as stop:            # registers with the stop flag
        for step in range(start, total):
            ...one optimizer step...
            if eval_point or policy.due():     # a save; `due` is also true once a stop is asked
                save(); policy.saved()
            if stop.is_set():
                raise TrialInterrupted(step + 1, stop_reason())
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from storage import fs as sfs

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_SECONDS = 60.0
DEFAULT_LOG_EVERY = 10  # steps between train-metric rows (W&B history, progress)
DEFAULT_PROGRESS_SECONDS = 10.0  # between progress-file writes and progress reports to the driver
FLUSH_GRACE_SECONDS = 25.0  # how long a SIGTERM waits for running trainers to save (k8s gives 30)


class TrialInterrupted(BaseException):
    """A trial stopped on request after saving its checkpoint: not an outcome, so it is never a
    ledger record (a BaseException, like KeyboardInterrupt, so `except Exception` lets it pass);
    re-running the study resumes it from `step`."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"interrupted at step {step} ({reason}); the checkpoint is saved, re-run to resume")
        self.step, self.reason = step, reason


# ---- the process-wide stop flag ---------------------------------------------------------------
_STOP = threading.Event()
_STOP_REASON: list[str] = []
_LOCK = threading.Condition()
_ACTIVE: dict[int, Callable[[], None] | None] = {}  # thread id of a trainer in its step loop -> its flush
_PARKED: set[int] = set()  # trainers blocked in a report (Tune's): they cannot see a stop request


def request_stop(reason: str) -> None:
    """Ask every running trainer of this process to checkpoint and stop at its next step boundary."""
    if not _STOP.is_set():
        _STOP_REASON[:] = [reason]
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


def stop_reason() -> str:
    return _STOP_REASON[0] if _STOP_REASON else "stop requested"


def clear_stop() -> None:
    """Forget a stop request (the runner reuses a worker process for the next trial)."""
    _STOP.clear()
    _STOP_REASON.clear()


def active_trainers() -> int:
    with _LOCK:
        return len(_ACTIVE)


@contextlib.contextmanager
def running_trainer(flush: Callable[[], None] | None = None) -> Iterator[threading.Event]:
    """Mark a trainer's step loop as running (a stop request waits for it); yields the stop flag.
    `flush` saves the trainer's state as of its last completed step: called by whoever asks for a
    stop while the trainer is parked in a report (`reporting`), where its state is consistent."""
    tid = threading.get_ident()
    with _LOCK:
        _ACTIVE[tid] = flush
    try:
        yield _STOP
    finally:
        with _LOCK:
            _ACTIVE.pop(tid, None)
            _PARKED.discard(tid)
            _LOCK.notify_all()


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Around a call that blocks the trainer until someone else answers (Tune's report, which
    returns only when the driver asks for the next result): meanwhile a stop request is served by
    calling the trainer's flush from the asking thread."""
    tid = threading.get_ident()
    with _LOCK:
        _PARKED.add(tid)
        _LOCK.notify_all()
    try:
        yield
    finally:
        with _LOCK:
            _PARKED.discard(tid)


def flush_and_stop(reason: str, timeout: float = FLUSH_GRACE_SECONDS) -> bool:
    """Ask every trainer of this process to save and stop, and wait (up to `timeout` seconds) until
    each one has: left its step loop (it saved at a step boundary), or was parked in a report and
    its flush ran here. True when all of them did."""
    request_stop(reason)
    deadline = time.monotonic() + timeout
    flushed: set[int] = set()
    with _LOCK:
        while True:
            for tid in [t for t in _ACTIVE if t in _PARKED and t not in flushed]:
                flushed.add(tid)
                flush = _ACTIVE[tid]
                if flush is not None:
                    try:
                        flush()
                    except Exception as error:  # noqa: BLE001 -- the next one still gets its turn
                        log.warning("flush of a parked trainer failed (%s: %s)", type(error).__name__, error)
            if not [t for t in _ACTIVE if t not in flushed]:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _LOCK.wait(left)


def wait_for_flush(timeout: float) -> bool:
    """Block until no trainer of this process is in its step loop, or `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with _LOCK:
        while _ACTIVE:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _LOCK.wait(left)
    return True


def install_sigterm_flush(grace: float = FLUSH_GRACE_SECONDS) -> bool:
    """Make SIGTERM save running trials before the process exits: the handler asks them to stop,
    waits up to `grace` seconds for their checkpoints, then calls the handler that was there
    before (Ray's exits the worker). Only the main thread may install handlers: False elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_scaling_flush", False):
        return True

    def handler(signum, frame):
        if active_trainers():
            flush_and_stop("SIGTERM", grace)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    handler._scaling_flush = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, handler)
    return True


@contextlib.contextmanager
def sigterm_flush(grace: float = FLUSH_GRACE_SECONDS) -> Iterator[None]:
    """For a trial run in a plain Python process (main thread): SIGTERM becomes checkpoint-and-stop
    (the trial raises TrialInterrupted) instead of death. The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "_scaling_flush", False):  # the runner installed it for the whole process
        yield
        return

    def handler(signum, frame):
        request_stop("SIGTERM")  # the step loop saves and raises; nothing to wait for here

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- when to checkpoint ------------------------------------------------------------------------
class CheckpointPolicy:
    """Save every `every_seconds` of wall clock (besides the evaluation points the trainer saves
    at), and at once when a stop is requested. `clock` is injectable for tests."""

    def __init__(self, every_seconds: float | None = DEFAULT_CHECKPOINT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_seconds is not None and not (every_seconds > 0 and math.isfinite(every_seconds)):
            raise ValueError(f"checkpoint every_seconds={every_seconds!r}: give a number of seconds > 0 "
                             "(e.g. 60), or None for evaluation points only")
        self.every_seconds, self.clock = every_seconds, clock
        self.last = clock()
        self.count = 0

    def due(self) -> bool:
        if _STOP.is_set():
            return True
        return self.every_seconds is not None and self.clock() - self.last >= self.every_seconds

    def saved(self) -> None:
        self.last = self.clock()
        self.count += 1


# ---- train metrics between log rows ------------------------------------------------------------
class StepLog:
    """The train metrics of the steps since the last row: mean loss, last lr and grad norm,
    tokens/s. `add` every step; `row` every `every` steps (or at the end) returns the row and
    starts a new window."""

    def __init__(self, every: int = DEFAULT_LOG_EVERY, tokens_per_step: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"log_every={every!r}: give a number of steps >= 1 (e.g. {DEFAULT_LOG_EVERY})")
        self.every, self.tokens_per_step, self.clock = every, tokens_per_step, clock
        self._reset()

    def _reset(self) -> None:
        self.t0, self.loss_sum, self.n = self.clock(), 0.0, 0

    def due(self, step: int, last: bool = False) -> bool:
        """Whether the step just done (1-based) ends a window."""
        return step % self.every == 0 or last

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.n += 1

    def row(self, step: int, lr: float, grad_norm: float | None, tokens: int) -> dict[str, float]:
        elapsed = max(self.clock() - self.t0, 1e-9)
        out = {"step": step, "train_loss": self.loss_sum / max(self.n, 1), "lr": lr,
               "tokens_per_s": self.n * self.tokens_per_step / elapsed, "tokens": tokens}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        self._reset()
        return out


# ---- what a running trial tells the world --------------------------------------------------------
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def progress_path(storage_uri: str, key: str) -> tuple[Any, str]:
    fs, root = sfs.resolve(storage_uri)
    return fs, sfs.join(root, "progress", f"{key}.json")


def log_path(storage_uri: str, key: str) -> tuple[Any, str]:
    fs, root = sfs.resolve(storage_uri)
    return fs, sfs.join(root, "logs", f"{key}.log")


class TrialProgress:
    """The trial's progress file and its own log under the study's storage. Tracking must never
    fail a trial: a write that fails is logged and skipped."""

    def __init__(self, storage_uri: str, key: str, *, info: dict[str, Any] | None = None,
                 node_id: str | None = None, every_seconds: float = DEFAULT_PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fs, self.path = progress_path(storage_uri, key)
        self.log_fs, self.log_file = log_path(storage_uri, key)
        self.every_seconds, self.clock = every_seconds, clock
        self.state: dict[str, Any] = {
            "key": key, **(info or {}), "state": "starting", "step": 0, "total_steps": None,
            "host": socket.gethostname(), "node_id": node_id, "pid": os.getpid(),
            "started_at": now_iso(), "updated_at": now_iso(),
        }
        self._last_write = -math.inf
        self._pending: list[str] = []
        self._old_log = None  # an object store cannot append: the earlier attempts' text, read once

    # -- the progress file
    def update(self, force: bool = False, **fields: Any) -> None:
        self.state.update(fields)
        if force or self.clock() - self._last_write >= self.every_seconds:
            self.write()

    def write(self) -> None:
        self.state["updated_at"] = now_iso()
        self._last_write = self.clock()
        try:
            sfs.write_bytes_atomic(self.fs, self.path, json.dumps(self.state, default=str).encode())
        except Exception as error:  # noqa: BLE001 -- progress must not fail the trial
            log.warning("progress file %s not written (%s: %s)", self.path, type(error).__name__, error)
        self.flush_log()

    def remove(self) -> None:
        try:
            if sfs.exists(self.fs, self.path):
                self.fs.delete_file(self.path)
        except Exception as error:  # noqa: BLE001
            log.warning("progress file %s not removed (%s: %s)", self.path, type(error).__name__, error)
        self.flush_log()

    # -- the trial's milestones (the same words for a trial run alone and for a seed of a pack)
    def started(self, spec: Any, node_id: str | None, packed_with: list[int] | None = None) -> None:
        self.say(f"start on {self.state['host']} (pid {os.getpid()}" + (f", Ray node {node_id}" if node_id else "")
                 + f"): {spec.cell} seed {spec.seed} [{spec.stage}]"
                 + (f", packed with seeds {packed_with}" if packed_with else ""))
        self.update(force=True)

    def training(self, start_step: int, total_steps: int, metric: str, params: tuple[int, int]) -> None:
        total, non_embedding = params
        self.say(("resumed from the checkpoint at step " if start_step else "training from step ")
                 + f"{start_step} of {total_steps}; {total:,} parameters ({non_embedding:,} non-embedding)")
        self.update(force=True, state="running", step=start_step, total_steps=total_steps, metric=metric,
                    params_total=int(total), resumed_from_step=start_step)

    def interrupted(self, step: int, reason: str) -> None:
        self.say(f"interrupted at step {step} ({reason}); checkpoint saved, re-run the study to resume")
        self.update(force=True, state="interrupted", step=step)

    def failed(self, step: int, error: str) -> None:
        self.say(f"failed at step {step}: {error}")
        self.remove()

    def finished(self, record: Any) -> None:
        value = "none" if record.metric_value is None else f"{record.metric_value:.6g}"
        self.say(f"finished: {record.status}, {record.metric_name or 'metric'} {value} at step {record.best_step} "
                 f"after {record.steps} steps, {record.wall_seconds:.1f}s" + (f" ({record.error})" if record.error else ""))
        self.remove()

    # -- the trial's log
    def say(self, text: str) -> None:
        self._pending.extend(f"{now_iso()} {line}" for line in text.rstrip("\n").splitlines())

    def flush_log(self) -> None:
        if not self._pending:
            return
        text = "".join(f"{line}\n" for line in self._pending)
        try:
            if isinstance(self.log_fs, pafs.LocalFileSystem):  # append: earlier attempts' lines stay
                os.makedirs(os.path.dirname(self.log_file), exist_ok=True)
                with open(self.log_file, "a") as out:
                    out.write(text)
            else:
                if self._old_log is None:
                    exists = sfs.exists(self.log_fs, self.log_file)
                    self._old_log = sfs.read_bytes(self.log_fs, self.log_file).decode() if exists else ""
                self._old_log += text
                sfs.write_bytes_atomic(self.log_fs, self.log_file, self._old_log.encode())
            self._pending.clear()
        except Exception as error:  # noqa: BLE001
            log.warning("trial log %s not written (%s: %s)", self.log_file, type(error).__name__, error)


class ThreadLogHandler(logging.Handler):
    """Copies this thread's warnings and errors (any logger) into the trial's log."""

    def __init__(self, progress: TrialProgress, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.progress, self.thread = progress, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and record.name != __name__:
            try:
                self.progress.say(f"{record.levelname} {record.name}: {record.getMessage()}")
            except Exception:  # noqa: BLE001
                pass


@contextlib.contextmanager
def thread_log(progress: TrialProgress) -> Iterator[None]:
    handler = ThreadLogHandler(progress)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
