"""Status, the HTTP status endpoint, `scaling status --format json` and the report of a study with a
`search:` block, on synthetic ledgers and plan.json files (no Ray, no training).

A searched cell's planned trials are slots in plan.json (key None: Optuna picks them as it goes);
they used to collapse into one 'pending' trial of the first cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import make_record
from scaling import api
from scaling.cli import main

CELLS = ("mqar/softmax", "mqar/oscillator/d2")
LR = (0.001, 0.003, 0.01)


def key(cell: str, seed: int, n: int) -> str:
    """A key in TrialSpec.key's format: <cell with / as -> -s<seed>-<12 hex>."""
    return f"{cell.replace('/', '-')}-s{seed}-{n:012x}"


def slots(cell: str, search_runs: int, replicate_seeds=(1,)) -> list[dict]:
    """plan.json rows of one searched cell, as studies.runner.plan_rows writes them."""
    variant, _, d = cell.split("/", 1)[1].partition("/")
    base = {"key": None, "cell": cell, "task": "mqar", "variant": variant, "d_osc": int(d[1:]) if d else None}
    return ([{**base, "seed": None, "stage": "search"} for _ in range(search_runs)]
            + [{**base, "seed": s, "stage": "replicate"} for s in replicate_seeds])


def record(cell: str, n: int, *, stage="search", seed=0, lr=0.01, status="completed", value=2.0, minute=0, **kw):
    variant, _, d = cell.split("/", 1)[1].partition("/")
    return make_record(key=key(cell, seed, n), study="searched", cell=cell, task="mqar", variant=variant,
                       d_osc=int(d[1:]) if d else None, seed=seed, stage=stage, hparams_json=json.dumps({"lr": lr}),
                       status=status, metric_value=value, steps=40 if status == "completed" else 10,
                       finished_at=f"2026-01-01T00:{minute:02d}:00+00:00", **kw)


def write_searched(directory: Path, records, plan, search_seeds=(0,)) -> Path:
    from storage.ledger import Ledger

    directory.mkdir(parents=True, exist_ok=True)
    config = {"name": "searched", "baseline": "softmax", "seeds": [0, 1],
              "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
              "search": {"sampler": "tpe", "trials_per_cell": 3, "seeds": list(search_seeds),
                         "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}}}}
    (directory / "study.yaml").write_text(yaml.safe_dump(config))
    (directory / "plan.json").write_text(json.dumps(plan))
    ledger = Ledger(str(directory))
    for r in records:
        ledger.append(r)
    return directory


@pytest.fixture
def finished(tmp_path) -> Path:
    """Both cells finished: 3 search trials (one pruned by ASHA) and one replicate at the best lr."""
    softmax, osc = CELLS
    records = [
        record(softmax, 1, lr=LR[0], value=2.5, minute=1),
        record(softmax, 2, lr=LR[1], status="pruned", value=3.9, minute=2),
        record(softmax, 3, lr=LR[2], value=2.1, minute=3),
        record(softmax, 4, stage="replicate", seed=1, lr=LR[2], value=2.05, minute=4),
        record(osc, 1, lr=LR[1], value=2.2, minute=1),
        record(osc, 2, lr=LR[0], status="pruned", value=4.0, minute=2),
        record(osc, 3, lr=LR[2], status="pruned", value=3.5, minute=3),
        record(osc, 4, stage="replicate", seed=1, lr=LR[1], value=2.25, minute=4),
    ]
    storage = write_searched(tmp_path / "searched", records, slots(softmax, 3) + slots(osc, 3))
    (storage / "checkpoints" / key(softmax, 1, 4)).mkdir(parents=True)  # the replicate's kept checkpoint
    (storage / "checkpoints" / key(softmax, 0, 99)).mkdir(parents=True)  # a stray one: no open slot to fill
    return storage


@pytest.fixture
def running(tmp_path) -> Path:
    """Mid-search: softmax has 2 search trials (one failed once, then finished on Tune's retry), one
    in progress (a checkpoint, no record) and its replicate pending; the oscillator cell has one
    search trial that failed for good and nothing else yet."""
    softmax, osc = CELLS
    records = [
        record(softmax, 1, lr=LR[0], value=2.5, minute=1),
        record(softmax, 2, lr=LR[1], status="failed", value=None, minute=2),
        record(softmax, 2, lr=LR[1], value=2.3, minute=3),
        record(osc, 1, lr=LR[0], status="failed", value=None, minute=1),
    ]
    storage = write_searched(tmp_path / "searched", records, slots(softmax, 3) + slots(osc, 3))
    (storage / "checkpoints" / key(softmax, 0, 3)).mkdir(parents=True)
    return storage


def zeros(**counts) -> dict[str, int]:
    return {**{k: 0 for k in api.STATUS_KEYS}, **counts}


def test_a_finished_search_study_counts_every_trial_and_nothing_pending(finished):
    cells = api.status(api.open_study(str(finished)))
    assert cells == {"mqar/softmax": zeros(completed=3, pruned=1), "mqar/oscillator/d2": zeros(completed=2, pruned=2)}


def test_a_running_search_study_counts_in_progress_failed_and_pending_per_cell(running):
    cells = api.status(api.open_study(str(running)))
    assert cells["mqar/softmax"] == zeros(completed=2, in_progress=1, pending=1)
    assert cells["mqar/oscillator/d2"] == zeros(failed=1, pending=3)  # 2 search slots and the replicate
    summary = api.status_summary(api.open_study(str(running)))
    assert summary["totals"] == zeros(completed=2, failed=1, in_progress=1, pending=4)
    assert summary["eta"]["remaining"] == 5 and summary["eta"]["seconds"] == pytest.approx(5 * 1.0 / 2)


def test_grid_and_search_slots_mix_in_one_plan(tmp_path):
    """A keyed (grid) trial in the plan is counted by its key; a record of it never fills a slot."""
    softmax = CELLS[0]
    plan = [{"key": "grid-key", "cell": "other/cell", "stage": "replicate"}] + slots(softmax, 2, replicate_seeds=())
    records = [make_record(key="grid-key", cell="other/cell", task="mqar"), record(softmax, 1)]
    storage = write_searched(tmp_path / "s", records, plan)
    cells = api.status(api.open_study(str(storage)))
    assert cells == {"other/cell": zeros(completed=1), "mqar/softmax": zeros(completed=1, pending=1)}


def test_cli_status_table_and_json(finished, capsys):
    assert main(["status", str(finished)]) == 0
    table = capsys.readouterr().out
    assert "mqar/softmax" in table and "mqar/oscillator/d2" in table and "all planned trials have finished" in table
    assert main(["status", str(finished), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == api.status_summary(api.open_study(str(finished)))
    assert out["totals"] == zeros(completed=5, pruned=3)
    assert out["cells"]["mqar/oscillator/d2"] == zeros(completed=2, pruned=2)
    assert out["eta"] == {"remaining": 0, "seconds": 0.0, "concurrent_trials": 2, "median_trial_seconds": 1.0}


def test_cli_status_json_eta_unknown_before_any_trial_completed(tmp_path, capsys):
    storage = write_searched(tmp_path / "s", [], slots(CELLS[0], 3))
    assert main(["status", str(storage), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["pending"] == 4 and out["eta"]["seconds"] is None
    assert main(["status", str(storage)]) == 0
    assert "4 trial(s) to go; ETA unknown" in capsys.readouterr().out


def test_http_status_is_the_cli_json_plus_the_submission(running, capsys):
    pytest.importorskip("fastapi", reason="scaling serve needs fastapi")
    from fastapi.testclient import TestClient

    from scaling.server import create_app

    token = "test-token-0123456789"
    client = TestClient(create_app(str(running.parent), token))
    response = client.get("/studies/searched", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.pop("submission") is None
    assert main(["status", str(running), "--format", "json"]) == 0
    assert body == json.loads(capsys.readouterr().out)
    assert body["cells"]["mqar/softmax"] == zeros(completed=2, in_progress=1, pending=1)


def test_searches_per_cell_order_best_so_far_and_the_chosen_configuration(finished):
    softmax, osc = api.searches(api.open_study(str(finished)))[::-1]  # sorted by cell: oscillator first
    assert softmax["cell"] == "mqar/softmax" and softmax["planned"] == 3
    assert [t["status"] for t in softmax["trials"]] == ["completed", "pruned", "completed"]
    assert [t["value"] for t in softmax["trials"]] == [2.5, 3.9, 2.1]
    assert [t["best_so_far"] for t in softmax["trials"]] == [2.5, 2.5, 2.1]  # pruned trials never count as best
    assert softmax["counts"] == {"completed": 2, "pruned": 1, "diverged": 0, "failed": 0, "in_progress": 0}
    assert softmax["chosen"] == {"number": 3, "hparams": {"lr": LR[2]}, "value": 2.1, "rule": "the replicates' configuration",
                                 "replicates": 1, "replicate_mean": 2.05, "replicate_sd": None}
    assert osc["chosen"]["hparams"] == {"lr": LR[1]} and osc["chosen"]["number"] == 1


def test_chosen_before_replicates_best_completed_else_best_pruned_and_higher_is_better(tmp_path):
    cell = CELLS[0]
    acc = dict(metric_name="val_accuracy")
    records = [record(cell, 1, lr=LR[0], value=0.6, **acc), record(cell, 2, lr=LR[1], value=0.8, minute=1, **acc),
               record(cell, 3, lr=LR[2], value=0.7, minute=2, **acc)]
    (search,) = api.searches(api.open_study(str(write_searched(tmp_path / "a", records, slots(cell, 3)))))
    assert not search["lower_is_better"] and [t["best_so_far"] for t in search["trials"]] == [0.6, 0.8, 0.8]
    assert search["chosen"]["hparams"] == {"lr": LR[1]} and search["chosen"]["rule"] == "best completed search trial"
    pruned = [record(cell, 1, lr=LR[0], status="pruned", value=3.0), record(cell, 2, lr=LR[1], status="pruned", value=2.0)]
    (search,) = api.searches(api.open_study(str(write_searched(tmp_path / "b", pruned, slots(cell, 3)))))
    assert search["chosen"]["hparams"] == {"lr": LR[1]} and search["chosen"]["rule"].startswith("best pruned")


def test_a_search_trial_at_two_seeds_is_one_trial_with_their_mean(tmp_path):
    cell = CELLS[0]
    records = [record(cell, 1, seed=0, lr=LR[0], value=2.0), record(cell, 2, seed=1, lr=LR[0], value=3.0, minute=1),
               record(cell, 3, seed=0, lr=LR[1], value=1.0, minute=2)]  # its seed 1 still running
    storage = write_searched(tmp_path / "s", records, slots(cell, 6, replicate_seeds=()), search_seeds=(0, 1))
    (search,) = api.searches(api.open_study(str(storage)))
    assert search["planned"] == 3 and search["search_seeds"] == 2
    assert [(t["seeds"], t["status"], t["value"]) for t in search["trials"]] == [([0, 1], "completed", 2.5),
                                                                                 ([0], "in_progress", 1.0)]
    assert search["chosen"]["hparams"] == {"lr": LR[0]}  # a half-finished trial is not yet a candidate


def test_report_counts_and_per_cell_search_section(finished):
    from scaling.report import render

    study = api.open_study(str(finished))
    page, markdown = render(study, api.fits(study, n_boot=50))
    assert "8 finished trials (5 completed, 3 pruned)" in markdown  # was: '10 finished trials (1 pending)'
    assert "pending" not in markdown.split("## Trials per cell")[0].split("\n")[2]
    table = markdown.split("## Trials per cell (failures included)")[1]
    assert "| mqar/softmax | 3 | 0 | 1 | 0 | 0 | 0 |" in table and "| mqar/oscillator/d2 | 2 | 0 | 2 | 0 | 0 | 0 |" in table
    section = markdown.split("## Per-cell search")[1].split("## Trials per cell")[0]
    assert "### Search in mqar/softmax" in section and "### Search in mqar/oscillator/d2" in section
    assert "3 search trial(s) of 3 planned: 2 completed, 1 pruned." in section
    assert "Chosen configuration: lr = 0.01 (trial #3, val_loss 2.1 in the search; 1 replicate(s) ran at it: val_loss 2.05)" in section
    assert "| 2 | lr = 0.003 | 0 | pruned | 10 | 3.9 | 2.5 |" in section
    assert "<h2>Per-cell search</h2>" in page and page.count('alt="search objective, ') == 2


def test_a_study_without_search_has_no_search_section(tmp_path):
    from conftest import write_synthetic_study
    from scaling.report import render

    study = api.open_study(str(write_synthetic_study(tmp_path / "grid", seeds=(0, 1), ds=(2, 4))))
    page, markdown = render(study, api.fits(study, n_boot=20))
    assert "Per-cell search" not in markdown and "Per-cell search" not in page
