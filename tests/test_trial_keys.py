"""Trial keys must not change: a changed key re-runs every finished trial of every study.

If a change must alter what a trial computes, bump `workers.trial.CODE_VERSION` with the reason and
update the pinned keys here in the same commit. These tests plan studies (no data are built) and
read the committed ledgers under docs/results; they take well under a second after imports.
"""

from __future__ import annotations

import glob
import json
import pathlib

import pytest
import yaml

from storage.records import TrialSpec
from studies.plan import expand
from studies.spec import load_study, parse_study

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = sorted(glob.glob(str(ROOT / "docs" / "results" / "*" / "run")))


def _quickstart(tmp_path, **overrides) -> dict:
    data = yaml.safe_load((ROOT / "studies" / "examples" / "quickstart.yaml").read_text())
    data["storage"] = str(tmp_path / "study")
    data.update(overrides)
    return data


def test_quickstart_keys_are_pinned(tmp_path):
    keys = [t.key for t in expand(parse_study(_quickstart(tmp_path)), build=False)]
    assert keys[::4] == ["mqar-softmax-s0-0f960d2f8126", "mqar-oscillator-d2-s1-5df13817bd35",
                         "mqar-oscillator-d4-s2-04c3cc12be22", "mqar-oscillator-d16-s0-3fa26b26336d"]


def test_every_variant_and_backbone_b_keys_are_pinned(tmp_path):
    """Variant option defaults enter the key: a default that moves, or a new option, changes it."""
    data = _quickstart(tmp_path, seeds=[0], variants=[
        {"name": "softmax"}, {"name": "kuramoto", "options": {"steps": 2}},
        {"name": "oscillator", "d_osc": [4], "options": {"p": 2}}])
    data["model"] = {**data["model"], "backbone": "b", "positions": "none"}
    keys = [t.key for t in expand(parse_study(data), build=False)]
    assert keys == ["mqar-softmax-s0-e9c41bffeb72", "mqar-kuramoto-s0-8d0d4762d9d4", "mqar-oscillator-d4-s0-881c40c55cd9"]


@pytest.mark.parametrize("run", RESULTS, ids=[pathlib.Path(r).parent.name for r in RESULTS])
def test_committed_ledger_keys_hash_the_same(run):
    """Each committed record's key is the hash of its own spec: the hashing (canonical JSON, the
    payload's fields) is unchanged, whatever code version made the record."""
    from storage.ledger import Ledger

    rows = Ledger(run).rows()  # one file per record, or compacted into ledger/parts
    assert rows
    for row in rows:
        assert TrialSpec(**json.loads(row["spec_json"])).key == row["key"], (run, row["key"])


def test_the_current_code_version_plans_the_committed_wikitext2_law_keys():
    """docs/results/wikitext2_law ran at the current CODE_VERSION: planning its saved study again
    gives exactly the keys in its ledger (so nothing of it would re-run)."""
    run = ROOT / "docs" / "results" / "wikitext2_law" / "run"
    files = {pathlib.Path(p).name.removesuffix(".parquet") for p in glob.glob(str(run / "ledger" / "*.parquet"))}
    planned = {t.key for t in expand(load_study(run), build=False)}
    assert len(files) == 20 and planned == files
