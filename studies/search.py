"""What to run next: the grid's trials, per-cell Optuna searches, then replicate seeds at each cell's
best configuration. `StudySearcher` is a Ray Tune `Searcher`, so Tune's concurrency limit, retries
and schedulers (ASHA) apply unchanged.

Optuna state lives in a journal file under the study's storage (or an RDB URL from the study file),
created once here in the driver. Crash safety: a search trial is told to Optuna only after its
record is in the ledger; on restart, trials Optuna still sees as RUNNING are settled from the
ledger (record found: told its value) or asked again with the same parameters (same trial key, so
the trial resumes from its checkpoint).
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from ray.tune.search import Searcher

from storage import fs as sfs
from storage.ledger import Ledger
from storage.records import TrialSpec
from studies.spec import Distribution, SearchEntry, StudySpec

OBJECTIVE = "objective"  # reported by every trial: the task metric, lower is better


def optuna_storage(study: StudySpec):
    import optuna

    assert study.search is not None
    if study.search.storage:
        return optuna.storages.RDBStorage(study.search.storage)
    storage = study.storage_uri()
    if not sfs.is_local(storage):
        raise ValueError(
            f"search.storage: the study's storage {storage} is not a local or shared-volume path, and Optuna's "
            "journal needs a file; give an RDB URL (e.g. postgresql://...) in search.storage"
        )
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.join(storage, "optuna"), exist_ok=True)
    return JournalStorage(JournalFileBackend(os.path.join(storage, "optuna", "journal.log")))


def make_sampler(search: SearchEntry):
    import optuna

    if search.sampler == "grid":
        return _grid_sampler_class()({n: d.grid_values() for n, d in search.space.items()}, seed=search.sampler_seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=search.sampler_seed)
    return optuna.samplers.TPESampler(seed=search.sampler_seed)


def _grid_sampler_class():
    """GridSampler without its `study.stop()` once the grid is covered: that call is meant for
    `study.optimize` and raises under ask-and-tell (Tune logged "Error stopping trial" with a
    traceback once per cell). The searcher already stops a cell at its grid's size."""
    import optuna

    class CellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return CellGridSampler


def suggest(trial, name: str, dist: Distribution) -> Any:
    if dist.type == "categorical":
        return trial.suggest_categorical(name, dist.choices)
    if dist.type == "int":
        return trial.suggest_int(name, int(dist.low), int(dist.high), step=int(dist.step or 1))
    return trial.suggest_float(name, dist.low, dist.high, log=dist.type == "loguniform", step=dist.step)


@dataclass
class CellSearch:
    """One cell's Optuna study: `budget` search trials, each run at every search seed."""

    template: TrialSpec  # the cell's trial with the first seed and no hparams
    search: SearchEntry
    optuna_study: Any
    replicate_seeds: list[int]
    pending: dict[int, dict[int, float | None]] = field(default_factory=dict)  # optuna number -> seed -> value
    replicates_queued: bool = False
    # optuna number -> step -> seed -> the evaluation's metric: reported to Optuna (as the mean over
    # the search seeds) once every search seed has evaluated that step
    curves: dict[int, dict[int, dict[int, float]]] = field(default_factory=dict)
    natural: bool = True  # the Optuna study's direction is the metric's own (False: a journal from
    # before metric names, where every study minimised sign * metric)

    @property
    def cell(self) -> str:
        return self.template.cell

    def spec(self, params: dict[str, Any], seed: int, stage: str) -> TrialSpec:
        return replace(self.template, hparams=dict(params), seed=seed, stage=stage)

    def value(self, mean: float) -> float:
        """The metric as Optuna's study holds it."""
        return mean if self.natural else _task_sign(self.template.task) * mean

    def report_intermediate(self, number: int, step: int, seed: int, value: float) -> None:
        """An evaluation of one search seed; once every search seed has one at `step`, their mean
        is the Optuna trial's intermediate value there (optuna-dashboard's curves, pruning)."""
        by_step = self.curves.setdefault(number, {}).setdefault(step, {})
        by_step[seed] = value
        if set(by_step) >= set(self.search.seeds):
            self._report(number, step, sum(by_step.values()) / len(by_step))
            self.curves[number].pop(step)

    def flush_intermediate(self, number: int) -> None:
        """Before the trial is told: steps that not every seed reached (a pruned seed) get the mean of
        the seeds that did."""
        for step, by_seed in sorted(self.curves.pop(number, {}).items()):
            if by_seed:
                self._report(number, step, sum(by_seed.values()) / len(by_seed))

    def _report(self, number: int, step: int, mean: float) -> None:
        import optuna

        trial_id = self.optuna_study._storage.get_trial_id_from_study_id_trial_number(
            self.optuna_study._study_id, number)
        try:
            optuna.trial.Trial(self.optuna_study, trial_id).report(self.value(mean), step)
        except Exception as error:  # noqa: BLE001 -- a lost curve point must not stop the study
            import logging

            logging.getLogger(__name__).warning("Optuna intermediate value of %s trial %d at step %d not stored (%s)",
                                                self.cell, number, step, error)

    def set_user_attrs(self, number: int, attrs: dict[str, Any]) -> None:
        trial_id = self.optuna_study._storage.get_trial_id_from_study_id_trial_number(
            self.optuna_study._study_id, number)
        for name, value in attrs.items():
            self.optuna_study._storage.set_trial_user_attr(trial_id, name, value)

    def settled_count(self) -> int:
        from optuna.trial import TrialState

        settled = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return len(self.optuna_study.get_trials(deepcopy=False, states=settled))

    def finished(self) -> bool:
        return self.settled_count() >= self.search.trials_per_cell and not self.pending

    def best_params(self, ledger_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The best completed search trial's parameters; when ASHA pruned every one, the pruned
        trial with the best value reached (from the ledger), so the cell still gets replicates."""
        import json

        from optuna.trial import TrialState

        done = self.optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done:
            return self.optuna_study.best_trial.params
        sign = _task_sign(self.template.task)
        pruned = [r for r in ledger_rows if r["cell"] == self.cell and r["stage"] == "search"
                  and r["status"] == "pruned" and r["metric_value"] is not None and math.isfinite(r["metric_value"])]
        return json.loads(min(pruned, key=lambda r: sign * r["metric_value"])["hparams_json"]) if pruned else None


class StudySearcher(Searcher):
    """Serves the study's trials to Tune. Lives in the driver."""

    def __init__(self, study: StudySpec, grid_todo: list[TrialSpec], search_cells: list[TrialSpec]) -> None:
        super().__init__(metric=OBJECTIVE, mode="min")
        self.study = study
        self.ledger = Ledger(study.storage_uri())
        self.queue: deque[TrialSpec] = deque(grid_todo)
        self.live: dict[str, tuple[TrialSpec, CellSearch | None, int | None]] = {}
        self.cells: list[CellSearch] = []
        if search_cells:
            self.cells = [self._open_cell(t) for t in search_cells]

    # -- Optuna ---------------------------------------------------------------------------------
    def _open_cell(self, template: TrialSpec) -> CellSearch:
        import optuna

        from workers.tasks import get_task

        search = self.study.search
        task = get_task(template.task)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna_study = optuna.create_study(
            study_name=f"{self.study.name}/{template.cell}",
            storage=optuna_storage(self.study),
            sampler=make_sampler(search),
            direction="minimize" if task.lower_is_better else "maximize",  # the metric as it is
            load_if_exists=True,
        )
        natural = (optuna_study.direction == optuna.study.StudyDirection.MINIMIZE) == task.lower_is_better
        if natural and optuna_study.metric_names is None:
            optuna_study.set_metric_names([task.metric])  # "val_loss", not "Objective 0"
        for name, value in {"study": self.study.name, "cell": template.cell, "task": template.task,
                            "variant": template.variant, "d_osc": template.d_osc,
                            "search_seeds": list(search.seeds)}.items():
            optuna_study.set_user_attr(name, value)
        replicate_seeds = [s for s in self.study.seeds if s not in search.seeds]
        cell = CellSearch(template, search, optuna_study, replicate_seeds, natural=natural)
        self._settle_stale(cell)
        return cell

    def _settle_stale(self, cell: CellSearch) -> None:
        """Trials a previous driver asked but never told: settle them from the ledger, or run their
        missing seeds again with the same parameters (same keys: they resume from checkpoints)."""
        from optuna.trial import TrialState

        done = {r["key"]: r for r in self.ledger.rows() if r["status"] != "failed"}
        for trial in cell.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            by_seed = {seed: done.get(cell.spec(trial.params, seed, "search").key, "queued") for seed in cell.search.seeds}
            if all(isinstance(v, dict) for v in by_seed.values()):
                self._tell(cell, trial.number, [v["status"] for v in by_seed.values()],
                           [v["metric_value"] for v in by_seed.values()])
            else:
                cell.pending[trial.number] = by_seed

    def _tell(self, cell: CellSearch, number: int, statuses: list[str], values: list[float | None]) -> None:
        from optuna.trial import TrialState

        cell.flush_intermediate(number)
        if all(s == "completed" for s in statuses) and all(v is not None and math.isfinite(v) for v in values):
            cell.optuna_study.tell(number, cell.value(sum(values) / len(values)))
        elif "pruned" in statuses:
            cell.optuna_study.tell(number, state=TrialState.PRUNED)
        else:  # diverged, or failed after Tune's retries: an outcome of these hyperparameters
            cell.optuna_study.tell(number, state=TrialState.FAIL)

    # -- Tune's Searcher interface ---------------------------------------------------------------
    def suggest(self, trial_id: str):
        spec, cell, number = self._next()
        if spec is None:
            return Searcher.FINISHED if (not self.live and self._all_done()) else None
        pack = self._pack_with(spec) if cell is None else []
        if pack:  # grid and replicate trials of one cell: one stacked Ray trial (workers/stacked.py)
            self.live[trial_id] = ([spec, *pack], None, None)
            return {"trials": [t.to_dict() for t in (spec, *pack)]}
        self.live[trial_id] = (spec, cell, number)
        if cell is not None and number is not None:
            self._link(cell, number, spec)
        return {"trial": spec.to_dict()}

    def _pack_with(self, spec: TrialSpec) -> list[TrialSpec]:
        """Queued trials that differ from `spec` only in seed, up to resources.pack_seeds in all
        (auto: every seed of the study); taken out of the queue."""
        from workers.stacked import packable, pack_key

        size = self.study.resources.pack_seeds
        size = len(self.study.seeds) if size == "auto" else int(size)
        if size <= 1 or not packable(spec):
            return []
        key = pack_key(spec)
        mates = [t for t in self.queue if t.stage == spec.stage and pack_key(t) == key and not self.ledger.contains(t.key)]
        mates = mates[: size - 1]
        for t in mates:
            self.queue.remove(t)
        return mates

    def _link(self, cell: CellSearch, number: int, spec: TrialSpec) -> None:
        """User attributes that lead from an Optuna trial to its runs: the trial key of each search
        seed (the ledger's key, the checkpoint and log names) and its W&B run id."""
        from studies import tracking

        trial = cell.optuna_study.trials[number]
        keys = {**trial.user_attrs.get("trial_keys", {}), str(spec.seed): spec.key}
        wandb_on = tracking.resolve_mode(self.study.tracking.wandb) != "disabled"
        runs = {**trial.user_attrs.get("wandb_run_ids", {}),
                **({str(spec.seed): tracking.run_id(spec.study, spec.key)} if wandb_on else {})}
        attrs: dict[str, Any] = {"trial_keys": keys, "wandb_run_ids": runs}
        if len(cell.search.seeds) == 1:
            attrs.update(trial_key=spec.key, **({"wandb_run_id": runs[str(spec.seed)]} if wandb_on else {}))
        cell.set_user_attrs(number, attrs)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Every evaluation of a search trial becomes an Optuna intermediate value."""
        spec, cell, number = self.live.get(trial_id, (None, None, None))
        if cell is None or number is None or not result.get("evaluation"):
            return
        from workers.tasks import get_task

        metric = get_task(spec.task).metric
        value = result.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and "step" in result:
            cell.report_intermediate(number, int(result["step"]), spec.seed, float(value))

    def _next(self) -> tuple[TrialSpec | None, CellSearch | None, int | None]:
        done = None
        while self.queue:
            spec = self.queue.popleft()
            done = done if done is not None else self.ledger.keys()
            if spec.key not in done:
                return spec, None, None
        for cell in self.cells:
            waiting = [(n, seed) for n, by_seed in cell.pending.items() for seed, v in by_seed.items() if v == "queued"]
            if waiting:
                number, seed = waiting[0]
                cell.pending[number][seed] = None
                params = cell.optuna_study.trials[number].params
                return cell.spec(params, seed, "search"), cell, number
            asked = cell.settled_count() + len(cell.pending)
            if asked < cell.search.trials_per_cell:
                trial = cell.optuna_study.ask()
                params = {name: suggest(trial, name, dist) for name, dist in cell.search.space.items()}
                cell.pending[trial.number] = {seed: "queued" for seed in cell.search.seeds}
                return self._next()
            if cell.finished() and not cell.replicates_queued:
                cell.replicates_queued = True
                best = cell.best_params(self.ledger.rows())
                if best is not None:
                    self.queue.extend(cell.spec(best, seed, "replicate") for seed in cell.replicate_seeds)
                    return self._next()
        return None, None, None

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the state lives in the ledger and Optuna's storage."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a new driver rebuilds the state from the ledger and Optuna's storage."""

    def _all_done(self) -> bool:
        return not self.queue and all(c.finished() and c.replicates_queued for c in self.cells)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        spec, cell, number = self.live.pop(trial_id, (None, None, None))
        if spec is None:
            return
        if isinstance(spec, list):  # a pack of grid / replicate trials: each wrote its own record
            return
        record = self._record_of(spec)
        if record is None and not error:
            record = _write_pruned(self.ledger, self.study.storage_uri(), spec, result or {})
        if cell is None or number is None:
            return
        by_seed = cell.pending.get(number)
        if by_seed is None:
            return
        by_seed[spec.seed] = record if record is not None else {"status": "failed", "metric_value": None}
        if all(isinstance(v, dict) for v in by_seed.values()):
            cell.pending.pop(number)
            self._tell(cell, number, [v["status"] for v in by_seed.values()], [v["metric_value"] for v in by_seed.values()])

    def _record_of(self, spec: TrialSpec) -> dict | None:
        path_rows = [r for r in self.ledger.rows() if r["key"] == spec.key and r["status"] != "failed"]
        return path_rows[0] if path_rows else None


def _task_sign(task_name: str) -> int:
    from workers.tasks import get_task

    return 1 if get_task(task_name).lower_is_better else -1


def _write_pruned(ledger: Ledger, storage_uri: str, spec: TrialSpec, result: dict[str, Any]) -> dict:
    """A trial the scheduler stopped early: recorded as pruned (never as completed), from its last report."""
    import json
    import socket

    from storage.records import TrialRecord, canonical_json
    from workers.trial import now_iso

    metric = next((k[len("best_"):] for k in result if k.startswith("best_")), "")
    value = result.get(f"best_{metric}") if metric else None
    record = TrialRecord(
        key=spec.key, study=spec.study, cell=spec.cell, task=spec.task, variant=spec.variant, d_osc=spec.d_osc,
        target_params=spec.target_params, params_total=int(result.get("params_total", 0)),
        params_non_embedding=int(result.get("params_non_embedding", 0)), seed=spec.seed, stage=spec.stage,
        hparams_json=canonical_json(spec.hparams), spec_json=canonical_json(spec.to_dict()), status="pruned",
        metric_name=metric, metric_value=None if value is None else float(value),
        metrics_json=json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}),
        best_step=None, steps=int(result.get("step", 0)), tokens_seen=int(result.get("tokens", 0)),
        flops=float(result.get("flops", 0.0)), wall_seconds=float(result.get("time_total_s", 0.0)),
        started_at="", finished_at=now_iso(), wandb_run_id=None, host=socket.gethostname(),
    )
    ledger.append(record)
    from workers.trial import Checkpoints

    Checkpoints(storage_uri, spec.key).remove()  # pruned is final: nothing will resume it
    return record.to_dict()
