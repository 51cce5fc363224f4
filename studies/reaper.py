"""The driver owns the Ray it starts: when `scaling run` dies, by any signal (SIGKILL included), every
process of its embedded Ray goes with it.

Ray fate-shares its GCS and raylet with the driver that started them, but the agents the raylet
starts (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, sometimes idle `default_worker`s) outlive a
killed driver for minutes. So the driver starts this watchdog in its own session with the read end
of a pipe, and marks what it owns two ways:

- a fresh token in its environment before `ray.init`, which every process of that Ray instance
  inherits (GCS, raylet, agents, workers); it leaves the driver's environment once Ray is up;
- the Ray session directory, written to the pipe once Ray is up: every process of that instance
  keeps its log files there open.

The token alone is not enough: the agents set their process title (`ray::DashboardAgent`) with
setproctitle, which may overwrite the memory that /proc/PID/environ reads, so on some runs their
token is simply gone from it. Open files in the session directory, which is unique to the run, are
not touched by that. The watchdog blocks on the pipe; the kernel closes the driver's end however the
driver ends, and then the watchdog terminates every process of this user that carries the token or
holds a file in the session directory and is a Ray process by its command line (SIGTERM, then
SIGKILL after a grace period). Other Ray instances on the machine, and the user's shell (a `tail -f`
of a session log included), are not touched.

    owner = RayOwner.start()           # before ray.init
    ray.init(...)
    owner.started(session_dir)         # the token leaves the driver's environment
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


def _under(path: str, dirs: tuple[str, ...]) -> bool:
    return any(path == d or path.startswith(d + os.sep) for d in dirs)


def _holds_file_under(pid: str, dirs: tuple[str, ...]) -> bool:
    """Whether /proc/<pid> has a file open (or its working directory) under one of `dirs`."""
    if not dirs:
        return False
    try:
        if _under(os.readlink(f"/proc/{pid}/cwd"), dirs):
            return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if _under(os.readlink(f"/proc/{pid}/fd/{fd}"), dirs):
                    return True
            except OSError:
                continue
    except OSError:  # gone, or another user's process
        return False
    return False


def _ray_command(argv: list[str]) -> bool:
    """A Ray process by its command line: a `ray::...` title, a Ray binary (raylet, gcs_server), or a
    Python script of the ray package (workers, agents, monitors) -- not, say, a user's `tail -f` of
    one of the session's log files."""
    if not argv:
        return False
    if argv[0].startswith("ray::") or os.path.basename(argv[0]) in ("raylet", "gcs_server", "plasma_store"):
        return True
    return any(f"{os.sep}ray{os.sep}" in a and a.endswith(".py") for a in argv[1:4])


def _is_ray_process(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return _ray_command([a.decode(errors="replace") for a in f.read().split(b"\0") if a])
    except OSError:
        return False


def marked_processes(token: str, exclude: set[int] | None = None, session_dirs: tuple[str, ...] = ()) -> list[int]:
    """PIDs of this user's processes whose environment carries `TOKEN_ENV=token`, or that hold a file
    open under one of `session_dirs` (the Ray session directories of the run)."""
    needle = f"{TOKEN_ENV}={token}".encode()
    exclude = exclude or set()
    dirs = tuple(os.path.realpath(d) for d in session_dirs if d)
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
            if needle in environ.split(b"\0") or (_holds_file_under(name, dirs) and _is_ray_process(name)):
                found.append(int(name))
        return found
    try:  # macOS and others: psutil reads other processes' environments and files where the OS allows it
        import psutil
    except ImportError:
        return found
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in exclude:
            continue
        try:
            if proc.environ().get(TOKEN_ENV) == token or (
                    _ray_command(proc.cmdline()) and any(_under(f.path, dirs) for f in proc.open_files())):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def reap(token: str, exclude: set[int] | None = None, grace_s: float = GRACE_S,
         session_dirs: tuple[str, ...] = ()) -> list[int]:
    """SIGTERM every marked process, SIGKILL what is left after `grace_s`; returns the PIDs signalled."""
    exclude = set(exclude or ()) | {os.getpid()}
    signalled: list[int] = []
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        pids = marked_processes(token, exclude, session_dirs)
        for pid in pids:
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = marked_processes(token, exclude, session_dirs)
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
        self.session_dirs: tuple[str, ...] = ()

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

    def started(self, session_dir: str | None = None) -> None:
        """Ray is up: later children of the driver (report browsers, other runs) are not Ray's. The
        watchdog learns the session directory, whose open files mark this run's processes."""
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]
        if session_dir and session_dir not in self.session_dirs:
            self.session_dirs += (session_dir,)
            if self.watchdog is not None and self.watchdog.stdin is not None:
                try:
                    self.watchdog.stdin.write(os.path.realpath(session_dir).encode() + b"\n")
                    self.watchdog.stdin.flush()
                except OSError:
                    pass

    def processes(self) -> list[int]:
        return marked_processes(self.token, {os.getpid()}, self.session_dirs)

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


def _ray_temp_root() -> str:
    """Where an embedded Ray puts its session directories (ray._common.utils, without importing Ray)."""
    if "RAY_TMPDIR" in os.environ:
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp"
    return os.path.join(base, "ray")


def _sessions_of(driver_pid: int, since: float) -> list[str]:
    """Session directories Ray named after this driver (`session_<date>_<pid>`) since the watchdog
    started: what a driver killed inside `ray.init`, before it could write its own, leaves."""
    root = _ray_temp_root()
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        return found
    for name in names:
        if name.startswith("session_") and name.endswith(f"_{driver_pid}"):
            path = os.path.join(root, name)
            try:
                if os.stat(path).st_mtime >= since - 1 and not os.path.islink(path):
                    found.append(os.path.realpath(path))
            except OSError:
                continue
    return found


def _watch(token: str, driver_pid: int) -> None:
    since = time.time()
    dirs: list[str] = []
    try:
        for line in sys.stdin.buffer:  # the driver writes its Ray session directory; EOF: it closed the pipe or died
            path = line.decode(errors="replace").strip()
            if path and os.path.isabs(path):
                dirs.append(path)
    except OSError:
        pass
    dirs += [d for d in _sessions_of(driver_pid, since) if d not in dirs]
    reap(token, exclude={driver_pid} if _alive(driver_pid) else set(), session_dirs=tuple(dirs))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver must not skip the reaping
    _watch(sys.argv[1], int(sys.argv[2]))
