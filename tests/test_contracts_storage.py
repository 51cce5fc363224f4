"""Storage-backend contract suite: the ledger, trial checkpoints and the dataset cache behave the
same on every backend (Optuna's `StorageTestCase` pattern). Backends: a local directory, the
in-memory `memory://` filesystem (the object-store code paths with no server), and S3 through the
moto server of conftest (`slow`: the server start costs seconds). A new backend is one more
`backend` parameter here."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pytest
import torch

from conftest import make_record
from storage import fs as sfs
from storage.cache import DatasetCache, fingerprint
from storage.ledger import Ledger, LedgerError
from workers.trial import Checkpoints


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.slow)])
def backend(request, tmp_path) -> str:
    """A fresh storage root on each backend (a URI; a plain path for local disk)."""
    if request.param == "local":
        return str(tmp_path / "root")
    prefix = uuid.uuid4().hex[:12]
    if request.param == "memory":
        return f"memory://contracts/{prefix}"
    request.getfixturevalue("s3_endpoint")
    return f"s3://bkt/{prefix}"


# ---- ledger ----------------------------------------------------------------------------------------------


def test_ledger_append_contains_and_refuses_a_second_write(backend):
    ledger = Ledger(backend)
    assert not ledger.contains("a") and ledger.rows() == []
    written = ledger.append(make_record(key="a", metric_value=1.5))
    assert written == sfs.uri(ledger.fs, sfs.join(ledger.dir, "a.parquet"))
    assert written.startswith(backend.split("://")[0] + "://") if "://" in backend else written.startswith("/")
    assert ledger.contains("a") and not ledger.contains("b")
    with pytest.raises(LedgerError, match="already holds trial a"):
        ledger.append(make_record(key="a", metric_value=9.0))
    assert [(r["key"], r["metric_value"]) for r in ledger.rows()] == [("a", 1.5)]  # the first write stands


def test_ledger_keeps_failed_attempts_as_data_but_not_as_done(backend):
    ledger = Ledger(backend)
    ledger.append(make_record(key="f", status="failed", error="boom"))
    ledger.append(make_record(key="f", status="failed", error="boom again"))
    assert not ledger.contains("f") and ledger.keys() == set()
    ledger.append(make_record(key="f", metric_value=2.0))  # the retry that finished
    assert ledger.contains("f") and ledger.keys() == {"f"}
    assert sorted(r["status"] for r in ledger.rows()) == ["completed", "failed", "failed"]
    assert len(ledger.table(include_failed=False)) == 1


def test_ledger_compaction_keeps_every_row_once_and_the_keys_done(backend):
    ledger = Ledger(backend)
    for i in range(5):
        ledger.append(make_record(key=f"k{i}", seed=i, metric_value=float(i)))
    ledger.append(make_record(key="k0", status="failed", error="first try"))
    before = sorted((r["key"], r["status"], r["metric_value"]) for r in ledger.rows())
    result = ledger.compact()
    assert result.part is not None and result.records == 6 and result.merged_files == 6 and result.removed == 6
    scan = ledger.scan()
    assert not scan.done and not scan.failed and len(scan.parts) == 1  # the loose files are gone
    assert sorted((r["key"], r["status"], r["metric_value"]) for r in Ledger(backend).rows()) == before
    assert Ledger(backend).contains("k3")  # found in the part by a fresh reader
    with pytest.raises(LedgerError, match="already holds trial k3"):
        Ledger(backend).append(make_record(key="k3"))
    ledger.append(make_record(key="k9", metric_value=9.0))
    assert ledger.compact().merged_parts == 1  # a second compaction merges the small part and the new file
    assert ledger.keys() == {f"k{i}" for i in range(5)} | {"k9"} and len(ledger.rows()) == 7
    assert ledger.compact().skipped  # nothing left to merge


# ---- checkpoints -----------------------------------------------------------------------------------------


def test_checkpoints_save_load_overwrite_remove(backend):
    checkpoints = Checkpoints(backend, "trialkey")
    assert checkpoints.load() is None
    weights = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    checkpoints.save({"step": 3, "model": {"w": weights}, "torch_rng": torch.get_rng_state()})
    state = Checkpoints(backend, "trialkey").load()  # another process's view: a fresh object
    assert state["step"] == 3 and torch.equal(state["model"]["w"], weights)
    assert state["torch_rng"].device.type == "cpu"
    checkpoints.save({"step": 5, "model": {"w": weights * 2}})  # the newer checkpoint replaces the older
    state = checkpoints.load()
    assert state["step"] == 5 and torch.equal(state["model"]["w"], weights * 2)
    assert Checkpoints(backend, "other").load() is None  # one folder per trial key
    checkpoints.remove()
    assert checkpoints.load() is None
    checkpoints.remove()  # removing what is not there is fine


# ---- dataset cache ---------------------------------------------------------------------------------------


def _tables() -> dict[str, pa.Table]:
    return {"train": pa.table({"x": list(range(100))}), "val": pa.table({"x": list(range(10))})}


def test_cache_builds_once_then_opens_and_verifies(backend):
    root = sfs.join(backend, "cache")
    builds = []

    def build():
        builds.append(1)
        return _tables(), {"vocab_size": 7}

    identity, request = {"source": "synthetic", "n": 100}, {"task": "toy", "options": {}}
    entry = DatasetCache(root).get_or_build("toy", identity, build, request=request)
    assert entry.fingerprint == fingerprint(identity) and entry.meta == {"vocab_size": 7}
    assert entry["train"].column("x").to_pylist() == list(range(100)) and entry["val"].num_rows == 10
    assert entry.uri.startswith(backend.split("://")[0] + "://") if "://" in backend else entry.uri.startswith("/")
    fresh = DatasetCache(root)  # another worker: opens, does not build
    again = fresh.get_or_build("toy", identity, build, request=request)
    assert builds == [1] and again["train"].equals(entry["train"])
    assert fresh.open_request("toy", request).fingerprint == entry.fingerprint
    assert fresh.get("toy", {"source": "other"}) is None
    rows = fresh.verify(full=True)
    assert [(r["name"], r["fingerprint"], r["ok"]) for r in rows] == [("toy", entry.fingerprint, True)]
    assert rows[0]["bytes"] == entry.nbytes > 0


def test_cache_detects_a_damaged_split_and_rebuilds_it(backend):
    root = sfs.join(backend, "cache")
    cache = DatasetCache(root)
    entry = cache.get_or_build("toy", {"n": 1}, lambda: (_tables(), {}))
    info = entry.manifest["splits"]["train"]
    path = sfs.join(entry.path, info["file"])
    data = bytearray(sfs.read_bytes(cache.fs, path))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    with cache.fs.open_output_stream(path) as out:
        out.write(bytes(data))
    damaged = DatasetCache(root)
    [row] = damaged.verify(full=True)
    assert not row["ok"] and "checksum" in row["problem"], row
    builds = []
    rebuilt = damaged.get_or_build("toy", {"n": 1}, lambda: (builds.append(1), (_tables(), {}))[1])
    assert builds == [1] and rebuilt["train"].column("x").to_pylist() == list(range(100))
    assert [r["ok"] for r in DatasetCache(root).verify(full=True)] == [True]
