"""Ledger at scale (issue 22): O(1) appends safe under 16 concurrent writers, compaction that loses
and duplicates nothing however it is interrupted, plain-Parquet files that pandas, Polars and DuckDB
read without the project, on local disk and on an S3-protocol server (moto, 127.0.0.1)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from conftest import make_record
from storage import fs as sfs
from storage.ledger import Ledger, LedgerError


def _rows(ledger: Ledger) -> list[tuple]:
    return sorted((r["key"], r["status"], r["error"] or "", r["seed"]) for r in ledger.rows())


def _fill(ledger: Ledger, n: int, prefix: str = "k") -> None:
    for i in range(n):
        ledger.append(make_record(key=f"{prefix}{i}", seed=i))
    ledger.append(make_record(key=f"{prefix}0", status="failed", error="first attempt"))
    ledger.append(make_record(key=f"{prefix}x", status="failed", error="crashed"))


def test_append_lists_nothing(tmp_path, monkeypatch):
    ledger = Ledger(str(tmp_path))
    _fill(ledger, 30)
    ledger.compact()
    _fill(ledger, 5, prefix="m")

    def no_listing(self):
        raise AssertionError("append listed the ledger")

    monkeypatch.setattr(Ledger, "scan", no_listing)
    monkeypatch.setattr(Ledger, "keys", no_listing)
    ledger.append(make_record(key="new"))
    ledger.append(make_record(key="new", status="failed"))
    with pytest.raises(LedgerError, match="immutable"):  # a loose record
        ledger.append(make_record(key="m1"))
    with pytest.raises(LedgerError, match="immutable"):  # a record in a part
        ledger.append(make_record(key="k3"))
    assert ledger.contains("k3") and ledger.contains("new") and not ledger.contains("nope")


def test_16_concurrent_writers_lose_and_duplicate_nothing(storage_uri):
    """16 threads append 10 distinct records each (3 on S3: moto on 2 cores is ~50 ms a request), and all race on the same 4 keys, while a
    compaction runs beside them: every distinct record once, each raced key exactly once."""
    ledger = Ledger(storage_uri)
    per_writer = 10 if sfs.is_local(storage_uri) else 3
    raced = [i for i in (0, 3, 6, 9) if i < per_writer]
    wins: list[str] = []
    barrier = threading.Barrier(17)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            mine = Ledger(storage_uri)
            barrier.wait()
            for i in range(per_writer):
                mine.append(make_record(key=f"w{w}-{i}", seed=i))
                if i % 3 == 0:
                    try:
                        mine.append(make_record(key=f"shared{i}", host=f"w{w}"))
                        wins.append(f"shared{i}")
                    except LedgerError:
                        pass
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    barrier.wait()
    Ledger(storage_uri).compact()  # beside the writers
    for t in threads:
        t.join()
    assert not errors
    keys = [r["key"] for r in ledger.rows()]
    expected = {f"w{w}-{i}" for w in range(16) for i in range(per_writer)} | {f"shared{i}" for i in raced}
    assert sorted(keys) == sorted(expected)  # none lost, none twice
    # every raced key was won; a write racing the compaction that just moved the key's file into a
    # part can win a second time: readers and the next compaction keep the first copy (one row, above)
    assert set(wins) == {f"shared{i}" for i in raced}
    ledger.compact()
    assert sorted(r["key"] for r in ledger.rows()) == sorted(expected)


@pytest.mark.parametrize("kill_at", ["writing", "after_part", "mid_delete"])
def test_a_killed_compaction_loses_and_duplicates_nothing(tmp_path, monkeypatch, kill_at):
    ledger = Ledger(str(tmp_path))
    _fill(ledger, 20)
    ledger.compact()  # one part already
    _fill(ledger, 12, prefix="m")
    before = _rows(ledger)
    import storage.ledger as L

    class Killed(BaseException):
        pass

    real_write, real_compact = sfs.write_bytes_atomic, L.Ledger._compact_once
    deleted = []

    def write(fs, path, data):
        if kill_at == "writing":  # the temporary file is half written when the process dies
            real_write(fs, path + ".tmp-0000dead", data[: len(data) // 2])
            raise Killed
        return real_write(fs, path, data)

    class KillingFS(type(ledger.fs)):
        def delete_file(self, path):
            if kill_at == "after_part" or (kill_at == "mid_delete" and len(deleted) >= 5):
                raise Killed
            deleted.append(path)
            return super().delete_file(path)

    monkeypatch.setattr(sfs, "write_bytes_atomic", write)
    ledger.fs = KillingFS()
    with pytest.raises(Killed):
        ledger.compact()
    monkeypatch.setattr(sfs, "write_bytes_atomic", real_write)
    reader = Ledger(str(tmp_path))
    assert _rows(reader) == before  # during: the same rows, none twice
    assert reader.keys() == {k for k, s, _, _ in before if s != "failed"}
    reader.compact()
    assert _rows(reader) == before  # after the next compaction too
    leftovers = [p.name for p in (tmp_path / "ledger").rglob("*.parquet")]
    assert len(leftovers) == 1 and leftovers[0].startswith("part-")
    assert real_compact is L.Ledger._compact_once


def test_readers_see_the_same_rows_at_every_step_of_a_compaction(tmp_path, monkeypatch):
    ledger = Ledger(str(tmp_path))
    _fill(ledger, 15)
    ledger.compact()
    _fill(ledger, 10, prefix="m")
    before = _rows(ledger)
    seen = []

    class ReadingFS(type(ledger.fs)):
        def delete_file(self, path):  # between every two deletions a reader reads
            seen.append(_rows(Ledger(str(tmp_path))))
            return super().delete_file(path)

    ledger.fs = ReadingFS()
    ledger.compact()
    assert len(seen) == 10 + 2 + 1 and all(rows == before for rows in seen)
    assert _rows(ledger) == before


def test_compaction_on_both_backends_keeps_every_row(storage_uri):
    ledger = Ledger(storage_uri)
    _fill(ledger, 8)
    before = _rows(ledger)
    result = ledger.compact()
    assert result.part.startswith("s3://" if storage_uri.startswith("s3://") else "/")
    assert result.records == 10 and result.merged_files == 10
    _fill(ledger, 3, prefix="z")
    after_more = _rows(ledger)
    ledger.compact()
    assert _rows(ledger) == after_more and set(before) <= set(after_more)
    scan = ledger.scan()
    assert not scan.done and not scan.failed and len(scan.parts) == 1


def test_older_files_without_a_new_column_read_as_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ledger = Ledger(str(tmp_path))
    ledger.append(make_record(key="a"))
    old = pa.Table.from_pylist([make_record(key="b").to_dict()]).drop_columns(["error"])
    pq.write_table(old, tmp_path / "ledger" / "b.parquet")  # a file from a version without `error`
    new = pa.Table.from_pylist([{**make_record(key="c").to_dict(), "node_id": "n1"}])
    pq.write_table(new, tmp_path / "ledger" / "c.parquet")  # a newer version's extra column
    for _ in range(2):
        rows = {r["key"]: r for r in ledger.rows()}
        assert set(rows) == {"a", "b", "c"} and rows["b"]["error"] is None
        ledger.compact()


EXTERNAL_READERS = r"""
import json, sys
import duckdb, pandas as pd, polars as pl
ledger = sys.argv[1]
pattern = ledger + "/**/*.parquet"
import glob
files = sorted(glob.glob(pattern, recursive=True))
a = pd.concat([pd.read_parquet(f) for f in files]).drop_duplicates(subset=None)
b = pl.read_parquet(pattern).unique()
c = duckdb.sql(f"SELECT DISTINCT * FROM read_parquet('{pattern}', union_by_name=true)").fetchall()
bad = [m for m in sys.modules if m.split('.')[0] in ('storage', 'scaling', 'studies', 'workers')]
print(json.dumps({"pandas": sorted(a["key"]), "polars": sorted(b["key"].to_list()),
                  "duckdb": sorted(r[0] for r in c), "project_modules": bad}))
"""


def _ledger_for_readers(tmp_path) -> list[str]:
    ledger = Ledger(str(tmp_path))
    _fill(ledger, 10)
    ledger.compact()
    _fill(ledger, 4, prefix="m")  # a part and loose records
    return sorted(r["key"] for r in ledger.rows())


def test_pandas_polars_and_duckdb_read_the_ledger(tmp_path, monkeypatch):
    """The readers' own code on the files (what the README shows), in this process: the fast check."""
    pytest.importorskip("duckdb")
    pytest.importorskip("polars")
    expected = _ledger_for_readers(tmp_path)
    printed: list[str] = []
    monkeypatch.setattr(sys, "argv", ["readers", str(tmp_path / "ledger")])
    exec(compile(EXTERNAL_READERS, "external_readers", "exec"), {"print": printed.append, "__name__": "readers"})
    got = json.loads(printed[0])
    assert got["pandas"] == got["polars"] == got["duckdb"] == expected


@pytest.mark.slow
def test_pandas_polars_and_duckdb_read_the_ledger_without_the_project(tmp_path):
    """The same in a fresh interpreter without the project on its path (slow: a new interpreter
    importing pandas, Polars and DuckDB is most of this file's default-run time)."""
    pytest.importorskip("duckdb")
    pytest.importorskip("polars")
    expected = _ledger_for_readers(tmp_path)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", EXTERNAL_READERS, str(tmp_path / "ledger")], capture_output=True,
                         text=True, check=True, cwd=tmp_path, env=env)
    got = json.loads(out.stdout)
    assert got["pandas"] == got["polars"] == got["duckdb"] == expected
    assert got["project_modules"] == []


@pytest.mark.slow
def test_cli_cache_and_checkpoints_on_s3_keep_the_scheme(s3_endpoint, tmp_path):
    """status, trials, compact and fits on an s3:// study print s3:// URIs; the dataset cache and
    trial checkpoints round-trip through the S3-protocol server."""
    import pyarrow as pa
    import yaml

    from storage.cache import DatasetCache
    from workers.trial import Checkpoints

    uri = "s3://bkt/cli/study"
    fs, root = sfs.resolve(uri)
    sfs.write_bytes_atomic(fs, sfs.join(root, "study.yaml"), yaml.safe_dump(
        {"name": "s3study", "baseline": "softmax"}).encode())
    ledger = Ledger(uri)
    for s in range(3):
        ledger.append(make_record(key=f"lm-softmax-s{s}", cell="lm/softmax", task="lm", seed=s, metric_value=3.0))
        for d in (2, 4, 8):
            ledger.append(make_record(key=f"lm-osc-d{d}-s{s}", cell=f"lm/oscillator/d{d}", task="lm",
                                      variant="oscillator", d_osc=d, seed=s, metric_value=3.0 + d ** -0.5))
    run = lambda *a: subprocess.run([sys.executable, "-m", "scaling.cli", *a], capture_output=True, text=True, check=True)
    out = run("compact", uri).stdout
    assert "s3://bkt/cli/study/ledger/parts/part-" in out
    assert json.loads(run("status", uri, "--format", "json").stdout)["totals"]["completed"] == 12
    assert len(run("trials", uri, "--format", "csv").stdout.strip().splitlines()) == 13
    run("fits", uri, "--format", "json", "--n-boot", "50")
    report = run("report", uri, "--n-boot", "50").stdout
    assert "s3://bkt/cli/study/report.html" in report
    cache = DatasetCache("s3://bkt/cache")
    entry = cache.get_or_build("toy", {"v": 1}, lambda: ({"train": pa.table({"x": [1, 2, 3]})}, {}))
    assert entry.uri.startswith("s3://bkt/cache/") and entry["train"].num_rows == 3
    again = DatasetCache("s3://bkt/cache").get_or_build("toy", {"v": 1}, lambda: 1 / 0)  # cached: no rebuild
    assert again["train"].column("x").to_pylist() == [1, 2, 3]
    ckpt = Checkpoints("s3://bkt/cli/study", "trial-a")
    ckpt.save({"step": 7})
    assert Checkpoints("s3://bkt/cli/study", "trial-a").load()["step"] == 7
    ckpt.remove()
    assert Checkpoints("s3://bkt/cli/study", "trial-a").load() is None


@pytest.mark.slow
def test_the_http_api_serves_studies_from_s3_as_from_a_local_root(s3_endpoint, tmp_path):
    """`scaling serve --root s3://...`: every read endpoint answers as it does for the same studies on
    local disk (paths aside)."""
    pytest.importorskip("fastapi")
    import uuid

    import pyarrow.fs as pafs
    from fastapi.testclient import TestClient

    from scaling.server import create_app
    from test_server import AUTH, TOKEN, make_root

    local = make_root(tmp_path / "studies")
    prefix = f"bkt/{uuid.uuid4().hex[:12]}"
    fs, _ = sfs.resolve(f"s3://{prefix}")
    pafs.copy_files(str(local), prefix, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    on_disk, on_s3 = TestClient(create_app(str(local), TOKEN)), TestClient(create_app(f"s3://{prefix}", TOKEN))
    for path in ["/studies", "/studies/demo", "/studies/demo/trials", "/studies/demo/fits", "/studies/grid/fits",
                 "/studies/demo/predict?task=lm&variant=oscillator&d_osc=64", "/studies/demo/report.md"]:
        a, b = on_disk.get(path, headers=AUTH), on_s3.get(path, headers=AUTH)
        assert a.status_code == b.status_code == 200, (path, a.text[:300], b.text[:300])
        a_text = a.text.replace(str(local), f"s3://{prefix}")
        if path.endswith(".md"):
            assert a_text == b.text, path
        else:  # JSON objects compare as objects: a listing's order (hence a status's cell order) is the backend's
            assert _same(json.loads(a_text), json.loads(b.text)), path


def _same(a, b) -> bool:
    """Equal JSON, numbers to 1e-6: the loss law's L-BFGS fit depends on the order of its points at
    ~1e-9, and the row order is the backend's listing order."""
    import math

    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b
