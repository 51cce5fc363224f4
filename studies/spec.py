"""The study file: load, validate (pydantic, unknown keys rejected), and hold as a frozen StudySpec.

Every error names the field, the bad value and the allowed values, before anything runs. Loading
and validating import neither torch nor ray (the task and variant registries are read through
`workers/_lazy.py` and `workers/variant_options.py`), so a bad file is refused in well under a
second; `check_can_run` adds the checks that depend on this machine (storage writable).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from scaling.laws import LAW_NAMES
from storage.suggest import did_you_mean
from workers.configs import MAX_STEPS, check_heads, study_model_fields, study_train_fields

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# Upper bounds no machine can run past (a trial of such a shape needs terabytes, or the number
# overflows a ledger column); the resource check before Ray starts compares with this node's memory.
# The model's and the recipe's bounds are declared with their configs (workers/configs.py).
MAX_D_OSC = 65_536
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding both take it
MAX_TARGET_PARAMS = 1e12
EXAMPLE = "studies/examples/quickstart.yaml"


class StudyError(ValueError):
    """A study file that cannot run; the message says what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_tasks() -> dict:
    from workers.tasks import TASKS

    return TASKS


def _known_variants() -> dict:
    from workers.variants import VARIANTS  # the registry; no torch (see workers/variants.py)

    return VARIANTS


def _uses_d_osc() -> frozenset:
    """The registered variants whose cells multiply by a d_osc list."""
    from workers.variants import uses_d_osc

    return uses_d_osc()


class TaskEntry(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "TaskEntry":
        tasks = _known_tasks()
        if self.name not in tasks:
            raise ValueError(f"unknown task {self.name!r}; allowed: {sorted(tasks)}{did_you_mean(self.name, tasks)}")
        tasks[self.name].options(self.options)  # raises naming unknown options
        return self


class VariantEntry(_Strict):
    name: str
    d_osc: list[int] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("d_osc")
    @classmethod
    def _d_osc(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("d_osc is an empty list; give at least one value >= 2, e.g. [2, 4, 8]")
        bad = [d for d in value if d < 2]
        if bad:
            raise ValueError(f"d_osc values {bad} are < 2; the oscillator sphere S^(d-1) needs d_osc >= 2")
        huge = [d for d in value if d > MAX_D_OSC]
        if huge:
            raise ValueError(f"d_osc values {huge} are > {MAX_D_OSC:,}; give oscillator dimensions from 2 to {MAX_D_OSC:,} "
                             "(paper A: 2 to 64)")
        if len(set(value)) != len(value):
            raise ValueError(f"d_osc {value} has repeated values")
        return value

    @model_validator(mode="after")
    def _check(self) -> "VariantEntry":
        variants = _known_variants()
        if self.name not in variants:
            raise ValueError(f"unknown variant {self.name!r}; allowed: {sorted(variants)}{did_you_mean(self.name, variants)}")
        variant = variants[self.name]
        uses_d_osc = sorted(name for name, v in variants.items() if v.uses_d_osc)
        allowed = set(variant.option_names()) - {"d_osc"}
        unknown = set(self.options) - allowed
        if unknown:
            raise ValueError(
                f"variant {self.name}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed) or 'none'}"
                f"{''.join(did_you_mean(u, allowed) for u in sorted(unknown))}"
            )
        if "d_osc" in self.options:
            raise ValueError(f"variant {self.name}: give d_osc as a list beside `options`, e.g. d_osc: [2, 4, 8]")
        # a variant with an oscillator and no d_osc is checked by the study: a `design:` may choose them
        if not variant.uses_d_osc and self.d_osc is not None:
            raise ValueError(f"variant {self.name} has no oscillator: remove d_osc (only {uses_d_osc} use it)")
        # the option values, through the variant's own config (the values are kept as written: they
        # are part of every trial key)
        variant.make_config({**self.options, **({"d_osc": self.d_osc[0]} if self.d_osc else {})})
        return self


class ModelEntry(create_model("ModelFields", __base__=_Strict, **study_model_fields())):  # workers/configs.py ModelConfig
    @model_validator(mode="after")
    def _heads(self) -> "ModelEntry":
        check_heads(self.d_model, self.n_heads, rotary=self.backbone == "b" or self.positions == "rope")
        return self


class TrainEntry(create_model("TrainFields", __base__=_Strict, **study_train_fields())):  # workers/configs.py TrainConfig
    # the budget: exactly one of steps, epochs or tokens (default: 1000 steps)

    @field_validator("eval_every")
    @classmethod
    def _eval_every(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_STEPS:
            raise ValueError("must be a number of steps >= 1, or \"epoch\" (evaluate after every pass over the train split)")
        return value

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainEntry":
        given = [name for name in ("steps", "epochs", "tokens") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one training budget, not {given}: steps, epochs or tokens")
        if not given:
            object.__setattr__(self, "steps", 1000)
        return self


LawName = Literal[LAW_NAMES]  # the law registry: scaling/laws.py


class HoldoutEntry(_Strict):
    # d_osc values run but left out of every fit, then predicted from it (paper A: 64)
    d_osc: list[int] = Field(default_factory=list)

    @field_validator("d_osc")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value} has repeated values")
        return value


class FitsEntry(_Strict):
    laws: list[LawName] = Field(default_factory=lambda: ["gap_vs_dosc"])
    # the one method of the headline, `predict`, `compare` and HTTP (scaling/fits.py: nonlinear =
    # every run, one level per seed, profile intervals; loglog-means = paper A's log-log on means)
    method: Literal["nonlinear", "loglog-means"] = "nonlinear"
    # nonlinear: fit C x^-alpha + g_inf (an irreducible gap) instead of C x^-alpha; chosen before
    # the data are seen, never by them (see scaling/fits.py _select_nonlinear)
    floor: bool = False
    holdout: HoldoutEntry = Field(default_factory=lambda: HoldoutEntry())


SEARCHABLE = ("lr", "weight_decay", "warmup_steps", "batch_size", "grad_clip", "schedule", "optimizer")


class Distribution(_Strict):
    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Distribution":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical distribution needs a non-empty `choices` list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical distribution takes `choices`, not low/high")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} distribution needs `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be < high={self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.choices is not None:
            raise ValueError(f"`choices` belongs to categorical distributions, not {self.type}")
        return self

    def grid_values(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int" and self.step:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        raise ValueError("the grid sampler needs categorical choices (or int with a step) for every parameter")


class AshaEntry(_Strict):
    grace_steps: int = Field(100, ge=1)  # no trial is stopped before this many steps
    reduction_factor: float = Field(3.0, gt=1)


class SearchEntry(_Strict):
    sampler: Literal["tpe", "grid", "random"] = "tpe"
    sampler_seed: int = 0
    trials_per_cell: int | None = Field(None, ge=1)  # grid: default = the grid's size
    seeds: list[int] | None = None  # seeds used for the search (default: the study's first seed)
    space: dict[str, Distribution]
    storage: str | None = None  # Optuna RDB URL; default: a journal file under the study's storage
    asha: AshaEntry | None = None

    @field_validator("space")
    @classmethod
    def _space(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        if not value:
            raise ValueError("is empty; name at least one hyperparameter to search, e.g. lr")
        unknown = set(value) - set(SEARCHABLE)
        if unknown:
            raise ValueError(f"cannot search {sorted(unknown)}; searchable: {list(SEARCHABLE)}")
        return value

    @model_validator(mode="after")
    def _sampler(self) -> "SearchEntry":
        if self.sampler == "grid":
            size = 1
            for name, dist in self.space.items():
                try:
                    size *= len(dist.grid_values())
                except ValueError as error:
                    raise ValueError(f"space.{name}: {error}") from None
            if self.trials_per_cell is None:
                object.__setattr__(self, "trials_per_cell", size)
        elif self.trials_per_cell is None:
            raise ValueError(f"sampler {self.sampler!r} needs trials_per_cell (the search trials per cell)")
        return self


class ResourcesEntry(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0, le=1024, allow_inf_nan=False)
    gpus_per_trial: float = Field(0.0, ge=0, le=64, allow_inf_nan=False)
    max_concurrent_trials: int | None = Field(None, ge=1, le=100_000)
    max_failures: int = Field(1, ge=0, le=1000)
    # trials that differ only in seed trained together as one stacked model in one Ray trial
    # (workers/stacked.py): 1 = one trial per worker; auto = all of a cell's seeds
    pack_seeds: int | Literal["auto"] = 1

    @field_validator("pack_seeds")
    @classmethod
    def _pack_seeds(cls, value):
        if value != "auto" and not 1 <= value <= 1024:
            raise ValueError(f"resources.pack_seeds={value!r}: give a number of seeds from 1 to 1024, or auto "
                             "(all of a cell's seeds in one stacked trial)")
        return value


class WandbEntry(_Strict):
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY is set
    project: str = "oscillator-scaling"
    entity: str | None = None


class TrackingEntry(_Strict):
    wandb: WandbEntry = Field(default_factory=WandbEntry)
    # a row of train metrics (mean loss, lr, grad norm, tokens/s) every this many steps: W&B
    # history and the trial's progress; evaluations are logged whenever they happen
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS)
    # how often a running trial updates its progress file and tells the driver (progress lines)
    progress_seconds: float = Field(10.0, ge=0.1, le=86_400, allow_inf_nan=False)


class CheckpointEntry(_Strict):
    """When a running trial saves its state (besides every evaluation). Not part of what a trial
    computes, so not part of its key: change it freely, a resumed trial gives the same result."""

    # wall-clock seconds between checkpoints: a cancelled, preempted or crashed trial loses at most
    # this much work; null: at evaluation points only
    every_seconds: float | None = Field(60.0, gt=0, le=86_400 * 7, allow_inf_nan=False)


class SizingEntry(_Strict):
    """How `target_params` becomes a shape (workers/sizing.py): shared depth, width and heads across
    variants; the FFN width absorbs what a variant adds (anchors, couplings)."""

    count: Literal["total", "non_embedding"] = "total"
    head_width: int = Field(32, ge=4)
    aspect_ratio: float = Field(64.0, gt=0)  # d_model / n_layers
    tolerance: float = Field(0.01, gt=0, lt=0.2)


class DesignRange(_Strict):
    """A design axis given as a range: the powers of two from low to high."""

    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)


class DesignTarget(_Strict):
    # the prediction interval of the gap at one point, e.g. {d_osc: 64}
    predict: dict[Literal["d_osc"], float]

    @field_validator("predict")
    @classmethod
    def _one(cls, value: dict) -> dict:
        if len(value) != 1:
            raise ValueError(f"name exactly one point, e.g. {{d_osc: 64}} (got {value})")
        (name, x0), = value.items()
        bounds = (2, MAX_D_OSC) if name == "d_osc" else (1e3, MAX_TARGET_PARAMS)
        if not (math.isfinite(x0) and bounds[0] <= x0 <= bounds[1]):
            raise ValueError(f"predict.{name} = {x0} is outside {bounds[0]:g} to {bounds[1]:g}; give a point in that range")
        return value


class DesignEntry(_Strict):
    """An adaptive design over the study's own axes (studies/design.py, scaling/design.py): which
    (d_osc, target_params, seed) to run next so the target's interval shrinks most."""

    variant: str | None = None  # the variant whose gap law is designed (default: the one with an oscillator)
    d_osc: list[int] | DesignRange | int | None = None  # values, a range of powers of two, or one value
    target_params: float | None = None  # the one size the design works at (default: the study's one size)
    seeds_per_point: int | None = Field(None, ge=2)  # cap on seeds at one point (default: len(seeds))
    budget: int = Field(ge=1, le=100_000)  # trials in all: grid, baseline and design runs
    # alpha: the width of alpha's 95% interval; {predict: {d_osc: 64}}: the prediction interval there
    target: Any = "alpha"
    initial_seeds: int = Field(2, ge=2, le=64)  # seeds of the space-filling start
    batch: int | None = Field(None, ge=1, le=1024)  # report's batch (default: resources.max_concurrent_trials)
    sampler_seed: int = 0
    # after the start and completion rules: "gain" (greedy, one batch ahead; the default) or "plan"
    # (the c-optimal design of the whole remaining budget, scaling/optimal_design.py)
    rule: Literal["gain", "plan"] = "gain"
    storage: str | None = None  # Optuna RDB URL; default: a journal file under the study's storage

    @field_validator("target")
    @classmethod
    def _target(cls, value: Any) -> Any:
        if value == "alpha" or isinstance(value, DesignTarget):
            return value
        if isinstance(value, dict):
            try:
                return DesignTarget.model_validate(value)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        raise ValueError("must be alpha (the width of alpha's interval) or {predict: {d_osc: 64}} (the prediction "
                         "interval of the gap at a point)")

    @field_validator("d_osc")
    @classmethod
    def _d_osc(cls, value: Any) -> Any:
        if isinstance(value, DesignRange):
            if not 2 <= value.low <= value.high <= MAX_D_OSC:
                raise ValueError(f"needs 2 <= low <= high <= {MAX_D_OSC:,} (got low {value.low:g}, high {value.high:g}); "
                                 f"e.g. {{low: 2, high: 64}}")
            if not _powers_of_two(value.low, value.high):
                raise ValueError(f"no power of two from {value.low:g} to {value.high:g}; widen the range, e.g. {{low: 2, high: 64}}")
            return value
        values = [value] if isinstance(value, int) else value
        if values is not None:
            VariantEntry._d_osc(values)
        return value

    @field_validator("target_params")
    @classmethod
    def _target_params(cls, value: float | None) -> float | None:
        if value is not None:
            StudySpec._targets([value])
        return value

    def d_osc_values(self) -> list[int]:
        if isinstance(self.d_osc, DesignRange):
            return _powers_of_two(self.d_osc.low, self.d_osc.high)
        return [self.d_osc] if isinstance(self.d_osc, int) else list(self.d_osc or [])

    def target_params_values(self) -> list[float]:
        return [] if self.target_params is None else [float(self.target_params)]


def _powers_of_two(low: float, high: float) -> list[int]:
    return [2**k for k in range(1, 17) if low <= 2**k <= high]


class StudySpec(_Strict):
    name: str
    description: str = ""
    storage: str | None = None  # directory or URI; default runs/<name> under the working directory
    cache: str | None = None  # dataset cache root; default $SCALING_CACHE or ~/.cache/oscillator-scaling
    tasks: list[TaskEntry]
    variants: list[VariantEntry]
    baseline: str = "softmax"
    model: ModelEntry = Field(default_factory=ModelEntry)
    seeds: list[int]
    train: TrainEntry = Field(default_factory=TrainEntry)
    search: SearchEntry | None = None  # optional per-cell Optuna search, then replicate seeds at the best
    # optional adaptive design over d_osc / target_params / seeds (after any grid the variants give)
    design: DesignEntry | None = None
    resources: ResourcesEntry = Field(default_factory=ResourcesEntry)
    tracking: TrackingEntry = Field(default_factory=TrackingEntry)
    checkpoint: CheckpointEntry = Field(default_factory=lambda: CheckpointEntry())
    # which laws to fit, by which method, and which points are held out of every fit; a plain list
    # (e.g. [gap_vs_dosc]) names the laws and keeps the defaults
    fits: FitsEntry = Field(default_factory=lambda: FitsEntry())
    # paper: each task's model and recipe from paper A (workers/presets.py); keys given under
    # `model:` / `train:` override the preset (e.g. fewer epochs for a reduced run)
    preset: Literal["paper"] | None = None
    target_params: list[float] | None = None  # a grid factor: each variant sized to each count
    sizing: SizingEntry = Field(default_factory=lambda: SizingEntry())

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"study name {value!r} must be 1-64 letters, digits, '.', '_' or '-' (it names directories and W&B groups)"
            )
        return value

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is not None:
            problem = storage_problem(value, writable=False)
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _default_storage(self) -> "StudySpec":
        if self.storage is None:  # runs/<name> under the working directory
            problem = storage_problem(self.storage_uri(), writable=False)
            if problem:
                raise ValueError(f"storage (default runs/{self.name}): {problem}")
        return self

    @field_validator("tasks", "variants")
    @classmethod
    def _non_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("is empty; list at least one entry")
        names = [entry.name for entry in value]
        if len(set(names)) != len(names):
            raise ValueError(f"names repeat: {names}; list each once")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("is empty; give at least one seed, e.g. seeds: [0, 1, 2]")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} has repeated seeds")
        if any(s < 0 or s > MAX_SEED for s in value):
            raise ValueError(f"seeds must be whole numbers from 0 to {MAX_SEED:,} (2^32 - 1)")
        return value

    @field_validator("target_params")
    @classmethod
    def _targets(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("is empty; give parameter counts such as [1.0e6, 5.0e6], or remove it")
        if any(not 1e3 <= v <= MAX_TARGET_PARAMS for v in value):
            raise ValueError(f"parameter counts must be from 1.0e3 to {MAX_TARGET_PARAMS:.1e}")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} has repeated counts")
        return value

    @model_validator(mode="after")
    def _preset(self) -> "StudySpec":
        if self.preset is None:
            return self
        from workers.presets import PAPER_A

        missing = [t.name for t in self.tasks if t.name not in PAPER_A]
        if missing:
            raise ValueError(f"preset: paper has no set-up for task(s) {missing}; paper A presets exist for {sorted(PAPER_A)}")
        if self.target_params:
            raise ValueError("preset: paper fixes each task's model shape; remove target_params (or the preset)")
        return self

    @field_validator("fits", mode="before")
    @classmethod
    def _fits_list(cls, value: Any) -> Any:
        return {"laws": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _holdout_in_grid(self) -> "StudySpec":
        held = self.fits.holdout.d_osc
        grid = {d for v in self.variants for d in (v.d_osc or [])}
        stray = sorted(set(held) - grid)
        if stray:
            raise ValueError(f"fits.holdout.d_osc {stray} is not in any variant's d_osc {sorted(grid)}: hold out d_osc "
                             f"values the study runs, or remove them")
        if grid and not grid - set(held):
            raise ValueError(f"fits.holdout.d_osc {sorted(held)} holds out every d_osc: leave some to fit")
        return self

    @model_validator(mode="after")
    def _search_seeds(self) -> "StudySpec":
        if self.search is None:
            return self
        if self.search.seeds is None:
            object.__setattr__(self.search, "seeds", [self.seeds[0]])
        stray = sorted(set(self.search.seeds) - set(self.seeds))
        if stray:
            raise ValueError(f"search.seeds {stray} are not among seeds {self.seeds}; search seeds must be study seeds")
        if self.search.asha and self.train.steps is None:
            raise ValueError("search.asha needs the budget in train.steps (its rungs are in steps)")
        return self

    @model_validator(mode="after")
    def _d_osc_given(self) -> "StudySpec":
        if self.design is not None:
            check_design(self)  # first: a bad design.variant is the error to show
        uses_d_osc = _uses_d_osc()
        for i, variant in enumerate(self.variants):
            if variant.name in uses_d_osc and variant.d_osc is None and not (self.design and self.design_variant() == variant.name):
                raise ValueError(f"variants[{i}]: variant {variant.name} needs d_osc: a list of oscillator dimensions, "
                                 f"e.g. [2, 4, 8] (or a `design:` block that chooses them)")
        return self

    def design_variant(self) -> str | None:
        """The variant a `design:` block designs: its `variant`, else the study's one oscillator variant."""
        if self.design is None:
            return None
        if self.design.variant:
            return self.design.variant
        uses_d_osc = _uses_d_osc()
        names = [v.name for v in self.variants if v.name in uses_d_osc]
        return names[0] if len(names) == 1 else None

    @model_validator(mode="after")
    def _baseline(self) -> "StudySpec":
        names = [v.name for v in self.variants]
        if "gap_vs_dosc" in self.fits.laws and self.baseline not in names:
            raise ValueError(
                f"baseline={self.baseline!r} is not among the variants {names}; add it to `variants` or set `baseline`"
            )
        return self

    # ---- derived ---------------------------------------------------------------------------
    def storage_uri(self) -> str:
        from storage.fs import study_storage_uri

        return study_storage_uri(self.name, self.storage)

    def to_yaml(self) -> str:
        """The study as written (unset keys stay unset, so defaults and presets resolve the same
        way when the copy is loaded again)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_unset=True), sort_keys=False)


def design_axes(study: "StudySpec") -> dict[str, Any]:
    """The resolved design: law, x name, allowed x values, the fixed other axis, target, seed cap."""
    design = study.design
    assert design is not None
    variant = study.design_variant()
    entry = next(v for v in study.variants if v.name == variant)
    ds = design.d_osc_values() or list(entry.d_osc or [])
    ns = design.target_params_values()
    if not ns and study.target_params and len(study.target_params) == 1:
        ns = [float(study.target_params[0])]
    law = "gap_vs_dosc"
    xs = [float(d) for d in ds]
    if isinstance(design.target, DesignTarget):
        (name, x0), = design.target.predict.items()
        target = {"kind": "predict", "x0": float(x0), "x_name": name}
    else:
        target = {"kind": "alpha", "x0": None, "x_name": None}
    return {"variant": variant, "law": law, "x_name": "d_osc", "xs": sorted(xs),
            "target_params": float(ns[0]) if ns else None,
            "target": target, "cap": design.seeds_per_point or len(study.seeds),
            "batch": design.batch or study.resources.max_concurrent_trials or 1}


def grid_size(study: "StudySpec") -> int:
    """Trials the study's grid holds (before any design): what `studies.plan.expand` makes."""
    uses_d_osc = _uses_d_osc()
    cells = 0
    others = 0
    for v in study.variants:
        if v.name in uses_d_osc and v.d_osc is None:
            continue  # chosen by the design
        n = len(v.d_osc or [None])
        cells += n
        others += n if v.name != study.baseline else 0
    if study.design is not None and others == 0:
        cells = 0  # only the baseline is left: the design runs it where it needs it
    return len(study.tasks) * cells * len(study.target_params or [None]) * len(study.seeds)


def check_design(study: "StudySpec") -> None:
    """Every rule a `design:` block must meet, each failure naming the field, the value and the fix."""
    from scaling.design import start_size

    design = study.design
    uses_d_osc = _uses_d_osc()
    names = [v.name for v in study.variants]
    variant = study.design_variant()
    if variant is None:
        candidates = [n for n in names if n in uses_d_osc]
        raise ValueError(f"design.variant: the study has {len(candidates)} oscillator variants {candidates}; name the "
                         f"one to design, e.g. variant: {candidates[0] if candidates else 'oscillator'}")
    if variant not in names or variant == study.baseline:
        raise ValueError(f"design.variant = {variant!r} must be one of the study's variants other than the baseline "
                         f"{[n for n in names if n != study.baseline]}")
    if study.baseline not in names:
        raise ValueError(f"design: the baseline {study.baseline!r} is not among the variants {names}; the design "
                         f"measures gaps to it: add it to `variants`")
    if len(study.tasks) != 1:
        raise ValueError(f"design: works on one task; the study has {len(study.tasks)} ({[t.name for t in study.tasks]}). "
                         f"Give each task its own study file")
    if study.search is not None:
        raise ValueError("design: cannot be combined with `search:` yet (a design trial has no per-cell search); "
                         "remove one of them")
    if study.preset is not None and design.target_params is not None:
        raise ValueError("design.target_params: preset: paper fixes each task's model shape; remove target_params "
                         "(or the preset)")
    entry = next(v for v in study.variants if v.name == variant)
    ds = design.d_osc_values() or list(entry.d_osc or [])
    ns = design.target_params_values()
    if not ds:
        raise ValueError(f"design.d_osc: variant {variant} has no d_osc list, so the design must give its values: "
                         f"e.g. d_osc: {{low: 2, high: 64}} (powers of two) or d_osc: [2, 4, 8, 16]")
    if not ns and study.target_params and len(study.target_params) > 1:
        raise ValueError(f"design.target_params: the study's grid has {len(study.target_params)} sizes "
                         f"{study.target_params}; name the one size the design works at in design.target_params")
    law, xs, axis = "gap_vs_dosc", ds, "d_osc"  # designs over parameter counts: not yet (README)
    need = 4 if study.fits.floor else 3
    if len(xs) < need:
        raise ValueError(f"design.{axis}: {len(xs)} value(s) {xs}; the law {law} needs at least {need} "
                         f"to be identified: widen the range")
    if law not in study.fits.laws:
        raise ValueError(f"design: its law is {law} ({axis} varies), but fits.laws is {list(study.fits.laws)}; add "
                         f"{law} to fits.laws")
    if isinstance(design.target, DesignTarget):
        (name, x0), = design.target.predict.items()
        if name != axis:
            raise ValueError(f"design.target.predict.{name}: the design's law is {law}, whose x is {axis}; predict "
                             f"at a {axis} value, e.g. {{{axis}: {2 * max(xs):g}}}")
    cap = design.seeds_per_point or len(study.seeds)
    if cap > len(study.seeds):
        raise ValueError(f"design.seeds_per_point = {cap} is more than the {len(study.seeds)} seeds in `seeds`; list "
                         f"more seeds (the design takes them in order) or lower the cap")
    if cap < 2:
        raise ValueError(f"design: `seeds` has {len(study.seeds)} seed; the fits need at least 2 per point: list more")
    if design.initial_seeds > cap:
        raise ValueError(f"design.initial_seeds = {design.initial_seeds} is more than seeds_per_point {cap}; lower it")
    grid = grid_size(study)
    start = start_size(xs, design.initial_seeds, study.fits.floor)
    least = grid + 1 if grid else start
    if design.budget < least:
        what = (f"the grid's {grid} trials and at least one design trial" if grid else
                f"the space-filling start: {start} trials ({min(need, len(xs))} {axis} values x "
                f"{design.initial_seeds} seeds, with their baseline runs)")
        raise ValueError(f"design.budget = {design.budget} is below {least}, {what}; raise the budget")


def storage_problem(uri: str, *, writable: bool = True) -> str | None:
    """Why a study's storage cannot hold its ledger, or None. Only a local path is checked, and
    nothing is created: a file where the directory should be (or above it), and with `writable`
    a directory this process cannot write (permissions, read-only filesystem)."""
    from storage.fs import is_local, resolve

    if not uri or not is_local(uri):
        return None
    path = Path(resolve(uri)[1])
    fix = "give a directory (it holds the ledger, checkpoints and report), or remove `storage:` for runs/<name>"
    try:
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
            return f"{path} {where}, not a directory; {fix}"
        if writable:
            if os.statvfs(existing).f_flag & os.ST_RDONLY:
                return f"{path} is on a read-only filesystem ({existing}); {fix}"
            _probe_write(existing, path)
    except OSError as error:
        if writable:
            return f"{path} is not writable ({error.strerror or error}); {fix}"
        return f"{path} cannot be checked ({error.strerror or error}); {fix}"
    return None


def _probe_write(existing: Path, path: Path) -> None:
    """Raise OSError unless this process can create `path` under `existing` (its nearest existing
    ancestor). Whatever the probe makes is removed at once: permission bits alone do not say it
    (root ignores them; pseudo and network filesystems refuse anyway)."""
    if existing == path:
        fd, probe = tempfile.mkstemp(prefix=".scaling-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
        return
    first = existing / path.relative_to(existing).parts[0]  # the first missing directory
    os.mkdir(first)
    os.rmdir(first)


def check_can_run(study: "StudySpec") -> None:
    """What this machine must allow before a study runs, checked in well under a second with
    nothing written: its storage can be written. Raises StudyError naming the field."""
    problem = storage_problem(study.storage_uri())
    if problem:
        field = "storage" if study.storage else f"storage (default runs/{study.name})"
        raise StudyError(f"study {study.name}: nothing was run:\n  - {field}: {problem}")


def ensure_storage(study: "StudySpec") -> str:
    """Create the study's storage directory (the run's first write); a failure is a StudyError
    naming the field, not a traceback. Returns the storage URI."""
    uri = study.storage_uri()
    from storage.fs import is_local, resolve

    if is_local(uri):
        path = resolve(uri)[1]
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            field = "storage" if study.storage else f"storage (default runs/{study.name})"
            raise StudyError(f"study {study.name}: nothing was run:\n  - {field}: cannot create {path} "
                             f"({error.strerror or error}); give a directory you can write to") from None
    return uri


FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _cut(text: str, limit: int) -> str:
    """Error text never echoes a large input: cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} problem(s); nothing was run:"]
    for item in error.errors():
        where = _location(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parent = item["loc"][:-1]
            allowed = _allowed_keys(parent)
            message = f"unknown key; allowed keys here: {', '.join(allowed)}{did_you_mean(item['loc'][-1], allowed)}"
        elif item["type"] == "missing":
            message = "required field is missing"
        value = item.get("input")
        bound = (item.get("ctx") or {}).get("le")
        if item["type"] == "less_than_equal" and isinstance(bound, (int, float)) and bound >= 1000:
            message = f"must be at most {bound:,}: past that no machine can run the trial; lower it"
        if isinstance(value, str) and FLOAT_TEXT.match(value.strip()) and item["type"].endswith("_parsing"):
            message += f"; YAML reads {value} as text: write it with a dot, e.g. {_with_dot(value)}"
        shown = "" if item["type"] in ("missing",) or isinstance(value, dict) else f" (got {_cut(repr(value), 80)})"
        lines.append(f"  - {_cut(where, 200)}: {_cut(message, 600)}{shown}")
    return "\n".join(lines)


def _with_dot(text: str) -> str:
    mantissa, _, exponent = text.strip().lower().partition("e")
    return f"{mantissa if '.' in mantissa else mantissa + '.0'}e{exponent}"


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = StudySpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields) if model else []


KINDS = {list: "a list (YAML sequence)", str: "a single string", int: "a single number", float: "a single number",
         bool: "a single true/false"}


def parse_study(data: Any, source: str = "study") -> StudySpec:
    if data is None:
        raise StudyError(f"{source}: the study file is empty (or only comments); nothing was run. A study file is a "
                         f"YAML mapping with at least name:, tasks:, variants: and seeds:; start from {EXAMPLE}")
    if not isinstance(data, dict):
        kind = KINDS.get(type(data), type(data).__name__)
        raise StudyError(f"{source}: the study file holds {kind}, not a mapping; nothing was run. A study file is a "
                         f"YAML mapping of keys (name:, tasks:, variants:, seeds:, ...); see {EXAMPLE}")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as error:
        raise StudyError(_format_errors(error, source)) from None


def load_study(path: str | os.PathLike) -> StudySpec:
    """Load a study from a YAML file, or from a study's storage directory (its saved study.yaml)."""
    path = Path(path)
    storage_dir = path.is_dir()
    if storage_dir:
        path = path / "study.yaml"
    if not path.exists():
        raise StudyError(f"{path}: no such study file (give a study .yaml or a study's storage directory)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyError(f"{path}: not valid YAML; nothing was run: {_cut(str(error), 600)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise StudyError(f"{path}: cannot be read as a text file ({error}); nothing was run") from None
    if storage_dir and isinstance(data, dict):
        # the copy lives beside its ledger: the directory it is in is the storage, wherever the
        # directory has been moved or cloned to since (the copy records the absolute path it had)
        data["storage"] = str(path.parent.resolve())
    return parse_study(data, str(path))
