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
