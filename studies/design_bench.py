"""Benchmark of adaptive designs on simulated studies: at equal budgets, the width of alpha's 95%
interval from the adaptive design (the real DesignSampler on Optuna, batched) against the uniform
grid, and the coverage of both.

Each simulated study has a known law and seed noise as the coverage benchmark (scaling.coverage):
gap = C d^-alpha with paper A's WikiText-2 constants (C 15, alpha 0.45), d_osc 2-32 (powers of two),
seed noise of one run `noise` x the smallest gap (d 32), half of its variance a seed effect shared
by the seed's baseline and variant runs. The grid at budget B runs B // 6 seeds of (baseline + 5
d_osc): 30 -> 5 seeds, 60 -> 10. The adaptive design gets the same number of trials and as many
seeds as it wants (the pool is large), proposing `batch` trials at a time for concurrent workers.
Both are fitted by the service's fits (scaling.fits, nonlinear method). Width: the median over all
studies, an unidentified fit counted as an infinitely wide interval; coverage: the share of
identified fits whose interval holds the true alpha. A reference column: the same rules with the
criterion evaluated at the TRUE law (an oracle: what the design would do if it knew alpha), and the
asymptotic floor: the locally c-optimal design's width against the grid's (scaling.optimal_design).
A study's seed effects and run noise are common to its three designs (common random numbers).

    python -m studies.design_bench [--reps 50] [--budgets 30 60] [--noise 1] [--batch 5] [--strategy gain|plan] [--json FILE]
    scaling bench --design --json FILE
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np

from scaling import design as D
from scaling import fits as fitting
from scaling import laws, synthetic

C_TRUE, ALPHA_TRUE = 15.0, 0.45
DS = (2.0, 4.0, 8.0, 16.0, 32.0)


class World:
    """One simulated study: a seed's effect and each run's noise are fixed functions of the study's
    key, the seed and the run (common random numbers): the grid, the adaptive design and the oracle
    of one study that run the same (arm, d_osc, seed) see the same value, so their widths are
    compared on the same luck (each design alone sees independent draws of the law, as before;
    the ratio of medians is much less noisy: on independent streams two 50-study runs of the same
    fixed design differed by 0.11 in ratio)."""

    def __init__(self, noise: float, key: tuple[int, ...]) -> None:
        sd = noise * C_TRUE * DS[-1] ** (-ALPHA_TRUE)
        self.part = sd / math.sqrt(2)
        self.key = tuple(int(k) for k in key)

    def _normal(self, *where: int) -> float:
        return float(np.random.default_rng([*self.key, *where]).normal(0, self.part))

    def value(self, point: D.Point) -> float:
        theta = self._normal(point.seed, 0)
        gap = 0.0 if point.arm == D.BASELINE else C_TRUE * point.x ** (-ALPHA_TRUE)
        return 150.0 + theta + gap + self._normal(point.seed, 1 + (0 if point.x is None else int(point.x)))


def fit_alpha(runs: list[tuple[D.Point, float]]) -> fitting.Estimate | None:
    """alpha by the service's fit (nonlinear method); None when not identified."""
    rows = []
    for point, value in runs:
        variant = "softmax" if point.arm == D.BASELINE else "oscillator"
        d = None if point.x is None else int(point.x)
        rows.append(synthetic.row(key=f"{variant}-{d}-{point.seed}", cell=synthetic.cell_name("lm", variant, d, None),
                                  task="lm", variant=variant, d_osc=d, seed=point.seed, metric_value=value,
                                  metric_name="val_ppl"))
    data = fitting.select_rows(rows, "lm")
    cells = fitting.gap_cells(data.rows, variant="oscillator", baseline="softmax", x_of="d_osc", metric="val_ppl")
    (fit,) = fitting.fit_gap_law(cells, study="bench", task="lm", law="gap_vs_dosc", variant="oscillator",
                           baseline="softmax", metric="val_ppl", draws=fitting.SeedDraws(data.seeds, 1, 0, "lm"),
                           methods=("nonlinear",))
    return fit.constants["alpha"] if fit.ok else None


def grid_runs(budget: int, world: World) -> list[tuple[D.Point, float]]:
    out = []
    for s in range(budget // (len(DS) + 1)):
        for point in [D.Point(D.BASELINE, None, s)] + [D.Point(D.VARIANT, x, s) for x in DS]:
            out.append((point, world.value(point)))
    return out


def adaptive_runs(budget: int, world: World, batch: int, seed: int,
                  strategy: str | None = None) -> tuple[list[tuple[D.Point, float]], list[dict]]:
    """The real sampler on an in-memory Optuna study: ask `batch` proposals (the earlier ones in
    flight), run them, tell their values; until the budget is spent."""
    import optuna

    from studies.design import DesignSampler, ask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = DesignSampler(xs=list(DS), seeds=list(range(budget)), cap=budget, budget=budget,
                            target=D.Target("alpha"), sign=1.0, strategy=strategy)
    study = optuna.create_study(sampler=sampler, study_name=f"bench-{seed}")
    runs, proposals = [], []
    while True:
        asked = []
        for _ in range(batch):
            got = ask(study, sampler)
            if got is None:
                break
            asked.append(got)
        if not asked:
            return runs, proposals
        for number, point, info in asked:
            value = world.value(point)
            study.tell(number, value)
            runs.append((point, value))
            proposals.append(info)


def oracle_design(budget: int, batch: int, strategy: str | None = None) -> list[D.Point]:
    """The same rules with the criterion evaluated at the TRUE law instead of the fitted one: what
    the sampler would do if it knew alpha (a reference no real study can reach)."""
    state = D.State(DS, tuple(range(budget)), budget, budget, D.Target("alpha"), known=(ALPHA_TRUE, C_TRUE),
                    strategy=strategy or D.DEFAULT_STRATEGY)
    made = []
    while (proposal := D.propose(state)) is not None:
        state.take(proposal)
        made.append(proposal.point)
    return made


def c_optimal_bound() -> dict[str, Any]:
    """The asymptotic floor of the ratio: the locally c-optimal approximate design for alpha at the
    true law (scaling.optimal_design.bound) against the grid's full blocks, over every block of
    runs a seed can make, and over those with the seed's baseline (the sampler's)."""
    from scaling import optimal_design as O

    out = {}
    for name, paired in (("any_blocks", False), ("paired_blocks", True)):
        b = O.bound(DS, ALPHA_TRUE, C=C_TRUE, paired=paired)
        out[name] = {"ratio": b["ratio"], "support": b["support"]}
    out["ratio"] = out["any_blocks"]["ratio"]
    return out


def _allocation(points: list[D.Point]) -> dict[str, int]:
    out = {"baseline": sum(p.arm == D.BASELINE for p in points)}
    for x in DS:
        out[f"d{int(x)}"] = sum(p.x == x for p in points)
    return out


def _mean_allocation(designs: list[list[D.Point]]) -> dict[str, float]:
    """Runs per arm and seeds, averaged over the adaptive studies."""
    if not designs:
        return {}
    out = {k: float(np.mean([_allocation(d)[k] for d in designs])) for k in _allocation(designs[0])}
    out["seeds"] = float(np.mean([len({p.seed for p in d}) for d in designs]))
    return out


def ratio_interval(top: list[fitting.Estimate | None], bottom: list[fitting.Estimate | None],
                   draws: int = 2000) -> list[float] | None:
    """95% bootstrap interval of median width(top) / median width(bottom), resampling the studies
    (paired: one study gives both widths); None where a median is infinite in over 2.5% of draws."""
    def widths(estimates):
        return np.array([math.inf if e is None else e.ci_high - e.ci_low for e in estimates])

    a, b = widths(top), widths(bottom)
    idx = np.random.default_rng(0).integers(0, len(a), size=(draws, len(a)))
    with np.errstate(invalid="ignore"):
        ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    ratios = np.sort(np.where(np.isfinite(ratios), ratios, math.inf))
    low, high = ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]
    return [float(low), float(high)] if math.isfinite(low) and math.isfinite(high) else None


def summarise(estimates: list[fitting.Estimate | None]) -> dict[str, Any]:
    widths = [math.inf if e is None else e.ci_high - e.ci_low for e in estimates]
    ok = [e for e in estimates if e is not None]
    median = float(np.median(widths))
    return {"median_width": median if math.isfinite(median) else None,
            "median_width_identified": float(np.median([e.ci_high - e.ci_low for e in ok])) if ok else None,
            "coverage": sum(e.ci_low <= ALPHA_TRUE <= e.ci_high for e in ok) / len(ok) if ok else None,
            "identified": len(ok) / len(estimates)}


def run(reps: int = 50, budgets=(30, 60), noise: float = 1.0, batch: int = 5, seed: int = 0,
        strategy: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bound = c_optimal_bound()
    with laws.single_threaded_blas():
        for budget in budgets:
            oracle = oracle_design(budget, batch, strategy)
            tallies: dict[str, list] = {"grid": [], "adaptive": [], "oracle": []}
            sequences, tallies_points = [], []
            for rep in range(reps):
                world = World(noise, (seed, budget, rep))  # one world per study, common to the three designs
                tallies["grid"].append(fit_alpha(grid_runs(budget, world)))
                runs, proposals = adaptive_runs(budget, world, batch, rep, strategy)
                tallies["adaptive"].append(fit_alpha(runs))
                tallies_points.append([p for p, _ in runs])
                if rep == 0:
                    sequences = proposals
                tallies["oracle"].append(fit_alpha([(p, world.value(p)) for p in oracle]))
            grid, adaptive, best = (summarise(tallies[k]) for k in ("grid", "adaptive", "oracle"))
            ratio = (adaptive["median_width"] / grid["median_width"]
                     if adaptive["median_width"] and grid["median_width"] else None)
            out[str(budget)] = {
                "grid_width": grid["median_width"], "adaptive_width": adaptive["median_width"], "ratio": ratio,
                "ratio_ci": ratio_interval(tallies["adaptive"], tallies["grid"]),
                "grid_coverage": grid["coverage"], "adaptive_coverage": adaptive["coverage"],
                "grid_identified": grid["identified"], "adaptive_identified": adaptive["identified"],
                "grid_trials": (budget // (len(DS) + 1)) * (len(DS) + 1), "adaptive_trials": budget,
                "oracle": {"allocation": _allocation(oracle), "width": best["median_width"],
                                      "ratio": (best["median_width"] / grid["median_width"]
                                                if best["median_width"] and grid["median_width"] else None),
                                      "ratio_ci": ratio_interval(tallies["oracle"], tallies["grid"]),
                                      "coverage": best["coverage"]},
                "c_optimal_bound": {**bound, "width": (bound["ratio"] * grid["median_width"]
                                                       if grid["median_width"] else None)},
                "adaptive_allocation_mean": _mean_allocation(tallies_points),
                # per study (null: not identified); the worlds depend on (seed, budget, study) only, so
                # runs with another --strategy are paired study by study
                "widths": {k: [None if e is None else e.ci_high - e.ci_low for e in v] for k, v in tallies.items()},
                "first_sequence": [{"point": p["point"], "rule": p["rule"], "expected_gain": p["expected_gain"]}
                                   for p in sequences],
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| budget (trials) | grid: median width | coverage | adaptive: median width | coverage | ratio | "
             "same rules knowing alpha (oracle): ratio | c-optimal bound: ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for budget, r in result["design"].items():
        fixed = r["oracle"]
        ci = r.get("ratio_ci")
        span = f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""
        lines.append(f"| {budget} | {_f(r['grid_width'])} | {_f(r['grid_coverage'])} | {_f(r['adaptive_width'])} | "
                     f"{_f(r['adaptive_coverage'])} | {_f(r['ratio'])}{span} | {_f(fixed['ratio'])} | "
                     f"{_f(r['c_optimal_bound']['ratio'])} |")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="simulated studies per budget (default 50)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[30, 60])
    parser.add_argument("--noise", type=float, default=1.0, help="seed noise of one run, x the smallest gap (default 1)")
    parser.add_argument("--batch", type=int, default=5, help="proposals per batch (concurrent workers; default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", choices=D.STRATEGIES, default=D.DEFAULT_STRATEGY,
                        help=f"the sampler's rule after start and completion (default {D.DEFAULT_STRATEGY})")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    for name in ("reps", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if any(b < 2 * (len(DS) + 1) for b in args.budgets):
        parser.error(f"--budgets must each be >= {2 * (len(DS) + 1)} (a grid of 2 seeds); got {args.budgets}")
    if not math.isfinite(args.noise) or args.noise <= 0:
        parser.error(f"--noise must be a positive number (got {args.noise})")
    started = time.perf_counter()
    result = {"design": run(args.reps, tuple(args.budgets), args.noise, args.batch, args.seed, args.strategy),
              "settings": {"reps": args.reps, "noise": args.noise, "batch": args.batch, "seed": args.seed,
                           "strategy": args.strategy,
                           "law": {"C": C_TRUE, "alpha": ALPHA_TRUE, "d_osc": list(DS)}}}
    result["settings"]["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(result))
    print(f"\n{args.reps} simulated studies per budget, noise {args.noise:g}x, batch {args.batch}, "
          f"strategy {args.strategy}; "
          f"{result['settings']['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
