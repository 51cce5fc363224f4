"""Expand a StudySpec into TrialSpecs with stable keys, and subtract what the ledger holds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from storage.cache import fingerprint
from storage.ledger import Ledger
from storage.records import TrialSpec
from studies.spec import StudySpec


def expand(study: StudySpec) -> list[TrialSpec]:
    """The grid: tasks x variants x d_osc (for variants that have it) x seeds, in a stable order."""
    from workers import CODE_VERSION
    from workers.attention import VARIANT_OPTIONS
    from workers.tasks import get_task

    model = study.model.model_dump()
    # unset optional fields stay out of the key, so adding an option later keeps old keys valid
    train = {k: v for k, v in study.train.model_dump().items() if v is not None}
    trials = []
    for task_entry in study.tasks:
        task = get_task(task_entry.name)
        task_options = task.options(task_entry.options)
        data_fp = fingerprint(task.identity(task_options))
        for variant in study.variants:
            defaults = {k: v for k, v in VARIANT_OPTIONS[variant.name].items() if k != "d_osc"}
            options = {**defaults, **variant.options}
            for d_osc in variant.d_osc or [None]:
                variant_options = dict(options) if d_osc is None else {**options, "d_osc": d_osc}
                for seed in study.seeds:
                    trials.append(
                        TrialSpec(
                            study=study.name,
                            task=task.name,
                            task_options=task_options,
                            variant=variant.name,
                            variant_options=variant_options,
                            model=model,
                            train=train,
                            seed=seed,
                            code_version=CODE_VERSION,
                            data_fingerprint=data_fp,
                        )
                    )
    keys = [t.key for t in trials]
    assert len(set(keys)) == len(keys), "two trials share a key: the grid has duplicate cells"
    return trials


@dataclass(frozen=True)
class Plan:
    """Grid trials known in advance, plus per-cell searches whose trials Optuna picks as it goes."""

    trials: list[TrialSpec]  # every trial whose key is known now (all of them without a search)
    done: set[str]
    search_cells: list[TrialSpec] = field(default_factory=list)  # one template per searched cell
    search_trials: int = 0  # per cell: search trials x search seeds
    replicate_seeds: list[int] = field(default_factory=list)

    @property
    def todo(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.key not in self.done]

    @property
    def planned(self) -> int:
        return len(self.trials) + len(self.search_cells) * (self.search_trials + len(self.replicate_seeds))

    def stage_counts(self) -> dict[str, int]:
        if not self.search_cells:
            return {"grid": len(self.trials)}
        return {
            "search": len(self.search_cells) * self.search_trials,
            "replicate": len(self.search_cells) * len(self.replicate_seeds),
        }


def make_plan(study: StudySpec) -> Plan:
    trials = expand(study)
    ledger_keys = Ledger(study.storage_uri()).keys()
    if study.search is None:
        return Plan(trials, ledger_keys & {t.key for t in trials})
    first = study.search.seeds[0]
    templates = [replace(t, stage="search") for t in trials if t.seed == first]
    replicate_seeds = [s for s in study.seeds if s not in study.search.seeds]
    search_trials = study.search.trials_per_cell * len(study.search.seeds)
    return Plan([], set(), templates, search_trials, replicate_seeds)
