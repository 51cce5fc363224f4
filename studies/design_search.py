"""The Ray Tune searcher of an adaptive study: the grid's trials first, then the design's proposals
(studies/design.py), one Optuna trial per training trial, told only after its record is in the ledger."""

from __future__ import annotations

import math
from typing import Any

from storage import fs as sfs
from storage.records import TrialSpec
from studies import design as SD
from studies.search import StudySearcher
from studies.spec import StudySpec


class DesignSearcher(StudySearcher):
    """Serves the grid (as StudySearcher), then the design. The design starts once every grid trial
    has finished, so its first proposal sees the grid's data."""

    def __init__(self, study: StudySpec, grid_todo: list[TrialSpec], grid_size: int) -> None:
        import optuna

        super().__init__(study, grid_todo, [])
        from workers.tasks import get_task

        self.axes = SD.resolve(study)
        self.sign = 1.0 if get_task(study.tasks[0].name).lower_is_better else -1.0
        self.factory = SD.TrialFactory(study, self.axes)
        self.budget = study.design.budget - grid_size
        self.grid_size = grid_size
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.sampler = SD.DesignSampler(
            xs=self.axes["xs"], seeds=study.seeds, cap=self.axes["cap"], budget=self.budget,
            target=SD.target_of(self.axes), floor=study.fits.floor, initial_seeds=study.design.initial_seeds,
            sign=self.sign, prior=self._prior, strategy=study.design.rule)
        self.optuna_study = optuna.create_study(study_name=f"{study.name}/design", storage=SD.design_storage(study),
                                                sampler=self.sampler, direction="minimize", load_if_exists=True)
        self.rerun: list[tuple[int, SD.D.Point]] = []
        self.exhausted = False
        self._settle_stale_design()
        self.write_json()

    # -- state ------------------------------------------------------------------------------------
    def _design_keys(self) -> dict[str, int]:
        out = {}
        for trial in self.optuna_study.get_trials(deepcopy=False):
            info = trial.system_attrs.get(SD.ATTR)
            if info:
                out[self.factory.spec(SD.D.Point(**info["point"])).key] = trial.number
        return out

    def _prior(self):
        return SD.ledger_runs(self.study, self.axes, self.ledger.rows(), set(self._design_keys()), self.sign)

    def _settle_stale_design(self) -> None:
        """Trials a previous driver asked but never told: told from the ledger, or run again."""
        from optuna.trial import TrialState

        finished = {r["key"]: r for r in self.ledger.rows() if r["status"] != "failed"}
        for trial in self.optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            info = trial.system_attrs.get(SD.ATTR)
            if not info:  # asked, but its proposal was never recorded: nothing ran
                self.optuna_study.tell(trial.number, state=TrialState.FAIL)
                continue
            point = SD.D.Point(**info["point"])
            record = finished.get(self.factory.spec(point).key)
            if record is not None:
                self._tell(trial.number, record)
            else:
                self.rerun.append((trial.number, point))

    def _tell(self, number: int, record: dict[str, Any] | None) -> None:
        from optuna.trial import TrialState

        value = None if record is None else record.get("metric_value")
        if record is not None and record["status"] == "completed" and value is not None and math.isfinite(value):
            self.optuna_study.tell(number, float(value))
        else:  # diverged, or failed after Tune's retries: the slot is spent, no data
            self.optuna_study.tell(number, state=TrialState.FAIL)

    def design_left(self) -> int:
        """Design trials still to finish (for the progress bar)."""
        from optuna.trial import TrialState

        settled = sum(1 for t in self.optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
                      if SD.ATTR in t.system_attrs)
        return max(0, self.budget - settled)

    # -- Tune's Searcher interface ------------------------------------------------------------------
    def _next(self):
        done = None
        while self.queue:
            spec = self.queue.popleft()
            done = done if done is not None else self.ledger.keys()
            if spec.key not in done:
                return spec, None, None
        if any(number is None for _, _, number in self.live.values()):
            return None, None, None  # grid trials still running: the design waits for their data
        if self.rerun:
            number, point = self.rerun.pop(0)
            return self.factory.spec(point), None, number
        asked = SD.ask(self.optuna_study, self.sampler)
        if asked is None:
            self.exhausted = True
            return None, None, None
        number, point, _ = asked
        self.write_json()
        return self.factory.spec(point), None, number

    def _all_done(self) -> bool:
        if self.queue or self.rerun:
            return False
        return self.exhausted or self.sampler.next_proposal(self.optuna_study) is None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        spec, _, number = self.live.pop(trial_id, (None, None, None))
        if spec is None or number is None:
            return
        self._tell(number, self._record_of(spec))
        self.write_json()

    # -- design.json ----------------------------------------------------------------------------------
    def write_json(self) -> None:
        from optuna.trial import TrialState

        proposals = []
        for trial in self.optuna_study.get_trials(deepcopy=False):
            info = trial.system_attrs.get(SD.ATTR)
            if not info:
                continue
            state = {TrialState.COMPLETE: "completed", TrialState.FAIL: "lost", TrialState.RUNNING: "running"}.get(
                trial.state, trial.state.name.lower())
            spec = self.factory.spec(SD.D.Point(**info["point"]))
            proposals.append({"number": trial.number, "key": spec.key, "cell": spec.cell, "state": state,
                              "value": trial.value, **info})
        payload = {"study": self.study.name, "law": self.axes["law"], "variant": self.axes["variant"],
                   "baseline": self.study.baseline, "task": self.study.tasks[0].name, "x_name": self.axes["x_name"],
                   "xs": self.axes["xs"], "target_params": self.axes["target_params"], "target": self.axes["target"],
                   "target_label": SD.target_of(self.axes).label(), "budget": self.study.design.budget,
                   "grid_trials": self.grid_size, "seeds_per_point": self.axes["cap"], "batch": self.axes["batch"],
                   "proposals": proposals}
        SD.write_design_json(sfs.join(self.study.storage_uri(), "design.json"), payload)
