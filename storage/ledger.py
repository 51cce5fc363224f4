"""The results ledger: one immutable Parquet file per finished trial under `<storage>/ledger/`.

A trial that ended (completed, diverged, pruned) is done: its key is never run again. A trial
that crashed (`failed`) is kept as data under `ledger/failed/` (one file per attempt) but does not
count as done, so a re-run retries it.

One file per record makes appends atomic and concurrent-safe on any filesystem (no read-modify-
write of a shared file), so workers on many machines append directly; reads concatenate them with
`pyarrow.dataset`. A key is written once: a second write of the same key is refused.
"""

from __future__ import annotations

import dataclasses
import io
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage import fs as sfs
from storage.records import TrialRecord

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("study", pa.string()),
        ("cell", pa.string()),
        ("task", pa.string()),
        ("variant", pa.string()),
        ("d_osc", pa.int64()),
        ("target_params", pa.int64()),
        ("params_total", pa.int64()),
        ("params_non_embedding", pa.int64()),
        ("seed", pa.int64()),
        ("stage", pa.string()),
        ("hparams_json", pa.string()),
        ("spec_json", pa.string()),
        ("status", pa.string()),
        ("metric_name", pa.string()),
        ("metric_value", pa.float64()),
        ("metrics_json", pa.string()),
        ("best_step", pa.int64()),
        ("steps", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("flops", pa.float64()),
        ("wall_seconds", pa.float64()),
        ("started_at", pa.string()),
        ("finished_at", pa.string()),
        ("wandb_run_id", pa.string()),
        ("host", pa.string()),
        ("error", pa.string()),
    ]
)
assert SCHEMA.names == TrialRecord.field_names(), "ledger schema out of step with TrialRecord"


class LedgerError(RuntimeError):
    pass


class Ledger:
    def __init__(self, storage_uri: str) -> None:
        self.fs, root = sfs.resolve(storage_uri)
        self.dir = sfs.join(root, "ledger")

    def _path(self, record: TrialRecord) -> str:
        if record.status == "failed":
            return sfs.join(self.dir, "failed", f"{record.key}-{uuid.uuid4().hex[:8]}.parquet")
        return sfs.join(self.dir, f"{record.key}.parquet")

    def append(self, record: TrialRecord) -> str:
        path = self._path(record)
        if record.status != "failed" and record.key in self.keys():
            raise LedgerError(f"ledger already holds trial {record.key}; records are immutable")
        table = pa.Table.from_pylist([dataclasses.asdict(record)], schema=SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        sfs.write_bytes_atomic(self.fs, path, buffer.getvalue())
        return path

    def keys(self) -> set[str]:
        """Keys of the trials that are done (every status but failed)."""
        selector = pafs.FileSelector(self.dir, allow_not_found=True)
        return {
            info.base_name[: -len(".parquet")]
            for info in self.fs.get_file_info(selector)
            if info.is_file and info.base_name.endswith(".parquet")
        }

    def table(self, include_failed: bool = True) -> pa.Table:
        """Every row; with include_failed=False only the done trials (one row per key)."""
        if not sfs.exists(self.fs, self.dir):
            return SCHEMA.empty_table()
        dataset = pads.dataset(self.dir, format="parquet", filesystem=self.fs, schema=SCHEMA)
        table = dataset.to_table()
        if not include_failed:
            table = table.filter(pads.field("status") != "failed")
        return table

    def records(self, include_failed: bool = True) -> list[TrialRecord]:
        return [TrialRecord(**row) for row in self.table(include_failed).to_pylist()]

    def rows(self) -> list[dict[str, Any]]:
        return self.table().to_pylist()

