"""The driver owns the Ray it starts: when `scaling run` dies, by any signal (SIGKILL included), every
process of its embedded Ray goes with it.

Ray fate-shares its GCS and raylet with the driver that started them, but the agents the raylet
starts (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, sometimes idle `default_worker`s) outlive a
killed driver for minutes. So before `ray.init` the driver sets a fresh token in its environment,
which every process of that Ray instance inherits (GCS, raylet, agents, workers), takes it out again
once Ray is up, and starts this watchdog in its own session with the read end of a pipe. The
watchdog blocks on the pipe; the kernel closes the driver's end however the driver ends, and then
the watchdog terminates every process that carries the token (SIGTERM, then SIGKILL after a grace
period). Only processes of this user with this run's token are touched: other Ray instances on the
machine, and the user's shell, are not.

    owner = RayOwner.start()   # before ray.init
    ray.init(...)
    owner.started()            # the token leaves the driver's environment
    ...
    ray.shutdown(); owner.close()   # a normal end: stragglers are reaped too
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

TOKEN_ENV = "SCALING_RAY_OWNER"
GRACE_S = 3.0


def marked_processes(token: str, exclude: set[int] | None = None) -> list[int]:
    """PIDs of this user's processes whose environment carries `TOKEN_ENV=token`."""
    needle = f"{TOKEN_ENV}={token}".encode()
    exclude = exclude or set()
    found: list[int] = []
    if os.path.isdir("/proc"):
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in exclude:
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read()
            except OSError:  # gone, or another user's process
                continue
            if needle in environ.split(b"\0"):
                found.append(int(name))
        return found
    try:  # macOS and others: psutil reads other processes' environments where the OS allows it
        import psutil
    except ImportError:
        return found
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in exclude:
            continue
        try:
            if proc.environ().get(TOKEN_ENV) == token:
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def reap(token: str, exclude: set[int] | None = None, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every marked process, SIGKILL what is left after `grace_s`; returns the PIDs signalled."""
    exclude = set(exclude or ()) | {os.getpid()}
    signalled: list[int] = []
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        pids = marked_processes(token, exclude)
        for pid in pids:
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = marked_processes(token, exclude)
            if pids:
                time.sleep(0.1)
        if not pids:
            break
    return sorted(set(signalled))


class RayOwner:
    """Ties an embedded Ray instance's processes to the life of this (driver) process."""

    def __init__(self, token: str, watchdog: subprocess.Popen | None) -> None:
        self.token = token
        self.watchdog = watchdog

    @classmethod
    def start(cls) -> "RayOwner":
        token = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
        watchdog = None
        try:
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "studies.reaper", token, str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=env, start_new_session=True,  # a Ctrl-C to the terminal must not stop it first
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
        except OSError:  # no watchdog: Ray still fate-shares its GCS and raylet with the driver
            watchdog = None
        os.environ[TOKEN_ENV] = token
        return cls(token, watchdog)

    def started(self) -> None:
        """Ray is up: later children of the driver (report browsers, other runs) are not Ray's."""
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]

    def processes(self) -> list[int]:
        return marked_processes(self.token, {os.getpid()})

    def close(self) -> None:
        """After ray.shutdown(): the watchdog reaps what shutdown left behind, then exits."""
        self.started()
        if self.watchdog is None:
            return
        try:
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=GRACE_S + 5)
        except (OSError, subprocess.TimeoutExpired):
            pass


def _watch(token: str, driver_pid: int) -> None:
    try:
        while sys.stdin.buffer.read(65536):
            pass  # the driver never writes; EOF means it closed the pipe or died
    except OSError:
        pass
    reap(token, exclude={driver_pid} if _alive(driver_pid) else set())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not skip the reaping
    _watch(sys.argv[1], int(sys.argv[2]))
