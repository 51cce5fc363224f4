"""Issue 22: should the ledger move to a table format? Today's layout (one Parquet file per trial,
compacted into parts: storage/ledger.py) against Delta Lake (deltalake), Apache Iceberg (pyiceberg,
SQL catalog on sqlite) and Lance (pylance), measured on local disk:

    python tools/ledger_formats_bench.py --sizes 10000 100000 [--formats ...] [--out formats.json]

For each format and size N: N ledger records (the ledger's schema, realistic JSON blobs) bulk-loaded
as one write (the state after a compaction), then

- append 1 record: median latency of 30 single-record appends, each a new writer as a worker is;
- 16 concurrent appenders: 16 processes, each appending 5 records of its own (a barrier starts them
  together); checks that no record is lost or duplicated, and the throughput (records/s);
- full read into Arrow (best of 2), with the row count checked;
- compaction / optimize (and the clean-up that deletes what it merged), and files on disk before/after;
- external readers: pandas, Polars and DuckDB in a fresh process where deltalake, pyiceberg and lance
  cannot be imported, after the compaction: Polars and DuckDB with their own reader of the format
  (read_delta / scan_iceberg, delta_scan / iceberg_scan), else every data Parquet file (not the
  format's own metadata) with exact duplicate rows dropped, as the README shows; 'yes' when every
  record is there once.

Every figure comes from one run on one machine; the machine this project runs on is a shared
2-core box, so read the numbers as ratios between formats.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from storage.ledger import SCHEMA  # noqa: E402

FORMATS = ("parquet-ledger", "delta", "iceberg", "lance")
APPENDS = 30
WRITERS, PER_WRITER = 16, 5


def records(start: int, n: int, tag: str = "b") -> pa.Table:
    """n ledger rows with keys {tag}{start}..{tag}{start+n-1}."""
    keys = [f"{tag}{i:08d}" for i in range(start, start + n)]
    spec = json.dumps({"model": {"d_model": 128, "n_layers": 4, "n_heads": 4}, "train": {"lr": 3e-4, "steps": 2000},
                       "task": "lm", "variant": "oscillator"})
    cols: dict[str, Any] = {f.name: [None] * n for f in SCHEMA}
    cols.update(key=keys, study=["bench"] * n, cell=[f"lm/oscillator/d{2 ** (1 + i % 5)}" for i in range(start, start + n)],
                task=["lm"] * n, variant=["oscillator"] * n, d_osc=[2 ** (1 + i % 5) for i in range(start, start + n)],
                target_params=[1_000_000] * n, params_total=[1_300_000] * n, params_non_embedding=[1_000_000] * n,
                seed=list(range(start, start + n)), stage=["replicate"] * n, hparams_json=['{"lr": 0.0003}'] * n,
                spec_json=[spec] * n, status=["completed"] * n, metric_name=["val_loss"] * n,
                metric_value=[3.0 + (i % 97) / 100 for i in range(start, start + n)],
                metrics_json=['{"val_loss": 3.1, "val_ppl": 22.2}'] * n, best_step=[2000] * n, steps=[2000] * n,
                tokens_seen=[2_000_000] * n, flops=[1e12] * n, wall_seconds=[60.0] * n,
                started_at=["2026-01-01T00:00:00+00:00"] * n, finished_at=["2026-01-01T00:01:00+00:00"] * n,
                host=["bench"] * n)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


# ---- the formats: open/create, append, read, compact -----------------------------------------------

class Format:
    name = ""

    def __init__(self, root: str) -> None:
        self.root = root

    def create(self, table: pa.Table) -> None: ...
    def append(self, table: pa.Table) -> None: ...
    def read(self) -> pa.Table: ...
    def compact(self) -> None: ...

    def files(self) -> int:
        return sum(len(f) for _, _, f in os.walk(self.root))


class ParquetLedger(Format):
    name = "parquet-ledger"

    def _ledger(self):
        from storage.ledger import Ledger

        return Ledger(self.root)

    def create(self, table):
        from storage.records import TrialRecord

        self._ledger().append_many([TrialRecord(**r) for r in table.to_pylist()])

    def append(self, table):
        from storage.records import TrialRecord

        ledger = self._ledger()
        for r in table.to_pylist():
            ledger.append(TrialRecord(**r))

    def read(self):
        return self._ledger().table()

    def compact(self):
        self._ledger().compact()


class Delta(Format):
    name = "delta"

    def create(self, table):
        from deltalake import write_deltalake

        write_deltalake(self.root, table)

    def append(self, table):
        from deltalake import write_deltalake

        for _ in range(100):  # appends never conflict logically; a lost race on the log's next version retries
            try:
                write_deltalake(self.root, table, mode="append")
                return
            except Exception as error:  # noqa: BLE001 -- deltalake's CommitFailedError and kin
                if "commit" not in str(error).lower() and "version" not in str(error).lower():
                    raise
                time.sleep(0.01)
        raise RuntimeError("delta: 100 commit conflicts in a row")

    def read(self):
        from deltalake import DeltaTable

        return DeltaTable(self.root).to_pyarrow_table()

    def compact(self):
        from deltalake import DeltaTable

        dt = DeltaTable(self.root)
        dt.optimize.compact()
        dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
        dt.create_checkpoint()
        dt.cleanup_metadata()


class Iceberg(Format):
    name = "iceberg"

    def _catalog(self):
        from pyiceberg.catalog.sql import SqlCatalog

        os.makedirs(self.root, exist_ok=True)
        return SqlCatalog("bench", uri=f"sqlite:///{self.root}/catalog.db", warehouse=f"file://{self.root}/warehouse")

    def create(self, table):
        catalog = self._catalog()
        catalog.create_namespace_if_not_exists("ledger")
        catalog.create_table("ledger.trials", schema=table.schema).append(table)

    def append(self, table):
        from pyiceberg.exceptions import CommitFailedException

        t = self._catalog().load_table("ledger.trials")
        for _ in range(200):
            try:
                t.append(table)
                return
            except CommitFailedException:  # another writer committed first: reload and retry
                time.sleep(0.01)
                t = self._catalog().load_table("ledger.trials")
        raise RuntimeError("iceberg: 200 commit conflicts in a row")

    def read(self):
        return self._catalog().load_table("ledger.trials").scan().to_arrow()

    def compact(self):
        # pyiceberg has no data-file compaction: rewrite the table (one overwrite), then expire the
        # old snapshots; their data files stay on disk (pyiceberg deletes no orphan files)
        t = self._catalog().load_table("ledger.trials")
        t.overwrite(t.scan().to_arrow())
        t = self._catalog().load_table("ledger.trials")
        current = t.current_snapshot().snapshot_id
        expire = t.maintenance.expire_snapshots()
        for snap in t.snapshots():
            if snap.snapshot_id != current:
                expire = expire.by_id(snap.snapshot_id)
        expire.commit()


class Lance(Format):
    name = "lance"

    def create(self, table):
        import lance

        lance.write_dataset(table, self.root, mode="create")

    def append(self, table):
        import lance

        for _ in range(100):
            try:
                lance.write_dataset(table, self.root, mode="append")
                return
            except OSError as error:  # a commit conflict that lance did not resolve itself
                if "conflict" not in str(error).lower() and "commit" not in str(error).lower():
                    raise
                time.sleep(0.01)
        raise RuntimeError("lance: 100 commit conflicts in a row")

    def read(self):
        import lance

        return lance.dataset(self.root).to_table()

    def compact(self):
        from datetime import timedelta

        import lance

        ds = lance.dataset(self.root)
        ds.optimize.compact_files()
        lance.dataset(self.root).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)


CLASSES = {c.name: c for c in (ParquetLedger, Delta, Iceberg, Lance)}


# ---- measurements ---------------------------------------------------------------------------------

def worker(fmt: str, root: str, start_at: float, wid: int, per: int) -> None:
    """One of the concurrent appenders (its own process): wait for the barrier, append, report."""
    f = CLASSES[fmt](root)
    rows = records(wid * per, per, tag=f"w{wid:02d}-")
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    for i in range(per):
        f.append(rows.slice(i, 1))
    print(json.dumps({"start": t0, "end": time.time()}))


def external_readers(fmt: str, root: str, expected: int) -> dict[str, str]:
    """pandas, Polars, DuckDB on the folder, each with only its own Parquet reader (the table-format
    packages made unimportable): 'yes' when it gets the right rows, else what happened."""
    code = f"""
import sys, glob, json
for blocked in ("deltalake", "pyiceberg", "lance"):
    sys.modules[blocked] = None
root, fmt, expected = {root!r}, {fmt!r}, {expected}
files = [f for f in glob.glob(root + "/**/*.parquet", recursive=True) if "/_delta_log/" not in f and "/metadata/" not in f]
out = {{}}
def check(n_rows, n_keys):
    if n_rows == expected and n_keys == expected:
        return "yes"
    return f"no: {{n_rows}} rows, {{n_keys}} distinct keys (want {{expected}})"
try:
    import pandas as pd
    if not files: raise RuntimeError("no Parquet files (not a Parquet-based format)")
    df = pd.concat(pd.read_parquet(f) for f in files).drop_duplicates()
    out["pandas"] = check(len(df), df["key"].nunique())
except Exception as e:
    out["pandas"] = "no: " + (type(e).__name__ + ": " + str(e))[:120]
try:
    import polars as pl
    if fmt == "delta":
        df = pl.read_delta(root)
    elif fmt == "iceberg":
        df = pl.scan_iceberg(root).collect()
    elif not files:
        raise RuntimeError("no Parquet files (not a Parquet-based format)")
    else:
        df = pl.read_parquet(files).unique()
    out["polars"] = check(df.height, df["key"].n_unique())
except Exception as e:
    out["polars"] = "no: " + (type(e).__name__ + ": " + str(e))[:120]
try:
    import duckdb
    if fmt == "delta":
        q = f"SELECT count(*), count(DISTINCT key) FROM delta_scan('{{root}}')"
    elif fmt == "iceberg":
        q = f"SELECT count(*), count(DISTINCT key) FROM iceberg_scan('{{root}}/warehouse/ledger/trials')"
    elif not files:
        raise RuntimeError("no Parquet files (not a Parquet-based format)")
    else:
        q = f"SELECT count(*), count(DISTINCT key) FROM (SELECT DISTINCT * FROM read_parquet({{files!r}}, union_by_name=true))"
    n, k = duckdb.connect().execute(q).fetchone()
    out["duckdb"] = check(n, k)
except Exception as e:
    out["duckdb"] = "no: " + (type(e).__name__ + ": " + str(e))[:120]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode:
        return {"error": done.stderr[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(fmt: str, n: int, work: str) -> dict[str, Any]:
    root = os.path.join(work, f"{fmt}-{n}")
    f = CLASSES[fmt](root)
    out: dict[str, Any] = {"format": fmt, "records": n}
    t0 = time.perf_counter()
    f.create(records(0, n))
    out["bulk_load_s"] = round(time.perf_counter() - t0, 2)
    # single appends, each by a fresh writer object (a worker appends once per trial)
    lat = []
    extra = records(0, APPENDS, tag="a")
    for i in range(APPENDS):
        t0 = time.perf_counter()
        CLASSES[fmt](root).append(extra.slice(i, 1))
        lat.append(time.perf_counter() - t0)
    out["append_1_ms_median"] = round(1000 * statistics.median(lat), 1)
    out["append_1_ms_max"] = round(1000 * max(lat), 1)
    # 16 concurrent appenders (processes), PER_WRITER records each
    start_at = time.time() + 8.0  # time for 16 interpreters to start and import
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", fmt, root, str(start_at), str(w),
                               str(PER_WRITER)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(WRITERS)]
    spans, errors = [], []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1200)
        if p.returncode:
            errors.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {p.returncode}")
        else:
            spans.append(json.loads(stdout.strip().splitlines()[-1]))
    expected = n + APPENDS + WRITERS * PER_WRITER
    if spans:
        wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
        out[f"concurrent_{WRITERS}x{PER_WRITER}_records_per_s"] = round(len(spans) * PER_WRITER / wall, 1)
    out["concurrent_writer_errors"] = errors[:3]
    out["files_before_compaction"] = f.files()
    reads = []
    for _ in range(2):
        t0 = time.perf_counter()
        table = f.read()
        reads.append(time.perf_counter() - t0)
    keys = table.column("key").to_pylist()
    want = {f"b{i:08d}" for i in range(n)} | {f"a{i:08d}" for i in range(APPENDS)} | {
        f"w{w:02d}-{i:08d}" for w in range(WRITERS) for i in range(w * PER_WRITER, (w + 1) * PER_WRITER)}
    out["read_s"] = round(min(reads), 3)
    out["rows_read"] = table.num_rows
    out["lost"] = len(want - set(keys))
    out["duplicated"] = len(keys) - len(set(keys))
    t0 = time.perf_counter()
    f.compact()
    out["compact_s"] = round(time.perf_counter() - t0, 2)
    out["files_after_compaction"] = f.files()
    after = f.read()
    out["rows_after_compaction"] = after.num_rows
    out["read_after_compaction_s"] = round(min(_timed(f.read) for _ in range(2)), 3)
    out["bytes_on_disk"] = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(root) for x in fs)
    out["external_readers"] = external_readers(fmt, root, expected)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        fmt, root, start_at, wid, per = argv[1:6]
        worker(fmt, root, float(start_at), int(wid), int(per))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--out", default="ledger_formats.json")
    parser.add_argument("--keep", action="store_true", help="keep the data written (under a temporary directory)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="ledger-formats-")
    results = []
    try:
        for n in args.sizes:
            for fmt in args.formats:
                row = measure(fmt, n, work)
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
