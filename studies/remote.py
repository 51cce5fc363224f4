"""Submit a study to a remote Ray cluster as a Ray Job, and watch, tail or cancel it.

The job runs `scaling run STUDY --address auto` on the cluster with the working directory shipped
(minus virtualenvs, results and caches). Secrets are never shipped: the cluster provides
WANDB_API_KEY (e.g. from a Kubernetes Secret); `--env NAME` forwards other named variables.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from studies.spec import StudySpec

EXCLUDES = [".venv", ".git", "runs", "wandb", "__pycache__", "*.egg-info", ".pytest_cache", "docs/results"]
NEVER_FORWARD = ("WANDB_API_KEY", "RAY_AUTH_TOKEN", "SCALING_API_TOKEN", "AWS_SECRET_ACCESS_KEY")
FORWARD_DEFAULT = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "SCALING_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def default_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("--address: give the Ray dashboard/job address, e.g. --address http://HEAD:8265 (or set RAY_ADDRESS)")
    return address


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(default_address(address))


STUDY_ENV = "SCALING_STUDY_YAML"
RESUME_ENV = "SCALING_RESUME_COMMAND"


def submit(study: StudySpec, study_path: str, *, address: str | None, working_dir: str | None = ".",
           forward_env: tuple[str, ...] = ()) -> str:
    """Submit; returns the Ray job id. The study travels inside the job (its exact text), so a
    study file that git ignores or that lies outside the working directory is still the one run."""
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
        runtime_env.update(working_dir=os.path.abspath(working_dir), excludes=EXCLUDES)
    return client(address).submit_job(
        entrypoint="python -m studies.job --address auto",
        submission_id=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        runtime_env=runtime_env,
        metadata={"study": study.name, "study_file": os.path.basename(study_path)},
    )


def job_status(job_id: str, address: str | None) -> dict:
    info = client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "study": (info.metadata or {}).get("study"),
            "start_time": info.start_time, "end_time": info.end_time, "entrypoint": info.entrypoint}


def logs(job_id: str, address: str | None) -> str:
    return client(address).get_job_logs(job_id)


async def follow(job_id: str, address: str | None):
    async for lines in client(address).tail_job_logs(job_id):
        yield lines


def cancel(job_id: str, address: str | None) -> bool:
    return client(address).stop_job(job_id)
