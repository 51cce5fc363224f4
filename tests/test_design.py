"""Adaptive designs over the study's own axes: the study file's `design:` block, the sampler's rules
(space-filling start, completion, gain, batches), the Optuna state a killed driver resumes from, and
status/report over a design's ledger. No training: trial results are drawn from a known law."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import make_record, tiny_study_dict
from scaling import design as D


# ---- the study file ---------------------------------------------------------------------------

def _adaptive(tmp_path, **design):
    data = tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator"}], seeds=[0, 1, 2, 3])
    data["design"] = {"d_osc": {"low": 2, "high": 16}, "budget": 12, **design}
    return data


def _error(data) -> str:
    from studies.spec import StudyError, parse_study

    with pytest.raises(StudyError) as info:
        parse_study(data)
    return str(info.value)


def test_a_design_block_resolves_its_axes(tmp_path):
    from studies.plan import make_plan
    from studies.spec import design_axes, parse_study

    study = parse_study(_adaptive(tmp_path, target={"predict": {"d_osc": 64}}))
    axes = design_axes(study)
    assert axes["xs"] == [2.0, 4.0, 8.0, 16.0] and axes["variant"] == "oscillator" and axes["cap"] == 4
    assert axes["target"] == {"kind": "predict", "x0": 64.0, "x_name": "d_osc"}
    plan = make_plan(study)
    assert plan.trials == [] and plan.design_trials == 12 and plan.stage_counts() == {"grid": 0, "design": 12}


@pytest.mark.parametrize("design, words", [
    ({"budget": 7}, ["design.budget = 7", "below 8", "space-filling start", "raise the budget"]),
    ({"d_osc": {"low": 2, "high": 4}}, ["design.d_osc", "[2, 4]", "at least 3"]),
    ({"d_osc": {"low": 3, "high": 3}}, ["no power of two from 3 to 3"]),
    ({"d_osc": [1, 2, 4]}, ["[1] are < 2"]),
    ({"seeds_per_point": 9}, ["design.seeds_per_point = 9", "4 seeds", "list more seeds"]),
    ({"target": "beta"}, ["design.target", "'beta'", "alpha"]),
    ({"target": {"predict": {"d_osc": 1}}}, ["predict.d_osc = 1", "outside"]),
    ({"budget": 0}, ["design.budget", "greater than or equal to 1"]),
    ({"initial_seeds": 5}, ["design.initial_seeds = 5", "seeds_per_point 4"]),
    ({"nope": 1}, ["design.nope", "unknown key", "budget"]),
])
def test_bad_design_blocks_name_the_field_value_and_fix(tmp_path, design, words):
    message = _error(_adaptive(tmp_path, **design))
    for word in words:
        assert word in message, message


def test_design_rules_against_the_rest_of_the_study(tmp_path):
    data = _adaptive(tmp_path, variant="softmax")
    assert "design.variant = 'softmax' must be one of the study's variants other than the baseline" in _error(data)
    data = _adaptive(tmp_path)
    data["search"] = {"sampler": "random", "trials_per_cell": 2, "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
    assert "cannot be combined with `search:`" in _error(data)
    data = _adaptive(tmp_path)
    del data["design"]
    assert "variants[1]: variant oscillator needs d_osc" in _error(data)
    data = _adaptive(tmp_path)  # after a grid: the budget must leave room beyond the grid's trials
    data["variants"] = [{"name": "softmax"}, {"name": "oscillator", "d_osc": [2, 8]}]
    assert "below 13, the grid's 12 trials" in _error(data)  # 4 seeds x (softmax, d2, d8)


# ---- the sampler's rules ------------------------------------------------------------------------

C_TRUE, ALPHA_TRUE = 15.0, 0.45


def _value(point: D.Point, rng, shared: dict, sd: float) -> float:
    theta = shared.setdefault(point.seed, rng.normal(0, sd))
    gap = 0.0 if point.arm == D.BASELINE else C_TRUE * point.x ** (-ALPHA_TRUE)
    return 150.0 + theta + gap + rng.normal(0, sd)


def _run(state: D.State, rng, batch: int = 1, sd: float = 2.2):
    shared: dict = {}
    made = []
    while state.remaining > 0:
        asked = []
        for _ in range(batch):
            proposal = D.propose(state)
            if proposal is None:
                break
            state.take(proposal)
            asked.append(proposal)
        if not asked:
            break
        for proposal in asked:
            state.pending.remove(proposal.point)
            state.observed.append((proposal.point, _value(proposal.point, rng, shared, sd)))
        made += asked
    return made


def test_start_then_completion_then_gain_and_every_x_keeps_two_seeds():
    state = D.State((2.0, 4.0, 8.0, 16.0, 32.0), tuple(range(8)), 8, 18, D.Target("alpha"))
    made = _run(state, np.random.default_rng(0))
    assert len(made) == 18 and len(set(p.point for p in made)) == 18  # the budget, no point twice
    start = [p.point for p in made[:8]]
    assert [p.rule for p in made[:8]] == ["start"] * 8
    assert {p.x for p in start if p.x} == {2.0, 8.0, 32.0} and {p.seed for p in start} == {0, 1}
    assert {p.rule for p in made[8:]} <= {"gain", "complete"} and any(p.rule == "gain" for p in made[8:])
    for p in made[8:]:
        if p.rule == "gain":
            assert p.expected_gain is not None and p.expected_gain > 0 and p.point == p.move[0]
    points = [p.point for p in made]
    base = {p.seed for p in points if p.arm == D.BASELINE}
    for x in {p.x for p in points if p.x}:
        seeds = {p.seed for p in points if p.x == x}
        assert len(seeds) >= 2 and seeds <= base  # identifiable: two seeds per x, each paired with its baseline
    fit = D.current_fit(state.observed, state.target)
    assert fit.reason == "" and fit.width is not None


def test_a_batch_spreads_instead_of_repeating_a_point():
    state = D.State((2.0, 4.0, 8.0, 16.0, 32.0), tuple(range(8)), 8, 16, D.Target("alpha"))
    made = _run(state, np.random.default_rng(1), batch=4)
    assert len(made) == 16 and len({p.point for p in made}) == 16


def test_expected_width_falls_with_more_runs_and_prefers_informative_points():
    draws = [(0.45, np.array([15.0]))]
    base = [D.Point(D.BASELINE, None, s) for s in range(3)]
    design = base + [D.Point(D.VARIANT, x, s) for s in range(3) for x in (2.0, 8.0, 32.0)]
    w = D.expected_width(design, draws, D.Target("alpha"), 1.0)
    assert math.isfinite(w)
    assert D.expected_width(design + [D.Point(D.VARIANT, 32.0, 0)], draws, D.Target("alpha"), 1.0) < w
    # alpha is about how the gap falls: at the far end a run says more than one where the gap is flat
    far = D.expected_width(design + [D.Point(D.VARIANT, 2.0, 0)], draws, D.Target("alpha"), 1.0)
    assert far < w
    # too few x values: no interval at all
    assert D.expected_width(base + [D.Point(D.VARIANT, 2.0, s) for s in range(3)], draws, D.Target("alpha"), 1.0) == math.inf


def test_seed_cap_and_budget_are_respected():
    state = D.State((2.0, 8.0, 32.0), (0, 1, 2), 3, 40, D.Target("predict", 64.0))
    made = _run(state, np.random.default_rng(2))
    assert len(made) == 12  # 3 seeds x (baseline + 3 x): nothing feasible beyond the cap
    assert D.propose(state) is None


# ---- Optuna state: a killed driver resumes the design --------------------------------------------

def _sampler(prior=None, budget=12):
    from studies.design import DesignSampler

    return DesignSampler(xs=[2, 4, 8, 16, 32], seeds=list(range(6)), cap=6, budget=budget, target=D.Target("alpha"),
                         prior=prior)


def test_proposals_live_in_optuna_storage_and_a_new_driver_continues(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from studies.design import ATTR, ask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = str(tmp_path / "design.log")
    rng, shared = np.random.default_rng(3), {}

    def open_study():
        sampler = _sampler()
        return optuna.create_study(study_name="s/design", storage=JournalStorage(JournalFileBackend(path)),
                                   sampler=sampler, load_if_exists=True), sampler

    study, sampler = open_study()
    for _ in range(10):
        number, point, info = ask(study, sampler)
        assert info["point"]["seed"] == point.seed
        study.tell(number, _value(point, rng, shared, 2.2))
    number, point, _ = ask(study, sampler)  # asked, then the driver dies before telling it
    del study, sampler

    study, sampler = open_study()
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert running.number == number and running.system_attrs[ATTR]["point"]["x"] == point.x
    state = sampler.state(study)
    assert state.remaining == 1 and point in state.pending and len(state.observed) == 10
    study.tell(number, _value(point, rng, shared, 2.2))
    last = ask(study, sampler)
    assert last is not None and last[1] not in {D.Point(**t.system_attrs[ATTR]["point"]) for t in study.trials[:-1]}
    study.tell(last[0], _value(last[1], rng, shared, 2.2))
    assert ask(study, sampler) is None  # budget of 12 spent
    gains = [t.system_attrs[ATTR]["expected_gain"] for t in study.trials]
    assert all(g is None for g in gains[:8]) and any(g for g in gains[8:])  # the start has no gain; later ones do


def test_the_searcher_serves_the_design_and_settles_a_dead_drivers_trials(tmp_path):
    from scaling import api
    from scaling.report import _design_section
    from storage.ledger import Ledger
    from studies.design_search import DesignSearcher
    from studies.plan import make_plan
    from studies.runner import save_plan, save_study_file, study_paths, trial_counts
    from studies.spec import parse_study

    study = parse_study(_adaptive(tmp_path, budget=10, batch=4))
    save_study_file(study, study_paths(study))
    save_plan(make_plan(study), study_paths(study))
    ledger = Ledger(study.storage_uri())
    rng, shared = np.random.default_rng(4), {}

    def finish(searcher, trial_id):
        spec = searcher.live[trial_id][0]
        point = D.Point("baseline" if spec.variant == "softmax" else "variant",
                        None if spec.d_osc is None else float(spec.d_osc), spec.seed)
        ledger.append(make_record(key=spec.key, study="tiny", cell=spec.cell, task="mqar", variant=spec.variant,
                                  d_osc=spec.d_osc, seed=spec.seed, stage="design",
                                  metric_value=_value(point, rng, shared, 0.05)))
        searcher.on_trial_complete(trial_id, {})

    searcher = DesignSearcher(study, [], 0)
    for i in range(6):
        assert searcher.suggest(f"t{i}") is not None
        finish(searcher, f"t{i}")
    config = searcher.suggest("t6")  # in flight when the driver dies
    key = searcher.live["t6"][0].key
    del searcher

    searcher = DesignSearcher(study, [], 0)
    again = searcher.suggest("u0")  # the unfinished trial runs again: same key, so it resumes its checkpoint
    assert again == config and searcher.live["u0"][0].key == key
    finish(searcher, "u0")
    n = 1
    while (config := searcher.suggest(f"u{n}")) not in (None, "FINISHED"):
        finish(searcher, f"u{n}")
        n += 1
    assert config == "FINISHED" and len(ledger.rows()) == 10
    design = json.loads((tmp_path / "study" / "design.json").read_text())
    assert [p["state"] for p in design["proposals"]] == ["completed"] * 10
    assert {p["rule"] for p in design["proposals"]} >= {"start"} and design["budget"] == 10

    # status, the design's report section and its API: the same trials, counted in the cells chosen
    assert trial_counts(study) == {"completed": 10, "failed": 0, "missing": 0}
    opened = api.open_study(study.storage_uri())
    cells = api.status(opened)
    assert "design" not in cells and cells["mqar/softmax"]["completed"] >= 2  # a spent design has no row of zeros
    assert sum(c["completed"] for c in cells.values()) == 10
    info = api.design(opened)
    assert [w["after_trials"] for w in info["widths"]] == [0, 4, 8, 10]  # start, then every batch of 4
    assert info["widths"][-1]["identified"] and info["widths"][-1]["width"] > 0
    page, md = _design_section(opened)  # the report's section (the whole report draws plots: slow)
    md = "\n".join(md)
    assert "Adaptive design" in "".join(page) and "Design sequence" in md and "space-filling start" in md
    assert "batch 3 (10 design trials)" in md

    from fastapi.testclient import TestClient

    from scaling.server import create_app

    client = TestClient(create_app(str(tmp_path), "t0ken"))
    got = client.get("/studies/study/design", headers={"Authorization": "Bearer t0ken"})
    assert got.status_code == 200 and len(got.json()["proposals"]) == 10 and got.json()["widths"][-1]["identified"]
    assert client.get("/studies/study/design").status_code == 401
    (tmp_path / "study" / "design.json").unlink()
    assert client.get("/studies/study/design", headers={"Authorization": "Bearer t0ken"}).status_code == 404


# ---- the benchmark --------------------------------------------------------------------------------

@pytest.mark.bench
def test_scaling_bench_design_writes_the_issue_schema(tmp_path):
    from scaling.cli import main

    out = tmp_path / "design.json"
    assert main(["bench", "--design", "--reps", "2", "--budgets", "12", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["design"]["12"]
    for name in ("grid_width", "adaptive_width", "ratio", "grid_coverage", "adaptive_coverage"):
        assert name in result
    assert result["adaptive_trials"] == 12 and len(result["first_sequence"]) == 12
    assert result["c_optimal_bound"]["ratio"] == pytest.approx(0.8557, abs=2e-4)
    assert len(result["widths"]["grid"]) == 2 and "ratio_ci" in result


# ---- end to end on local Ray ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.ray
def test_a_grid_then_a_design_runs_end_to_end_and_a_rerun_repeats_nothing(tmp_path):
    from storage.ledger import Ledger
    from studies.runner import run_study
    from studies.spec import parse_study

    data = tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2, 8]}], seeds=[0, 1, 2])
    data["design"] = {"d_osc": [2, 4, 8, 16], "budget": 13}
    study = parse_study(data)
    result = run_study(study, num_cpus=2, progress=False)
    assert result.ok, result.counts
    rows = Ledger(study.storage_uri()).rows()
    assert len(rows) == 13 and sum(r["stage"] == "design" for r in rows) == 4
    design = json.loads((tmp_path / "study" / "design.json").read_text())
    assert [p["state"] for p in design["proposals"]] == ["completed"] * 4 and design["grid_trials"] == 9
    assert "Adaptive design" in (tmp_path / "study" / "report.md").read_text()
    again = run_study(study, num_cpus=2, progress=False, report=False)
    assert again.ran == 0 and len(Ledger(study.storage_uri()).rows()) == 13


# ---- c-optimal designs (scaling.optimal_design) and the plan rule -------------------------------------

def _slr(xs):
    return np.array([np.outer([1.0, x], [1.0, x]) for x in xs])


@pytest.mark.parametrize("method", ["multiplicative", "slsqp"])
def test_c_optimal_matches_simple_linear_regression_analytically(method):
    from scaling import optimal_design as O

    xs = [-1.0, -0.5, 0.0, 0.5, 1.0]
    # the slope: half the runs at each end, variance 1
    slope = O.c_optimal(_slr(xs), np.ones(5), np.array([0.0, 1.0]), method=method, tol=1e-10)
    assert np.allclose(slope.weights, [0.5, 0, 0, 0, 0.5], atol=1e-3) and math.exp(slope.value) == pytest.approx(1.0, rel=1e-6)
    # the mean at x0 = 2 (an extrapolation): Elfving's weights (1 + x0) / 2x0 = 3/4 at +1, variance x0^2 = 4
    far = O.c_optimal(_slr(xs), np.ones(5), np.array([1.0, 2.0]), method=method, tol=1e-10)
    assert np.allclose(far.weights, [0.25, 0, 0, 0, 0.75], atol=1e-3) and math.exp(far.value) == pytest.approx(4.0, rel=1e-6)
    assert 0 <= far.gap < 1e-6  # the certificate: no design is better by more than the gap


def test_block_information_is_the_fits_information():
    """The blocks' information adds up to what expected_width computes from the runs (seed levels
    projected out), so the plan and the gain rule speak of the same variance."""
    from scipy.special import stdtrit

    from scaling import optimal_design as O

    blocks = [(None, 2.0, 8.0, 32.0), (None, 2.0, 8.0, 32.0), (None, 16.0), (2.0, 16.0)]
    points = [D.Point(D.BASELINE, None, s) if x is None else D.Point(D.VARIANT, x, s)
              for s, block in enumerate(blocks) for x in block]
    M = sum(O.block_info(b, 0.45) for b in blocks)
    df = len(points) - len(blocks) - 2
    width = D.expected_width(points, [(0.45, np.array([1.0]))], D.Target("alpha"), 1.0)
    assert width == pytest.approx(2 * stdtrit(df, 0.975) * math.sqrt(np.linalg.inv(M)[1, 1]), rel=1e-9)
    assert np.allclose(O.block_info((None,), 0.45), 0)  # a lone run says nothing once its seed level is fitted


def test_the_c_optimal_bound_at_the_benchmark_law():
    """The finding behind the benchmark's bound column: for alpha at C 15, alpha 0.45, d 2-32, the
    c-optimal design is 0.856x the grid's width in the limit, its blocks {baseline, 16} and {2, 16};
    0.863x with the baseline in every block; the same whether the seed level is a fixed effect or a
    random one sharing any part of the noise (the ratio is the same under both models)."""
    from scaling import optimal_design as O

    xs = [2, 4, 8, 16, 32]
    any_block = O.bound(xs, 0.45, C=15.0)
    assert any_block["ratio"] == pytest.approx(0.8557, abs=2e-4) and any_block["gap"] < 1e-8
    assert [s["block"] for s in any_block["support"]] == [["baseline", 16.0], [2.0, 16.0]]
    assert [round(s["share"], 2) for s in any_block["support"]] == [0.61, 0.39]
    paired = O.bound(xs, 0.45, paired=True)
    assert paired["ratio"] == pytest.approx(0.8628, abs=2e-4)
    assert [s["block"] for s in paired["support"]] == [["baseline", 2.0, 16.0, 32.0], ["baseline", 16.0]]
    for shared in (0.0, 0.5, 0.9):
        assert O.bound(xs, 0.45, model="random", shared=shared)["ratio"] == pytest.approx(any_block["ratio"], abs=2e-4)
    assert O.bound(xs, 0.45, against=[((None, 2.0, 4.0, 8.0, 16.0, 32.0), 1.0)])["ratio"] == pytest.approx(any_block["ratio"])
    assert O.bound(xs, 0.45, against=[((None, 16.0), 0.608), ((2.0, 16.0), 0.392)])["ratio"] == pytest.approx(1.0, abs=1e-3)


def test_the_two_solvers_agree_on_a_pseudo_bayesian_augmentation():
    from scaling import optimal_design as O

    blocks = O.block_types([2, 4, 8, 16, 32], paired=True)
    alphas = [0.2, 0.45, 0.9]
    infos = O.stack_infos(blocks, alphas)
    c = np.array([O.target_vector("alpha", a) for a in alphas])
    made = np.array([O.block_info((None, 2.0, 8.0, 32.0), a) * 2 for a in alphas])  # the start, two seeds
    costs = [len(b) for b in blocks]
    one = O.c_optimal(infos, costs, c, M0=made, budget=22, tol=1e-9)
    two = O.c_optimal(infos, costs, c, M0=made, budget=22, method="slsqp")
    assert one.value == pytest.approx(two.value, abs=1e-6) and one.gap < 1e-6 and two.gap < 1e-6
    # averaging over alpha spreads the design: more block types than at one alpha
    local = O.c_optimal(infos[1:2], costs, c[1:2], tol=1e-9)
    spread = O.c_optimal(infos, costs, c, tol=1e-9)
    assert (spread.weights > 1e-3).sum() >= 2 and {blocks[i] for i in np.flatnonzero(local.weights > 1e-3)} != \
        {blocks[i] for i in np.flatnonzero(spread.weights > 1e-3)}


def test_the_plan_rule_spends_the_budget_in_whole_blocks_and_keeps_the_fits_rules():
    state = D.State((2.0, 4.0, 8.0, 16.0, 32.0), tuple(range(20)), 20, 30, D.Target("alpha"), strategy="plan")
    made = _run(state, np.random.default_rng(5), batch=5)
    assert len(made) == 30 and len({p.point for p in made}) == 30
    assert [p.rule for p in made[:8]] == ["start"] * 8 and {p.rule for p in made[8:]} <= {"plan", "complete", "gain"}
    plans = [p for p in made if p.rule == "plan"]
    assert len(plans) >= 15 and any("c-optimal plan for the 22 trial(s) left" in p.reason for p in plans)
    assert all(p.expected_gain is not None and p.point == p.move[0] for p in plans)
    points = [p.point for p in made]
    base = {p.seed for p in points if p.arm == D.BASELINE}
    for x in {p.x for p in points if p.x}:
        assert len({p.seed for p in points if p.x == x}) >= 2
    assert {p.seed for p in points} == base  # every seed has its baseline
    for p in made:  # a block begun is finished: a seed's baseline is followed by its planned variant runs
        if p.rule == "plan" and p.point.arm == D.BASELINE:
            assert all(q in points for q in p.move)
    assert D.current_fit(state.observed, state.target).reason == ""


def test_the_plan_at_the_known_law_follows_the_c_optimal_blocks():
    """Knowing alpha, after the start the plan runs the c-optimal paired blocks {baseline, 2, 16, 32}
    and {baseline, 16} (and 16 on the start's seeds), and never d 4."""
    state = D.State((2.0, 4.0, 8.0, 16.0, 32.0), tuple(range(60)), 60, 60, D.Target("alpha"), known=(0.45, 15.0),
                    strategy="plan")
    made = []
    while (proposal := D.propose(state)) is not None:
        state.take(proposal)
        made.append(proposal.point)
    assert len(made) == 60
    seeds = {}
    for p in made:
        seeds.setdefault(p.seed, set()).add(p.x)
    blocks = {tuple(sorted(b, key=lambda x: -1 if x is None else x)) for s, b in seeds.items() if s >= 2}
    assert blocks <= {(None, 16.0), (None, 2.0, 16.0, 32.0), (None, 2.0, 8.0, 16.0, 32.0)}, blocks
    assert not any(p.x == 4.0 for p in made)


def test_a_plan_block_begun_before_a_restart_is_finished_after_it(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from studies.design import DesignSampler, ask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = str(tmp_path / "design.log")
    rng, shared = np.random.default_rng(6), {}

    def open_study():
        sampler = DesignSampler(xs=[2, 4, 8, 16, 32], seeds=list(range(12)), cap=12, budget=16,
                                target=D.Target("alpha"), strategy="plan")
        return optuna.create_study(study_name="s/design", storage=JournalStorage(JournalFileBackend(path)),
                                   sampler=sampler, load_if_exists=True), sampler

    study, sampler = open_study()
    while True:
        number, point, info = ask(study, sampler)
        study.tell(number, _value(point, rng, shared, 2.2))
        if info["rule"] == "plan" and len(info["move"]) > 1:
            break  # a new seed's baseline: the driver dies before its variant runs are asked
    planned = [D.Point(**p) for p in info["move"][1:]]
    del study, sampler
    study, sampler = open_study()
    for want in planned:
        number, point, info = ask(study, sampler)
        assert point == want and info["rule"] == "plan" and info["reason"].startswith("continues its planned block")
        study.tell(number, _value(point, rng, shared, 2.2))
    with pytest.raises(ValueError, match="strategy"):
        DesignSampler(xs=[2, 4], seeds=[0], cap=1, budget=1, target=D.Target("alpha"), strategy="nope")


def test_the_design_rule_is_chosen_in_the_study_file(tmp_path):
    """`design.rule` reaches the sampler; a rule that does not exist is refused naming the field."""
    import yaml

    from studies.spec import StudyError, load_study

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "docs/results/quickstart_adaptive/study.yaml").read_text())
    data["storage"] = str(tmp_path / "run")
    data["design"]["rule"] = "plan"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    assert study.design.rule == "plan"
    from studies.design_search import DesignSearcher

    assert DesignSearcher(study, [], 0).sampler.strategy == "plan"
    data["design"]["rule"] = "greedy"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyError, match=r"design.rule.*'gain' or 'plan'"):
        load_study(path)
