"""storage: record keys and the Parquet ledger (the cache has tests/test_cache.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_record, tiny_spec
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


# ---- what a reader skips: anything under ledger/ that is not a finished record -----------------

def _leftovers(ledger_dir, key: str) -> None:
    """What a writer killed between write and rename leaves, and other non-records."""
    record = (ledger_dir / f"{key}.parquet").read_bytes()
    (ledger_dir / f"{key}.parquet.tmp-0a1b2c3d").write_bytes(record)  # complete temp copy of a finished record
    (ledger_dir / "lost.parquet.tmp-deadbeef").write_bytes(record[: len(record) // 2])  # partial, never renamed
    (ledger_dir / "short.parquet").write_bytes(b"PAR1")  # a record cut short
    (ledger_dir / "garbage.parquet").write_bytes(b"not parquet at all, but long enough to pass the size check")
    (ledger_dir / "notes.txt").write_text("hand-written notes")
    (ledger_dir / "failed" / "x-00000000.parquet.tmp-0badf00d").parent.mkdir(exist_ok=True)
    (ledger_dir / "failed" / "x-00000000.parquet.tmp-0badf00d").write_bytes(record[:10])


def test_readers_skip_temp_and_partial_files_and_say_why(tmp_path, caplog):
    ledger = Ledger(str(tmp_path))
    ledger.append(make_record(key="a", metric_value=1.5))
    ledger.append(make_record(key="b", status="failed", error="boom"))
    _leftovers(tmp_path / "ledger", "a")
    caplog.set_level("WARNING", logger="storage.ledger")
    assert ledger.keys() == {"a", "garbage"}  # by name and size; 'garbage' is caught when read
    table = ledger.table()
    assert sorted(table.column("key").to_pylist()) == ["a", "b"]  # the complete temp copy is not a second 'a'
    assert [r.key for r in ledger.records(include_failed=False)] == ["a"]
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((i.path, i.reason) for i in ledger.ignored)}
    assert set(reasons) == {"a.parquet.tmp-0a1b2c3d", "lost.parquet.tmp-deadbeef", "short.parquet", "garbage.parquet",
                            "notes.txt", "x-00000000.parquet.tmp-0badf00d"}
    assert "interrupted before its rename" in reasons["a.parquet.tmp-0a1b2c3d"]
    assert "its record is in the ledger" in reasons["a.parquet.tmp-0a1b2c3d"]
    assert "not in the ledger and runs again" in reasons["lost.parquet.tmp-deadbeef"]
    assert "partial record (4 bytes" in reasons["short.parquet"]
    assert "unreadable record" in reasons["garbage.parquet"] and "magic" in reasons["garbage.parquet"].lower()
    assert "not a ledger record" in reasons["notes.txt"]
    assert any("ignored" in m and "tmp-0a1b2c3d" in m for m in caplog.messages)  # said, once per file
    before = len(caplog.messages)
    ledger.table()
    assert len(caplog.messages) == before


def test_a_partial_record_does_not_block_its_trial(tmp_path):
    ledger = Ledger(str(tmp_path))
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "k.parquet").write_bytes(b"PAR")  # cut short: the trial is not done
    assert ledger.keys() == set()
    ledger.append(make_record(key="k"))  # the re-run's record replaces it
    assert [r.key for r in ledger.records()] == ["k"] and ledger.ignored == []


def test_status_and_report_work_with_leftovers_and_count_each_trial_once(tmp_path, capsys):
    import json

    from conftest import write_synthetic_study
    from scaling import api
    from scaling.cli import main

    storage = write_synthetic_study(tmp_path / "s", seeds=(0, 1, 2), ds=(2, 4, 8))
    clean = api.status_summary(api.open_study(str(storage)))["totals"]
    key = sorted(p.name for p in (storage / "ledger").glob("*.parquet"))[0][: -len(".parquet")]
    _leftovers(storage / "ledger", key)
    assert main(["status", str(storage), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"] == clean  # the complete temp copy is not counted twice
    assert len(out["ledger_ignored"]) == 6
    assert main(["report", str(storage), "--n-boot", "100"]) == 0
    assert main(["fits", str(storage), "--format", "json", "--n-boot", "100"]) == 0
