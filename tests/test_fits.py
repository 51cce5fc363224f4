"""scaling.fits: recovery of known laws, interval coverage, and the awkward cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_record, write_synthetic_study
from scaling import api, laws, synthetic
from scaling import fits as fitting
from scaling.fits import fit_gap_vs_dosc, fit_power_law


def _gap_fits(rows, *, n_boot=400, level=0.95, rng_seed=0, methods=fitting.GAP_METHODS, task="lm", metric="val_loss",
              floor=False):
    data = fitting.select_rows(rows, task)
    draws = fitting.SeedDraws(data.seeds, n_boot, rng_seed, stream=task)
    cells = fitting.gap_cells(data.rows, variant="oscillator", baseline="softmax", x_of="d_osc", metric=metric)
    fits = fitting.fit_gap_law(cells, study="s", task=task, law="gap_vs_dosc", variant="oscillator", baseline="softmax",
                         metric=metric, draws=draws, ci_level=level, methods=methods, floor=floor)
    return {f.method: f for f in fits}


def _loss_fit(rows, *, n_boot=400, level=0.95, rng_seed=0, variant="softmax"):
    data = fitting.select_rows(rows, "lm")
    draws = fitting.SeedDraws(data.seeds, n_boot, rng_seed, stream="lm")
    return fitting.fit_loss_vs_params(data.rows, study="s", task="lm", variant=variant, metric="val_loss", draws=draws,
                                ci_level=level)


def test_fit_power_law_exact():
    d = np.array([2.0, 4, 8, 16, 32])
    c, alpha, r2 = fit_power_law(d, 3.0 * d**-0.8)
    assert c == pytest.approx(3.0) and alpha == pytest.approx(0.8) and r2 == pytest.approx(1.0)


def test_variable_projection_matches_scipy_curve_fit():
    from scipy.optimize import curve_fit

    x = np.array([2.0, 4, 8, 16, 32])
    rng = np.random.default_rng(3)
    Y = 3 * x**-0.8 + 0.5 + rng.normal(0, 0.02, (200, 5))
    out = laws.power_vp_batch(x, Y, floor=True)  # a bootstrap-sized batch (coarse grid path)
    for b in range(5):
        p, _ = curve_fit(lambda x, C, a, g: C * x**-a + g, x, Y[b], p0=[3, 0.8, 0.5], maxfev=20000)
        assert [out["C"][b], out["alpha"][b], out["g_inf"][b]] == pytest.approx(p, rel=1e-5, abs=1e-6)
    single = laws.power_vp_batch(x, Y[:1], floor=False)
    p, _ = curve_fit(lambda x, C, a: C * x**-a, x, Y[0], p0=[3, 0.8], maxfev=20000)
    assert [single["C"][0], single["alpha"][0]] == pytest.approx(p, rel=1e-5)


def test_recovers_known_law_with_ci(tmp_path):
    study = api.open_study(str(write_synthetic_study(tmp_path / "s", C=2.0, alpha=0.7, noise=0.01)))
    fits = {f.method: f for f in api.fits(study, law="gap_vs_dosc", n_boot=600)}
    assert set(fits) == {"loglog-means", "nonlinear"}
    for fit in fits.values():
        assert fit.ok and fit.variant == "oscillator" and fit.baseline == "softmax"
        alpha = fit.constants["alpha"]
        assert alpha.ci_low < 0.7 < alpha.ci_high
        assert alpha.value == pytest.approx(0.7, abs=0.05)
        assert fit.constants["C"].ci_low < 2.0 < fit.constants["C"].ci_high
        assert fit.n_points == 5 and fit.n_seeds == 5 and fit.r2 > 0.98
        assert fit.heldout["x"] == 32 and abs(fit.heldout["rel_error"]) < 0.2
        assert len(fit.loo["points"]) == 5 and fit.loo["rmse"] < 0.05
        assert all(p["band_low"] <= p["fit"] <= p["band_high"] for p in fit.points)
        assert all(abs(p["residual"]) < 0.05 for p in fit.points)
    assert fits["nonlinear"].model == "power"  # no floor in the data: the simpler model predicts better
    assert fits["loglog-means"].r2_space == "log" and fits["nonlinear"].r2_space == "linear"


def test_gaps_are_paired_by_seed():
    # a large seed effect shared by variant and baseline cancels exactly when paired
    rows = []
    for seed, offset in enumerate([0.0, 5.0, -3.0]):
        rows.append(make_record(key=f"b{seed}", seed=seed, metric_value=10 + offset).to_dict())
        for d in (2, 4, 8):
            rows.append(make_record(key=f"o{d}{seed}", seed=seed, variant="oscillator", d_osc=d,
                                    metric_value=10 + offset + d**-1.0).to_dict())
    fit = fit_gap_vs_dosc(rows, study="s", task="lm", variant="oscillator", baseline="softmax", metric="val_loss", n_boot=200)
    assert fit.constants["alpha"].value == pytest.approx(1.0)
    assert fit.constants["alpha"].ci_high - fit.constants["alpha"].ci_low < 1e-5  # no noise left after pairing


def test_unpaired_seed_uses_baseline_mean_and_says_so():
    rows = [make_record(key="b0", seed=0, metric_value=1.0).to_dict()]
    rows += [make_record(key=f"o{d}", seed=7, variant="oscillator", d_osc=d, metric_value=1 + 1 / d).to_dict() for d in (2, 4)]
    fit = fit_gap_vs_dosc(rows, study="s", task="lm", variant="oscillator", baseline="softmax", metric="val_loss", n_boot=50)
    assert any("no baseline with the same seed" in n for n in fit.notes)
    # two d_osc values and one seed identify nothing: no headline number, one sentence why
    assert not fit.ok and fit.reason == "2 d_osc value(s) with runs; the law needs at least 3"
    assert fit.constants["alpha"].ci_low is None and fit.to_row()["reason"] == fit.reason


def test_non_positive_gaps_are_left_out_of_loglog_but_fitted_by_nonlinear(tmp_path):
    study_dir = write_synthetic_study(tmp_path / "s", C=1.0, alpha=1.0, noise=0.01, ds=(2, 4, 8))
    from storage.ledger import Ledger

    base = {r["seed"]: r["metric_value"] for r in api.open_study(str(study_dir)).rows if r["variant"] == "softmax"}
    # d=64: the law says 0.016; the runs measure a mean gap of 0 (the variant matches the baseline)
    for s, gap in zip(range(5), (0.01, -0.01, 0.005, -0.005, 0.0)):
        Ledger(str(study_dir)).append(make_record(key=f"lm-osc-d64-s{s}", task="lm", variant="oscillator", d_osc=64,
                                                  seed=s, cell="lm/oscillator/d64", metric_value=base[s] + gap))
    fits = {f.method: f for f in api.fits(api.open_study(str(study_dir)), n_boot=300)}
    loglog, nonlinear = fits["loglog-means"], fits["nonlinear"]
    # paper A's method cannot take the log of a mean gap at zero: unidentified, saying where
    assert not loglog.ok and loglog.reason.startswith("the mean gap at d_osc 64 (") and "not clearly above zero" in loglog.reason
    assert nonlinear.ok and nonlinear.n_points == 4  # the zero gap is data here
    assert [p["used"] for p in nonlinear.points] == [True] * 4
    assert nonlinear.points[-1]["mean"] == pytest.approx(0.0, abs=1e-12)
    a = nonlinear.constants["alpha"]
    assert a.ci_low < a.value < a.ci_high and a.ci_low < 1.0 < a.ci_high


def test_all_negative_gaps_do_not_crash():
    rows = synthetic.gap_study_rows(C=-1.0, alpha=0.5, seed_effect=0.0, variant_noise=0.01, baseline_noise=0.0)
    fits = _gap_fits(rows, n_boot=200)
    assert not fits["loglog-means"].ok and "not clearly above zero" in fits["loglog-means"].reason
    nl = fits["nonlinear"]
    assert nl.ok and nl.constants["C"].value == pytest.approx(-1.0, rel=0.1)
    assert nl.constants["alpha"].value == pytest.approx(0.5, abs=0.1)


def test_floor_is_fitted_when_the_study_asks_and_suggested_when_the_data_have_one():
    rows = synthetic.gap_study_rows(C=4.0, alpha=1.0, g_inf=1.0, ds=(2, 4, 8, 16, 32, 64), seed_effect=0.0,
                                    variant_noise=0.01, baseline_noise=0.0, rng=1)
    plain = _gap_fits(rows)["nonlinear"]
    assert plain.model == "power" and "consider `fits: floor: true`" in plain.selection["summary"]
    assert plain.selection["loo_rmse"]["power_floor"] < plain.selection["loo_rmse"]["power"]
    fits = _gap_fits(rows, floor=True)
    nl = fits["nonlinear"]
    assert nl.model == "power_floor" and nl.selection["chosen"] == "power_floor"
    g = nl.constants["g_inf"]
    assert g.ci_low < 1.0 < g.ci_high and g.value == pytest.approx(1.0, abs=0.05)
    assert nl.constants["alpha"].value == pytest.approx(1.0, abs=0.05)
    assert "g_inf" in nl.to_row() and nl.to_row()["g_inf"] == pytest.approx(g.value)
    # paper A's method cannot see a floor: it reports a flatter exponent and predicts d=64 worse
    assert fits["loglog-means"].constants["alpha"].value < 0.6
    assert abs(fits["loglog-means"].heldout["error"]) > abs(nl.heldout["error"])


def test_too_few_points_is_a_failed_fit_with_a_reason():
    rows = [make_record(key="b", metric_value=1.0).to_dict(),
            make_record(key="o", variant="oscillator", d_osc=2, metric_value=2.0).to_dict()]
    fit = fit_gap_vs_dosc(rows, study="s", task="lm", variant="oscillator", baseline="softmax", metric="val_loss")
    assert not fit.ok and math.isnan(fit.constants["alpha"].value)
    assert fit.reason == "1 d_osc value(s) with runs; the law needs at least 3"
    assert fit.notes[0] == f"not identified: {fit.reason}"
    assert fit.to_row()["alpha"] is None  # JSON-safe


def test_diverged_and_failed_trials_are_excluded_and_counted(tmp_path):
    extra = [make_record(key="lm-osc-d2-s9", task="lm", variant="oscillator", d_osc=2, seed=9, status="diverged",
                         metric_value=None, cell="lm/oscillator/d2"),
             make_record(key="lm-osc-d4-s9", task="lm", variant="oscillator", d_osc=4, seed=9, status="failed",
                         metric_value=None, cell="lm/oscillator/d4"),
             make_record(key="lm-osc-d8-s9", task="lm", variant="oscillator", d_osc=8, seed=9, status="completed",
                         metric_value=float("nan"), cell="lm/oscillator/d8")]
    study = api.open_study(str(write_synthetic_study(tmp_path / "s", noise=0.0, extra_rows=extra)))
    for fit in api.fits(study, n_boot=100):
        assert all(p["n_seeds"] == 5 for p in fit.points)
        assert fit.excluded == {"diverged": 1, "failed": 1, "non-finite": 1}
        row = fit.to_row()
        assert (row["excluded_diverged"], row["excluded_failed"], row["excluded_non_finite"]) == (1, 1, 1)


def test_a_failed_attempt_that_was_retried_is_not_counted():
    rows = synthetic.gap_study_rows(ds=(2, 4, 8), seed_effect=0.0)
    retried = next(r for r in rows if r["variant"] == "oscillator")
    rows.append({**retried, "status": "failed", "metric_value": None})
    assert fitting.select_rows(rows, "lm").excluded == []


def test_search_stage_and_duplicate_trials_do_not_enter_the_fit():
    rows = synthetic.gap_study_rows(ds=(2, 4, 8), seed_effect=0.0, variant_noise=0.0, baseline_noise=0.0)
    osc = next(r for r in rows if r["variant"] == "oscillator")
    rows.append({**osc, "key": "search-1", "stage": "search", "metric_value": 99.0})
    rows.append({**osc, "key": "older", "metric_value": 55.0, "finished_at": "2025-01-01T00:00:00+00:00"})
    data = fitting.select_rows(rows, "lm")
    assert any("search-stage" in n for n in data.notes) and any("duplicate" in n for n in data.notes)
    assert 99.0 not in [r["metric_value"] for r in data.rows] and 55.0 not in [r["metric_value"] for r in data.rows]


def test_no_baseline_gives_a_reason():
    rows = [make_record(key=f"o{d}", variant="oscillator", d_osc=d, metric_value=1 + 1 / d).to_dict() for d in (2, 4, 8)]
    fit = fit_gap_vs_dosc(rows, study="s", task="lm", variant="oscillator", baseline="softmax", metric="val_loss")
    assert not fit.ok and any("no completed softmax baseline" in n for n in fit.notes)


def test_accuracy_gap_is_positive_when_the_variant_is_worse():
    rows = synthetic.gap_study_rows(C=-5.0, alpha=0.5, base=90.0, metric_name="val_accuracy", seed_effect=0.0,
                                    variant_noise=0.01, baseline_noise=0.0)  # accuracy below the baseline's
    fits = _gap_fits(rows, metric="val_accuracy", n_boot=200)
    assert fits["loglog-means"].ok and fits["loglog-means"].constants["C"].value == pytest.approx(5.0, rel=0.05)
    assert any("higher is better" in n for n in fits["loglog-means"].notes)


def test_widen_factor_is_the_t_correction():
    assert fitting.widen_factor(0.9, 5) == pytest.approx(math.sqrt(5 / 4) * 2.131847 / 1.644854, rel=1e-5)
    assert fitting.widen_factor(0.9, 1000) == pytest.approx(1.0, abs=0.01)


# ---- validity: do the intervals cover the truth? ------------------------------------------------

# The gap laws' coverage (95% profile intervals, 2-5 seeds, noise 1-30x the smallest gap) is
# checked in tests/test_trust.py and benchmarked by `python -m scaling.coverage`.


@pytest.mark.slow  # 100 simulated fits (~11 s); tests/test_trust.py checks coverage in the default run
def test_loss_law_90_percent_intervals_cover_the_truth_100_replicates():
    """The same validity check for L = E + A N^-alpha: 5 sizes x 5 seeds, 1% multiplicative seed noise."""
    hits = {"alpha": 0, "E": 0, "A": 0}
    truth = {"alpha": 0.4, "E": 2.0, "A": 400.0}
    with laws.single_threaded_blas():
        for rep in range(100):
            fit = _loss_fit(synthetic.loss_study_rows(E=2.0, A=400.0, alpha=0.4, noise=0.01, rng=rep), n_boot=1000,
                            level=0.9, rng_seed=rep)
            for k in hits:
                hits[k] += fit.constants[k].ci_low <= truth[k] <= fit.constants[k].ci_high
    assert all(80 <= h <= 97 for h in hits.values()), hits


# ---- loss vs parameters -------------------------------------------------------------------------

def test_loss_vs_params_recovers_the_law_and_bootstrap_solver_agrees_with_lbfgs():
    from scipy.optimize import minimize

    rows = synthetic.loss_study_rows(E=2.0, A=400.0, alpha=0.4, noise=0.005, rng=4)
    fit = _loss_fit(rows, n_boot=400)
    assert fit.ok and fit.law == "loss_vs_params" and fit.model == "offset_power" and fit.method == "huber-log"
    for name, true in (("E", 2.0), ("A", 400.0), ("alpha", 0.4)):
        est = fit.constants[name]
        assert est.ci_low < true < est.ci_high, (name, est)
    assert fit.constants["E"].ci_low > 0 and fit.constants["A"].ci_low > 0  # positive constants, log-scale intervals
    assert fit.r2 > 0.99 and len(fit.loo["points"]) == 5 and fit.heldout["x"] == 16_000_000
    assert abs(fit.heldout["rel_error"]) < 0.02
    # the batched Newton refits reach the same optimum L-BFGS finds from there
    data = fitting.select_rows(rows, "lm")
    y = np.array([r["metric_value"] for r in data.rows])
    x = np.array([r["params_non_embedding"] for r in data.rows], dtype=float)
    problem = laws.HuberLogProblem(x, y, 0.01)
    theta, _ = laws.offset_power_point_fit(problem, y)
    W = np.random.default_rng(0).multinomial(5, [0.2] * 5, size=20)[:, [r["seed"] for r in data.rows]].astype(float)
    theta_b, values, converged = laws.damped_newton_batch(problem, np.tile(theta, (20, 1)), W)
    assert converged.all()
    for b in range(20):
        res = minimize(problem.fun_and_grad_single, theta_b[b], args=(W[b],), jac=True, method="L-BFGS-B",
                       options={"gtol": 1e-12, "ftol": 1e-15})
        assert res.fun >= values[b] - 1e-10
        assert np.abs(res.x - theta_b[b]).max() < 1e-4


def test_loss_fit_from_a_grid_of_starts_finds_the_global_optimum():
    rows = synthetic.loss_study_rows(E=0.5, A=50.0, alpha=0.25, noise=0.002, rng=2)
    fit = _loss_fit(rows, n_boot=100)
    assert fit.constants["alpha"].value == pytest.approx(0.25, abs=0.03)
    assert fit.constants["E"].value == pytest.approx(0.5, rel=0.1)


def test_loss_fit_refuses_accuracy_and_too_few_sizes():
    rows = synthetic.loss_study_rows(sizes=(1_000_000, 2_000_000))
    fit = _loss_fit(rows)
    assert not fit.ok and any("needs >= 3 parameter counts" in n for n in fit.notes)
    rows = [dict(r, metric_name="val_accuracy") for r in synthetic.loss_study_rows()]
    data = fitting.select_rows(rows, "lm")
    fit = fitting.fit_loss_vs_params(data.rows, study="s", task="lm", variant="softmax", metric="val_accuracy",
                               draws=fitting.SeedDraws(data.seeds, 50, 0, "lm"))
    assert not fit.ok and any("higher is better" in n for n in fit.notes)


def test_a_full_grid_gives_every_law_per_size_and_d():
    rows = synthetic.scaling_grid_rows(tasks=("lm",), variants={"softmax": None, "oscillator": [2, 4, 8, 16]},
                                       sizes=(1_000_000, 2_000_000, 4_000_000), seeds=range(3), diverged_every=41)
    study = api.StudyResults("grid", "/nowhere", {"baseline": "softmax"}, rows, None)
    fits = api.fits(study, n_boot=200)
    by_law = {}
    for f in fits:
        by_law.setdefault(f.law, []).append(f)
    assert len(by_law["gap_vs_dosc"]) == 3 * 2  # per size, two methods
    assert {f.group["target_params"] for f in by_law["gap_vs_dosc"]} == {1_000_000, 2_000_000, 4_000_000}
    assert len(by_law["gap_vs_params"]) == 4 * 2  # per d_osc, two methods
    assert len(by_law["loss_vs_params"]) == 1 + 4  # softmax, and oscillator at each d_osc
    assert all(f.ok for f in fits if f.law != "gap_vs_params")
    # 3 sizes x 3 seeds with a small gap: the gap in parameters is not detected at p < 0.001, and says so
    for f in by_law["gap_vs_params"]:
        assert f.ok or f.reason.startswith(("no gap detected: a zero gap at every parameter count",
                                            "the gap at parameter count", "the gap is detected, but not strongly"))
    # the generating law: gap = 1.5 d^-0.7 times a loss of ~2-2.3, so alpha ~0.7 at every size
    for f in by_law["gap_vs_dosc"]:
        assert 0.5 < f.constants["alpha"].value < 0.9
    assert sum(sum(f.excluded.values()) for f in by_law["loss_vs_params"]) > 0
    rows_out = [f.to_row() for f in fits]
    assert len({tuple(sorted(r)) for r in rows_out}) == 1  # the same columns for every law


# ---- queries on a fit ---------------------------------------------------------------------------

def test_predict_from_fit(tmp_path):
    study = api.open_study(str(write_synthetic_study(tmp_path / "s", C=2.0, alpha=0.7, noise=0.005)))
    out = api.predict(study, task="lm", variant="oscillator", d_osc=64, n_boot=400)
    assert out["gap"] == pytest.approx(2.0 * 64**-0.7, rel=0.1)
    assert out["ci_low"] <= out["gap"] <= out["ci_high"]
    assert out["pi_low"] <= out["ci_low"] and out["pi_high"] >= out["ci_high"]  # a new run also has seed noise
    assert out["extrapolated"] and out["method"] == "nonlinear"
    inside = api.predict(study, task="lm", variant="oscillator", d_osc=8, method="loglog-means", n_boot=400)
    assert not inside["extrapolated"] and inside["method"] == "loglog-means"
    with pytest.raises(api.QueryError, match="no usable gap_vs_dosc fit"):
        api.predict(study, task="lm", variant="kuramoto", d_osc=64)
    with pytest.raises(api.QueryError, match="positive point"):
        api.predict(study, task="lm", variant="oscillator", d_osc=-1)


def test_prediction_interval_covers_new_runs():
    """A 90% prediction interval for one new seed at a new d covers most new runs."""
    rows = synthetic.gap_study_rows(C=1.5, alpha=0.6, seed_effect=0.0, variant_noise=0.05, baseline_noise=0.05, rng=9)
    fit = _gap_fits(rows, n_boot=800, level=0.9, methods=["nonlinear"])["nonlinear"]
    out = fit.predict(24.0, n_seeds=1)
    rng = np.random.default_rng(0)
    # a new seed's gap: its variant run minus its own baseline run, each with seed noise
    new_runs = 1.5 * 24.0**-0.6 + rng.normal(0, 0.05, 2000) - rng.normal(0, 0.05, 2000)
    covered = np.mean((new_runs >= out["pi_low"]) & (new_runs <= out["pi_high"]))
    assert 0.8 <= covered <= 0.995, covered
    assert fit.predict(24.0, n_seeds=5)["pi_high"] < out["pi_high"]  # a mean of 5 seeds is less noisy


def test_difference_of_exponents():
    same = synthetic.gap_study_rows(C=1.5, alpha=0.6, rng=1) + [
        dict(r, variant="oscillator_b", key=r["key"] + "b", cell=r["cell"].replace("oscillator", "oscillator_b"))
        for r in synthetic.gap_study_rows(C=1.0, alpha=0.6, rng=2) if r["variant"] == "oscillator"]
    study = api.StudyResults("s", "/nowhere", {"baseline": "softmax"}, same, None)
    out = api.compare(study, a=("lm", "oscillator"), b=("lm", "oscillator_b"), law="gap_vs_dosc", method="loglog-means")
    assert out["ci_low"] < 0 < out["ci_high"] and "conservative" in out["note"]
    steeper = synthetic.gap_study_rows(C=1.5, alpha=1.2, rng=3, task="lm2", seed_effect=0.0, variant_noise=0.005)
    study = api.StudyResults("s", "/nowhere", {"baseline": "softmax"}, same + steeper, None)
    out = api.compare(study, a=("lm2", "oscillator"), b=("lm", "oscillator"), method="loglog-means")
    assert not out["paired"] and out["diff"] == pytest.approx(0.6, abs=0.15) and out["ci_low"] > 0
    table = api.exponent_differences(api.fits(study, law="gap_vs_dosc", method="loglog-means"))
    assert len(table) == 2  # two variants of lm; oscillator across lm and lm2


def test_fit_to_dict_is_json_ready():
    import json

    fits = _gap_fits(synthetic.gap_study_rows(), n_boot=100)
    for fit in fits.values():
        text = json.dumps(fit.to_dict(), allow_nan=False)
        assert "boot" not in json.loads(text)


# ---- speed (issue 7: a 500-trial ledger, 2,000 bootstrap draws per fit, all fits <= 5 s on 2 cores) ----

@pytest.mark.bench
def test_bench_all_fits_on_a_500_trial_ledger(tmp_path):
    """Reproduce: .venv/bin/python -m pytest -m bench tests/test_fits.py -s
    (SCALING_BENCH_OUT=DIR also writes DIR/fits_bench.json). Ratios are taken within this one run."""
    import contextlib
    import json
    import os
    import time

    import yaml

    from scaling.report import render
    from storage.ledger import Ledger
    from storage.records import TrialRecord

    rows = synthetic.scaling_grid_rows(diverged_every=37)  # 2 tasks x 4 sizes x 5 seeds x (softmax + 2 x 6 d_osc)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"name": "bench", "baseline": "softmax"}))
    ledger = Ledger(str(tmp_path))
    for row in rows:
        ledger.append(TrialRecord(**row))

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - wall, time.process_time() - cpu

    def calibration():  # a fixed single-threaded numpy workload, to compare machines and loads
        rng = np.random.default_rng(0)
        with laws.single_threaded_blas():
            for _ in range(10):
                a = rng.normal(size=(2000, 60))
                np.sort(np.exp(a) @ a.T, axis=1)

    fitting.widen_factor(0.95, 5)  # one-off imports (scipy.special, scipy.optimize) outside the timings
    import scipy.optimize  # noqa: F401

    _, cal_wall, cal_cpu = timed(calibration)
    study, read_wall, _ = timed(lambda: api.open_study(str(tmp_path)))
    api._CACHE.clear()
    fits, fit_wall, fit_cpu = timed(lambda: api.fits(study, n_boot=2000))
    api._CACHE.clear()
    original = laws.single_threaded_blas
    laws.single_threaded_blas = contextlib.nullcontext  # the same fits with OpenBLAS threads left on
    try:
        _, threaded_wall, _ = timed(lambda: api.fits(study, n_boot=2000))
    finally:
        laws.single_threaded_blas = original
    _, render_wall, _ = timed(lambda: render(study, fits))
    by_law = {}
    for f in fits:
        by_law[f.law] = by_law.get(f.law, 0) + 1
    result = {
        "trials": len(rows), "fits": len(fits), "fits_by_law": by_law, "n_boot": 2000, "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "seconds": {"read_ledger": read_wall, "all_fits_wall": fit_wall, "all_fits_cpu": fit_cpu,
                    "all_fits_blas_threads_on_wall": threaded_wall, "render_report": render_wall,
                    "calibration_wall": cal_wall, "calibration_cpu": cal_cpu},
        "ratios": {"fits_wall_over_5s_budget": fit_wall / 5.0, "fits_cpu_over_5s_budget": fit_cpu / 5.0,
                   "fits_over_calibration": fit_wall / cal_wall, "blas_threads_on_over_off": threaded_wall / fit_wall},
    }
    print(json.dumps(result, indent=1))
    out = os.environ.get("SCALING_BENCH_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "fits_bench.json"), "w") as handle:
            json.dump(result, handle, indent=1)
    assert len(rows) >= 500 and all(f.n_boot == 2000 for f in fits) and all(f.ok for f in fits)
    assert fit_cpu <= 5.0, result  # CPU time: what the fits cost on an otherwise idle core
