"""Expand a StudySpec into TrialSpecs with stable keys, and subtract what the ledger holds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from storage.cache import NotCached, fingerprint
from storage.ledger import Ledger
from storage.records import TrialSpec
from studies.spec import StudySpec


def expand(study: StudySpec, *, build: bool = True) -> list[TrialSpec]:
    """The grid: tasks x variants x d_osc (for variants that have it) x seeds, in a stable order.
    Sizing to `target_params` reads the data's vocabulary: with build=False (`scaling plan`) from the
    cache only, raising NotCached when the data are not prepared."""
    from workers import CODE_VERSION
    from workers.variants import get_variant
    from workers.tasks import get_task

    trials = []
    grid_variants = [v for v in study.variants if v.d_osc is not None or v.name not in _uses_d_osc()]
    if study.design is not None and all(v.name == study.baseline for v in grid_variants):
        grid_variants = []  # a design with no grid: it runs the baseline where it needs it
    for task_entry in study.tasks:
        task = get_task(task_entry.name)
        task_options = task.options(task_entry.options)
        data_fp = fingerprint(task.identity(task_options))
        model, train = model_and_train(study, task.name)
        for variant in grid_variants:
            defaults = {k: v for k, v in get_variant(variant.name).defaults().items() if k != "d_osc"}
            options = {**defaults, **preset_variant_options(study, task.name, variant.name), **variant.options}
            for d_osc in variant.d_osc or [None]:
                variant_options = dict(options) if d_osc is None else {**options, "d_osc": d_osc}
                for target in study.target_params or [None]:
                    shaped = model if target is None else sized_model(study, task, task_options, model, variant.name,
                                                                      variant_options, target, build=build)
                    for seed in study.seeds:
                        trials.append(
                            TrialSpec(
                                study=study.name,
                                task=task.name,
                                task_options=task_options,
                                variant=variant.name,
                                variant_options=variant_options,
                                model=shaped,
                                train=train,
                                seed=seed,
                                target_params=None if target is None else int(target),
                                code_version=CODE_VERSION,
                                data_fingerprint=data_fp,
                            )
                        )
    keys = [t.key for t in trials]
    assert len(set(keys)) == len(keys), "two trials share a key: the grid has duplicate cells"
    return trials


def _uses_d_osc() -> frozenset:
    from workers.variants import uses_d_osc

    return uses_d_osc()


BUDGETS = ("steps", "epochs", "tokens")


def model_and_train(study: StudySpec, task: str) -> tuple[dict, dict]:
    """The model and recipe of one task: the study's, or paper A's preset overridden by what the
    study file sets explicitly. Unset optional fields stay out (and out of the trial key)."""
    model = study.model.model_dump()
    train = {k: v for k, v in study.train.model_dump().items() if v is not None}
    if study.preset != "paper":
        return model, train
    from workers.presets import paper_preset

    preset = paper_preset(task)
    model = {**preset["model"], **{k: getattr(study.model, k) for k in study.model.model_fields_set}}
    explicit = {k: getattr(study.train, k) for k in study.train.model_fields_set if getattr(study.train, k) is not None}
    base = preset["train"]
    if any(b in explicit for b in BUDGETS):  # the study's budget replaces the preset's
        base = {k: v for k, v in base.items() if k not in BUDGETS}
    return model, {**base, **explicit}


def preset_variant_options(study: StudySpec, task: str, variant: str) -> dict:
    """Variant options the paper preset fixes for this task (e.g. SVA's readout masked causally
    only, as the reference code); options the study gives explicitly override them."""
    if study.preset != "paper":
        return {}
    from workers.presets import paper_preset

    return dict(paper_preset(task).get("variant_options", {}).get(variant, {}))


def sized_model(study: StudySpec, task, task_options: dict, model: dict, variant: str, variant_options: dict, target: float,
                *, build: bool = True) -> dict:
    """The study's model with depth, width, heads and FFN chosen for `target` parameters."""
    from storage.cache import DatasetCache
    from workers.sizing import model_fields, shape_for_target

    fields = task.model_fields(task.prepare(task_options, DatasetCache(study.cache), build=build))
    sizing = study.sizing
    shape = shape_for_target(
        target, variant=variant, variant_options=variant_options, vocab_size=fields.get("vocab_size", 0),
        seq_len=fields["max_seq_len"], backbone=model.get("backbone", "a"), head=fields.get("head", "lm"),
        num_classes=fields.get("num_classes", 0), input_dim=fields.get("input_dim"), positions=model.get("positions"),
        causal=fields.get("causal", True), count=sizing.count, head_width=sizing.head_width,
        aspect_ratio=sizing.aspect_ratio, tolerance=sizing.tolerance,
    )
    return {**model, **model_fields(shape)}


@dataclass(frozen=True)
class Plan:
    """Grid trials known in advance, plus per-cell searches whose trials Optuna picks as it goes."""

    trials: list[TrialSpec]  # every trial whose key is known now (all of them without a search)
    done: set[str]
    search_cells: list[TrialSpec] = field(default_factory=list)  # one template per searched cell
    search_trials: int = 0  # per cell: search trials x search seeds
    replicate_seeds: list[int] = field(default_factory=list)
    design_trials: int = 0  # trials an adaptive design chooses as it goes (studies/design.py)
    design_cells: list[TrialSpec] = field(default_factory=list)  # one template per cell the design may choose

    @property
    def todo(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.key not in self.done]

    @property
    def planned(self) -> int:
        return len(self.trials) + len(self.search_cells) * (self.search_trials + len(self.replicate_seeds)) + self.design_trials

    def stage_counts(self) -> dict[str, int]:
        if self.design_trials:
            return {"grid": len(self.trials), "design": self.design_trials}
        if not self.search_cells:
            return {"grid": len(self.trials)}
        return {
            "search": len(self.search_cells) * self.search_trials,
            "replicate": len(self.search_cells) * len(self.replicate_seeds),
        }


def make_plan(study: StudySpec, *, build: bool = True) -> Plan:
    """What the study runs; build=False reads the dataset cache but builds nothing (see `expand`)."""
    trials = expand(study, build=build)
    ledger_keys = Ledger(study.storage_uri()).keys()
    if study.design is not None:
        return Plan(trials, ledger_keys & {t.key for t in trials}, design_trials=max(0, study.design.budget - len(trials)),
                    design_cells=design_templates(study, build=build))
    if study.search is None:
        return Plan(trials, ledger_keys & {t.key for t in trials})
    first = study.search.seeds[0]
    templates = [replace(t, stage="search") for t in trials if t.seed == first]
    replicate_seeds = [s for s in study.seeds if s not in study.search.seeds]
    search_trials = study.search.trials_per_cell * len(study.search.seeds)
    return Plan([], set(), templates, search_trials, replicate_seeds)


def design_templates(study: StudySpec, *, build: bool = True) -> list[TrialSpec]:
    """One trial per cell an adaptive design may choose (the baseline and each allowed d_osc), so the
    resource check and `scaling plan` see their shapes before any is chosen."""
    from scaling.design import BASELINE, VARIANT, Point
    from studies.design import TrialFactory, resolve

    factory = TrialFactory(study, resolve(study), build=build)
    points = [Point(BASELINE, None, study.seeds[0])] + [Point(VARIANT, x, study.seeds[0]) for x in factory.axes["xs"]]
    return [factory.spec(p) for p in points]


@dataclass(frozen=True)
class CellCost:
    cell: str
    trials: int
    done: int  # trials of the cell already in the ledger (finished: completed, diverged or pruned)
    params_total: int | None
    params_non_embedding: int | None
    flops_per_trial: float | None  # training FLOPs (forward + backward) of one trial
    seconds_per_trial: float | None  # estimated from finished trials' measured FLOP rate
    note: str = ""
    done_seconds: float = 0.0  # measured wall time of the cell's finished trials

    @property
    def remaining(self) -> int:
        return max(0, self.trials - self.done)


def cell_costs(study: StudySpec, plan: Plan, *, build: bool = True) -> list[CellCost]:
    """Parameters, training FLOPs and an estimated wall time per cell, running no trial, with the
    trials already in the ledger (done, their measured time) apart from those still to run.

    Counts depend on the vocabulary: the data are read from the cache, and prepared if needed unless
    build=False (`scaling plan`: a cell whose data are not cached gets a note instead). The time
    estimate divides FLOPs by the FLOP rate measured in this study's finished trials (same variant first)."""
    from storage.cache import DatasetCache
    from workers.tasks import get_task
    from workers.trial import build_model, resolve_budget, resolve_train

    per_cell: dict[str, list[TrialSpec]] = {}
    for spec in plan.trials + plan.search_cells:
        per_cell.setdefault(spec.cell, []).append(spec)
    n_per_cell = {cell: len(specs) for cell, specs in per_cell.items()}
    for spec in plan.design_cells:  # the design decides how many: counted as the grid's (0 beyond it)
        per_cell.setdefault(spec.cell, []).append(spec)
        n_per_cell.setdefault(spec.cell, 0)
    for spec in plan.search_cells:
        n_per_cell[spec.cell] = plan.search_trials + len(plan.replicate_seeds)
    rates = _flop_rates(study)
    done, done_seconds = _done_per_cell(study, plan)
    cache = DatasetCache(study.cache)
    out = []
    for cell, specs in per_cell.items():
        spec = specs[0]
        task = get_task(spec.task)
        finished = dict(done=done.get(cell, 0), done_seconds=done_seconds.get(cell, 0.0))
        try:
            prepared = task.prepare(spec.task_options, cache, build=build)
        except NotCached:
            out.append(CellCost(cell, n_per_cell[cell], params_total=None, params_non_embedding=None,
                                flops_per_trial=None, seconds_per_trial=None,
                                note="data not cached yet (see below)", **finished))
            continue
        except Exception as error:  # noqa: BLE001 -- a missing source is reported, not fatal here
            out.append(CellCost(cell, n_per_cell[cell], params_total=None, params_non_embedding=None,
                                flops_per_trial=None, seconds_per_trial=None, note=f"data not available: {error}", **finished))
            continue
        with torch_meta():  # counts and FLOPs without allocating (a huge shape must not fill the memory)
            model = build_model(spec, task.model_fields(prepared))
        seq_len = task.tokens_per_example(prepared)
        n_train = len(next(iter(prepared.arrays["train"].values())))
        train = resolve_budget(resolve_train(spec.train, spec.hparams), n_train, seq_len)
        flops = 3 * model.flops_per_token(seq_len) * seq_len * train["batch_size"] * train["steps"]
        rate = rates.get(spec.variant) or rates.get("*")
        total, non_embedding = model.param_counts()
        note = "+ design's choice" if any(t.cell == cell for t in plan.design_cells) else ""
        out.append(CellCost(cell, n_per_cell[cell], params_total=total, params_non_embedding=non_embedding,
                            flops_per_trial=flops, seconds_per_trial=flops / rate if rate else None, note=note,
                            **finished))
    return out


def _done_per_cell(study: StudySpec, plan: Plan) -> tuple[dict[str, int], dict[str, float]]:
    """Per cell, the planned trials the ledger holds a finished record of, and their wall seconds.
    A searched cell counts its finished records (Optuna picks its keys as it goes)."""
    known = {t.key for t in plan.trials}
    searched = {t.cell for t in plan.search_cells}
    seen: set[str] = set()
    count: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for row in Ledger(study.storage_uri()).rows():
        if row["status"] == "failed" or row["key"] in seen or not (row["key"] in known or row["cell"] in searched):
            continue
        seen.add(row["key"])
        count[row["cell"]] = count.get(row["cell"], 0) + 1
        seconds[row["cell"]] = seconds.get(row["cell"], 0.0) + float(row["wall_seconds"] or 0.0)
    return count, seconds


def _flop_rates(study: StudySpec) -> dict[str, float]:
    """Training FLOP/s per variant (and '*' for all): measured on this study's completed trials,
    else from `scaling bench` figures ($SCALING_BENCH_JSON, default ./bench.json) when present."""
    import statistics

    rows = [r for r in Ledger(study.storage_uri()).rows() if r["status"] == "completed" and r["wall_seconds"] > 0 and r["flops"] > 0]
    rates: dict[str, list[float]] = {}
    for row in rows:
        rate = row["flops"] / row["wall_seconds"]
        rates.setdefault(row["variant"], []).append(rate)
        rates.setdefault("*", []).append(rate)
    if not rates:
        rates = bench_flop_rates(os.environ.get("SCALING_BENCH_JSON", "bench.json"))
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_flop_rates(path: str) -> dict[str, list[float]]:
    """FLOP/s of whole training steps measured by `scaling bench` (its model, its sequence lengths)."""
    import json

    if not os.path.exists(path):
        return {}
    from workers.model import ModelConfig, Transformer

    with open(path) as f:
        bench = json.load(f)
    rates: dict[str, list[float]] = {}
    for row in bench.get("rows", []):
        if row.get("part") != "step" or "naive" in row["case"] or not row.get("tokens_per_s"):
            continue
        variant, _, d = row["case"].partition(" d")
        options = {"d_osc": int(d)} if d.isdigit() else {}
        cfg = ModelConfig(**{**bench["model"], "max_seq_len": row["T"]}, attention=variant, attention_options=options)
        with torch_meta():
            flops = 3 * Transformer(cfg).flops_per_token(row["T"]) * row["tokens_per_s"]
        rates.setdefault(variant, []).append(flops)
        rates.setdefault("*", []).append(flops)
    return rates


def torch_meta():
    import torch

    return torch.device("meta")
