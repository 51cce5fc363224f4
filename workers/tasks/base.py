"""The task interface, and the causal language-modelling task that most tasks share.

Legend: B batch, T sequence, V vocabulary. LM splits are Arrow tables with two fixed-size list
columns `input_ids` and `labels` (label -100 = not scored).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from storage.cache import CacheCorrupt, CachedDataset, DatasetCache, NotCached
from storage.prep.sources import SourceUnavailable
from storage.suggest import did_you_mean
from workers._lazy import F, no_grad, torch  # torch on first use: validating a study file imports this module

IGNORE = -100
SPLITS = ("train", "val", "test")
EVAL_LOGITS_BUDGET = 1 << 24  # logits per forward pass in LM evaluation (64 MB of float32)


@dataclass
class PreparedTask:
    """A task's cached splits as numpy arrays, plus what the model needs to know."""

    fingerprint: str
    arrays: dict[str, dict[str, np.ndarray]]  # split -> column -> (N, T) array
    meta: dict[str, Any]


def _numpy_dtype(arrow_type: pa.DataType) -> np.dtype | None:
    width = getattr(arrow_type, "bit_width", 0) // 8
    if pa.types.is_signed_integer(arrow_type):
        return np.dtype(f"<i{width}")
    if pa.types.is_unsigned_integer(arrow_type):
        return np.dtype(f"<u{width}")
    if pa.types.is_floating(arrow_type):
        return np.dtype(f"<f{width}")
    return None


def _primitive_view(array: pa.Array, start: int, count: int) -> np.ndarray | None:
    """`count` values of a null-free primitive array from `start`, viewed in place (no copy, and no
    pyarrow -> pandas import, which costs a fresh worker ~0.3 s on its first `to_numpy`)."""
    dtype = _numpy_dtype(array.type)
    if dtype is None or array.null_count:
        return None
    data = array.buffers()[1]
    return np.frombuffer(data, dtype=dtype, count=count, offset=(array.offset + start) * dtype.itemsize)


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column as numpy, zero-copy where Arrow allows (one chunk, no nulls: memory-mapped files
    stay shared between workers); a fixed-size list column becomes (N, width)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        if column.null_count == 0:
            view = _primitive_view(column.values, column.offset * width, len(column) * width)
            if view is not None:
                return view.reshape(-1, width)
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    view = _primitive_view(column, 0, len(column))
    return view if view is not None else column.to_numpy(zero_copy_only=False)


def table_to_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    return {name: column_to_numpy(table.column(name)) for name in table.column_names}


def fixed_width_table(**columns: np.ndarray) -> pa.Table:
    """(N, T) integer arrays -> an Arrow table of fixed-size int32 lists (memory-mappable)."""
    arrays = {}
    for name, array in columns.items():
        flat = pa.array(np.ascontiguousarray(array, dtype=np.int32).reshape(-1))
        arrays[name] = pa.FixedSizeListArray.from_arrays(flat, array.shape[1])
    return pa.table(arrays)


class Task:
    name: str = ""
    DEFAULTS: dict[str, Any] = {}
    metric: str = "val_loss"  # the primary validation metric recorded in the ledger
    lower_is_better: bool = True

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = set(given) - set(self.DEFAULTS)
        if unknown:
            raise ValueError(
                f"task {self.name}: unknown option(s) {sorted(unknown)}; allowed: {sorted(self.DEFAULTS)}"
                f"{''.join(did_you_mean(u, self.DEFAULTS) for u in sorted(unknown))}"
            )
        return {**self.DEFAULTS, **given}

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        """What the cached data depends on (hashed into the cache fingerprint and the trial key)."""
        return {"task": self.name, "options": options}

    def request(self, options: dict[str, Any]) -> dict[str, Any]:
        """What was asked for (options as given): how a machine without the source finds the entry."""
        return {"task": self.name, "options": options}

    def build(self, options: dict[str, Any]) -> tuple[dict[str, pa.Table], dict[str, Any]]:
        raise NotImplementedError

    def entry(self, options: dict[str, Any], cache: DatasetCache, *, build: bool = True) -> CachedDataset:
        """The cache entry for these options, built if needed. A machine that cannot see a local
        source (a worker without the dataset mounted) opens the entry built for the same request.
        With build=False nothing is built (`scaling plan`): a missing entry raises NotCached."""
        options = self.options(options)
        request = self.request(options)
        try:
            identity = self.identity(options)
        except SourceUnavailable as missing:
            try:
                found = cache.open_request(self.name, request)
            except CacheCorrupt as error:
                raise SourceUnavailable(f"{error}; only a machine with the source can rebuild it: {missing}") from error
            if found is None:
                raise
            return found
        if not build:
            found = cache.get(self.name, identity)
            if found is None:
                raise NotCached(f"task {self.name}: its data is not in the cache {cache.uri} yet (nothing was built); "
                                "`scaling cache build --study STUDY.yaml` prepares it, as `scaling run` does")
            return found
        return cache.get_or_build(self.name, identity, lambda: self.build(options), request=request)

    def prepare(self, options: dict[str, Any], cache: DatasetCache, *, build: bool = True) -> PreparedTask:
        options = self.options(options)
        entry = self.entry(options, cache, build=build)
        return PreparedTask(entry.fingerprint, self.arrays(entry, options), entry.meta)

    def arrays(self, entry: CachedDataset, options: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
        """The splits the trainer reads (train / val / test) as numpy arrays; other tables (a
        vocabulary) stay in the entry."""
        return {split: table_to_arrays(entry.tables[split]) for split in SPLITS if split in entry.tables}

    def failed(self, metrics: dict[str, float], prefix: str = "val") -> bool:
        """The task's own failure criterion on evaluation metrics (default: none)."""
        return False

    failure_rule: str = ""  # the task's own failure criterion, in words (for the ledger's reason)

    @staticmethod
    def chance_loss(fields: dict[str, Any]) -> float:
        """The validation loss of a model that knows nothing: uniform over the head's outputs
        (log vocab for next-token heads, log C for C classes, log 2 for one binary logit)."""
        outputs = fields.get("vocab_size") if fields.get("head", "lm") == "lm" else fields.get("num_classes")
        return math.log(max(2, int(outputs or 2)))

    def divergence(self, metrics: dict[str, Any], fields: dict[str, Any], prefix: str = "val") -> str | None:
        """Why a trial that ran to the end still counts as diverged, or None: its selected
        validation loss is worse than chance (a model that blew up but stayed finite), or the
        task's own failure rule flags it. Non-finite losses are caught while training."""
        loss, chance = metrics.get(f"{prefix}_loss"), self.chance_loss(fields)
        if loss is not None and math.isfinite(loss) and loss > chance:
            return (f"validation loss {loss:.4g} is worse than chance ({chance:.4g} nats: uniform over the "
                    f"model's outputs)")
        if self.failed(metrics, prefix):
            return f"the task's failure rule: {self.failure_rule}"
        return None

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        """ModelConfig fields fixed by the data (vocabulary, length, head)."""
        raise NotImplementedError

    device: torch.device | None = None  # where batches go; set per trial by `on_device`

    def on_device(self, device: torch.device) -> "Task":
        """A copy of this (registry-shared) task whose batches land on `device`."""
        placed = copy.copy(self)
        placed.device = None if device.type == "cpu" else device
        return placed

    def placed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device is None:
            return batch
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()}

    def batch(self, split: dict[str, np.ndarray], index: np.ndarray) -> dict[str, torch.Tensor]:
        return self.placed({name: torch.from_numpy(np.asarray(array[index], dtype=np.int64)) for name, array in split.items()})

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
        """What the training loss feeds the model: `model(*args, **kwargs)` (a stacked pack calls its
        stacked forward with the seeds' inputs stacked, workers/stacked.py)."""
        raise NotImplementedError

    def loss_from_output(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss from the model's output on `model_inputs(batch)`."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        args, kwargs = self.model_inputs(batch)
        return self.loss_from_output(model(*args, **kwargs), batch)

    @no_grad
    def evaluate(self, model, split: dict[str, np.ndarray], batch_size: int, prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def tokens_per_example(self, prepared: PreparedTask) -> int:
        return int(next(iter(prepared.arrays["train"].values())).shape[1])


class LMTask(Task):
    """Causal language modelling: cross-entropy on every scored next token."""

    metric = "val_loss"

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        return {
            "vocab_size": int(prepared.meta["vocab_size"]),
            "max_seq_len": int(prepared.meta["seq_len"]),
            "head": "lm",
            "causal": True,
        }

    def model_inputs(self, batch):
        return (batch["input_ids"],), {}

    def loss_from_output(self, logits_BTV, batch):
        return F.cross_entropy(logits_BTV.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    @no_grad
    def evaluate(self, model, split, batch_size, prefix):
        nll, correct, tokens = self.scored_sums(model, split, batch_size)
        return lm_metrics(nll, correct, tokens, prefix)

    @no_grad
    def scored_sums(self, model, split, batch_size) -> tuple[float, int, int]:
        """(summed next-token NLL in nats, correct argmax predictions, scored tokens) over a split.
        Forward passes are cut so that one holds at most EVAL_LOGITS_BUDGET logits."""
        total_loss, total_correct, total_tokens = 0.0, 0, 0
        n = len(next(iter(split.values())))
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", 0) or 1
        for start in range(0, n, batch_size):
            batch = self.batch(split, np.arange(start, min(start + batch_size, n)))
            rows = max(1, EVAL_LOGITS_BUDGET // max(1, batch["input_ids"].shape[1] * vocab))
            for sub in range(0, batch["input_ids"].shape[0], rows):
                logits_BTV = model(batch["input_ids"][sub : sub + rows])
                labels_BT = batch["labels"][sub : sub + rows]
                scored_BT = labels_BT != IGNORE
                total_loss += F.cross_entropy(
                    logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE, reduction="sum"
                ).item()
                total_correct += ((logits_BTV.argmax(-1) == labels_BT) & scored_BT).sum().item()
                total_tokens += scored_BT.sum().item()
        return total_loss, total_correct, total_tokens


def lm_metrics(nll: float, correct: int, tokens: int, prefix: str) -> dict[str, float]:
    loss = nll / max(tokens, 1)
    return {
        f"{prefix}_loss": loss,
        f"{prefix}_ppl": perplexity(nll, tokens),
        f"{prefix}_accuracy": correct / max(tokens, 1),
        f"{prefix}_tokens": float(tokens),
    }


def perplexity(nll: float, tokens: int) -> float:
    """exp(mean NLL in nats) over the scored tokens (capped at exp(50) so a diverged model stays finite)."""
    return math.exp(min(nll / max(tokens, 1), 50.0))


def bits_per_unit(nll: float, units: int) -> float:
    """Mean NLL in bits: bits per character / per byte when each scored token is one byte."""
    return nll / max(units, 1) / math.log(2)
