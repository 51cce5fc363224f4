"""storage: record keys, the Parquet ledger and the content-addressed Arrow cache (no torch)."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import make_record, tiny_spec
from storage.cache import CacheCorrupt, DatasetCache, fingerprint
from storage.ledger import Ledger, LedgerError
from storage.records import TrialRecord, TrialSpec


def test_key_is_stable_and_content_addressed():
    a, b = tiny_spec(), tiny_spec()
    assert a.key == b.key
    assert a.key.startswith("mqar-softmax-s0-")
    assert tiny_spec(seed=1).key != a.key
    assert tiny_spec(variant="oscillator", variant_options={"d_osc": 2}).key != a.key
    assert tiny_spec(data_fingerprint="other").key != a.key
    # option order never changes the key
    reordered = tiny_spec(task_options=dict(reversed(list(a.task_options.items()))))
    assert reordered.key == a.key


def test_trial_spec_round_trips_and_rejects_unknown_fields():
    spec = tiny_spec(variant="oscillator", variant_options={"d_osc": 8})
    assert TrialSpec.from_dict(spec.to_dict()) == spec
    assert spec.cell == "mqar/oscillator/d8" and spec.d_osc == 8
    with pytest.raises(ValueError, match="unknown fields \\['bogus'\\]"):
        TrialSpec.from_dict({**spec.to_dict(), "bogus": 1})


def test_record_status_is_checked():
    with pytest.raises(ValueError, match="allowed"):
        make_record(status="finished")


def test_ledger_append_read_and_immutability(tmp_path):
    ledger = Ledger(str(tmp_path))
    assert ledger.keys() == set() and ledger.table().num_rows == 0
    ledger.append(make_record(key="a", metric_value=1.5))
    ledger.append(make_record(key="b", status="diverged", metric_value=None))
    assert ledger.keys() == {"a", "b"}
    rows = {r.key: r for r in ledger.records()}
    assert rows["a"].metric_value == 1.5 and rows["b"].status == "diverged"
    assert isinstance(rows["a"], TrialRecord)
    with pytest.raises(LedgerError, match="immutable"):
        ledger.append(make_record(key="a"))


def test_failed_attempts_are_kept_but_not_done(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.append(make_record(key="x", status="failed", error="boom"))
    ledger.append(make_record(key="x", status="failed", error="boom again"))
    assert ledger.keys() == set()  # a re-run retries it
    assert ledger.table().num_rows == 2
    ledger.append(make_record(key="x"))
    assert ledger.keys() == {"x"}
    assert ledger.table(include_failed=False).num_rows == 1


def _tables(n=100):
    return {"train": pa.table({"x": list(range(n))}), "val": pa.table({"x": [1, 2, 3]})}, {"vocab_size": 7}


def test_cache_builds_once_and_memory_maps(tmp_path):
    cache = DatasetCache(str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return _tables()

    first = cache.get_or_build("toy", {"n": 100}, build)
    second = DatasetCache(str(tmp_path)).get_or_build("toy", {"n": 100}, build)
    assert len(calls) == 1
    assert first.fingerprint == second.fingerprint == fingerprint({"n": 100})
    assert second["train"].column("x").to_pylist() == list(range(100))
    assert second.meta == {"vocab_size": 7}
    assert [e["name"] for e in cache.entries()] == ["toy"]
    other = cache.get_or_build("toy", {"n": 101}, lambda: _tables(101))
    assert other.fingerprint != first.fingerprint  # any change, a new entry


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_cache_detects_damage_and_rebuilds(tmp_path, damage):
    cache = DatasetCache(str(tmp_path))
    entry = cache.get_or_build("toy", {"n": 100}, _tables)
    path = tmp_path / entry.path.rsplit("/", 1)[1] / "train.arrow"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    fresh = DatasetCache(str(tmp_path))
    with pytest.raises(CacheCorrupt):
        fresh.open("toy", entry.fingerprint)
    rebuilt = fresh.get_or_build("toy", {"n": 100}, _tables)
    assert rebuilt["train"].column("x").to_pylist() == list(range(100))


def _concurrent_builder(root, marker_dir, queue):
    import os
    import time

    def build():
        open(os.path.join(marker_dir, f"build-{os.getpid()}"), "w").close()
        time.sleep(0.5)  # hold the lock long enough for the other process to wait on it
        return _tables()

    entry = DatasetCache(root).get_or_build("toy", {"n": 100}, build)
    queue.put(entry["train"].num_rows)


def test_concurrent_builders_make_one_build(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_concurrent_builder, args=(str(tmp_path / "cache"), str(markers), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [queue.get(timeout=5) for _ in procs] == [100, 100]
    assert len(list(markers.iterdir())) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_storage_and_scaling_import_without_torch_or_ray():
    code = (
        "import sys, storage.cache, storage.ledger, storage.records, scaling.api, scaling.fits, scaling.report, scaling.cli;"
        "bad = [m for m in ('torch', 'ray', 'optuna') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_workers_never_import_ray_or_optuna():
    code = (
        "import sys, workers, workers.trial, workers.tasks, workers.attention;"
        "bad = [m for m in ('ray', 'optuna', 'wandb') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
