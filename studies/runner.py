"""Run a study on Ray Tune: embedded local Ray by default, or an existing cluster with `address`.

Each Tune trial calls `workers.run_trial` and appends its TrialRecord to the ledger itself (on the
worker), so a record survives the driver. What runs is the plan minus the ledger's keys, so
re-running a finished or interrupted study runs only the missing trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from storage import fs as sfs
from storage.cache import DatasetCache
from storage.ledger import Ledger
from storage.records import TrialSpec
from studies import tracking
from studies.plan import Plan, make_plan
from studies.spec import StudySpec

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    storage: str
    planned: int
    skipped: int
    ran: int
    counts: dict[str, int] = field(default_factory=dict)
    report_path: str | None = None
    fits: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0 and self.counts.get("missing", 0) == 0


def study_paths(study: StudySpec) -> dict[str, str]:
    storage = study.storage_uri()
    local = sfs.is_local(storage)
    return {
        "storage": storage,
        "study_file": sfs.join(storage, "study.yaml"),
        "ray_results": sfs.join(storage, "ray_results"),
        # W&B writes run files locally; on object storage keep them beside the driver
        "wandb": sfs.join(storage, "wandb") if local else os.path.abspath(os.path.join("wandb", study.name)),
    }


def save_study_file(study: StudySpec, paths: dict[str, str]) -> None:
    """The resolved study beside its ledger, so `scaling status/fits/report DIR` need only the directory."""
    fs, path = sfs.resolve(paths["study_file"])
    resolved = study.model_copy(update={"storage": paths["storage"]})
    sfs.write_bytes_atomic(fs, path, resolved.to_yaml().encode())


def save_plan(plan: Plan, paths: dict[str, str]) -> None:
    """The planned trials beside the ledger, so status needs neither torch nor the study's code."""
    fs, path = sfs.resolve(sfs.join(paths["storage"], "plan.json"))
    rows = [
        {"key": t.key, "cell": t.cell, "task": t.task, "variant": t.variant, "d_osc": t.d_osc, "seed": t.seed, "stage": t.stage}
        for t in plan.trials
    ]
    sfs.write_bytes_atomic(fs, path, json.dumps(rows, indent=1).encode())


def prepare_data(study: StudySpec) -> None:
    """Build every split the study needs once, in the driver, before any trial starts."""
    from workers.tasks import get_task

    cache = DatasetCache(study.cache)
    for entry in study.tasks:
        get_task(entry.name).prepare(entry.options, cache)


def _trainable(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial, running on a Ray worker."""
    from ray import tune

    from studies.spec import WandbEntry
    from workers import run_trial

    spec = TrialSpec.from_dict(config["trial"])
    ledger = Ledger(ctx["storage"])
    if spec.key in ledger.keys():  # a retry after the record was written
        tune.report({"status_code": 0, "trial_key": spec.key})
        return
    wandb_cfg = WandbEntry(**ctx["wandb"])
    run = tracking.start_trial_run(spec, wandb_cfg, ctx["wandb_dir"])

    def report(metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if run is not None:
            run.log(scalars, step=int(scalars.get("step", 0)))
        tune.report(scalars)

    record = run_trial(
        spec,
        storage_uri=ctx["storage"],
        cache_uri=ctx["cache"],
        report=report,
        num_threads=ctx["threads"],
        wandb_run_id=run.id if run is not None else None,
    )
    ledger.append(record)
    summary = {
        "status": record.status,
        record.metric_name or "metric": record.metric_value,
        "params_total": record.params_total,
        "wall_seconds": record.wall_seconds,
    }
    tracking.finish_trial_run(run, summary, exit_code=1 if record.status == "failed" else 0)
    if record.status == "failed":  # Tune retries it up to resources.max_failures
        raise RuntimeError(f"trial {spec.key} failed:\n{record.error}")
    tune.report({"status_code": 0, "trial_key": spec.key})


class _Progress:
    """Driver-side progress fed by Tune's callbacks: done, running, failed, ETA. A live bar on a
    terminal; one plain line per finished trial otherwise (CI logs, `kubectl logs`)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.total, self.done, self.running, self.failed = total, 0, 0, 0
        self.enabled = enabled and total > 0
        self.live = self.enabled and sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not self.live,
        )
        self.task = self.progress.add_task("trials", total=total, state="")

    def update(self, advance: int = 0, label: str = "") -> None:
        self.done += advance
        state = f"running {self.running}  failed {self.failed}"
        self.progress.update(self.task, advance=advance, state=state)
        if advance and self.enabled and not self.live:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {label}  {state}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s", flush=True)

    def callback(self) -> "ProgressCallback":
        _PROGRESS[id(self)] = self
        return ProgressCallback(id(self))


_PROGRESS: dict[int, _Progress] = {}


class ProgressCallback(Callback):
    """Feeds a driver-side bar. Holds only a handle: Tune pickles callbacks, a live bar holds locks."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def _bar(self) -> _Progress | None:
        return _PROGRESS.get(self.handle)

    def on_trial_start(self, iteration, trials, trial, **info):
        if bar := self._bar():
            bar.running += 1
            bar.update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if bar := self._bar():
            bar.running = max(0, bar.running - 1)
            bar.update(advance=1, label=f"{_trial_dirname(trial)} done")

    def on_trial_error(self, iteration, trials, trial, **info):
        if bar := self._bar():
            bar.running = max(0, bar.running - 1)
            bar.failed += 1
            bar.update(advance=1, label=f"{_trial_dirname(trial)} FAILED")


def _init_ray(address: str | None, num_cpus: int | None, env_vars: dict[str, str]) -> bool:
    """Connect to (or start) Ray; True when this call started it, so the caller shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
    return True


def _trial_dirname(trial) -> str:
    return TrialSpec.from_dict(trial.config["trial"]).key


def run_trials(study: StudySpec, trials: list[TrialSpec], paths: dict[str, str], *, address, num_cpus, progress: bool) -> None:
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tracking.prepare_environment(paths["wandb"])
    env_vars = {k: os.environ[k] for k in ("WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "SCALING_CACHE") if k in os.environ}
    started = _init_ray(address, num_cpus, env_vars)
    import ray
    from ray import tune

    res = study.resources
    ctx = {
        "storage": paths["storage"],
        "cache": study.cache,
        "wandb": study.tracking.wandb.model_dump(),
        "wandb_dir": paths["wandb"],
        "threads": max(1, math.floor(res.cpus_per_trial)),
    }
    bar = _Progress(len(trials), progress)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, ctx=ctx), {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.to_dict() for t in trials])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=res.max_concurrent_trials, reuse_actors=True, trial_dirname_creator=_trial_dirname
        ),
        run_config=tune.RunConfig(
            name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=paths["ray_results"],
            failure_config=tune.FailureConfig(max_failures=res.max_failures),
            verbose=0,
            callbacks=[bar.callback()],
        ),
    )
    try:
        with bar.progress:
            bar.update()
            tuner.fit()
    finally:
        _PROGRESS.pop(id(bar), None)
        if started:
            ray.shutdown()


def run_study(
    study: StudySpec,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    report: bool = True,
    study_file: str | None = None,
) -> RunResult:
    t0 = time.perf_counter()
    paths = study_paths(study)
    save_study_file(study, paths)
    plan: Plan = make_plan(study)
    save_plan(plan, paths)
    todo = plan.todo
    if todo:
        prepare_data(study)
        run_trials(study, todo, paths, address=address, num_cpus=num_cpus, progress=progress)
    result = RunResult(paths["storage"], len(plan.trials), len(plan.done), len(todo))
    result.counts = trial_counts(study, plan)
    if report:
        from scaling.report import write_report

        written = write_report(paths["storage"])
        result.report_path, result.fits = written.html_path, written.fit_rows
        tracking.log_study_summary(study.name, study.tracking.wandb, paths["wandb"], result.fits, result.report_path)
    result.seconds = time.perf_counter() - t0
    if not result.ok:
        target = study_file or paths["storage"]
        print(
            f"{result.counts.get('failed', 0)} trial(s) failed and {result.counts.get('missing', 0)} did not finish; "
            f"the ledger keeps every finished one. Resume with:\n  scaling run {shlex.quote(str(target))}",
            file=sys.stderr,
        )
    return result


def trial_counts(study: StudySpec, plan: Plan | None = None) -> dict[str, int]:
    """done/diverged/... per status for the planned trials, plus `failed` (crashed, no finished
    record yet) and `missing` (never finished)."""
    plan = plan or make_plan(study)
    wanted = {t.key for t in plan.trials}
    rows = Ledger(study.storage_uri()).rows()
    counts: dict[str, int] = {}
    finished = set()
    for row in rows:
        if row["key"] in wanted and row["status"] != "failed":
            finished.add(row["key"])
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    failed_keys = {row["key"] for row in rows if row["status"] == "failed" and row["key"] in wanted} - finished
    counts["failed"] = len(failed_keys)
    counts["missing"] = len(wanted) - len(finished) - len(failed_keys)
    return counts
