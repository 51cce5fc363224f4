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
criterion evaluated at the TRUE law (an oracle: what the design would do if it knew alpha).

    python -m studies.design_bench [--reps 50] [--budgets 30 60] [--noise 1] [--batch 5] [--json FILE]
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
    """One simulated study: the seed effects are drawn once per seed, each run adds its own noise."""

    def __init__(self, noise: float, rng: np.random.Generator) -> None:
        sd = noise * C_TRUE * DS[-1] ** (-ALPHA_TRUE)
        self.part = sd / math.sqrt(2)
        self.rng = rng
        self.shared: dict[int, float] = {}

    def value(self, point: D.Point) -> float:
        theta = self.shared.setdefault(point.seed, self.rng.normal(0, self.part))
        gap = 0.0 if point.arm == D.BASELINE else C_TRUE * point.x ** (-ALPHA_TRUE)
        return 150.0 + theta + gap + self.rng.normal(0, self.part)


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


def adaptive_runs(budget: int, world: World, batch: int, seed: int) -> tuple[list[tuple[D.Point, float]], list[dict]]:
    """The real sampler on an in-memory Optuna study: ask `batch` proposals (the earlier ones in
    flight), run them, tell their values; until the budget is spent."""
    import optuna

    from studies.design import DesignSampler, ask

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = DesignSampler(xs=list(DS), seeds=list(range(budget)), cap=budget, budget=budget,
                            target=D.Target("alpha"), sign=1.0)
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


def oracle_design(budget: int, batch: int) -> list[D.Point]:
    """The same rules with the criterion evaluated at the TRUE law instead of the fitted one: what
    the sampler would do if it knew alpha (a reference no real study can reach)."""
    state = D.State(DS, tuple(range(budget)), budget, budget, D.Target("alpha"), known=(ALPHA_TRUE, C_TRUE))
    made = []
    while (proposal := D.propose(state)) is not None:
        state.pending.append(proposal.point)
        state.remaining -= 1
        made.append(proposal.point)
    return made


def _allocation(points: list[D.Point]) -> dict[str, int]:
    out = {"baseline": sum(p.arm == D.BASELINE for p in points)}
    for x in DS:
        out[f"d{int(x)}"] = sum(p.x == x for p in points)
    return out


def summarise(estimates: list[fitting.Estimate | None]) -> dict[str, Any]:
    widths = [math.inf if e is None else e.ci_high - e.ci_low for e in estimates]
    ok = [e for e in estimates if e is not None]
    median = float(np.median(widths))
    return {"median_width": median if math.isfinite(median) else None,
            "median_width_identified": float(np.median([e.ci_high - e.ci_low for e in ok])) if ok else None,
            "coverage": sum(e.ci_low <= ALPHA_TRUE <= e.ci_high for e in ok) / len(ok) if ok else None,
            "identified": len(ok) / len(estimates)}


def run(reps: int = 50, budgets=(30, 60), noise: float = 1.0, batch: int = 5, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    with laws.single_threaded_blas():
        for budget in budgets:
            oracle = oracle_design(budget, batch)
            tallies: dict[str, list] = {"grid": [], "adaptive": [], "oracle": []}
            sequences = []
            for rep in range(reps):
                world = World(noise, rng)  # one world per study: the arms see independent runs of the same law
                tallies["grid"].append(fit_alpha(grid_runs(budget, world)))
                runs, proposals = adaptive_runs(budget, World(noise, rng), batch, rep)
                tallies["adaptive"].append(fit_alpha(runs))
                if rep == 0:
                    sequences = proposals
                oracle_world = World(noise, rng)
                tallies["oracle"].append(fit_alpha([(p, oracle_world.value(p)) for p in oracle]))
            grid, adaptive, best = (summarise(tallies[k]) for k in ("grid", "adaptive", "oracle"))
            ratio = (adaptive["median_width"] / grid["median_width"]
                     if adaptive["median_width"] and grid["median_width"] else None)
            out[str(budget)] = {
                "grid_width": grid["median_width"], "adaptive_width": adaptive["median_width"], "ratio": ratio,
                "grid_coverage": grid["coverage"], "adaptive_coverage": adaptive["coverage"],
                "grid_identified": grid["identified"], "adaptive_identified": adaptive["identified"],
                "grid_trials": (budget // (len(DS) + 1)) * (len(DS) + 1), "adaptive_trials": budget,
                "oracle": {"allocation": _allocation(oracle), "width": best["median_width"],
                                      "ratio": (best["median_width"] / grid["median_width"]
                                                if best["median_width"] and grid["median_width"] else None),
                                      "coverage": best["coverage"]},
                "first_sequence": [{"point": p["point"], "rule": p["rule"], "expected_gain": p["expected_gain"]}
                                   for p in sequences],
            }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| budget (trials) | grid: median width | coverage | adaptive: median width | coverage | ratio | same rules knowing alpha (oracle): ratio |",
             "|---|---|---|---|---|---|---|"]
    for budget, r in result["design"].items():
        fixed = r["oracle"]
        lines.append(f"| {budget} | {_f(r['grid_width'])} | {_f(r['grid_coverage'])} | {_f(r['adaptive_width'])} | "
                     f"{_f(r['adaptive_coverage'])} | {_f(r['ratio'])} | {_f(fixed['ratio'])} |")
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
    result = {"design": run(args.reps, tuple(args.budgets), args.noise, args.batch, args.seed),
              "settings": {"reps": args.reps, "noise": args.noise, "batch": args.batch, "seed": args.seed,
                           "law": {"C": C_TRUE, "alpha": ALPHA_TRUE, "d_osc": list(DS)}}}
    result["settings"]["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(result))
    print(f"\n{args.reps} simulated studies per budget, noise {args.noise:g}x, batch {args.batch}; "
          f"{result['settings']['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
