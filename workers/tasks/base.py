"""The task interface, and the causal language-modelling task that most tasks share.

Legend: B batch, T sequence, V vocabulary. LM splits are Arrow tables with two fixed-size list
columns `input_ids` and `labels` (label -100 = not scored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from storage.cache import CachedDataset, DatasetCache

IGNORE = -100


@dataclass
class PreparedTask:
    """A task's cached splits as numpy arrays, plus what the model needs to know."""

    fingerprint: str
    arrays: dict[str, dict[str, np.ndarray]]  # split -> column -> (N, T) array
    meta: dict[str, Any]


def table_to_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


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
            )
        return {**self.DEFAULTS, **given}

    def identity(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"task": self.name, "options": options}

    def build(self, options: dict[str, Any]) -> tuple[dict[str, pa.Table], dict[str, Any]]:
        raise NotImplementedError

    def prepare(self, options: dict[str, Any], cache: DatasetCache) -> PreparedTask:
        options = self.options(options)
        entry: CachedDataset = cache.get_or_build(self.name, self.identity(options), lambda: self.build(options))
        arrays = {split: table_to_arrays(table) for split, table in entry.tables.items()}
        return PreparedTask(entry.fingerprint, arrays, entry.meta)

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        """ModelConfig fields fixed by the data (vocabulary, length, head)."""
        raise NotImplementedError

    def batch(self, split: dict[str, np.ndarray], index: np.ndarray) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.asarray(array[index], dtype=np.int64)) for name, array in split.items()}

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
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

    def loss(self, model, batch):
        logits_BTV = model(batch["input_ids"])
        return F.cross_entropy(logits_BTV.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model, split, batch_size, prefix):
        total_loss, total_correct, total_tokens = 0.0, 0, 0
        n = len(split["input_ids"])
        for start in range(0, n, batch_size):
            batch = self.batch(split, np.arange(start, min(start + batch_size, n)))
            logits_BTV = model(batch["input_ids"])
            labels_BT = batch["labels"]
            scored_BT = labels_BT != IGNORE
            total_loss += F.cross_entropy(
                logits_BTV.flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
            total_correct += ((logits_BTV.argmax(-1) == labels_BT) & scored_BT).sum().item()
            total_tokens += scored_BT.sum().item()
        loss = total_loss / max(total_tokens, 1)
        return {
            f"{prefix}_loss": loss,
            f"{prefix}_ppl": math.exp(min(loss, 50.0)),
            f"{prefix}_accuracy": total_correct / max(total_tokens, 1),
            f"{prefix}_tokens": float(total_tokens),
        }
