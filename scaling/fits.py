"""Power-law fits with honest uncertainty (numpy and scipy only; no torch, no ray).

Laws (one FitResult per task, variant, group and method):

- `gap_vs_dosc`: gap(d) = metric(variant, d) - metric(baseline) at the same task and size, paired
  by seed where the baseline has that seed (else taken to the baseline's mean, and said so). Two
  methods side by side:
  * `loglog-means` — paper A's: least squares of log gap on log d over the per-d mean gaps
    (d values whose mean gap is <= 0 cannot enter a log and are left out, with a note);
  * `nonlinear` — least squares on the per-d mean gaps in linear space of gap = C d^-alpha and of
    gap = C d^-alpha + g_inf (an irreducible gap); the one with the lower leave-one-d-out error
    is kept. Zero and negative gaps are ordinary data here.
- `gap_vs_params`: the same two methods with x = parameter count, at one d_osc, paired by seed and size.
- `loss_vs_params`: L(N) = E + A N^-alpha per variant (and d_osc), Huber loss on log residuals,
  minimised by L-BFGS from a grid of starting points (Epoch AI's Chinchilla replication), every
  trial a point.

Uncertainty: the seed is the replicate unit. A bootstrap draw resamples the seeds with replacement
and every cell keeps the drawn seeds it has (one draw for all cells of a task, so the pairing with
the shared baseline survives, and two fits of the same task are compared draw by draw). Every
constant gets a percentile interval widened for the small number of seeds (see `widened_interval`);
the validity test checks coverage on synthetic studies. Also: R^2, residuals, leave-one-x-out and
largest-x-held-out prediction errors, confidence bands, prediction intervals for a new run, and the
interval of the difference of two exponents (`compare_exponents`).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import numpy as np

from scaling import laws
from scaling import profile as P

CI_LEVEL = 0.95
N_BOOT = 2000
LAWS = laws.LAW_NAMES  # the law registry: scaling/laws.py
GAP_METHODS = laws.LAWS["gap_vs_dosc"].methods
PARAM_FIELDS = {"non_embedding": "params_non_embedding", "total": "params_total"}



# ---- results -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float | None
    ci_high: float | None

    def fmt(self, digits: int = 3) -> str:
        if not _finite(self.value):
            return "–"
        if self.ci_low is None or self.ci_high is None:
            return f"{self.value:.{digits}g}"
        return f"{self.value:.{digits}g} [{self.ci_low:.{digits}g}, {self.ci_high:.{digits}g}]"


@dataclass(frozen=True)
class FitResult:
    study: str
    task: str
    law: str  # gap_vs_dosc | gap_vs_params | loss_vs_params
    variant: str
    baseline: str  # "" for loss_vs_params
    metric: str
    method: str  # loglog-means | nonlinear | huber-log
    constants: dict[str, Estimate]
    r2: float | None
    n_points: int
    n_seeds: int
    n_boot: int
    ci_level: float
    heldout: dict[str, Any] | None  # the largest x predicted from a fit to the others
    points: list[dict[str, Any]]  # per x: mean, per-seed values, fit, residual, band
    notes: list[str] = field(default_factory=list)
    ok: bool = True
    model: str = "power"  # power | power_floor | offset_power (scaling.laws)
    x_name: str = "d_osc"  # d_osc | params
    group: dict[str, Any] = field(default_factory=dict)  # what is held fixed: {"target_params": N} or {"d_osc": d}
    loo: dict[str, Any] | None = None  # leave-one-x-out prediction errors
    selection: dict[str, Any] | None = None  # nonlinear: held-out error of each candidate model
    excluded: dict[str, int] = field(default_factory=dict)  # trials left out, by reason
    r2_space: str = "log"
    description: str = ""  # the method in words, for reports
    curve: dict[str, list[float]] | None = None  # dense x grid: fit, band_low, band_high
    boot: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)
    # seed noise of one run around its cell mean (log scale for loss_vs_params), as
    # log sd = intercept + slope log x (noise often shrinks with d_osc), with its degrees of freedom
    noise: dict[str, float] | None = None
    boot_stream: str = ""  # fits with the same stream used the same seed draws (paired)
    min_cell_seeds: int = 0
    x_label: str = ""  # axis label of x: "d_osc" or which parameter count
    # why the data do not identify the law (one sentence, '' when they do): the same on every surface
    reason: str = ""
    calibration: str = ""  # gap laws: "profile" | "joint" (scaling.profile), loss law: "bootstrap"
    holdout: list[dict[str, Any]] = field(default_factory=list)  # out-of-sample checks at held-out x
    uncertainty: Any = field(default=None, repr=False, compare=False)  # what predict() needs (no draws)

    # -- queries --
    @property
    def formula(self) -> str:
        return laws.FORMULAS[self.model].replace("x", "d_osc" if self.x_name == "d_osc" else "N")

    @property
    def group_label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.group.items())

    def value_at(self, x: float | np.ndarray) -> np.ndarray | float:
        out = laws.evaluate(self.model, {k: e.value for k, e in self.constants.items()}, x)
        return float(out) if np.ndim(out) == 0 else out

    def predict(self, x: float, *, n_seeds: int = 1, level: float | None = None) -> dict[str, Any]:
        """The fitted value at x with a confidence interval (of the law's mean) and a prediction
        interval for the mean of `n_seeds` new runs there (seed noise added to the curve draws)."""
        level = level or self.ci_level
        value = float(self.value_at(x))
        out: dict[str, Any] = {"x": float(x), "value": value, "ci_low": None, "ci_high": None, "pi_low": None,
                               "pi_high": None, "level": level, "n_seeds": n_seeds,
                               "extrapolated": not (min(p["x"] for p in self.points) <= x <= max(p["x"] for p in self.points))
                               if self.points else True}
        if not self.ok:
            return out
        if self.uncertainty is not None:  # gap laws: profile likelihood (or the log-log delta method)
            return {**out, **self.uncertainty.predict(float(x), n_seeds=n_seeds, level=level)}
        if self.boot is None or self.min_cell_seeds < 2:
            return out
        draws = laws.evaluate(self.model, self.boot, np.array([x]))[:, 0]
        positive = self.method in ("loglog-means", "huber-log")
        out["ci_low"], out["ci_high"] = widened_interval(value, draws, level, self.min_cell_seeds, log=positive)
        if self.noise and self.noise["df"] >= 1 and out["ci_low"] is not None:
            # new runs = the law's value + seed noise: half-widths add in quadrature, the noise part
            # with t quantiles on the within-cell degrees of freedom
            from scipy.special import stdtrit

            sd = math.exp(self.noise["intercept"] + self.noise["slope"] * math.log(x))
            out["noise_sd"] = sd
            spread = float(stdtrit(self.noise["df"], (1 + level) / 2)) * sd / math.sqrt(n_seeds)
            log = self.law == "loss_vs_params"  # multiplicative seed noise
            centre, low, high = (np.log([value, out["ci_low"], out["ci_high"]]) if log
                                 else (value, out["ci_low"], out["ci_high"]))
            pi_low = centre - math.hypot(centre - low, spread)
            pi_high = centre + math.hypot(high - centre, spread)
            out["pi_low"], out["pi_high"] = (math.exp(pi_low), math.exp(pi_high)) if log else (pi_low, pi_high)
        return out

    def to_row(self) -> dict[str, Any]:
        """A flat row for tables, CSV and W&B: the same columns for every law (None where absent)."""
        row: dict[str, Any] = {
            "study": self.study, "task": self.task, "law": self.law, "variant": self.variant,
            "group": self.group_label, "baseline": self.baseline, "metric": self.metric, "method": self.method,
            "model": self.model, "formula": self.formula, "ok": self.ok, "r2": json_safe(self.r2),
            "n_points": self.n_points, "n_seeds": self.n_seeds, "n_boot": self.n_boot, "ci_level": self.ci_level,
        }
        for name in ("C", "alpha", "g_inf", "E", "A"):
            est = self.constants.get(name)
            row[name] = json_safe(est.value) if est else None
            row[f"{name}_ci_low"] = json_safe(est.ci_low) if est else None
            row[f"{name}_ci_high"] = json_safe(est.ci_high) if est else None
        loo = self.loo or {}
        row["loo_rmse"], row["loo_mean_abs_rel_error"] = json_safe(loo.get("rmse")), json_safe(loo.get("mean_abs_rel_error"))
        held = self.heldout or {}
        row["heldout_x"], row["heldout_rel_error"] = json_safe(held.get("x")), json_safe(held.get("rel_error"))
        for reason in ("diverged", "failed", "pruned", "non-finite"):
            row[f"excluded_{reason.replace('-', '_')}"] = int(self.excluded.get(reason, 0))
        row["identified"] = self.ok
        row["reason"] = self.reason
        row["calibration"] = self.calibration
        row.update(holdout_x=None, holdout_observed=None, holdout_predicted=None, holdout_z=None, holdout_inside=None)
        for check in self.holdout[:1]:  # the first held-out point (paper A: d_osc 64)
            row["holdout_x"], row["holdout_observed"] = check.get("x"), json_safe(check.get("observed"))
            row["holdout_predicted"], row["holdout_z"] = json_safe(check.get("predicted")), json_safe(check.get("z"))
            row["holdout_inside"] = check.get("inside")
        row["notes"] = "; ".join(self.notes)
        return row

    def to_dict(self) -> dict[str, Any]:
        """Everything but the bootstrap draws, JSON-ready (non-finite numbers become None)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("boot", "uncertainty")}
        out["constants"] = {k: {"value": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high} for k, e in self.constants.items()}
        out["formula"] = self.formula
        return json_safe(out)


def plain_number(value: float) -> int | float:
    """3.0 -> 3 (how d_osc values and sizes are printed); other numbers unchanged."""
    return int(value) if float(value).is_integer() else float(value)


def _short(value: Any) -> str:
    if isinstance(value, (int, float)) and abs(value) >= 1e4:
        return f"{value:.3g}"
    return str(value)


# ---- intervals ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def widen_factor(level: float, n: int) -> float:
    """sqrt(n/(n-1)) * t_(n-1) / z: the plug-in bootstrap spread of a mean of n seeds is
    sqrt((n-1)/n) of the unbiased one, and a mean of n seeds follows t with n-1 degrees of freedom,
    not the normal law a plain percentile interval assumes. Without it, 90% intervals from 5 seeds
    cover only ~80% of the time (see tests/test_fits.py)."""
    from scipy.special import ndtri, stdtrit  # t and normal quantiles (scipy.stats is slow to import)

    tail = (1 + level) / 2
    return math.sqrt(n / (n - 1)) * float(stdtrit(n - 1, tail)) / float(ndtri(tail))


def widened_interval(
    estimate: float, draws: np.ndarray, level: float, n: int, *, log: bool = False
) -> tuple[float | None, float | None]:
    """The percentile interval of the draws, its two half-widths around the estimate widened by
    `widen_factor`; (None, None) with fewer than 2 seeds per cell or 20 usable draws. `log=True`
    widens on the log scale (for positive constants: the interval stays positive)."""
    (low, high), = widened_intervals(np.array([estimate], dtype=float), np.asarray(draws, dtype=float)[:, None], level, n,
                                     log=log)
    return low, high


def widened_intervals(
    estimates: np.ndarray, draws: np.ndarray, level: float, n: int, *, log: bool = False
) -> list[tuple[float | None, float | None]]:
    """`widened_interval` for many quantities at once: estimates (G,), draws (B, G)."""
    G = len(estimates)
    if n < 2 or draws.shape[0] == 0:
        return [(None, None)] * G
    if log:
        estimates = np.asarray(estimates, dtype=float)
        positive = (estimates > 0) & ~(draws <= 0).any(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            on_log = widened_intervals(np.log(np.where(positive, estimates, 1.0)), np.log(np.where(positive, draws, 1.0)),
                                       level, n)
        on_linear = widened_intervals(estimates, draws, level, n) if not positive.all() else on_log
        return [(_exp(lo), _exp(hi)) if ok else lin for (lo, hi), lin, ok in zip(on_log, on_linear, positive)]
    ok_count = np.isfinite(draws).sum(axis=0)
    tail = (1 - level) / 2
    if (ok_count == draws.shape[0]).all():
        low, high = np.percentile(draws, [100 * tail, 100 * (1 - tail)], axis=0)
    else:
        low, high = _column_quantiles(draws, ok_count, tail), _column_quantiles(draws, ok_count, 1 - tail)
    k = widen_factor(level, n)
    lo = estimates - k * np.maximum(estimates - low, 0.0)
    hi = estimates + k * np.maximum(high - estimates, 0.0)
    return [(float(a), float(b)) if c >= 20 and np.isfinite(e) and np.isfinite(a) and np.isfinite(b) else (None, None)
            for a, b, c, e in zip(lo, hi, ok_count, estimates)]


def _exp(value: float | None) -> float | None:
    return None if value is None else float(math.exp(value))


def _unique_rows(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, index of each original row among them)."""
    if counts.shape[1] == 0:
        return counts[:1], np.zeros(len(counts), dtype=int)
    patterns, which = np.unique(counts, axis=0, return_inverse=True)
    return patterns, which.reshape(-1)


def _column_quantiles(draws: np.ndarray, counts: np.ndarray, q: float) -> np.ndarray:
    """np.nanpercentile(draws, 100 q, axis=0) (linear interpolation) without its slow per-column loop."""
    ordered = np.sort(np.where(np.isfinite(draws), draws, np.inf), axis=0)  # non-finite sorts last
    pos = np.maximum(counts - 1, 0) * q
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(counts - 1, 0))
    cols = np.arange(draws.shape[1])
    v_lo, v_hi = ordered[lo, cols], ordered[hi, cols]
    with np.errstate(invalid="ignore"):
        out = v_lo + (pos - lo) * (v_hi - v_lo)
    return np.where(counts > 0, out, np.nan)


# ---- the data a fit sees ------------------------------------------------------------------------

HIGHER_IS_BETTER_HINTS = ("acc", "f1", "auc", "score", "recall", "precision")


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities, bits per character: lower is better; accuracies: higher."""
    name = (metric or "").lower()
    return not any(hint in name for hint in HIGHER_IS_BETTER_HINTS)


@dataclass
class TaskRows:
    """A task's usable trials (completed, finite metric, replicate stage; one per cell and seed) and
    what was left out, by cell and reason."""

    task: str
    metric: str
    rows: list[dict[str, Any]]
    excluded: list[tuple[dict[str, Any], str]]  # (row, reason): diverged | failed | pruned | non-finite
    notes: list[str]

    def excluded_where(self, **match: Any) -> dict[str, int]:
        """Counts by reason of the excluded trials whose fields equal `match` (a value may be a set)."""
        out: dict[str, int] = {}
        for row, reason in self.excluded:
            if all(row[k] in v if isinstance(v, (set, frozenset)) else row[k] == v for k, v in match.items()):
                out[reason] = out.get(reason, 0) + 1
        return out

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.rows})


def select_rows(rows: Iterable[dict[str, Any]], task: str) -> TaskRows:
    rows = [r for r in rows if r["task"] == task]
    finished_keys = {r["key"] for r in rows if r["status"] != "failed"}
    excluded: list[tuple[dict[str, Any], str]] = []
    notes: list[str] = []

    def exclude(row: dict[str, Any], reason: str) -> None:
        excluded.append((row, reason))

    best: dict[tuple, dict[str, Any]] = {}
    failed_seen: set[str] = set()
    n_search = n_duplicate = 0
    for row in rows:
        status = row["status"]
        if status == "failed":
            if row["key"] not in finished_keys and row["key"] not in failed_seen:  # retried later: not a loss
                failed_seen.add(row["key"])
                exclude(row, "failed")
            continue
        if row.get("stage", "replicate") == "search":
            n_search += 1
            continue
        if status != "completed":
            exclude(row, status)
            continue
        if not _finite(row["metric_value"]):
            exclude(row, "non-finite")
            continue
        slot = (row["variant"], row["d_osc"], row["target_params"], int(row["seed"]))
        if slot in best:
            n_duplicate += 1
            if str(row.get("finished_at") or "") <= str(best[slot].get("finished_at") or ""):
                continue
        best[slot] = row
    if n_search:
        notes.append(f"{n_search} search-stage trial(s) not used (fits use the replicate trials)")
    if n_duplicate:
        notes.append(f"{n_duplicate} duplicate trial(s) of the same cell and seed: the latest kept")
    used = list(best.values())
    names = sorted({r["metric_name"] for r in used if r.get("metric_name")})
    return TaskRows(task, ", ".join(names) or "metric", used, excluded, notes)


class SeedDraws:
    """Bootstrap draws of the seeds: counts (n_boot, n_seeds), how often each seed was drawn.

    The random stream is named (e.g. by task), so every fit of one task sees the same draws."""

    def __init__(self, seeds: Iterable[int], n_boot: int, rng_seed: int = 0, stream: str = "") -> None:
        self.seeds = sorted({int(s) for s in seeds})
        self.index = {s: i for i, s in enumerate(self.seeds)}
        self.stream = f"{stream}#{rng_seed}"
        self._rng_seed = [rng_seed, zlib.crc32(stream.encode())]
        self._n_boot = n_boot

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """(n_boot, n_seeds), drawn on first use: the gap laws need only the stream's name, and
        2,000 draws of 16,000 seeds take seconds and 250 MB."""
        rng = np.random.default_rng(self._rng_seed)
        n = len(self.seeds)
        return rng.multinomial(n, [1.0 / n] * n, size=self._n_boot).astype(float) if n else np.zeros((self._n_boot, 0))

    @property
    def n_boot(self) -> int:
        return self._n_boot


# ---- gaps ---------------------------------------------------------------------------------------

@dataclass
class GapCells:
    """Per x value (cell j) and seed (column s): the variant's value and its baseline.

    gap = sign * (variant - baseline), sign = +1 when lower is better, so a positive gap means the
    variant is worse than the baseline."""

    x: np.ndarray  # (J,)
    seeds: list[int]
    variant: np.ndarray  # (J, S), NaN where missing
    baseline: np.ndarray  # (J, S) the baseline at the same size, NaN where missing
    sign: float
    notes: list[str]

    def mean_gaps(self, counts: np.ndarray) -> np.ndarray:
        """(B, J) mean gap per cell for seed counts (B, S): paired where the baseline has the seed,
        else against the (resampled) baseline mean of that cell."""
        has_v = np.isfinite(self.variant)
        has_b = np.isfinite(self.baseline)
        v = np.where(has_v, self.variant, 0.0)
        b = np.where(has_b, self.baseline, 0.0)
        paired = has_v & has_b
        unpaired = has_v & ~has_b
        den = counts @ has_v.T.astype(float)
        num = counts @ (np.where(paired, v - b, 0.0)).T + counts @ (np.where(unpaired, v, 0.0)).T
        n_unpaired = counts @ unpaired.T.astype(float)
        b_den = counts @ has_b.T.astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            b_mean = (counts @ b.T) / b_den
            unpaired_part = np.where(n_unpaired > 0, n_unpaired * b_mean, 0.0)
            out = self.sign * (num - unpaired_part) / den
        bad = (den == 0) | ((n_unpaired > 0) & (b_den == 0))
        return np.where(bad, np.nan, out)

    def seed_gaps(self) -> list[dict[int, float]]:
        """Per cell {seed: gap} with the full-data baseline mean for unpaired seeds."""
        out = []
        seeds = np.asarray(self.seeds)
        for j in range(len(self.x)):
            has_b = np.isfinite(self.baseline[j])
            b_mean = np.nanmean(self.baseline[j]) if has_b.any() else np.nan
            has_v = np.isfinite(self.variant[j])
            base = np.where(has_b, self.baseline[j], b_mean)
            gaps = self.sign * (self.variant[j] - base)
            out.append(dict(zip(seeds[has_v].tolist(), gaps[has_v].tolist())))
        return out


def gap_cells(
    rows: list[dict[str, Any]], *, variant: str, baseline: str, x_of: str, metric: str,
    d_osc: int | None = None, target_params: int | None = None, params_field: str = "params_non_embedding",
) -> GapCells:
    """x_of = "d_osc" (one size: target_params) or "params" (one d_osc)."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    base: dict[Any, dict[int, float]] = {}
    values: dict[Any, dict[int, float]] = {}
    params: dict[Any, list[float]] = {}
    for row in rows:
        if x_of == "d_osc" and row["target_params"] != target_params:
            continue
        if row["variant"] == baseline:
            base.setdefault(row["target_params"], {})[int(row["seed"])] = float(row["metric_value"])
        elif row["variant"] == variant:
            if (x_of == "d_osc" and row["d_osc"] is None) or (x_of == "params" and row["d_osc"] != d_osc):
                continue
            key = row["d_osc"] if x_of == "d_osc" else row["target_params"]
            if key is None:
                continue
            values.setdefault(key, {})[int(row["seed"])] = float(row["metric_value"])
            params.setdefault(key, []).append(float(row[params_field]))
    notes: list[str] = []
    keys = sorted(values)
    seeds = sorted({s for k in keys for s in values[k]} | {s for b in base.values() for s in b})
    J, S = len(keys), len(seeds)
    V, Bm = np.full((J, S), np.nan), np.full((J, S), np.nan)
    col = {s: i for i, s in enumerate(seeds)}
    unpaired = missing_base = 0
    for j, key in enumerate(keys):
        size = target_params if x_of == "d_osc" else key
        b = base.get(size, {})
        if not b:
            missing_base += 1
        for seed, value in values[key].items():
            V[j, col[seed]] = value
            if seed in b:
                Bm[j, col[seed]] = b[seed]
            else:
                unpaired += 1
        for seed, value in b.items():  # baseline seeds the variant lacks still inform the baseline mean
            Bm[j, col[seed]] = value
    if x_of == "d_osc":
        x = np.array(keys, dtype=float)
    else:
        x = np.array([np.mean(params[k]) for k in keys], dtype=float)
    if missing_base:
        notes.append(f"{missing_base} cell(s) have no completed {baseline} baseline at the same size: left out")
        keep = np.isfinite(Bm).any(axis=1)
        x, V, Bm = x[keep], V[keep], Bm[keep]
        unpaired = int((np.isfinite(V) & ~np.isfinite(Bm)).sum())
    if unpaired:
        notes.append(f"{unpaired} trial(s) had no baseline with the same seed: gap taken to the baseline mean")
    if sign < 0:
        notes.append(f"{metric}: higher is better, so gap = {baseline} - variant (positive = variant worse)")
    return GapCells(x, seeds, V, Bm, sign, notes)


# ---- fitting a gap law --------------------------------------------------------------------------

def _fit_gap_method(method: str, x: np.ndarray, means: np.ndarray, *, model: str | None = None) -> dict[str, np.ndarray]:
    """Constants per row of means (B, J) for one method and model."""
    if method == "loglog-means":
        C, alpha, _ = laws.loglog_batch(x, means)
        return {"C": C, "alpha": alpha}
    floor = model == "power_floor"
    out = laws.power_vp_batch(x, means, floor=floor)
    consts = {"C": out["C"], "alpha": out["alpha"]}
    if floor:
        consts["g_inf"] = out["g_inf"]
    consts["_at_bound"] = out["at_bound"]
    return consts


def _min_points(method: str, model: str) -> int:
    return 3 if model == "power_floor" else 2


def _leave_one_out(method: str, model: str, x: np.ndarray, means: np.ndarray) -> dict[str, Any] | None:
    """Refit without each x in turn and predict it. Uses only x values the method can use."""
    usable = np.isfinite(means) & ((means > 0) if method == "loglog-means" else True)
    idx = np.flatnonzero(usable)
    if len(idx) < _min_points(method, model) + 1:
        return None
    rows = np.repeat(means[None, :], len(idx), axis=0)
    for r, j in enumerate(idx):
        rows[r, j] = np.nan
    consts = _fit_gap_method(method, x, rows, model=model)
    preds = np.array([laws.evaluate(model, {k: v[r] for k, v in consts.items() if not k.startswith("_")}, x[j])
                      for r, j in enumerate(idx)], dtype=float).ravel()
    observed = means[idx]
    errors = preds - observed
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(observed != 0, errors / np.abs(observed), np.nan)
    points = [{"x": float(x[j]), "observed": float(o), "predicted": json_safe(float(p)), "error": json_safe(float(e)),
               "rel_error": json_safe(float(q))} for j, o, p, e, q in zip(idx, observed, preds, errors, rel)]
    finite = np.isfinite(errors)
    return {"points": points,
            "rmse": float(np.sqrt(np.mean(errors[finite] ** 2))) if finite.any() else None,
            "mean_abs_rel_error": float(np.nanmean(np.abs(rel))) if np.isfinite(rel).any() else None}


def fit_gap_law(
    cells: GapCells, *, study: str, task: str, law: str, variant: str, baseline: str, metric: str,
    draws: SeedDraws, group: dict[str, Any] | None = None, ci_level: float = CI_LEVEL,
    methods: Iterable[str] = GAP_METHODS, excluded: dict[str, int] | None = None, extra_notes: Iterable[str] = (),
    params_field: str = "params_non_embedding", floor: bool = False,
) -> list[FitResult]:
    x_name = "d_osc" if law == "gap_vs_dosc" else "params"
    x = cells.x
    point = cells.mean_gaps(np.ones((1, len(cells.seeds))))[0] if len(x) else np.zeros(0)
    seed_gaps = cells.seed_gaps()
    n_per_cell = [len(g) for g in seed_gaps]
    min_seeds = min(n_per_cell) if n_per_cell else 0
    noise = _noise(seed_gaps, x)
    n_seeds = len({s for g in seed_gaps for s in g} | {cells.seeds[s] for s in np.flatnonzero(np.isfinite(cells.baseline).any(axis=0))})
    base_points = [
        {"x": float(xj), "mean": json_safe(float(m)), "values": {str(s): g for s, g in sorted(sg.items())}, "n_seeds": len(sg)}
        for xj, m, sg in zip(x, point, seed_gaps)
    ]
    for p in base_points:  # the names the first report and tests used
        p["gap_mean"], p["gaps"] = p["mean"], p["values"]
        if x_name == "d_osc":
            p["d_osc"] = int(p["x"])
    runs = P.runs_from_cells(x, cells.variant, cells.baseline, cells.sign) if len(x) else None
    profiles: dict[bool, Any] = {}
    out = []
    for method in methods:
        notes = list(cells.notes) + list(extra_notes)
        common = dict(study=study, task=task, law=law, variant=variant, baseline=baseline, metric=metric, method=method,
                      n_seeds=n_seeds, n_boot=0, ci_level=ci_level, x_name=x_name, group=dict(group or {}),
                      excluded=dict(excluded or {}), boot_stream=draws.stream, min_cell_seeds=min_seeds,
                      x_label="d_osc" if x_name == "d_osc" else _params_label(params_field))
        points = [dict(p) for p in base_points]
        if method == "loglog-means":
            usable = np.isfinite(point) & (point > 0)
            model, selection = "power", None
            description = ("paper A: least squares of log(mean gap) on log x over the per-x means; interval by the "
                           "delta method with the seed noise of the runs (scaling.profile)")
        else:
            usable = np.isfinite(point)
            model, selection = _select_nonlinear(x, point, floor)
            description = ("least squares on every run (linear space) of C x^-alpha (or C x^-alpha + g_inf, chosen by "
                           "leave-one-out error) with one level per seed; profile-likelihood intervals (scaling.profile)")
            if selection:
                notes.append(selection["summary"])
        has_floor = model == "power_floor"
        if has_floor not in profiles:  # both methods identify by the same profile: compute it once
            profiles[has_floor] = P.profile(runs, floor=has_floor, level=ci_level) if runs is not None and len(runs.z) else None
        prof = profiles[has_floor]
        cell_seeds = [int(np.isfinite(row).sum()) for row in cells.variant]
        said = "d_osc" if x_name == "d_osc" else "parameter count"
        reason = P.identify(runs, prof, cell_seeds, int(np.isfinite(point).sum()), floor=has_floor, x_name=said) \
            if runs is not None else f"no {said} values with runs"
        if not reason and method == "loglog-means":
            reason = _loglog_reason(prof, runs, cells, point, x, said)
        n_points = int(usable.sum())
        names = ["C", "alpha"] + (["g_inf"] if has_floor else [])
        r2_space = "log" if method == "loglog-means" else "linear"
        if reason:
            notes.insert(0, f"not identified: {reason}")
            out.append(FitResult(**common, constants={k: Estimate(float("nan"), None, None) for k in names},
                                 r2=None, n_points=n_points, heldout=None, points=points, notes=notes, ok=False,
                                 model=model, selection=selection, description=description, r2_space=r2_space,
                                 reason=reason, calibration=prof.calibration if prof else ""))
            continue
        if method == "loglog-means":
            unc: Any = LogLogUncertainty.build(prof, runs, cells, point, x, usable)
            consts = unc.constants
            estimates = {"C": Estimate(consts["C"], *unc.constant_interval("C")),
                         "alpha": Estimate(consts["alpha"], *unc.constant_interval("alpha"))}
        else:
            unc = ProfileUncertainty(prof)
            low, high, _ = prof.alpha_interval()
            consts = {"C": float(prof.beta_hat[0]), "alpha": prof.alpha_hat}
            estimates = {"C": Estimate(consts["C"], *prof.constant_interval(0)[1:]),
                         "alpha": Estimate(prof.alpha_hat, low, high)}
            if has_floor:
                consts["g_inf"] = float(prof.beta_hat[1])
                estimates["g_inf"] = Estimate(consts["g_inf"], *prof.constant_interval(1)[1:])
        if prof.calibration == "joint":
            notes.append(f"gap detected with moderate evidence (p = {prof.p_gap:.2g}): intervals from the joint 95% "
                         f"region of the law's constants (wider)")
        fitted = np.asarray(laws.evaluate(model, consts, x), dtype=float).ravel()
        for j, p in enumerate(points):
            p["fit"] = float(fitted[j])
            p["residual"] = json_safe(float(point[j] - fitted[j]))
            p["band_low"], p["band_high"] = unc.band(float(x[j]))
            p["used"] = bool(usable[j])
            p["se"] = json_safe(_cell_se(prof.sigma, cells, j))
        if method == "loglog-means":
            r2 = laws.r2_score(np.log(point[usable]), np.log(fitted[usable]))
        else:
            r2 = laws.r2_score(point[usable], fitted[usable])
        loo = _leave_one_out(method, model, x, point)
        grid = np.geomspace(float(np.min(x[usable])), float(np.max(x[usable])), 40)
        bands = [unc.band(float(g)) for g in grid]
        curve = {"x": grid.tolist(), "fit": np.asarray(laws.evaluate(model, consts, grid), float).ravel().tolist(),
                 "band_low": [b[0] for b in bands], "band_high": [b[1] for b in bands]}
        out.append(FitResult(
            **common, constants=estimates, r2=r2, n_points=n_points, heldout=_heldout_largest(loo), points=points,
            notes=notes, ok=True, model=model, loo=loo, selection=selection, description=description,
            r2_space=r2_space, curve=curve, boot=None, noise=noise, calibration=prof.calibration, uncertainty=unc,
        ))
    return out


def _cell_se(sigma: float, cells: GapCells, j: int) -> float | None:
    """Standard error of cell j's mean gap under the run model: sigma * sqrt(1/n + 1/n_b)."""
    n = int(np.isfinite(cells.variant[j]).sum())
    n_b = int(np.isfinite(cells.baseline[j]).sum())
    if not n or not n_b:
        return None
    paired = int((np.isfinite(cells.variant[j]) & np.isfinite(cells.baseline[j])).sum())
    # mean(v - b) over paired seeds; unpaired seeds use the baseline mean
    return float(sigma * math.sqrt(1.0 / n + (paired / n) ** 2 / max(paired, 1) + ((n - paired) / n) ** 2 / n_b))


def _loglog_reason(prof, runs, cells: GapCells, point: np.ndarray, x: np.ndarray, x_name: str) -> str:
    """Paper A's log-log method needs every mean gap clearly above zero (a log of a mean that noise
    can push to or below zero is not a measurement): '' when it is, else the sentence saying where not."""
    if prof.calibration != "profile":
        return (f"the gap is detected, but not strongly enough for paper A's log-log method (F test p = {prof.p_gap:.2g}; "
                f"it needs p < {P.STRONG_EVIDENCE:g}: with less, the log of near-noise means made its 95% intervals "
                f"cover the truth in only 75-85% of synthetic studies); the nonlinear method fits it")
    seeds = [int(np.isfinite(row).sum()) for row in cells.variant]
    if seeds and min(seeds) < 3:
        return (f"a {x_name} cell has {min(seeds)} seeds; paper A's log-log method needs at least 3 per cell for an "
                f"interval (with 2, its 95% intervals covered the truth in ~75% of synthetic studies; the nonlinear "
                f"method needs 2)")
    fitted = prof.beta_hat[0] * np.asarray(x, float) ** (-prof.alpha_hat)
    for j in range(len(x)):
        se = _cell_se(prof.sigma, cells, j)
        if not np.isfinite(point[j]) or se is None:
            continue
        if point[j] <= 0:
            return (f"the mean gap at {x_name} {plain_number(x[j])} ({point[j]:.3g} +- {se:.2g}) is not clearly above zero; "
                    f"paper A's log-log method needs every mean gap > 0 (the nonlinear method fits it)")
        if fitted[j] <= prof.t * se:
            return (f"the gap at {x_name} {plain_number(x[j])} is not clearly above zero (the law fitted to every run gives "
                    f"{fitted[j]:.3g}, standard error {se:.2g}); paper A's log-log method needs every gap > "
                    f"{prof.t:.2f} standard errors (the nonlinear method fits it)")
    return ""


class ProfileUncertainty:
    """Bands and predictions of a gap law from its profile (scaling.profile)."""

    def __init__(self, prof: "P.Profile") -> None:
        self.prof = prof

    def band(self, x0: float) -> tuple[float | None, float | None]:
        _, low, high = self.prof.value_interval(x0)
        return low, high

    def predict(self, x0: float, *, n_seeds: int = 1, level: float | None = None) -> dict[str, Any]:
        """Confidence interval of the law at x0, and a prediction interval for the mean gap of
        `n_seeds` new runs there, each paired with its own baseline run (noise 2 sigma^2 / n)."""
        prof = self.prof
        if level is not None and abs(level - prof.level) > 1e-12:
            prof = _relevel(prof, level)
        value, low, high = prof.value_interval(x0)
        return _with_prediction(value, low, high, prof.sigma, prof.df, prof.level, n_seeds)


def _relevel(prof: "P.Profile", level: float) -> "P.Profile":
    from scipy.special import fdtri, stdtrit

    q = prof.beta.shape[1] + 1
    mult = float(stdtrit(prof.df, (1 + level) / 2)) if prof.calibration == "profile" else math.sqrt(q * float(fdtri(q, prof.df, level)))
    import dataclasses

    return dataclasses.replace(prof, level=level, t=mult, threshold=prof.rss_min * (1 + mult * mult / prof.df))


def _with_prediction(value: float, low: float, high: float, sigma: float, df: int, level: float, n_seeds: int) -> dict[str, Any]:
    from scipy.special import stdtrit

    noise = float(stdtrit(df, (1 + level) / 2)) * sigma * math.sqrt(2.0 / n_seeds)
    return {"value": value, "ci_low": low, "ci_high": high, "level": level,
            "pi_low": value - math.hypot(value - low, noise), "pi_high": value + math.hypot(high - value, noise),
            "noise_sd": sigma * math.sqrt(2.0), "df": df}


@dataclass
class LogLogUncertainty:
    """Paper A's estimator (least squares of log mean gap on log x) with its sampling covariance:
    the mean gaps' covariance under the run model (sigma from the runs, shared baseline runs make
    the cells' means correlated), carried to the logs by the delta method."""

    constants: dict[str, float]
    coef: np.ndarray  # (intercept = log C, slope = -alpha)
    cov: np.ndarray  # (2, 2)
    mult: float  # t (profile calibration) or sqrt(q F) (joint)
    sigma: float
    df: int
    level: float

    @classmethod
    def build(cls, prof, runs, cells: GapCells, point: np.ndarray, x: np.ndarray, usable: np.ndarray) -> "LogLogUncertainty":
        idx = np.flatnonzero(usable)
        lx = np.log(x[idx])
        X = np.stack([np.ones_like(lx), lx], axis=1)
        H = np.linalg.solve(X.T @ X, X.T)  # (2, J): the OLS coefficients as combinations of log means
        cov_means = prof.sigma ** 2 * _mean_weights_gram(cells, idx)
        D = np.diag(1.0 / point[idx])
        cov = H @ D @ cov_means @ D @ H.T
        coef = H @ np.log(point[idx])
        # always the joint-region multiplier: the log of a mean that is only a few standard errors
        # above zero is skewed, and the delta method's t multiplier under-covered (0.83 pooled, measured)
        from scipy.special import fdtri

        mult = math.sqrt(2 * float(fdtri(2, prof.df, prof.level)))
        return cls({"C": float(math.exp(coef[0])), "alpha": float(-coef[1])}, coef, cov, mult, prof.sigma, prof.df,
                   prof.level)

    def constant_interval(self, name: str) -> tuple[float, float]:
        if name == "alpha":
            half = self.mult * math.sqrt(self.cov[1, 1])
            return self.constants["alpha"] - half, self.constants["alpha"] + half
        half = self.mult * math.sqrt(self.cov[0, 0])
        return math.exp(self.coef[0] - half), math.exp(self.coef[0] + half)

    def band(self, x0: float) -> tuple[float, float]:
        v = np.array([1.0, math.log(x0)])
        centre, half = float(v @ self.coef), self.mult * math.sqrt(float(v @ self.cov @ v))
        return math.exp(centre - half), math.exp(centre + half)

    def predict(self, x0: float, *, n_seeds: int = 1, level: float | None = None) -> dict[str, Any]:
        v = np.array([1.0, math.log(x0)])
        low, high = self.band(x0)
        return _with_prediction(math.exp(float(v @ self.coef)), low, high, self.sigma, self.df, self.level, n_seeds)


def _mean_weights_gram(cells: GapCells, idx: np.ndarray) -> np.ndarray:
    """W W' (len(idx), len(idx)), W (cells, runs) writing cell j's mean gap as a combination of the
    runs of runs_from_cells: its n variant runs +1/n each, their paired baseline runs -1/n, and for
    an unpaired seed the baseline mean (-1/(n m) on each of the m baseline runs). Variant runs
    belong to one cell, so they add 1/n_j on the diagonal; the baseline runs, shared by the cells,
    add Wb Wb' with Wb (cells, seeds) their weights. O(cells x seeds), no (cells x runs) matrix."""
    has_b = np.isfinite(cells.baseline).any(axis=0)  # (S,) seeds with a baseline run
    m = int(has_b.sum())
    has_v = np.isfinite(cells.variant[idx])  # (J', S)
    n = has_v.sum(axis=1).astype(float)
    unpaired = (has_v & ~has_b[None, :]).sum(axis=1)
    spread = unpaired / (n * m) if m else np.zeros(len(idx))
    Wb = np.where(has_b[None, :], -(has_v / n[:, None]) - spread[:, None], 0.0)
    return np.diag(1.0 / n) + Wb @ Wb.T


def _select_nonlinear(x: np.ndarray, means: np.ndarray, floor: bool = False) -> tuple[str, dict[str, Any] | None]:
    """The model is chosen before the data are seen: C x^-alpha, or C x^-alpha + g_inf when the
    study asks for a floor (`fits: floor: true`). Both models' leave-one-out RMSEs are reported as
    information. (Choosing by the data, by the lower LOO RMSE or by an F test of g_inf = 0, picked a
    floor for 5-10% of studies that had none, and the exponent of that model then usually missed
    the truth: coverage 0.92-0.93 instead of 0.95-0.96 with the model fixed, measured with
    scaling.coverage.)"""
    usable = int(np.isfinite(means).sum())
    chosen = "power_floor" if floor and usable >= 4 else "power"
    if usable < 4:
        extra = " (a floor needs >= 4 x values)" if floor else ""
        return chosen, {"chosen": chosen, "summary": f"model: {chosen}{extra}"}
    scores = {}
    for model in ("power", "power_floor"):
        loo = _leave_one_out("nonlinear", model, x, means)
        scores[model] = loo["rmse"] if loo and loo["rmse"] is not None else math.inf
    text = ", ".join(f"{m} {_fmt_num(v)}" for m, v in scores.items())
    hint = ""
    if not floor and scores["power_floor"] < 0.5 * scores["power"]:
        hint = "; a floor predicts held-out x much better: consider `fits: floor: true`"
    return chosen, {"chosen": chosen, "loo_rmse": {k: json_safe(v) for k, v in scores.items()},
                    "summary": f"model: {chosen} (set by the study; leave-one-out RMSE {text}){hint}"}


def _heldout_largest(loo: dict[str, Any] | None) -> dict[str, Any] | None:
    """The largest x predicted from a fit to the others (paper A's d = 64 check)."""
    if not loo or not loo["points"]:
        return None
    last = max(loo["points"], key=lambda p: p["x"])
    return {"x": last["x"], "observed": last["observed"], "predicted": last["predicted"],
            "error": last["error"], "rel_error": last["rel_error"]}


def _curve(model: str, consts: dict[str, float], boot: dict[str, np.ndarray], x: np.ndarray, level: float,
           n: int, num: int = 40, log: bool = False) -> dict[str, list[float]]:
    grid = np.geomspace(float(np.min(x)), float(np.max(x)), num) if len(x) and np.min(x) > 0 else np.asarray(x, float)
    fit = np.asarray(laws.evaluate(model, consts, grid), dtype=float).ravel()
    bands = widened_intervals(fit, laws.evaluate(model, boot, grid), level, n, log=log)
    return {"x": grid.tolist(), "fit": fit.tolist(), "band_low": [b[0] for b in bands], "band_high": [b[1] for b in bands]}


def _noise(cells: list[dict[Any, float]], x: np.ndarray, log: bool = False) -> dict[str, float] | None:
    """The seed noise of one run as log sd = intercept + slope log x, from the within-cell spreads:
    a weighted regression over cells when >= 3 have >= 2 seeds (noise that shrinks or grows with x),
    else the pooled sd (slope 0). df = the within-cell degrees of freedom (minus 1 for the slope)."""
    log_sd, weights, xs = [], [], []
    ss, df = 0.0, 0
    for cell, xj in zip(cells, x):
        values = np.array([v for v in cell.values() if v is not None], dtype=float)
        if log:
            values = np.log(values)
        if len(values) >= 2:
            cell_ss = float(np.sum((values - values.mean()) ** 2))
            ss, df = ss + cell_ss, df + len(values) - 1
            if cell_ss > 0:
                log_sd.append(0.5 * math.log(cell_ss / (len(values) - 1)))
                weights.append(len(values) - 1)
                xs.append(math.log(float(xj)))
    if not df or ss <= 0:
        return None
    pooled = 0.5 * math.log(ss / df)
    if len(log_sd) >= 3 and np.ptp(xs) > 0:
        slope, intercept = np.polyfit(xs, log_sd, 1, w=np.sqrt(weights))
        return {"intercept": float(intercept), "slope": float(slope), "df": max(df - 1, 1), "pooled_log_sd": pooled}
    return {"intercept": pooled, "slope": 0.0, "df": df, "pooled_log_sd": pooled}


# ---- loss vs parameters -------------------------------------------------------------------------

def fit_loss_vs_params(
    rows: list[dict[str, Any]], *, study: str, task: str, variant: str, metric: str, draws: SeedDraws,
    d_osc: int | None = None, params_field: str = "params_non_embedding", ci_level: float = CI_LEVEL,
    huber_delta: float | None = None, excluded: dict[str, int] | None = None, extra_notes: Iterable[str] = (),
) -> FitResult:
    """L(N) = E + A N^-alpha for one variant (at one d_osc), every completed replicate trial a point."""
    pts = [r for r in rows if r["variant"] == variant and r["d_osc"] == d_osc and r["target_params"] is not None]
    notes = list(extra_notes)
    cells: dict[int, list[dict[str, Any]]] = {}
    for r in pts:
        cells.setdefault(int(r["target_params"]), []).append(r)
    keys = sorted(cells)
    points = [
        {"x": float(np.mean([r[params_field] for r in cells[k]])), "target_params": k,
         "mean": float(np.mean([r["metric_value"] for r in cells[k]])),
         "values": {str(r["seed"]): float(r["metric_value"]) for r in sorted(cells[k], key=lambda r: r["seed"])},
         "params": {str(r["seed"]): int(r[params_field]) for r in cells[k]}, "n_seeds": len(cells[k])}
        for k in keys
    ]
    min_seeds = min((p["n_seeds"] for p in points), default=0)
    group = {"d_osc": d_osc} if d_osc is not None else {}
    common = dict(study=study, task=task, law="loss_vs_params", variant=variant, baseline="", metric=metric,
                  method="huber-log", n_seeds=len({r["seed"] for r in pts}), n_boot=draws.n_boot, ci_level=ci_level,
                  x_name="params", group=group, excluded=dict(excluded or {}), model="offset_power",
                  boot_stream=draws.stream, min_cell_seeds=min_seeds, r2_space="linear",
                  x_label=_params_label(params_field))
    nan_consts = {k: Estimate(float("nan"), None, None) for k in ("E", "A", "alpha")}
    description = ("Huber loss on log residuals of E + A N^-alpha over every trial; L-BFGS-B (scipy) polished from "
                   "the best of a grid of starting points; bootstrap refits by damped Gauss-Newton from the estimate")
    if not lower_is_better(metric):
        notes.append(f"{metric}: higher is better; E + A N^-alpha is a law for losses: no fit")
        return FitResult(**common, constants=nan_consts, r2=None, n_points=len(points), heldout=None, points=points,
                         notes=notes, ok=False, description=description)
    y = np.array([r["metric_value"] for r in pts], dtype=float)
    if len(keys) < 3 or (y <= 0).any():
        notes.append(f"needs >= 3 parameter counts with positive {metric} (has {len(keys)}): no fit")
        return FitResult(**common, constants=nan_consts, r2=None, n_points=len(points), heldout=None, points=points,
                         notes=notes, ok=False, description=description)
    if len(keys) == 3:
        notes.append("3 parameter counts for 3 constants: the fit has no residual degrees of freedom")
    xs = np.array([r[params_field] for r in pts], dtype=float)
    cell_of = np.array([keys.index(int(r["target_params"])) for r in pts])
    delta = huber_delta or _huber_delta(y, cell_of)
    problem = laws.HuberLogProblem(xs, y, delta)
    theta, info = laws.offset_power_point_fit(problem, y)
    consts = {k: float(v[0]) for k, v in problem.constants(theta).items()}
    # bootstrap: a trial's weight is how often its seed was drawn
    seed_cols = sorted({draws.index[int(r["seed"])] for r in pts})
    patterns, which = _unique_rows(draws.counts[:, seed_cols])  # each distinct draw refitted once
    W = patterns[:, [seed_cols.index(draws.index[int(r["seed"])]) for r in pts]]
    cells_present = np.stack([(W[:, cell_of == j].sum(axis=1) > 0) for j in range(len(keys))], axis=1).sum(axis=1)
    W_ok = cells_present >= 3
    theta_b, _, conv = laws.damped_newton_batch(problem, np.tile(theta, (len(W), 1)), np.where(W_ok[:, None], W, 1.0))
    boot = {k: np.where(W_ok & conv, v, np.nan)[which] for k, v in problem.constants(theta_b).items()}
    dropped = int((~(W_ok & conv))[which].sum())
    if dropped > 0.02 * draws.n_boot:
        notes.append(f"{dropped} of {draws.n_boot} bootstrap refits dropped (< 3 sizes drawn or no convergence)")
    if not info.get("converged", True):
        notes.append(f"L-BFGS-B: {info.get('message')}")
    estimates = {k: Estimate(consts[k], *widened_interval(consts[k], boot[k], ci_level, min_seeds, log=k != "alpha"))
                 for k in ("E", "A", "alpha")}
    means = np.array([p["mean"] for p in points])
    x_cells = np.array([p["x"] for p in points])
    fitted = laws.evaluate("offset_power", consts, x_cells).ravel()
    bands = widened_intervals(fitted, laws.evaluate("offset_power", boot, x_cells), ci_level, min_seeds, log=True)
    for j, p in enumerate(points):
        p["fit"] = float(fitted[j])
        p["residual"] = float(means[j] - fitted[j])
        p["band_low"], p["band_high"] = bands[j]
        p["used"] = True
    loo = _loss_leave_one_out(problem, theta, cell_of, x_cells, means)
    notes.append(f"Huber delta {delta:.3g} on log residuals")
    return FitResult(
        **common, constants=estimates, r2=laws.r2_score(means, fitted), n_points=len(points),
        heldout=_heldout_largest(loo), points=points, notes=notes, ok=True, loo=loo, description=description,
        curve=_curve("offset_power", consts, boot, x_cells, ci_level, min_seeds, log=True),
        boot=boot, noise=_noise([p["values"] for p in points], x_cells, log=True),
    )


def _huber_delta(y: np.ndarray, cell_of: np.ndarray) -> float:
    """1.345 robust standard deviations of the seed noise in log space (the classic Huber tuning:
    quadratic for ordinary seed noise, linear for an outlying seed), at least 1e-3 (Epoch AI's value)."""
    devs = []
    for j in np.unique(cell_of):
        v = np.log(y[cell_of == j])
        if len(v) >= 2:
            devs.append(v - np.median(v))
    if not devs:
        return 1e-3
    d = np.concatenate(devs)
    scale = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    return max(1.345 * scale, 1e-3)


def _loss_leave_one_out(problem, theta, cell_of, x_cells, means) -> dict[str, Any] | None:
    """Each parameter count held out in turn (refit from the full-data estimate), then predicted."""
    J = len(x_cells)
    if J < 4:
        return None
    W = np.ones((J, len(cell_of)))
    for j in range(J):
        W[j, cell_of == j] = 0.0
    theta_j, _, _ = laws.damped_newton_batch(problem, np.tile(theta, (J, 1)), W)
    consts = problem.constants(theta_j)
    points = []
    for j in range(J):
        pred = float(laws.evaluate("offset_power", {k: v[j] for k, v in consts.items()}, x_cells[j]))
        err = pred - means[j]
        points.append({"x": float(x_cells[j]), "observed": float(means[j]), "predicted": pred, "error": err,
                       "rel_error": err / abs(means[j])})
    errors = np.array([p["error"] for p in points])
    return {"points": points, "rmse": float(np.sqrt(np.mean(errors**2))),
            "mean_abs_rel_error": float(np.mean([abs(p["rel_error"]) for p in points]))}


# ---- comparing exponents ------------------------------------------------------------------------

def compare_exponents(a: FitResult, b: FitResult, *, level: float | None = None, constant: str = "alpha") -> dict[str, Any]:
    """The difference a - b of a constant (default alpha) with its interval.

    Fits of the same task share the seed draws (same boot_stream), so the difference is taken draw
    by draw and the shared baseline's noise cancels; fits of different tasks have independent
    draws, which is right for independent data."""
    level = level or a.ci_level
    out = {"a": _fit_label(a), "b": _fit_label(b), "constant": constant, "level": level,
           "paired": a.boot_stream == b.boot_stream, "diff": None, "ci_low": None, "ci_high": None}
    if not (a.ok and b.ok) or constant not in a.constants or constant not in b.constants:
        out["note"] = "both fits must be identified and have the constant"
        return out
    if a.boot is None or b.boot is None or constant not in a.boot or constant not in b.boot:
        return _compare_from_intervals(a, b, out, constant, level)
    if a.boot_stream != b.boot_stream and a.task == b.task:
        out["note"] = "fits of one task with different seed draws: treated as independent (conservative)"
    diff = a.constants[constant].value - b.constants[constant].value
    draws = a.boot[constant] - b.boot[constant]
    n = min(a.min_cell_seeds, b.min_cell_seeds)
    out["diff"] = diff
    out["ci_low"], out["ci_high"] = widened_interval(diff, draws, level, n)
    return out


def _compare_from_intervals(a: FitResult, b: FitResult, out: dict[str, Any], constant: str, level: float) -> dict[str, Any]:
    """Gap laws have profile intervals, not draws: each interval gives a standard error (half-width
    over its multiplier), and the difference gets a t interval on the smaller df with the two
    treated as independent. Fits of one task share the baseline runs, which are positively
    correlated through it, so for them this is conservative (and says so)."""
    from scipy.special import stdtrit

    ses, dfs = [], []
    for fit in (a, b):
        est = fit.constants[constant]
        unc = fit.uncertainty
        if est.ci_low is None or est.ci_high is None or unc is None:
            out["note"] = "both fits need an interval for the constant"
            return out
        mult = unc.prof.t if isinstance(unc, ProfileUncertainty) else unc.mult
        ses.append((est.ci_high - est.ci_low) / (2 * mult))
        dfs.append(unc.prof.df if isinstance(unc, ProfileUncertainty) else unc.df)
    diff = a.constants[constant].value - b.constants[constant].value
    half = float(stdtrit(min(dfs), (1 + level) / 2)) * math.hypot(*ses)
    out.update(diff=diff, ci_low=diff - half, ci_high=diff + half, paired=False)
    if a.task == b.task and a.group == b.group:
        out["note"] = "same task: the shared baseline correlates the two exponents; treated as independent (conservative)"
    return out


def _fit_label(fit: FitResult) -> str:
    group = f" ({fit.group_label})" if fit.group else ""
    return f"{fit.task}/{fit.variant}{group} {fit.law} {fit.method}"


# ---- the old single-fit entry points (kept for callers and tests) -------------------------------

def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float | None]:
    """(C, alpha, R^2) of y = C * x^-alpha by least squares in log-log space; y must be > 0."""
    C, alpha, _ = laws.loglog_batch(np.asarray(x, float), np.asarray(y, float)[None, :])
    c, a = float(C[0]), float(alpha[0])
    r2 = laws.r2_score(np.log(y), np.log(c) - a * np.log(x))
    return c, a, r2


def fit_gap_vs_dosc(
    rows: list[dict[str, Any]], *, study: str, task: str, variant: str, baseline: str, metric: str,
    n_boot: int = N_BOOT, seed: int = 0, method: str = "loglog-means", target_params: int | None = None,
    ci_level: float = CI_LEVEL,
) -> FitResult:
    """One gap_vs_dosc fit straight from ledger rows (api.fits makes all of them)."""
    selected = select_rows(rows, task)
    sizes = {r["target_params"] for r in selected.rows if r["variant"] == variant}
    if target_params is None and len(sizes) > 1:
        raise ValueError(f"task {task} variant {variant} has several sizes {sorted(sizes)}; pass target_params")
    target = target_params if target_params is not None else next(iter(sizes), None)
    draws = SeedDraws(selected.seeds, n_boot, seed, stream=task)
    with laws.single_threaded_blas():
        return _fit_gap_vs_dosc(selected, draws, study=study, task=task, variant=variant, baseline=baseline,
                                metric=metric, method=method, target=target, ci_level=ci_level)


def _fit_gap_vs_dosc(selected: TaskRows, draws: SeedDraws, *, study, task, variant, baseline, metric, method, target,
                     ci_level) -> FitResult:
    if not any(r["variant"] == baseline for r in selected.rows):
        cells = GapCells(np.zeros(0), [], np.zeros((0, 0)), np.zeros((0, 0)), 1.0,
                         [f"no completed {baseline} baseline trials for task {task}"])
    else:
        cells = gap_cells(selected.rows, variant=variant, baseline=baseline, x_of="d_osc", metric=metric,
                          target_params=target)
    (fit,) = fit_gap_law(cells, study=study, task=task, law="gap_vs_dosc", variant=variant, baseline=baseline,
                         metric=metric, draws=draws, methods=[method], ci_level=ci_level,
                         group={"target_params": target} if target is not None else {}, extra_notes=selected.notes)
    return fit


# ---- helpers ------------------------------------------------------------------------------------

def _params_label(params_field: str) -> str:
    return "non-embedding parameters" if params_field == "params_non_embedding" else "parameters (total)"


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _fmt_num(value: float | None) -> str:
    return "–" if value is None or not _finite(value) else f"{value:.3g}"


def json_safe(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, non-finite floats to None, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
