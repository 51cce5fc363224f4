"""Adaptive studies: an Optuna sampler over the study's own axes (d_osc or target_params, and seeds),
and the Ray Tune searcher that serves its proposals after the grid.

The math (what to run next and why) is `scaling.design`; this module keeps its state on Optuna's
storage, so a killed driver resumes the design: every proposal is one Optuna trial whose params are
(arm, x, seed) and whose system attribute `design` records the proposal with its expected gain.
A trial's value (the task metric) is told only after its record is in the ledger; on restart,
trials Optuna still sees as RUNNING are settled from the ledger, or run again with the same params
(same trial key: they resume from their checkpoint). The proposals so far are also written to
`design.json` beside the ledger, which the report, `scaling status` and the HTTP API read without
Optuna.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from scaling import design as D

ATTR = "design"


def _x_key(x: float | None) -> float:
    return 0.0 if x is None else float(x)


class DesignSampler(optuna.samplers.BaseSampler):
    """Proposes the next (arm, x, seed) of an adaptive design (scaling.design.propose).

    `prior` returns the runs made outside this Optuna study (the grid): ((Point, z) finished,
    [Point] lost). Trial values are the task metric; `sign` makes z = sign * metric (+1 when lower
    is better, so a positive gap means the variant is worse)."""

    def __init__(self, *, xs: list[float], seeds: list[int], cap: int, budget: int, target: D.Target,
                 floor: bool = False, initial_seeds: int = 2, sign: float = 1.0,
                 prior: Callable[[], tuple[list, list]] | None = None, strategy: str | None = None) -> None:
        self.xs = tuple(sorted(float(x) for x in xs))
        self.seeds = tuple(int(s) for s in seeds)
        self.cap, self.budget, self.target = cap, budget, target
        self.floor, self.initial_seeds, self.sign = floor, initial_seeds, sign
        self.prior = prior or (lambda: ([], []))
        self.strategy = strategy or D.DEFAULT_STRATEGY
        if self.strategy not in D.STRATEGIES:
            raise ValueError(f"strategy must be one of {D.STRATEGIES} (got {self.strategy!r})")
        self._cached: tuple[int, D.Proposal | None] | None = None

    # the three parameters of every proposal
    def distributions(self) -> dict[str, CategoricalDistribution]:
        return {"arm": CategoricalDistribution([D.BASELINE, D.VARIANT]),
                "x": CategoricalDistribution([0.0, *self.xs]),
                "seed": CategoricalDistribution(list(self.seeds))}

    def state(self, study: optuna.Study) -> D.State:
        observed, lost = self.prior()
        observed, lost = list(observed), list(lost)
        pending: list[D.Point] = []
        blocks: list[list[D.Point]] = []  # the plan's blocks, so a block begun is finished after a restart
        asked = 0
        for trial in study.get_trials(deepcopy=False):
            info = trial.system_attrs.get(ATTR)
            if not info:
                continue
            asked += 1
            point = D.Point(**info["point"])
            if info.get("rule") == "plan":
                blocks.append([D.Point(**p) for p in info["move"]])
            if trial.state == TrialState.COMPLETE and trial.value is not None and math.isfinite(trial.value):
                observed.append((point, self.sign * float(trial.value)))
            elif trial.state in (TrialState.RUNNING, TrialState.WAITING):
                pending.append(point)
            else:
                lost.append(point)
        remaining = self.budget - asked  # the design's own trials; the grid's are not in this budget
        return D.State(self.xs, self.seeds, self.cap, remaining, self.target, observed, pending, lost,
                       self.floor, self.initial_seeds, strategy=self.strategy, blocks=blocks)

    def next_proposal(self, study: optuna.Study) -> D.Proposal | None:
        """The proposal the next trial will get (computed once per state of the design)."""
        trials = [t for t in study.get_trials(deepcopy=False) if ATTR in t.system_attrs]
        key = (len(trials), tuple(t.state for t in trials))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, D.propose(self.state(study)))
        return self._cached[1]

    # -- Optuna's sampler interface -----------------------------------------------------------------
    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if ATTR in trial.system_attrs:
            return
        proposal = self.next_proposal(study)  # the new trial has no proposal yet: the same state as the peek
        self._cached = None
        if proposal is None:
            raise RuntimeError("the design has nothing left to propose (budget spent); the searcher asks only when "
                               "DesignSampler.next_proposal is not None")
        study._storage.set_trial_system_attr(trial._trial_id, ATTR, proposal.to_dict())
        if proposal.expected_gain is not None:
            study._storage.set_trial_user_attr(trial._trial_id, "expected_gain", proposal.expected_gain)

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        point = trial.system_attrs[ATTR]["point"]
        return {"arm": point["arm"], "x": _x_key(point["x"]), "seed": point["seed"]}[param_name]


def point_of(params: dict[str, Any]) -> D.Point:
    arm = params["arm"]
    return D.Point(arm, None if arm == D.BASELINE else float(params["x"]), int(params["seed"]))


def ask(study: optuna.Study, sampler: DesignSampler) -> tuple[int, D.Point, dict] | None:
    """One proposal as an Optuna trial: (trial number, point, the recorded proposal); None when the
    design is done (budget spent, or nothing feasible left)."""
    if sampler.next_proposal(study) is None:
        return None
    trial = study.ask(sampler.distributions())
    # the attribute before_trial wrote (storage-level, as Optuna's GridSampler does: Trial has no getter)
    return trial.number, point_of(trial.params), study._storage.get_trial(trial._trial_id).system_attrs[ATTR]


# ---- the study side: trial specs, the ledger, the searcher --------------------------------------

def design_storage(study):
    """Optuna storage of the design: the RDB URL in design.storage, else a journal file under the study."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from storage import fs as sfs

    if study.design.storage:
        return optuna.storages.RDBStorage(study.design.storage)
    storage = study.storage_uri()
    if not sfs.is_local(storage):
        raise ValueError(f"design.storage: the study's storage {storage} is not a local or shared-volume path, and "
                         "Optuna's journal needs a file; give an RDB URL (e.g. postgresql://...) in design.storage")
    os.makedirs(os.path.join(storage, "optuna"), exist_ok=True)
    return JournalStorage(JournalFileBackend(os.path.join(storage, "optuna", "design.log")))


class TrialFactory:
    """TrialSpecs for design points: the study's own expansion for one (variant, d_osc, size, seed),
    so keys, sizing and options are exactly what a grid with that point would make."""

    def __init__(self, study, axes: dict[str, Any], *, build: bool = True) -> None:
        self.study, self.axes, self.build = study, axes, build
        self._templates: dict[tuple, Any] = {}

    def spec(self, point: D.Point):
        key = (point.arm, point.x)
        if key not in self._templates:
            self._templates[key] = self._template(point)
        return dataclasses.replace(self._templates[key], seed=point.seed, stage="design")

    def _template(self, point: D.Point):
        from studies.plan import expand

        study, axes = self.study, self.axes
        name = study.baseline if point.arm == D.BASELINE else axes["variant"]
        entry = next(v for v in study.variants if v.name == name)
        if point.arm == D.VARIANT:
            entry = entry.model_copy(update={"d_osc": [int(point.x)]})
        size = axes["target_params"]
        one = study.model_copy(update={"variants": [entry], "seeds": [study.seeds[0]], "design": None,
                                       "target_params": None if size is None else [size]})
        (trial,) = expand(one, build=self.build)
        return trial


def ledger_runs(study, axes: dict[str, Any], rows: list[dict[str, Any]], exclude: set[str], sign: float):
    """The runs of the design's law already in the ledger (a grid), as design points: finished ones
    with z = sign * metric, and lost ones (diverged, failed, pruned) that used their slot."""
    task = study.tasks[0].name
    observed, lost = [], []
    seen = set()
    for row in rows:
        if row["task"] != task or row["key"] in exclude or row.get("stage") == "search":
            continue
        point = _point_of_row(row, axes, study.baseline)
        if point is None:
            continue
        ok = row["status"] == "completed" and row["metric_value"] is not None and math.isfinite(row["metric_value"])
        if ok and point not in seen:
            seen.add(point)
            observed.append((point, sign * float(row["metric_value"])))
    for row in rows:
        if row["task"] != task or row["key"] in exclude:
            continue
        point = _point_of_row(row, axes, study.baseline)
        if point is not None and point not in seen and point not in lost:
            lost.append(point)
    return observed, lost


def _point_of_row(row: dict[str, Any], axes: dict[str, Any], baseline: str) -> D.Point | None:
    size = axes["target_params"]
    if (row["target_params"] or None) != (int(size) if size else None):
        return None
    if row["variant"] == baseline:
        return D.Point(D.BASELINE, None, int(row["seed"]))
    if row["variant"] == axes["variant"] and row["d_osc"] is not None and float(row["d_osc"]) in axes["xs"]:
        return D.Point(D.VARIANT, float(row["d_osc"]), int(row["seed"]))
    return None


def resolve(study) -> dict[str, Any]:
    from studies.spec import design_axes

    return design_axes(study)


def target_of(axes: dict[str, Any]) -> D.Target:
    t = axes["target"]
    return D.Target(t["kind"], t["x0"])


def write_design_json(path_uri: str, payload: dict[str, Any]) -> None:
    from storage import fs as sfs

    fs, path = sfs.resolve(path_uri)
    sfs.write_bytes_atomic(fs, path, json.dumps(payload, indent=1).encode())
