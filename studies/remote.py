"""Submit a study to a remote Ray cluster as a Ray Job, and watch, tail, list or cancel it.

The job runs `scaling run STUDY --address auto` on the cluster with the working directory shipped
as Ray ships it: minus what `.gitignore` and `.rayignore` files list (at any depth, as Ray's
runtime_env does), minus EXCLUDES and `--exclude` patterns. The package is measured before it is
uploaded, so a directory too large for Ray's upload limit is refused with its largest entries and
the fix, not a "413" traceback. Secrets are never shipped: the cluster provides WANDB_API_KEY (e.g.
from a Kubernetes Secret); `--env NAME` forwards other named variables.

Token authentication (Ray >= 2.52 turns it on): the token comes from `--token-file`, else
RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else Ray's fallback ~/.ray/auth_token.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from studies.spec import StudySpec

EXCLUDES = [".venv", ".git", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache", "docs/results"]
NEVER_FORWARD = ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "SCALING_API_TOKEN", "AWS_SECRET_ACCESS_KEY")
FORWARD_DEFAULT = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "SCALING_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
FALLBACK_TOKEN = Path("~/.ray/auth_token")


# ---- token authentication ------------------------------------------------------------------------

def use_token(token_file: str | None = None, *, warn=None) -> str | None:
    """Make this process send Ray's auth token, before Ray's client is created. Returns where the
    token comes from (None: no token anywhere, the cluster must not need one).

    Ray's HTTP client (the job API) sends the token only when RAY_AUTH_MODE=token, which a client
    machine rarely sets: a token given here (file or environment) turns it on. An explicit
    RAY_AUTH_MODE=disabled is respected."""
    warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr))
    if token_file is not None:
        path = Path(token_file).expanduser()
        problem = _token_file_problem(path)
        if problem:
            raise ValueError(f"--token-file {token_file}: {problem}")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())
        os.environ.pop("RAY_AUTH_TOKEN", None)  # Ray reads RAY_AUTH_TOKEN first: the file given wins
        source = f"--token-file {path}"
    elif os.environ.get("RAY_AUTH_TOKEN", "").strip():
        source = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        problem = _token_file_problem(path)
        if problem:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={os.environ['RAY_AUTH_TOKEN_PATH']}: {problem}")
        source = f"RAY_AUTH_TOKEN_PATH ({path})"
    elif FALLBACK_TOKEN.expanduser().is_file():
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            warn(f"using Ray's fallback token {FALLBACK_TOKEN.expanduser()}: it is shared by every Ray cluster and "
                 "program of this account on this machine (an embedded `scaling run` Ray writes one there), and by "
                 "everyone who uses this account or can read its home. Give the cluster's own token with "
                 "--token-file PATH or RAY_AUTH_TOKEN_PATH=PATH (a file only you can read)")
        source = str(FALLBACK_TOKEN)
    else:
        return None
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return source
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray read its config at import: make it see token mode and this token
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    if token_file is not None or source.startswith("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            warn(f"{path} can be read by other users (mode {stat.filemode(path.stat().st_mode)}); anyone who reads "
                 f"it can run code on the cluster: chmod 600 {path}")
    return source


def _token_file_problem(path: Path) -> str | None:
    if not path.exists():
        return "no such file; give the file holding the cluster's Ray token (`ray get-auth-token` prints a token)"
    if not path.is_file():
        return "not a file; give the file holding the cluster's Ray token"
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot be read ({error}); give a readable text file holding the token"
    if not text:
        return "the file is empty; write the cluster's token into it (`ray get-auth-token` prints it on the head)"
    return None


def default_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("--address: give the Ray dashboard/job address, e.g. --address http://HEAD:8265 (or set RAY_ADDRESS)")
    return address


AUTH_FIX = ("give the cluster's token: --token-file PATH (a file holding it), or RAY_AUTH_TOKEN=... / "
            "RAY_AUTH_TOKEN_PATH=PATH; on the head, `ray get-auth-token` prints it")


def client(address: str | None):
    """The cluster's job API client; an unreachable address or a refused token is a ValueError
    saying what to do, not a traceback."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = default_address(address)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise ValueError(_auth_message(address, error)) from None
    except ConnectionError as error:
        raise ValueError(f"--address {address}: cannot reach a Ray job API there ({error}); give the dashboard "
                         "address of a running cluster, e.g. http://HEAD:8265 (port-forward it if it is in Kubernetes)") from None


def _auth_message(address: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    sent = "a token was sent but the cluster refused it" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" \
        else "no token was sent"
    return f"--address {address}: the cluster requires Ray token authentication ({first}; {sent}); {AUTH_FIX}"


def _call(address: str, what: str, fn, *args, **kwargs):
    """One job API call, with Ray's authentication and HTTP errors turned into ValueErrors."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as error:
        raise ValueError(_auth_message(address, error)) from None
    except RuntimeError as error:
        text = str(error)
        if "status code 404" in text and what.startswith("job"):
            raise ValueError(f"{what}: no such job on {address}; `scaling jobs --address {address}` lists them") from None
        raise


# ---- the package: what Ray would upload as the job's working directory ---------------------------

@dataclass
class Package:
    root: str
    files: list[tuple[str, int]]  # (path relative to root, bytes), as Ray would zip them
    excludes: list[str]
    ignore_files: list[str] = field(default_factory=list)  # .gitignore / .rayignore files that applied

    @property
    def bytes(self) -> int:
        """Size of Ray's zip: its files are stored uncompressed (ZIP_STORED), plus ~100 bytes of
        headers per entry and its name twice (local header and central directory)."""
        return sum(size + 76 + 2 * len(name.encode()) for name, size in self.files) + 22

    def largest(self, n: int = 5) -> list[tuple[str, int, int]]:
        """The n largest top-level entries: (name, bytes, files); a directory counts what is under it."""
        sizes: dict[str, list[int]] = {}
        for name, size in self.files:
            head, sep, _ = name.partition("/")
            entry = sizes.setdefault(head + ("/" if sep else ""), [0, 0])
            entry[0] += size
            entry[1] += 1
        return sorted(((k, v[0], v[1]) for k, v in sizes.items()), key=lambda t: -t[1])[:n]


def upload_limit() -> tuple[int, str]:
    """The most a job's working directory may be: the dashboard takes the package in one HTTP
    request of at most DASHBOARD_CLIENT_MAX_SIZE (100 MiB in Ray 2.60: beyond it the cluster answers
    413), and stores it in the GCS, whose gRPC messages are capped too."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    http = int(ray_constants.DASHBOARD_CLIENT_MAX_SIZE)
    if GCS_STORAGE_MAX_SIZE < http:
        return int(GCS_STORAGE_MAX_SIZE), "the GCS's message size limit (RAY_max_grpc_message_size)"
    return http, "the Ray dashboard's request size limit, which a job's working directory is uploaded through"


def working_dir_package(working_dir: str, excludes: list[str]) -> Package:
    """What Ray would pack, found by Ray's own walk (runtime_env packaging): .gitignore files are
    honoured unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, .rayignore files always, at every level."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).absolute()
    if not root.is_dir():
        raise ValueError(f"--working-dir {working_dir}: not a directory; give the directory to ship with the job "
                         "(default: the current directory)")
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    files: list[tuple[str, int]] = []
    ignore_files: list[str] = []

    def handler(path: Path) -> None:  # what Ray's zip handler packs: files and empty directories
        if path.is_dir():
            if next(path.iterdir(), None) is None:
                files.append((str(path.relative_to(root)) + "/", 0))
            for name in ((".gitignore",) if include_gitignore else ()) + (".rayignore",):
                if (path / name).is_file():
                    ignore_files.append(str((path / name).relative_to(root)))
        elif path.is_file():
            files.append((str(path.relative_to(root)), path.stat().st_size))

    import logging

    quiet = logging.getLogger("scaling.package")
    quiet.setLevel(logging.WARNING)
    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore=include_gitignore, logger=quiet)
    return Package(str(root), files, list(excludes), ignore_files)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 1024:.1f} KiB"


def check_package(package: Package, limit: int | None = None, why: str | None = None) -> None:
    """Refuse a package over Ray's upload limit before anything is sent: its size, the limit and
    why, its largest entries and the fix."""
    if limit is None:
        limit, why = upload_limit()
    if package.bytes < limit:
        return
    largest = "\n".join(f"    {_mib(size):>10}  {name}" + (f" ({count:,} files)" if name.endswith("/") else "")
                        for name, size, count in package.largest())
    applied = ", ".join(package.ignore_files) or "no .gitignore or .rayignore file"
    raise ValueError(
        f"--working-dir {package.root}: the package Ray would upload is {_mib(package.bytes)} "
        f"({len(package.files):,} files), over Ray's limit of {_mib(limit)} ({why}); nothing was submitted.\n"
        f"  Largest entries (after {applied} and the excludes {package.excludes}):\n{largest}\n"
        "  Fix: list what the job does not need in a .rayignore file in the working directory (gitignore syntax; "
        ".gitignore files are honoured too), or pass --exclude PATTERN (repeatable, e.g. --exclude 'data/'), or give "
        "--working-dir a smaller directory (the code the job runs). Datasets belong in the dataset cache "
        "(`cache:` / SCALING_CACHE) or on shared storage, not in the job's package."
    )


STUDY_ENV = "SCALING_STUDY_YAML"
RESUME_ENV = "SCALING_RESUME_COMMAND"


def submit(study: StudySpec, study_path: str, *, address: str | None, working_dir: str | None = ".",
           forward_env: tuple[str, ...] = (), excludes: tuple[str, ...] = (), announce=None) -> str:
    """Submit; returns the Ray job id. The study travels inside the job (its exact text), so a
    study file that git ignores or that lies outside the working directory is still the one run.
    The working directory is measured first: over Ray's upload limit it is refused, naming its
    largest entries and the fix. `announce` gets one line describing the package."""
    secret = [name for name in forward_env if name in NEVER_FORWARD]
    if secret:
        raise ValueError(f"--env {secret}: secrets are not shipped with a job; give them to the cluster as secrets")
    if study.storage is None or not (os.path.isabs(study.storage) or "://" in study.storage):
        raise ValueError(
            f"storage={study.storage!r}: a cluster job needs an absolute shared path (e.g. /data/runs/{study.name}) "
            "or an object-store URI (s3://...) in the study file, else results land in the job's temporary directory"
        )
    env = {name: os.environ[name] for name in (*FORWARD_DEFAULT, *forward_env) if name in os.environ}
    env[STUDY_ENV] = Path(study_path).read_text()
    # an interrupted job prints how to resume it: submitting it again, not the job's own `scaling run`
    env.setdefault(RESUME_ENV, " ".join(shlex.quote(w) for w in [
        "scaling", "submit", study_path, "--address", default_address(address),
        *(["--working-dir", working_dir] if working_dir and working_dir != "." else []),
        *(word for name in forward_env for word in ("--env", name))]))
    # `scaling cancel` sends the driver SIGTERM, then SIGKILL after this many seconds (Ray's default
    # 3): time for the driver to stop Tune and for every running trial to save its checkpoint
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "30"))
    runtime_env: dict = {"env_vars": env}
    if working_dir:
        patterns = [*EXCLUDES, *excludes]
        package = working_dir_package(working_dir, patterns)
        check_package(package)
        if announce:
            ignored = f"; honoured {', '.join(package.ignore_files)}" if package.ignore_files else ""
            announce(f"working directory {package.root}: {len(package.files):,} files, {_mib(package.bytes)} "
                     f"(limit {_mib(upload_limit()[0])}){ignored}")
        runtime_env.update(working_dir=package.root, excludes=patterns)
    address = default_address(address)
    jobs = client(address)
    try:
        return _call(address, "submit", jobs.submit_job,
                     entrypoint="python -m studies.job --address auto",
                     submission_id=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                     runtime_env=runtime_env,
                     metadata={"study": study.name, "study_file": os.path.basename(study_path)})
    except RuntimeError as error:
        if "413" in str(error):  # a cluster whose limit is lower than this Ray's
            raise ValueError(f"--address {address}: the cluster refused the working directory as too large ({error}); "
                             "nothing was submitted. Fix: list large files in .rayignore, pass --exclude PATTERN, or "
                             "give --working-dir a smaller directory") from None
        raise


def job_status(job_id: str, address: str | None) -> dict:
    address = default_address(address)
    info = _call(address, f"job {job_id}", client(address).get_job_info, job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "study": (info.metadata or {}).get("study"),
            "start_time": info.start_time, "end_time": info.end_time, "entrypoint": info.entrypoint}


def list_jobs(address: str | None) -> list[dict]:
    """Every job the cluster knows (newest first): submission id, status, study, times."""
    address = default_address(address)
    out = []
    for info in _call(address, "jobs", client(address).list_jobs):
        status = str(info.status.value if hasattr(info.status, "value") else info.status)
        out.append({"job_id": info.submission_id or info.job_id, "status": status,
                    "study": (info.metadata or {}).get("study"), "start_time": info.start_time,
                    "end_time": info.end_time, "message": info.message, "entrypoint": info.entrypoint})
    return sorted(out, key=lambda j: -(j["start_time"] or 0))


def logs(job_id: str, address: str | None) -> str:
    address = default_address(address)
    return _call(address, f"job {job_id}", client(address).get_job_logs, job_id)


async def follow(job_id: str, address: str | None):
    async for lines in client(address).tail_job_logs(job_id):
        yield lines


def cancel(job_id: str, address: str | None) -> bool:
    address = default_address(address)
    return _call(address, f"job {job_id}", client(address).stop_job, job_id)
