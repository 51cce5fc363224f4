"""The core records shared by every layer: TrialSpec (what to run) and TrialRecord (what ran).

They live in `storage` because it is the lowest layer: `workers` builds a TrialRecord from a
TrialSpec, `studies` creates TrialSpecs, `scaling` reads TrialRecords, and none of them may
import the others' heavy dependencies. Both are frozen dataclasses of plain JSON values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("completed", "diverged", "failed", "pruned")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON-serialisable: {value!r} ({type(value).__name__})")


def stable_hash(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class TrialSpec:
    """One fully resolved trial. `key` hashes everything that changes the result."""

    study: str
    task: str
    task_options: dict[str, Any]
    variant: str
    variant_options: dict[str, Any]  # d_osc, p, anchor_norm, ... (d_osc absent for softmax)
    model: dict[str, Any]  # resolved shape: d_model, n_layers, n_heads, d_ff, dropout, ...
    train: dict[str, Any]  # budget and optimiser: steps, batch_size, lr, weight_decay, ...
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)  # searched nuisance parameters
    stage: str = "replicate"  # search | replicate
    target_params: int | None = None
    code_version: str = ""
    data_fingerprint: str = ""

    @property
    def d_osc(self) -> int | None:
        value = self.variant_options.get("d_osc")
        return int(value) if value is not None else None

    @property
    def cell(self) -> str:
        """The grid cell: everything but the seed (and searched hyperparameters)."""
        parts = [self.task, self.variant]
        if self.d_osc is not None:
            parts.append(f"d{self.d_osc}")
        if self.target_params is not None:
            parts.append(f"N{self.target_params}")
        return "/".join(parts)

    @property
    def key(self) -> str:
        payload = {
            "task": self.task,
            "task_options": self.task_options,
            "variant": self.variant,
            "variant_options": self.variant_options,
            "model": self.model,
            "train": self.train,
            "seed": self.seed,
            "hparams": self.hparams,
            "target_params": self.target_params,
            "code_version": self.code_version,
            "data_fingerprint": self.data_fingerprint,
        }
        slug = self.cell.replace("/", "-")
        return f"{slug}-s{self.seed}-{stable_hash(payload, 12)}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"TrialSpec: unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class TrialRecord:
    """The ledger row for one finished trial. Immutable once written."""

    key: str
    study: str
    cell: str
    task: str
    variant: str
    d_osc: int | None
    target_params: int | None
    params_total: int
    params_non_embedding: int
    seed: int
    stage: str
    hparams_json: str
    spec_json: str
    status: str  # completed | diverged | failed | pruned
    metric_name: str  # the task's primary validation metric, e.g. "val_loss"
    metric_value: float | None
    metrics_json: str  # every metric, validation and test
    best_step: int | None
    steps: int
    tokens_seen: int
    flops: float
    wall_seconds: float
    started_at: str
    finished_at: str
    wandb_run_id: str | None
    host: str
    error: str | None = None
    node_id: str | None = None  # the Ray node the trial ran on (None outside Ray): several nodes can share a host

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"TrialRecord.status={self.status!r}; allowed: {list(STATUSES)}")

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_json)

    @property
    def spec(self) -> TrialSpec:
        return TrialSpec.from_dict(json.loads(self.spec_json))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
