"""Expand a StudySpec into TrialSpecs with stable keys, and subtract what the ledger holds."""

from __future__ import annotations

from dataclasses import dataclass

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
    train = study.train.model_dump()
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
    trials: list[TrialSpec]
    done: set[str]

    @property
    def todo(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.key not in self.done]


def make_plan(study: StudySpec) -> Plan:
    trials = expand(study)
    wanted = {t.key for t in trials}
    done = Ledger(study.storage_uri()).keys() & wanted
    return Plan(trials, done)
