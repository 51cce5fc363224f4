"""Run a study on Ray Tune: embedded local Ray by default, or an existing cluster with `address`.

Each Tune trial calls `workers.run_trial` and appends its TrialRecord to the ledger itself (on the
worker), so a record survives the driver. What runs is the plan minus the ledger's keys, so
re-running a finished or interrupted study runs only the missing trials.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

from storage import fs as sfs
from storage.cache import DatasetCache
from storage.faults import COUNTER_ENV, DRIVER_ENV, FAULT_ENV, fault_point
from storage.ledger import COMPACT_EVERY, Ledger
from storage.records import TrialSpec
from studies import tracking
from studies.plan import Plan, make_plan
from studies.reaper import RayOwner
from studies.resources import check_resources
from studies.search import OBJECTIVE, StudySearcher
from studies.spec import StudySpec, ensure_storage
from workers import lifecycle

log = logging.getLogger(__name__)
# Tune's cleanup gives a stopping trial 5 s before it kills the actor; the trial saves at its next
# step boundary, so a step must end and a checkpoint be written within this
FLUSH_SECONDS = 4.5
PROGRESS_LINE_SECONDS = 30.0  # a trial's progress line in the driver's output at most this often


@dataclass
class RunResult:
    storage: str
    planned: int
    skipped: int
    ran: int
    counts: dict[str, int] = field(default_factory=dict)
    report_path: str | None = None
    report_error: str | None = None
    fits: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: str | None = None  # the signal that stopped the run (SIGINT, SIGTERM); then no report

    @property
    def ok(self) -> bool:
        return not self.interrupted and not self.report_error and self.counts.get("failed", 0) == 0 and self.counts.get("missing", 0) == 0


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


def plan_rows(plan: Plan) -> list[dict[str, Any]]:
    """Every planned trial; a searched cell's trials are slots (key None) until Optuna picks them."""
    rows = [
        {"key": t.key, "cell": t.cell, "task": t.task, "variant": t.variant, "d_osc": t.d_osc, "seed": t.seed, "stage": t.stage}
        for t in plan.trials
    ]
    for t in plan.search_cells:
        base = {"key": None, "cell": t.cell, "task": t.task, "variant": t.variant, "d_osc": t.d_osc}
        rows += [{**base, "seed": None, "stage": "search"} for _ in range(plan.search_trials)]
        rows += [{**base, "seed": seed, "stage": "replicate"} for seed in plan.replicate_seeds]
    # an adaptive design's trials: slots until the design picks their cell (scaling.api.status)
    rows += [{"key": None, "cell": DESIGN_CELL, "task": None, "variant": None, "d_osc": None, "seed": None,
              "stage": "design"} for _ in range(plan.design_trials)]
    return rows


DESIGN_CELL = "design"  # plan.json's cell of the design's open slots


def save_plan(plan: Plan, paths: dict[str, str]) -> None:
    """The planned trials beside the ledger, so status needs neither torch nor the study's code."""
    fs, path = sfs.resolve(sfs.join(paths["storage"], "plan.json"))
    sfs.write_bytes_atomic(fs, path, json.dumps(plan_rows(plan), indent=1).encode())


def prepare_data(study: StudySpec) -> None:
    """Build every split the study needs once, in the driver, before any trial starts."""
    from workers.tasks import get_task

    cache = DatasetCache(study.cache)
    for entry in study.tasks:
        get_task(entry.name).prepare(entry.options, cache)


def _import(path: str):
    """'package.module:attribute' -> the attribute (the trial function is replaceable for benchmarks)."""
    import importlib

    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _tune_report(metrics: dict[str, Any]) -> None:
    """tune.report, unless this process was asked to stop. The report blocks the trial until the
    driver asks for the next result; meanwhile a stop request saves it from the asking thread."""
    from ray import tune

    if lifecycle.stop_requested():
        return
    with lifecycle.reporting():
        tune.report(metrics)


def _trainable(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial, running on a Ray worker."""
    import ray

    from studies.spec import WandbEntry
    from workers.tasks import get_task

    if "trials" in config:  # a pack: a cell's seeds as one stacked model
        return _trainable_pack(config, ctx)
    run_trial = _import(ctx.get("trial_fn") or "workers:run_trial")
    lifecycle.clear_stop()  # a reused worker process: the last trial's stop request is spent

    spec = TrialSpec.from_dict(config["trial"])
    ledger = Ledger(ctx["storage"])
    sign = 1 if get_task(spec.task).lower_is_better else -1
    where = {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    if ledger.contains(spec.key):  # a retry after the record was written (one look-up, no listing)
        _tune_report({OBJECTIVE: float("nan"), "trial_key": spec.key, "record_written": 1, **where})
        return
    tracker = tracking.TrialTracker(spec, WandbEntry(**ctx["wandb"]), ctx["wandb_dir"])
    size: dict[str, Any] = {}
    last_report = [time.monotonic()]

    def on_start(info: dict[str, Any]) -> None:
        size.update(total_steps=info["total_steps"], params_total=info["params_total"],
                    params_non_embedding=info["params_non_embedding"])
        tracker.configure(info)

    def log(row: dict[str, Any]) -> None:
        """A row of train metrics: to W&B always, to the driver (progress lines) every progress_seconds."""
        size["step"] = row["step"]
        tracker.log(row, step=int(row["step"]))
        if time.monotonic() - last_report[0] >= ctx["progress_seconds"]:
            last_report[0] = time.monotonic()
            _tune_report({**row, **size, "trial_key": spec.key, **where})

    def report(metrics: dict[str, Any]) -> None:
        """An evaluation: to W&B, and to the driver and Tune's scheduler (the objective)."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        best = next((v for k, v in scalars.items() if k.startswith("best_")), None)
        if best is not None:
            scalars[OBJECTIVE] = sign * best  # lower is better, for Tune's schedulers
        tracker.log(scalars, step=int(scalars.get("step", 0)))
        last_report[0] = time.monotonic()
        _tune_report({**scalars, **size, "trial_key": spec.key, "evaluation": 1, **where})

    try:
        record = run_trial(
            spec,
            storage_uri=ctx["storage"],
            cache_uri=ctx["cache"],
            report=report,
            num_threads=ctx["threads"],
            wandb_run_id=tracker.intended_id,
            log=log,
            log_every=ctx["log_every"],
            checkpoint_every_s=ctx["checkpoint_every_s"],
            progress_every_s=ctx["progress_seconds"],
            on_start=on_start,
            node_id=where["node_id"],
        )
    except lifecycle.TrialInterrupted as stop:
        tracker.interrupted(stop.step)
        # an error, not a return: Tune must not take an interrupted trial for a finished one (a
        # search trial would be recorded as pruned); when the driver goes on, Tune retries it and
        # it resumes from the checkpoint just written
        raise RuntimeError(f"trial {spec.key} {stop}") from None
    except BaseException:  # Tune stops a trial (ASHA) by raising SystemExit inside tune.report
        if spec.key in ledger.keys():  # the driver recorded it as pruned before stopping it
            tracker.finish({"status": "pruned"}, exit_code=0)
        else:
            tracker.interrupted(int(size.get("step", 0)))
        raise
    summary = {
        "status": record.status,
        record.metric_name or "metric": record.metric_value,
        "params_total": record.params_total,
        "wall_seconds": record.wall_seconds,
    }
    tracker.finish(summary, exit_code=1 if record.status == "failed" else 0)
    if tracker.actual_id != record.wandb_run_id:  # W&B fell back to another id, or to none
        record = dataclasses.replace(record, wandb_run_id=tracker.actual_id)
    ledger.append(record)
    if record.status == "failed":  # Tune retries it up to resources.max_failures
        raise RuntimeError(f"trial {spec.key} failed:\n{record.error}")
    value = record.metric_value if record.metric_value is not None else float("nan")
    _tune_report({OBJECTIVE: sign * value, "trial_key": spec.key, "record_written": 1, **where})


def _study_trainable(ctx: dict[str, Any]):
    """The Tune trainable class: the trial function, plus what the worker process does around it.
    Its setup runs in the actor's main thread, where a signal handler can be installed: SIGTERM
    (a preempted or drained node) then saves the running trial before the process exits. Its
    cleanup (Tune stopping the trial: Ctrl-C or a cancelled job in the driver) asks the trial to
    save and waits for it (a trial parked in a report is saved from this thread)."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_parameters(_trainable, ctx=ctx))

    class StudyTrial(base):
        def setup(self, config):
            lifecycle.install_sigterm_flush()
            return super().setup(config)

        def cleanup(self):
            if lifecycle.active_trainers():
                lifecycle.flush_and_stop("the study was stopped", timeout=FLUSH_SECONDS)
            return super().cleanup()

    StudyTrial.__name__ = StudyTrial.__qualname__ = "StudyTrial"
    return StudyTrial


def _trainable_pack(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial that trains several seeds of one cell together (workers.stacked.run_pack):
    every seed keeps its own W&B run (config, train-metrics rows, evaluations), progress file, log and
    ledger record; seeds already in the ledger are left out. Stop and save as `_trainable`."""
    import ray
    from ray import tune

    from studies.spec import WandbEntry
    from workers.stacked import run_pack

    lifecycle.clear_stop()  # a reused worker process: the last trial's stop request is spent
    ledger = Ledger(ctx["storage"])
    specs = [s for s in (TrialSpec.from_dict(d) for d in config["trials"]) if not ledger.contains(s.key)]
    if not specs:  # a retry after every record was written
        tune.report({OBJECTIVE: float("nan"), "record_written": 1})
        return
    from workers.tasks import get_task

    sign = 1 if get_task(specs[0].task).lower_is_better else -1
    where = {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    trackers = [tracking.TrialTracker(s, WandbEntry(**ctx["wandb"]), ctx["wandb_dir"]) for s in specs]
    bests: dict[int, float] = {}
    size: dict[str, Any] = {"pack_size": len(specs)}
    last_report = [time.monotonic()]

    def on_start(index: int, info: dict[str, Any]) -> None:
        size.update(total_steps=info["total_steps"], params_total=info["params_total"],
                    params_non_embedding=info["params_non_embedding"])
        trackers[index].configure(info)

    rows: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}

    def pack_mean(per_seed: dict[int, dict[str, Any]], step: Any) -> dict[str, Any]:
        """The driver's progress line for a pack: the mean over its seeds at this step (tokens/s summed)."""
        now = [m for m in per_seed.values() if m.get("step") == step]
        out: dict[str, Any] = {}
        for name in now[0] if now else ():
            values = [m[name] for m in now if isinstance(m.get(name), (int, float))]
            if name != "step" and len(values) == len(now):
                out[name] = sum(values) if name == "tokens_per_s" else sum(values) / len(values)
        return out

    def log(index: int, row: dict[str, Any]) -> None:
        """A seed's row of train metrics: to its W&B run always, to the driver every progress_seconds."""
        size["step"] = row["step"]
        trackers[index].log(row, step=int(row["step"]))
        rows[index] = row
        if index == len(specs) - 1 and time.monotonic() - last_report[0] >= ctx["progress_seconds"]:
            last_report[0] = time.monotonic()
            tune.report({**pack_mean(rows, row["step"]), "step": row["step"], **size, "trial_key": specs[index].key,
                         **where})

    def report(index: int, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        trackers[index].log(scalars, step=int(scalars.get("step", 0)))
        evals[index] = scalars
        best = next((v for k, v in scalars.items() if k.startswith("best_")), None)
        if best is not None:
            bests[index] = sign * best
        if index == len(specs) - 1 and bests:  # Tune wants the objective in every report: the pack's mean
            last_report[0] = time.monotonic()
            step = scalars.get("step", 0)
            tune.report({**pack_mean(evals, step), OBJECTIVE: sum(bests.values()) / len(bests), "step": step,
                         **size, "trial_key": specs[index].key, "evaluation": 1, **where})

    try:
        records = run_pack(specs, storage_uri=ctx["storage"], cache_uri=ctx["cache"], report=report,
                           num_threads=ctx["threads"], wandb_run_ids=[t.intended_id for t in trackers],
                           log=log, log_every=ctx["log_every"], checkpoint_every_s=ctx["checkpoint_every_s"],
                           progress_every_s=ctx["progress_seconds"], on_start=on_start, node_id=where["node_id"])
    except lifecycle.TrialInterrupted as stop:
        for tracker in trackers:
            tracker.interrupted(stop.step)
        raise RuntimeError(f"pack {specs[0].key} (+{len(specs) - 1} seeds) {stop}") from None
    except BaseException:
        for tracker in trackers:
            tracker.interrupted(int(size.get("step", 0)))
        raise
    failed = []
    for tracker, record in zip(trackers, records):
        tracker.finish({"status": record.status, record.metric_name or "metric": record.metric_value,
                        "params_total": record.params_total, "wall_seconds": record.wall_seconds,
                        "pack_size": len(specs)}, exit_code=1 if record.status == "failed" else 0)
        if tracker.actual_id != record.wandb_run_id:
            record = dataclasses.replace(record, wandb_run_id=tracker.actual_id)
        ledger.append(record)
        if record.status == "failed":
            failed.append(record)
    if failed:  # Tune retries the pack; the seeds already recorded are left out then
        raise RuntimeError(f"{len(failed)} trial(s) of the pack failed:\n{failed[0].error}")
    tune.report({OBJECTIVE: 0.0, "trial_key": specs[0].key, "record_written": 1, "pack_size": len(specs)})


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
        self._last_line: dict[str, float] = {}

    def update(self, advance: int = 0, label: str = "") -> None:
        self.done += advance
        state = f"running {self.running}  failed {self.failed}"
        self.progress.update(self.task, advance=advance, state=state)
        if advance and self.enabled and not self.live:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {label}  {state}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s", flush=True)

    def line(self, text: str) -> None:
        """One line of output above the bar (a terminal), or plain (logs, `scaling logs --follow`)."""
        if not self.enabled:
            return
        if self.live:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def trial_result(self, key: str, result: dict[str, Any]) -> None:
        """A trial's progress line: at every evaluation, else at most every PROGRESS_LINE_SECONDS."""
        if "step" not in result or "record_written" in result:
            return
        now = time.monotonic()
        if not result.get("evaluation") and now - self._last_line.get(key, -math.inf) < PROGRESS_LINE_SECONDS:
            return
        self._last_line[key] = now
        self.line(progress_line(key, result))

    def callback(self) -> "ProgressCallback":
        _PROGRESS[id(self)] = self
        return ProgressCallback(id(self))


_PROGRESS: dict[int, _Progress] = {}


class CompactCallback(Callback):
    """Compacts the ledger every `every` finished trials (storage.ledger.COMPACT_EVERY), in the
    driver, so readers of a long study open a few parts instead of one file per trial. A failed
    compaction is logged and the study goes on: nothing is lost, the next one merges more."""

    def __init__(self, storage: str, every: int) -> None:
        self.storage, self.every, self.finished = storage, every, 0

    def _count(self) -> None:
        self.finished += 1
        if self.every > 0 and self.finished % self.every == 0:
            compact_ledger(self.storage, reason=f"{self.finished} trials finished")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._count()


def compact_ledger(storage: str, *, reason: str) -> None:
    from storage.ledger import Ledger

    try:
        result = Ledger(storage).compact()
    except Exception:  # noqa: BLE001 -- compaction only speeds reads up; the records are safe as they are
        log.exception("ledger compaction (%s) failed; the records are untouched", reason)
        return
    if result.part:
        log.info("ledger compacted (%s): %d records in %s (%.1fs)", reason, result.records, result.part, result.seconds)


def progress_line(key: str, result: dict[str, Any]) -> str:
    """`[key] step 400/600 (67%)  train_loss 0.53  val_loss 0.61 (best 0.60)  12.3k tok/s  on host`"""
    step, total = int(result["step"]), result.get("total_steps")
    parts = [f"[{key}] step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")]
    if "train_loss" in result:
        parts.append(f"train_loss {result['train_loss']:.4g}")
    for name, value in result.items():
        if name.startswith("best_") and isinstance(value, (int, float)):
            metric = name[len("best_"):]
            if isinstance(result.get(metric), (int, float)):
                parts.append(f"{metric} {result[metric]:.4g} (best {value:.4g})")
    if result.get("tokens_per_s"):
        parts.append(f"{result['tokens_per_s'] / 1000:.1f}k tok/s")
    if result.get("host"):
        parts.append(f"on {result['host']}")
    return "  ".join(parts)


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

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if bar := self._bar():
            bar.trial_result(_trial_dirname(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if bar := self._bar():
            bar.running = max(0, bar.running - 1)
            bar.update(advance=_trials_in(trial), label=f"{_trial_dirname(trial)} done")

    def on_trial_error(self, iteration, trials, trial, **info):
        if bar := self._bar():
            bar.running = max(0, bar.running - 1)
            bar.failed += 1
            bar.update(advance=_trials_in(trial), label=f"{_trial_dirname(trial)} FAILED")


# Tune's own words on an interrupted run: its Tuner.restore hint (this service resumes by re-running
# the study, from the ledger and the trials' checkpoints) and its "Ctrl-C again to skip" note
_TUNE_NOISE = ("Stop signal received", "Tuner.restore", "Trials did not complete", "Experiment has been interrupted")
_TUNE_LOGGERS = ("ray.tune.tune", "ray.tune.tuner", "ray.tune.impl.tuner_internal", "ray.tune.execution.tune_controller")


class _QuietTune(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _TUNE_NOISE)


class _Interrupts:
    """SIGINT (Ctrl-C) and SIGTERM (`scaling cancel`, `ray job stop`, `kill`, a pod's shutdown) in the
    driver: end Tune's loop the graceful way, so every running trial saves its checkpoint before its
    actor goes; a second signal quits at once. `name` says which signal came (None: none)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.previous: dict[int, Any] = {}
        self.quiet = _QuietTune()

    def __enter__(self) -> "_Interrupts":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours instead; Tune's SIGUSR1 one stays
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        for name in _TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self.quiet)
        return self

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            self._restore()
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(f"\n{self.name}: stopping the study; running trials save a checkpoint first "
              f"({self.name} again to quit at once)", file=sys.stderr, flush=True)
        stop_tune = signal.getsignal(signal.SIGUSR1)  # Tune's graceful stop, installed by fit()
        if callable(stop_tune):
            stop_tune(signal.SIGUSR1, frame)
        else:  # before Tune started: nothing runs yet
            raise KeyboardInterrupt

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
        for name in _TUNE_LOGGERS:
            logging.getLogger(name).removeFilter(self.quiet)


def _init_ray(address: str | None, num_cpus: int | None, env_vars: dict[str, str]) -> RayOwner | bool:
    """Connect to (or start) Ray. When this call starts an embedded Ray it returns the RayOwner that
    ties Ray's processes to this driver (studies/reaper.py): the caller shuts Ray down and closes it.
    False when Ray was already up or is a cluster's (`address`), which this driver does not own."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": env_vars}
    if address:
        # inside a Ray Job the job's runtime env (its env vars, working dir) is merged with ours
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
        return False
    owner = RayOwner.start()
    try:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
    except BaseException:
        owner.close()
        raise
    owner.started(_session_dir())
    fault_point("driver.ray_started")
    return owner


def _session_dir() -> str | None:
    """The embedded Ray's session directory (its processes keep their logs there open)."""
    try:
        from ray._private import worker

        return worker._global_node.get_session_dir_path()
    except Exception:  # another Ray version: the owner token still marks the processes
        return None


def _trial_dirname(trial) -> str:
    if "trials" in trial.config:
        return TrialSpec.from_dict(trial.config["trials"][0]).key + f"-pack{len(trial.config['trials'])}"
    return TrialSpec.from_dict(trial.config["trial"]).key


def _trials_in(trial) -> int:
    return len(trial.config["trials"]) if "trials" in trial.config else 1


def _scheduler(study: StudySpec):
    """ASHA for search trials only: replicate and grid trials always run to the end."""
    if study.search is None or study.search.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class SearchOnlyASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if "trial" not in trial.config or trial.config["trial"]["stage"] != "search" or OBJECTIVE not in result:
                return TrialScheduler.CONTINUE
            if result.get("step", 0) >= study.train.steps:  # the final evaluation: let it finish and record
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    asha = study.search.asha
    # max_t past the last step: ASHA stops trials that reach max_t, which would cut off the final
    # evaluation and the ledger write of a trial that ran to the end
    return SearchOnlyASHA(time_attr="step", metric=OBJECTIVE, mode="min", max_t=study.train.steps + 1,
                          grace_period=asha.grace_steps, reduction_factor=asha.reduction_factor)


def run_trials(study: StudySpec, plan: Plan, paths: dict[str, str], *, address, num_cpus, progress: bool,
               trial_fn: str | None = None) -> str | None:
    """Run the plan's trials; returns the signal that interrupted them (SIGINT, SIGTERM), or None."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # progress reports between evaluations carry no objective (schedulers and the searcher read it
    # only from evaluations: SearchOnlyASHA, StudySearcher.on_trial_result)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tracking.prepare_environment(paths["wandb"])
    os.environ[DRIVER_ENV] = str(os.getpid())  # storage/faults.py: whom a fault-injection point kills
    # a reused trial actor waits this long for the last trial's function to end (W&B closing its
    # run) before Tune gives up reusing it and fails the next trial (Tune's default: 2 s)
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    env_vars = {k: os.environ[k] for k in ("TUNE_FUNCTION_THREAD_TIMEOUT_S", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE",
                                           "SCALING_CACHE", DRIVER_ENV, FAULT_ENV, COUNTER_ENV) if k in os.environ}
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
        "trial_fn": trial_fn,
        "log_every": study.tracking.log_every_steps,
        "progress_seconds": study.tracking.progress_seconds,
        "checkpoint_every_s": study.checkpoint.every_seconds,
    }
    if study.design is not None:  # an adaptive design after the grid (studies/design_search.py)
        from studies.design_search import DesignSearcher

        searcher = DesignSearcher(study, plan.todo, len(plan.trials))
    else:
        searcher = StudySearcher(study, plan.todo, plan.search_cells)
    total = len(plan.todo) + sum(
        max(0, plan.search_trials + len(plan.replicate_seeds) - _cell_done(study, c)) for c in plan.search_cells
    ) + (searcher.design_left() if study.design is not None else 0)
    bar = _Progress(total, progress)
    trainable = tune.with_resources(_study_trainable(ctx), {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=_scheduler(study),
            num_samples=-1,
            max_concurrent_trials=res.max_concurrent_trials or max(1, int((num_cpus or os.cpu_count() or 1) // res.cpus_per_trial)),
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=paths["ray_results"],
            failure_config=tune.FailureConfig(max_failures=res.max_failures),
            verbose=0,
            callbacks=[bar.callback(), CompactCallback(paths["storage"], COMPACT_EVERY)],
        ),
    )
    interrupts = _Interrupts()
    try:
        with interrupts, bar.progress:
            bar.update()
            tuner.fit()
        fault_point("driver.trials_done")
    except KeyboardInterrupt:  # a second signal, or one before Tune started
        interrupts.name = interrupts.name or "SIGINT"
    finally:
        _PROGRESS.pop(id(bar), None)
        if started:
            ray.shutdown()
            if isinstance(started, RayOwner):
                started.close()
    return interrupts.name


def _cell_done(study: StudySpec, template: TrialSpec) -> int:
    rows = Ledger(study.storage_uri()).rows()
    return sum(1 for r in rows if r["cell"] == template.cell and r["status"] != "failed")


def run_study(
    study: StudySpec,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    report: bool = True,
    study_file: str | None = None,
    trial_fn: str | None = None,
    resume_command: str | None = None,
) -> RunResult:
    """Run what the ledger lacks, then fit and report. `trial_fn` ('module:function', default
    workers:run_trial) replaces the trial function, for runner benchmarks. `resume_command` is the
    command that runs the study again, printed when it stops short (default: `scaling run FILE`;
    $SCALING_RESUME_COMMAND, set by `scaling submit` for its job, wins). An interrupted run
    (SIGINT, SIGTERM) writes no report: its trials saved checkpoints, and the command resumes them."""
    t0 = time.perf_counter()
    paths = study_paths(study)
    plan: Plan = make_plan(study)
    todo = plan.todo
    work = bool(todo or plan.search_cells or plan.design_trials)
    if work:
        prepare_data(study)
        # before anything of the study is written and before Ray starts: a trial this machine
        # cannot hold (memory, CPUs, GPUs) is refused with the numbers (studies/resources.py)
        check_resources(study, plan, address=address, num_cpus=num_cpus)
    ensure_storage(study)
    save_study_file(study, paths)
    save_plan(plan, paths)
    before = len(Ledger(paths["storage"]).keys())
    interrupted = None
    if work:
        try:
            interrupted = run_trials(study, plan, paths, address=address, num_cpus=num_cpus, progress=progress,
                                     trial_fn=trial_fn)
        finally:  # at the study's end (finished, failed or interrupted): the trials' files into one part
            compact_ledger(paths["storage"], reason="end of the study")
    adaptive = bool(plan.search_cells or plan.design_trials)
    ran = len(Ledger(paths["storage"]).keys()) - before if adaptive or interrupted else len(todo)
    result = RunResult(paths["storage"], plan.planned, len(plan.done) if not adaptive else before, ran)
    result.counts = trial_counts(study, plan)
    result.interrupted = interrupted
    resume = os.environ.get("SCALING_RESUME_COMMAND") or resume_command or \
        f"scaling run {shlex.quote(str(study_file or paths['storage']))}"
    if interrupted:
        result.seconds = time.perf_counter() - t0
        print(f"{interrupted}: study {study.name} stopped with {result.counts.get('missing', 0) + result.counts.get('failed', 0)} "
              f"trial(s) unfinished; every finished one is in the ledger and the running ones saved checkpoints. "
              f"No report was written (it would fit partial data). Resume with:\n  {resume}", file=sys.stderr, flush=True)
        return result
    if report:
        from scaling.report import write_report

        try:
            written = write_report(paths["storage"])
        except Exception as error:  # noqa: BLE001 -- the trials are safe in the ledger; say how to retry
            log.exception("report failed")
            print(f"the trials are in the ledger, but the report failed: {type(error).__name__}: {error}\n"
                  f"  retry with: scaling report {shlex.quote(paths['storage'])}", file=sys.stderr)
            result.report_error = f"{type(error).__name__}: {error}"
        else:
            result.report_path, result.fits = written.html_path, written.fit_rows  # URIs keep their scheme
            design = None
            if study.design is not None:  # the design sequence and widths beside the fits
                from scaling import api

                design = api.design(api.open_storage(paths["storage"]))
            tracking.log_study_summary(study.name, study.tracking.wandb, paths["wandb"], result.fits, result.report_path,
                                       Ledger(paths["storage"]).rows(), design=design)
    result.seconds = time.perf_counter() - t0
    if not result.ok:
        print(
            f"{result.counts.get('failed', 0)} trial(s) failed and {result.counts.get('missing', 0)} did not finish; "
            f"the ledger keeps every finished one. Resume with:\n  {resume}",
            file=sys.stderr,
        )
    return result


def trial_counts(study: StudySpec, plan: Plan | None = None) -> dict[str, int]:
    """Finished trials per status (completed, diverged, pruned), plus `failed` (crashed, with no
    finished record yet) and `missing` (never finished), over the planned trials of each cell."""
    plan = plan or make_plan(study)
    expected: dict[str, int] = {}
    for row in plan_rows(plan):
        expected[row["cell"]] = expected.get(row["cell"], 0) + 1
    known = {t.key for t in plan.trials}
    searched = {t.cell for t in plan.search_cells}
    counts: dict[str, int] = {}
    finished: dict[str, set[str]] = {}
    failed: dict[str, set[str]] = {}
    for row in Ledger(study.storage_uri()).rows():
        if plan.design_trials and row.get("stage") == "design":
            row = {**row, "cell": DESIGN_CELL}  # counted against the design's slots
        elif row["key"] not in known and row["cell"] not in searched:
            continue  # a trial of an earlier version of the study
        if row["status"] == "failed":
            failed.setdefault(row["cell"], set()).add(row["key"])
        elif row["key"] not in finished.setdefault(row["cell"], set()):
            finished[row["cell"]].add(row["key"])
            counts[row["status"]] = counts.get(row["status"], 0) + 1
    counts["failed"] = sum(len(keys - finished.get(cell, set())) for cell, keys in failed.items())
    counts["missing"] = sum(max(0, n - len(finished.get(cell, set()))) for cell, n in expected.items()) - counts["failed"]
    counts["missing"] = max(0, counts["missing"])
    return counts
