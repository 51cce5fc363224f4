"""The results ledger: one immutable Parquet file per finished trial under `<storage>/ledger/`.

A trial that ended (completed, diverged, pruned) is done: its key is never run again. A trial
that crashed (`failed`) is kept as data under `ledger/failed/` (one file per attempt) but does not
count as done, so a re-run retries it.

One file per record makes appends atomic and concurrent-safe on any filesystem (no read-modify-
write of a shared file), so workers on many machines append directly; reads concatenate them with
`pyarrow.dataset`. A key is written once: a second write of the same key is refused.

Readers take only finished records: `<key>.parquet` (and `failed/<key>-<attempt>.parquet`) of at
least a Parquet file's minimum size. Anything else there -- the temporary sibling a write leaves
when it is killed before its rename (`<key>.parquet.tmp-XXXXXXXX`, complete or partial), a record
file that cannot be read, a stray file or folder -- is skipped, listed in `Ledger.ignored` with the
reason, and logged once per file, so a reader neither fails on it nor counts a trial twice.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import uuid
from dataclasses import dataclass, field
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
        ("node_id", pa.string()),  # absent from records written before it existed: read as null
    ]
)
assert SCHEMA.names == TrialRecord.field_names(), "ledger schema out of step with TrialRecord"


class LedgerError(RuntimeError):
    pass


log = logging.getLogger(__name__)

SUFFIX = ".parquet"
FAILED = "failed"
# a Parquet file is at least 'PAR1' + footer length (4 bytes) + 'PAR1'
PARQUET_MIN_BYTES = 12
TEMP_RE = re.compile(r"^(?P<final>.+\.parquet)\.tmp-[0-9a-f]+$")  # storage.fs.write_bytes_atomic's sibling
_LOGGED: set[tuple[str, str]] = set()  # (path, reason) already logged by this process


@dataclass(frozen=True)
class Ignored:
    """A file under ledger/ that is not a finished record, and why it was skipped."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class LedgerScan:
    done: dict[str, str] = field(default_factory=dict)  # key -> path of its finished record
    failed: list[str] = field(default_factory=list)  # paths of failed attempts
    ignored: list[Ignored] = field(default_factory=list)


class Ledger:
    def __init__(self, storage_uri: str) -> None:
        self.fs, root = sfs.resolve(storage_uri)
        self.dir = sfs.join(root, "ledger")
        self.ignored: list[Ignored] = []  # what the last scan or read skipped, and why

    def _path(self, record: TrialRecord) -> str:
        if record.status == "failed":
            return sfs.join(self.dir, FAILED, f"{record.key}-{uuid.uuid4().hex[:8]}{SUFFIX}")
        return sfs.join(self.dir, f"{record.key}{SUFFIX}")

    def append(self, record: TrialRecord) -> str:
        path = self._path(record)
        if record.status != "failed" and record.key in self.keys():
            raise LedgerError(f"ledger already holds trial {record.key}; records are immutable")
        table = pa.Table.from_pylist([dataclasses.asdict(record)], schema=SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        sfs.write_bytes_atomic(self.fs, path, buffer.getvalue())
        return path

    def scan(self) -> LedgerScan:
        """The finished records under ledger/ (by name and size: nothing is read), and what else is there."""
        scan = LedgerScan()
        for folder, failed in ((self.dir, False), (sfs.join(self.dir, FAILED), True)):
            for info in self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                name = info.base_name
                if name.startswith("."):  # editor, NFS and OS droppings (.nfs..., .DS_Store)
                    continue
                if info.type == pafs.FileType.Directory:
                    if not (name == FAILED and not failed):
                        scan.ignored.append(Ignored(info.path, "a folder, not a record"))
                    continue
                reason = self._not_a_record(info, folder)
                if reason:
                    scan.ignored.append(Ignored(info.path, reason))
                elif failed:
                    scan.failed.append(info.path)
                else:
                    scan.done[name[: -len(SUFFIX)]] = info.path
        self._note(scan.ignored)
        return scan

    def _not_a_record(self, info: pafs.FileInfo, folder: str) -> str | None:
        temp = TEMP_RE.match(info.base_name)
        if temp:
            final = sfs.join(folder, temp.group("final"))
            outcome = ("its record is in the ledger" if sfs.exists(self.fs, final)
                       else "its trial is not in the ledger and runs again")
            return f"temporary file of a write interrupted before its rename ({info.size} bytes; {outcome}); safe to delete"
        if not info.base_name.endswith(SUFFIX):
            return "not a ledger record (records are <trial key>.parquet)"
        if info.size is not None and info.size < PARQUET_MIN_BYTES:
            return (f"partial record ({info.size} bytes, shorter than any Parquet file); delete it and its trial "
                    "runs again")
        return None

    def _note(self, ignored: list[Ignored]) -> None:
        self.ignored = list(ignored)
        for item in ignored:
            if (item.path, item.reason) not in _LOGGED:
                _LOGGED.add((item.path, item.reason))
                log.warning("ledger: ignored %s: %s", item.path, item.reason)

    def keys(self) -> set[str]:
        """Keys of the trials that are done (every status but failed)."""
        return set(self.scan().done)

    def table(self, include_failed: bool = True) -> pa.Table:
        """Every finished record (failed attempts too unless include_failed=False: then one row per
        done key). Files that are not finished records are skipped and listed in `self.ignored`."""
        scan = self.scan()
        paths = list(scan.done.values()) + (scan.failed if include_failed else [])
        if not paths:
            return SCHEMA.empty_table()
        try:
            table = pads.dataset(paths, format="parquet", filesystem=self.fs, schema=SCHEMA).to_table()
        except (pa.ArrowException, OSError):  # some file is not readable Parquet: read them one by one
            tables = []
            for path in paths:
                try:
                    tables.append(pads.dataset([path], format="parquet", filesystem=self.fs, schema=SCHEMA).to_table())
                except (pa.ArrowException, OSError) as error:
                    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    scan.ignored.append(Ignored(path, f"unreadable record ({first[:200]}); move it aside or delete "
                                                      "it and its trial runs again"))
            self._note(scan.ignored)
            table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        if not include_failed:
            table = table.filter(pads.field("status") != "failed")
        return table

    def records(self, include_failed: bool = True) -> list[TrialRecord]:
        return [TrialRecord(**row) for row in self.table(include_failed).to_pylist()]

    def rows(self) -> list[dict[str, Any]]:
        return self.table().to_pylist()

