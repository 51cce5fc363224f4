"""studies: the study file's validation and the plan (grid expansion, stable keys, ledger subtraction)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from conftest import make_record, tiny_study_dict
from storage.ledger import Ledger
from studies.plan import expand, make_plan
from studies.spec import StudyError, load_study, parse_study

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_is_valid_and_has_15_trials():
    study = load_study(ROOT / "studies/examples/quickstart.yaml")
    trials = expand(study)
    assert len(trials) == 15
    assert sorted({t.cell for t in trials}) == [
        "mqar/oscillator/d16", "mqar/oscillator/d2", "mqar/oscillator/d4", "mqar/oscillator/d8", "mqar/softmax"]
    assert all(t.variant_options.get("d_osc") is None for t in trials if t.variant == "softmax")


def test_keys_are_stable_across_loads(tmp_path):
    a = [t.key for t in expand(parse_study(tiny_study_dict(tmp_path)))]
    b = [t.key for t in expand(parse_study(tiny_study_dict(tmp_path)))]
    assert a == b and len(set(a)) == 4


def test_plan_subtracts_the_ledger(tmp_path):
    study = parse_study(tiny_study_dict(tmp_path))
    trials = expand(study)
    Ledger(study.storage_uri()).append(make_record(key=trials[0].key))
    Ledger(study.storage_uri()).append(make_record(key=trials[1].key, status="failed"))
    plan = make_plan(study)
    assert plan.done == {trials[0].key}
    assert [t.key for t in plan.todo] == [t.key for t in trials[1:]]


def _error(tmp_path, **overrides) -> str:
    with pytest.raises(StudyError) as info:
        parse_study(tiny_study_dict(tmp_path, **overrides), "study.yaml")
    return str(info.value)


def test_unknown_top_level_key_names_allowed_keys(tmp_path):
    message = _error(tmp_path, epochs=3)
    assert "epochs: unknown key" in message and "allowed keys here: name, description" in message
    assert "nothing was run" in message


def test_unknown_nested_key(tmp_path):
    message = _error(tmp_path, train={"stepz": 3})
    assert "train.stepz: unknown key" in message and "steps" in message
    assert "did you mean 'steps'?" in message


def test_unknown_task_and_variant(tmp_path):
    message = _error(tmp_path, tasks=[{"name": "wikitext3"}], variants=[{"name": "linear"}])
    assert "tasks[0]: unknown task 'wikitext3'; allowed: ['codeparrot', 'enwik8', 'kws', 'mqar'," in message
    assert "'tinystories', 'wikitext2']; did you mean 'wikitext2'?" in message
    assert "variants[0]: unknown variant 'linear'; allowed: ['kuramoto', 'oscillator', 'softmax']" in message
    assert "did you mean" not in message.split("variants[0]")[1]  # nothing is close to 'linear'
    assert "unknown variant 'oscilator'; allowed: ['kuramoto', 'oscillator', 'softmax']; did you mean 'oscillator'?" in _error(
        tmp_path, variants=[{"name": "softmax"}, {"name": "oscilator", "d_osc": [2]}])


def test_d_osc_below_two(tmp_path):
    message = _error(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [1, 4]}])
    assert "variants[1].d_osc" in message and "[1] are < 2" in message


def test_empty_seed_list(tmp_path):
    assert "seeds: is empty; give at least one seed" in _error(tmp_path, seeds=[])


def test_missing_d_osc_and_misplaced_options(tmp_path):
    assert "needs d_osc" in _error(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator"}])
    assert "remove d_osc" in _error(tmp_path, variants=[{"name": "softmax", "d_osc": [2]}, {"name": "oscillator", "d_osc": [2]}])
    assert "unknown option(s) ['temperature']" in _error(
        tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2], "options": {"temperature": 2}}])


def test_unknown_task_option(tmp_path):
    assert "task mqar: unknown option(s) ['pairs']" in _error(tmp_path, tasks=[{"name": "mqar", "options": {"pairs": 3}}])


def test_baseline_must_be_a_variant(tmp_path):
    assert "baseline='softmax' is not among the variants" in _error(tmp_path, variants=[{"name": "oscillator", "d_osc": [2]}])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(StudyError, match="not valid YAML"):
        load_study(bad)
    with pytest.raises(StudyError, match="no such study file"):
        load_study(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(StudyError, match="YAML mapping"):
        load_study(listy)


GOOD = """
name: ok
tasks: [{name: mqar}]
variants: [{name: softmax}, {name: oscillator, d_osc: [2, 4]}]
seeds: [0, 1]
"""

MALFORMED = [
    ("name: ok\ntasks: [{name: mqar}\n", "not valid YAML"),
    ("- just\n- a list\n", "YAML mapping"),
    (GOOD + "epochs: 3\n", "epochs: unknown key"),
    (GOOD.replace("name: ok", "name: ../escape"), "study name '../escape'"),
    (GOOD.replace("name: ok\n", ""), "name: required field is missing"),
    (GOOD.replace("seeds: [0, 1]", "seeds: []"), "seeds: is empty"),
    (GOOD.replace("seeds: [0, 1]", "seeds: [0, 0]"), "repeated seeds"),
    (GOOD.replace("seeds: [0, 1]", "seeds: zero"), "seeds"),
    (GOOD.replace("{name: mqar}", "{name: wikitext103}"), "unknown task 'wikitext103'"),
    (GOOD.replace("{name: softmax}", "{name: performer}"), "unknown variant 'performer'"),
    (GOOD.replace("d_osc: [2, 4]", "d_osc: [1, 4]"), "d_osc values [1] are < 2"),
    (GOOD.replace("d_osc: [2, 4]", "d_osc: []"), "d_osc is an empty list"),
    (GOOD.replace("d_osc: [2, 4]", "d_osc: [two]"), "d_osc"),
    (GOOD + "model: {d_model: 30, n_heads: 4}\n", "not divisible by n_heads"),
    (GOOD + "model: {d_model: 4}\n", "model.d_model"),
    (GOOD + "train: {steps: 100, epochs: 2}\n", "give one training budget"),
    (GOOD + "train: {lr: -1}\n", "train.lr"),
    (GOOD + "resources: {cpus_per_trial: 0}\n", "resources.cpus_per_trial"),
    (GOOD + "search: {sampler: tpe, space: {lr: {type: loguniform, low: 0.01, high: 0.001}}, trials_per_cell: 3}\n",
     "low=0.01 must be < high=0.001"),
    (GOOD + "search: {sampler: tpe, space: {lr: {type: loguniform, low: 0.0001, high: 0.01}}}\n", "needs trials_per_cell"),
    (GOOD + "search: {sampler: grid, space: {lr: {type: loguniform, low: 0.0001, high: 0.01}}}\n", "grid sampler needs"),
    (GOOD + "search: {seeds: [7], trials_per_cell: 2, space: {lr: {type: uniform, low: 0.001, high: 0.01}}}\n",
     "search.seeds [7] are not among seeds"),
    (GOOD + "search: {trials_per_cell: 2, space: {dropout: {type: uniform, low: 0.0, high: 0.5}}}\n", "cannot search ['dropout']"),
    (GOOD + "fits: [loss_vs_flops]\n", "fits.laws[0]"),
    (GOOD + "fits: {method: loglog, holdout: {d_osc: [64]}}\n", "fits.method"),
    (GOOD + "tracking: {wandb: {mode: sometimes}}\n", "tracking.wandb.mode"),
]


@pytest.mark.parametrize("text,expected", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_study_rejected_before_any_compute(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert expected in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_good_study_parses(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    study = load_study(path)
    assert study.train.steps == 1000 and len(expand(study)) == 6


def test_target_params_size_every_variant_within_two_percent(tmp_path):
    from storage.cache import DatasetCache
    from workers.tasks import get_task
    from workers.trial import build_model

    study = parse_study(tiny_study_dict(tmp_path, target_params=[2.0e5, 5.0e5], variants=[
        {"name": "softmax"}, {"name": "oscillator", "d_osc": [2, 16]}]))
    trials = expand(study)
    assert len(trials) == 2 * 3 and {t.target_params for t in trials} == {200000, 500000}
    assert "mqar/oscillator/d16/N500000" in {t.cell for t in trials}
    for t in trials:
        task = get_task(t.task)
        fields = task.model_fields(task.prepare(t.task_options, DatasetCache(study.cache)))
        total, _ = build_model(t, fields).param_counts()
        assert abs(total - t.target_params) <= 0.02 * t.target_params, (t.cell, total)


def test_paper_preset_with_explicit_overrides(tmp_path):
    data = tiny_study_dict(tmp_path, preset="paper", tasks=[{"name": "sva"}, {"name": "wikitext2"}])
    data.pop("model")
    data["train"] = {"epochs": 2, "batch_size": 32}
    study = parse_study(data)
    from studies.plan import model_and_train

    model, train = model_and_train(study, "sva")
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["d_ff"]) == (32, 1, 1, 64)
    assert train["epochs"] == 2 and train["batch_size"] == 32 and train["lr"] == 5e-4 and "steps" not in train
    model, train = model_and_train(study, "wikitext2")
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["d_ff"]) == (128, 2, 4, 512)


def test_paper_preset_rejects_tasks_without_one(tmp_path):
    assert "no set-up for task(s) ['mqar']" in _error(tmp_path, preset="paper")


def test_saved_study_copy_plans_the_same_trials(tmp_path):
    """The copy beside the ledger keeps unset keys unset, so presets and defaults resolve alike."""
    data = tiny_study_dict(tmp_path, preset="paper", tasks=[{"name": "sva"}])
    data.pop("model")
    data["train"] = {"epochs": 1}
    study = parse_study(data)
    copy = tmp_path / "copy.yaml"
    copy.write_text(study.model_copy(update={"storage": study.storage_uri()}).to_yaml())
    from studies.plan import model_and_train

    assert model_and_train(load_study(copy), "sva") == model_and_train(study, "sva")
    assert "d_model" not in yaml.safe_load(copy.read_text()).get("model", {})


def test_plan_estimates_time_from_bench_figures(tmp_path, monkeypatch):
    import json

    from studies.plan import cell_costs

    bench = {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0, "vocab_size": 100},
             "rows": [{"part": "step", "T": 50, "case": "softmax", "tokens_per_s": 1000.0},
                      {"part": "step", "T": 50, "case": "oscillator d2", "tokens_per_s": 500.0},
                      {"part": "attention", "T": 50, "case": "softmax", "tokens_per_s": 9e9}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    monkeypatch.setenv("SCALING_BENCH_JSON", str(tmp_path / "bench.json"))
    study = parse_study(tiny_study_dict(tmp_path))
    costs = {c.cell: c for c in cell_costs(study, make_plan(study))}
    assert all(c.seconds_per_trial and c.seconds_per_trial > 0 for c in costs.values())
    assert all(c.params_total > 0 and c.flops_per_trial > 0 for c in costs.values())
    monkeypatch.setenv("SCALING_BENCH_JSON", str(tmp_path / "missing.json"))
    assert all(c.seconds_per_trial is None for c in cell_costs(study, make_plan(study)))


def test_storage_directory_that_moved_is_its_own_storage(tmp_path):
    """A study directory copied elsewhere (a clone, committed results) reads its own ledger, not
    the absolute path recorded in its study copy."""
    import shutil

    study = parse_study(tiny_study_dict(tmp_path))
    original = tmp_path / "original"
    original.mkdir()
    (original / "study.yaml").write_text(study.model_copy(update={"storage": str(original)}).to_yaml())
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    assert load_study(moved).storage_uri().rstrip("/").endswith(str(moved.resolve()).lstrip("/"))
    assert load_study(moved / "study.yaml").storage == str(original)  # a file is taken as written
