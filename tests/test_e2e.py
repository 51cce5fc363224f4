"""End to end on embedded local Ray: a 4-trial study file -> ledger -> fit -> report; re-runs are idempotent."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import yaml

from conftest import tiny_study_dict

pytestmark = pytest.mark.ray


@pytest.fixture
def study_file(tmp_path) -> pathlib.Path:
    data = tiny_study_dict(tmp_path)
    data["train"] = {**data["train"], "steps": 60, "eval_every": 30}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SECRET = "wandb-key-that-must-never-be-written-0123456789"


def test_study_runs_end_to_end_and_reruns_only_missing(study_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # offline mode is forced by the study; the key must not leak
    from scaling import api
    from scaling.cli import main
    from storage.ledger import Ledger
    from studies.runner import run_study
    from studies.spec import load_study

    study = load_study(study_file)
    result = run_study(study, num_cpus=2, study_file=str(study_file))
    assert result.ok, result.counts
    assert (result.planned, result.skipped, result.ran) == (4, 0, 4)
    assert result.counts["completed"] == 4

    storage = pathlib.Path(study.storage_uri())
    rows = Ledger(str(storage)).rows()
    assert sorted(r["cell"] for r in rows) == [
        "mqar/oscillator/d2", "mqar/oscillator/d4", "mqar/oscillator/d8", "mqar/softmax"]
    assert all(r["status"] == "completed" and math.isfinite(r["metric_value"]) for r in rows)
    assert all(r["metric_name"] == "val_loss" and r["params_total"] > 0 and r["steps"] == 60 for r in rows)
    assert all(r["wandb_run_id"] and r["wandb_run_id"].startswith("tiny-mqar-") for r in rows)

    # the fit is the one the ledger implies: gap(d) = oscillator(d) - softmax (one seed, paired)
    base = next(r["metric_value"] for r in rows if r["variant"] == "softmax")
    (fit,) = api.fits(api.open_study(str(storage)), method="loglog-means")
    expected = {r["d_osc"]: r["metric_value"] - base for r in rows if r["variant"] == "oscillator"}
    assert {p["d_osc"]: p["gap_mean"] for p in fit.points} == pytest.approx(expected)
    assert fit.law == "gap_vs_dosc" and fit.task == "mqar"

    report = pathlib.Path(result.report_path)
    html = report.read_text()
    assert report.name == "report.html" and "gap_vs_dosc" in html and "mqar/oscillator/d8" in html
    assert (storage / "report.md").exists() and json.loads((storage / "fits.json").read_text())
    assert len(json.loads((storage / "plan.json").read_text())) == 4
    offline_runs = list((storage / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) >= 4  # one per trial, plus the study summary run
    # the ledger tells Ray nodes apart, not only hosts
    assert all(r["node_id"] and len(r["node_id"]) == 56 and r["host"] for r in rows)

    # W&B: a row of train metrics every 10 steps (tracking.log_every_steps), evaluations at 30 and 60,
    # and the numbers researchers filter by at the top level of the config
    from studies import tracking, wandb_files

    for r in rows:
        (run_dir,) = wandb_files.offline_runs(str(storage / "wandb"), r["wandb_run_id"])
        run = wandb_files.read_run(wandb_files.run_file(run_dir))
        history = run["history"]
        assert [h["_step"] for h in history] == [10, 20, 30, 40, 50, 60]
        assert all({"train_loss", "lr", "grad_norm", "tokens_per_s"} <= set(h) for h in history)
        assert all("val_loss" in h for h in history if h["_step"] in (30, 60))
        config = run["config"]
        assert config["d_osc"] == r["d_osc"] and config["trial_key"] == r["key"]  # None for softmax
        assert config["params_total"] == r["params_total"] and config["params_non_embedding"] == r["params_non_embedding"]
        assert config["train_flops"] > 0 and config["d_model"] == 32 and "target_params" in config
    summary_dir = wandb_files.offline_runs(str(storage / "wandb"), tracking.run_id("tiny", "summary"))[-1]
    summary_rows = wandb_files.read_run(wandb_files.run_file(summary_dir))["history"]
    assert any(k.startswith("cells/") for h in summary_rows for k in h)  # the per-cell results table

    # the W&B key appears nowhere: ledger, configs, logs, reports, offline run files
    leaked = [p for p in storage.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked

    # finished study: nothing runs again
    again = run_study(study, num_cpus=2, progress=False)
    assert (again.skipped, again.ran) == (4, 0)

    # interrupted study (a record lost): only that trial runs. The study's end compacted its
    # records into one part, so the ledger is rewritten without the d4 trial's record
    ledger = Ledger(str(storage))
    kept = [r for r in ledger.records() if not r.key.startswith("mqar-oscillator-d4-")]
    assert len(kept) == 3
    for part in storage.glob("ledger/**/*.parquet"):
        part.unlink()
    Ledger(str(storage)).append_many(kept)
    resumed = run_study(study, num_cpus=2, progress=False)
    assert (resumed.skipped, resumed.ran) == (3, 1)
    assert len(Ledger(str(storage)).rows()) == 4

    # the CLI reads the same study from its storage directory
    capsys.readouterr()
    assert main(["status", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "mqar/oscillator/d4" in out and "total" in out
    assert main(["fits", str(study_file), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["law"] == "gap_vs_dosc"


@pytest.mark.slow  # a second study on local Ray (about a minute on 2 shared cores)
def test_a_study_with_stacked_seeds_records_every_seed_under_its_own_key(tmp_path):
    """pack_seeds: auto on local Ray: one Ray trial per cell, one ledger record per seed, under the
    key the seed has unpacked, with the pack noted; a re-run runs nothing."""
    from storage.ledger import Ledger
    from studies.plan import expand
    from studies.runner import run_study
    from studies.spec import load_study

    data = tiny_study_dict(tmp_path, seeds=[0, 1, 2], variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2]}],
                           resources={"cpus_per_trial": 1, "max_concurrent_trials": 2, "pack_seeds": "auto"})
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    result = run_study(study, num_cpus=2, study_file=str(path))
    assert result.ok, result.counts
    rows = Ledger(study.storage_uri()).rows()
    assert sorted(r["key"] for r in rows) == sorted(t.key for t in expand(study))
    for row in rows:
        assert row["status"] == "completed"
        note = json.loads(row["metrics_json"])["pack"]
        assert note["size"] == 3 and note["seeds"] == [0, 1, 2] and row["key"] in note["keys"]
        assert row["node_id"] and row["host"]
    # every seed its own W&B run, as a trial run alone: train rows every 10 steps, its config
    from studies import wandb_files

    steps = study.train.steps
    for row in rows:
        (run_dir,) = wandb_files.offline_runs(str(study.storage_uri()) + "/wandb", row["wandb_run_id"])
        run = wandb_files.read_run(wandb_files.run_file(run_dir))
        assert [h["_step"] for h in run["history"]] == list(range(10, steps + 1, 10))
        assert all({"train_loss", "lr", "grad_norm", "tokens_per_s"} <= set(h) for h in run["history"])
        assert run["config"]["trial_key"] == row["key"] and run["config"]["pack_size"] == 3
        assert run["config"]["params_total"] == row["params_total"]
    again = run_study(study, num_cpus=2, study_file=str(path))
    assert again.ran == 0
