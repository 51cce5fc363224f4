"""Power-law fits with honest uncertainty (numpy only; no torch, no ray).

`gap_vs_dosc`: gap(d) = metric(variant, d) - metric(baseline), paired by seed where the baseline
has that seed (else against the baseline's mean), fitted as gap = C * d^-alpha by least squares of
log gap on log d over the per-d means (paper A's method). Uncertainty: bootstrap over seeds
(resample the seeds within each d cell, refit), percentile intervals. Goodness of fit: R^2 in log
space and the error predicting the largest d from a fit to the others.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

CI_LEVEL = 0.95
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float | None
    ci_high: float | None

    def fmt(self, digits: int = 3) -> str:
        if self.ci_low is None or self.ci_high is None:
            return f"{self.value:.{digits}g}"
        return f"{self.value:.{digits}g} [{self.ci_low:.{digits}g}, {self.ci_high:.{digits}g}]"


@dataclass(frozen=True)
class FitResult:
    study: str
    task: str
    law: str
    variant: str
    baseline: str
    metric: str
    method: str
    constants: dict[str, Estimate]
    r2: float | None
    n_points: int
    n_seeds: int
    n_boot: int
    ci_level: float
    heldout: dict[str, Any] | None
    points: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    ok: bool = True

    def predict(self, x: float) -> float:
        c, alpha = self.constants["C"].value, self.constants["alpha"].value
        return c * x ** (-alpha)

    def to_row(self) -> dict[str, Any]:
        """A flat row for tables, CSV and W&B."""
        row: dict[str, Any] = {
            "study": self.study, "task": self.task, "law": self.law, "variant": self.variant,
            "baseline": self.baseline, "metric": self.metric, "method": self.method, "ok": self.ok,
            "r2": self.r2, "n_points": self.n_points, "n_seeds": self.n_seeds,
        }
        for name, est in self.constants.items():
            row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = est.value, est.ci_low, est.ci_high
        if self.heldout:
            row["heldout_x"], row["heldout_rel_error"] = self.heldout["x"], self.heldout["rel_error"]
        row["notes"] = "; ".join(self.notes)
        return row

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float | None]:
    """(C, alpha, R^2) of y = C * x^-alpha by least squares in log-log space; y must be > 0."""
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (intercept + slope * lx)
    ss_tot = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if len(x) > 2 and ss_tot > 0 else None
    return math.exp(intercept), -slope, r2


def paired_gaps(
    rows: Iterable[dict[str, Any]], *, task: str, variant: str, baseline: str
) -> tuple[dict[int, dict[int, float]], dict[int, float], list[str]]:
    """({d: {seed: gap}}, {seed: baseline value}, notes) from completed ledger rows."""
    notes: list[str] = []
    base: dict[int, float] = {}
    values: dict[int, dict[int, float]] = {}
    for row in rows:
        if row["task"] != task or row["status"] != "completed" or not _finite(row["metric_value"]):
            continue
        if row["variant"] == baseline:
            base[int(row["seed"])] = float(row["metric_value"])
        elif row["variant"] == variant and row["d_osc"] is not None:
            values.setdefault(int(row["d_osc"]), {})[int(row["seed"])] = float(row["metric_value"])
    if not base:
        return {}, {}, [f"no completed {baseline} baseline trials for task {task}"]
    base_mean = float(np.mean(list(base.values())))
    gaps: dict[int, dict[int, float]] = {}
    unpaired = 0
    for d, by_seed in sorted(values.items()):
        for seed, value in by_seed.items():
            if seed not in base:
                unpaired += 1
            gaps.setdefault(d, {})[seed] = value - base.get(seed, base_mean)
    if unpaired:
        notes.append(f"{unpaired} trial(s) had no baseline with the same seed: gap taken to the baseline mean")
    return gaps, base, notes


def fit_gap_vs_dosc(
    rows: list[dict[str, Any]],
    *,
    study: str,
    task: str,
    variant: str,
    baseline: str,
    metric: str,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> FitResult:
    gaps, base, notes = paired_gaps(rows, task=task, variant=variant, baseline=baseline)
    ds = np.array(sorted(gaps), dtype=float)
    means = np.array([np.mean(list(gaps[int(d)].values())) for d in ds])
    points = [
        {"d_osc": int(d), "gap_mean": float(m), "gaps": {str(s): g for s, g in sorted(gaps[int(d)].items())},
         "n_seeds": len(gaps[int(d)])}
        for d, m in zip(ds, means)
    ]
    positive = means > 0
    if (~positive).any():
        notes.append(
            f"d_osc {[int(d) for d in ds[~positive]]}: mean gap <= 0 (variant matches or beats {baseline}); "
            "left out of the log-log fit"
        )
    n_seeds = len({s for by_seed in gaps.values() for s in by_seed} | set(base))
    common = dict(study=study, task=task, law="gap_vs_dosc", variant=variant, baseline=baseline, metric=metric,
                  method="log-log least squares on per-d mean gaps; seed bootstrap",
                  n_seeds=n_seeds, n_boot=n_boot, ci_level=CI_LEVEL, points=points)
    if positive.sum() < 2:
        notes.append("fewer than 2 d_osc values with a positive mean gap: no fit")
        nan = Estimate(float("nan"), None, None)
        return FitResult(**common, constants={"C": nan, "alpha": nan}, r2=None, n_points=int(positive.sum()),
                         heldout=None, notes=notes, ok=False)

    c, alpha, r2 = fit_power_law(ds[positive], means[positive])
    boot = _bootstrap(gaps, ds, n_boot, seed)
    c_ci, alpha_ci = _percentiles(boot[:, 0]), _percentiles(boot[:, 1])
    if len(boot) < 0.9 * n_boot:
        notes.append(f"{n_boot - len(boot)} of {n_boot} bootstrap resamples had < 2 positive points and were dropped")
    band = _band(boot, ds)
    for point, (lo, hi) in zip(points, band):
        point["fit"] = c * point["d_osc"] ** (-alpha)
        point["band_low"], point["band_high"] = lo, hi
    return FitResult(
        **common,
        constants={"C": Estimate(c, *c_ci), "alpha": Estimate(alpha, *alpha_ci)},
        r2=r2,
        n_points=int(positive.sum()),
        heldout=_heldout_largest(ds[positive], means[positive]),
        notes=notes,
    )


def _bootstrap(gaps: dict[int, dict[int, float]], ds: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_ok, 2) array of (C, alpha) refitted on seed resamples within each d cell."""
    rng = np.random.default_rng(seed)
    cells = [np.array(list(gaps[int(d)].values())) for d in ds]
    draws = np.stack([rng.choice(cell, size=(n_boot, len(cell)), replace=True).mean(axis=1) for cell in cells], axis=1)
    out = []
    log_d = np.log(ds)
    for means in draws:
        keep = means > 0
        if keep.sum() < 2:
            continue
        slope, intercept = np.polyfit(log_d[keep], np.log(means[keep]), 1)
        out.append((math.exp(intercept), -slope))
    return np.array(out).reshape(-1, 2)


def _percentiles(samples: np.ndarray) -> tuple[float | None, float | None]:
    if len(samples) == 0:
        return None, None
    tail = (1 - CI_LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _band(boot: np.ndarray, ds: np.ndarray) -> list[tuple[float | None, float | None]]:
    """Pointwise percentile band of the fitted curve at each d."""
    if len(boot) == 0:
        return [(None, None)] * len(ds)
    curves = boot[:, :1] * ds[None, :] ** (-boot[:, 1:2])
    return [_percentiles(curves[:, j]) for j in range(len(ds))]


def _heldout_largest(ds: np.ndarray, means: np.ndarray) -> dict[str, Any] | None:
    """Fit without the largest d and predict it: an out-of-sample check like paper A's d = 64."""
    if len(ds) < 3:
        return None
    c, alpha, _ = fit_power_law(ds[:-1], means[:-1])
    predicted = c * ds[-1] ** (-alpha)
    return {"x": float(ds[-1]), "observed": float(means[-1]), "predicted": float(predicted),
            "rel_error": float((predicted - means[-1]) / means[-1])}


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))
