"""Per-cell Optuna search on local Ray: search trials, then replicate seeds at each cell's best config;
ASHA-stopped trials are recorded as pruned; a re-run repeats nothing."""

from __future__ import annotations

import json

import optuna
import pytest

from conftest import tiny_study_dict

pytestmark = pytest.mark.ray


def _study(tmp_path, **search):
    from studies.spec import parse_study

    data = tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2]}], seeds=[0, 1])
    data["train"] = {**data["train"], "steps": 40, "eval_every": 10}
    data["search"] = {"sampler": "tpe", "sampler_seed": 3, "trials_per_cell": 3,
                      "space": {"lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2}}, **search}
    return parse_study(data)


def test_search_then_replicate_at_the_best_config(tmp_path):
    from storage.ledger import Ledger
    from studies.runner import run_study

    study = _study(tmp_path)
    result = run_study(study, num_cpus=2, progress=False, report=False)
    assert result.ok, result.counts
    rows = Ledger(study.storage_uri()).rows()
    assert len(rows) == 8 and result.planned == 8
    for cell in ("mqar/softmax", "mqar/oscillator/d2"):
        search = [r for r in rows if r["cell"] == cell and r["stage"] == "search"]
        (replicate,) = [r for r in rows if r["cell"] == cell and r["stage"] == "replicate"]
        assert len(search) == 3 and {r["seed"] for r in search} == {0} and replicate["seed"] == 1
        assert len({r["hparams_json"] for r in search}) == 3  # three different learning rates
        best = min(search, key=lambda r: r["metric_value"])
        assert replicate["hparams_json"] == best["hparams_json"]
        # Optuna's journal under the study's storage knows the same trials
        optuna_study = optuna.load_study(study_name=f"tiny/{cell}", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(f"{study.storage_uri()}/optuna/journal.log")))
        assert sorted(t.value for t in optuna_study.trials) == pytest.approx(sorted(r["metric_value"] for r in search))
        assert json.loads(replicate["hparams_json"]) == optuna_study.best_params
        # named metric, curves for optuna-dashboard, and the way from an Optuna trial to its run
        assert optuna_study.metric_names == ["val_loss"]
        by_key = {r["key"]: r for r in search}
        for t in optuna_study.trials:
            assert sorted(t.intermediate_values) == [10, 20, 30, 40]
            row = by_key[t.user_attrs["trial_key"]]
            assert t.intermediate_values[row["best_step"]] == pytest.approx(row["metric_value"])
            assert t.user_attrs["wandb_run_id"] == row["wandb_run_id"] and t.user_attrs["trial_keys"] == {"0": row["key"]}

    again = run_study(study, num_cpus=2, progress=False, report=False)
    assert again.ran == 0 and len(Ledger(study.storage_uri()).rows()) == 8


def test_an_exhausted_grid_is_not_an_error():
    """Optuna's GridSampler calls study.stop() once the grid is covered, which raises outside
    study.optimize (Tune logged "Error stopping trial" per cell); the cell's sampler does not."""
    from studies.search import make_sampler
    from studies.spec import SearchEntry

    search = SearchEntry(sampler="grid", space={"lr": {"type": "categorical", "choices": [0.1, 0.01]}})
    study = optuna.create_study(sampler=make_sampler(search))
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, trial.suggest_categorical("lr", [0.1, 0.01]))  # raised RuntimeError at the last cell
    assert sorted(t.params["lr"] for t in study.trials) == [0.01, 0.1]


@pytest.mark.slow  # a Ray study with ASHA (~30 s); CI runs make test only
def test_asha_stops_are_recorded_as_pruned(tmp_path):
    from storage.ledger import Ledger
    from studies.runner import run_study

    study = _study(tmp_path, trials_per_cell=6, sampler="random",
                   space={"lr": {"type": "loguniform", "low": 1e-5, "high": 3e-2}},
                   asha={"grace_steps": 10, "reduction_factor": 2})
    result = run_study(study, num_cpus=2, progress=False, report=False)
    rows = Ledger(study.storage_uri()).rows()
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned, [(r["stage"], r["status"], r["steps"]) for r in rows]
    assert all(r["stage"] == "search" and r["steps"] < 40 for r in pruned)
    assert all(r["status"] in ("completed", "pruned") for r in rows)
    replicates = [r for r in rows if r["stage"] == "replicate"]
    assert len(replicates) == 2 and all(r["status"] == "completed" and r["steps"] == 40 for r in replicates)
    assert result.counts.get("pruned") == len(pruned)
