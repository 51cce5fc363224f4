"""Gap laws fitted to every run, with profile-likelihood intervals (numpy and scipy only).

The model, for one task and size: every run of the baseline and of the variant at x (d_osc or a
parameter count), with z = sign * metric (so a positive gap means the variant is worse):

    z(baseline, seed s)   = theta_s + e
    z(variant, x, seed s) = theta_s + g(x) + e,     g(x) = C x^-alpha  (+ g_inf with a floor)

theta_s is one level per seed (the pairing: what a seed does to both models cancels), e is seed
noise with one variance. For a fixed alpha the model is linear in (theta, C, g_inf), so the exact
least-squares fit and residual sum of squares RSS(alpha) come from one projection per alpha on a
fine grid (variable projection). Gaps at or below zero are ordinary data: nothing is logged.

Intervals are profile-likelihood intervals calibrated with the F distribution (Bates & Watts,
"Nonlinear Regression Analysis", ch. 6; exact when the model is linear): a value v of a quantity
is inside the 95% interval when the best fit that has that value is no worse than

    RSS <= RSS_min * (1 + t^2_{df, 0.975} / df),   df = runs - seeds - linear constants - 1.

For alpha that is the set of grid values with RSS(alpha) under the threshold. For a quantity
linear in (C, g_inf) at fixed alpha (C itself, or g(x0) for a band or a prediction) the best
fit with value v costs RSS(alpha) + (v - v_hat(alpha))^2 / (c' M(alpha) c), M the inverse
information of the linear constants after the seed levels are projected out, so its interval is
the union over the alpha set of v_hat(alpha) +- sqrt((threshold - RSS(alpha)) c' M c): exact,
no resampling, and asymmetric where the data make it so. No endpoint equals the estimate unless
the profile is flat there; an interval that reaches the edge of the alpha search range means the
data do not bound alpha, and the fit is reported as unidentified (IDENTIFICATION below).

IDENTIFICATION (a fit gives a headline number only when all hold; else one sentence says which
failed, the same sentence on every surface):
  1. at least 3 distinct x values with runs (4 with a floor),
  2. at least 2 seeds in every x cell, and residual degrees of freedom df >= 2,
  3. a gap is detected: the F test of "no gap at any x" against the law gives p < 0.001,
  4. the 95% interval of alpha is bounded inside the search range [ALPHA_MIN, ALPHA_MAX].
Paper A's log-log method (scaling.fits) also needs 3 seeds per cell and every gap clearly above zero.

Calibration. The one-parameter threshold (t^2) is used when the gap is detected strongly
(p < 1e-5). Between that and p < 0.001 the interval is the projection of the joint 95% region of
(C, [g_inf,] alpha), threshold RSS_min (1 + q F_{q, df} / df) with q constants: wider, because on
synthetic studies with a known law the one-parameter interval covered alpha in only 70-85% of the
fits that were identified with moderate evidence (a selection effect: noise that happens to look
like a law), and 93-98% with this rule (`python -m scaling.coverage`, table in the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import numpy as np

ALPHA_MIN, ALPHA_MAX = -3.0, 8.0
DETECTION = 1e-3  # a gap counts as detected when "no gap at any x" is rejected at this level
STRONG_EVIDENCE = 1e-5  # below this p-value the one-parameter profile calibration is used
GRID = np.linspace(ALPHA_MIN, ALPHA_MAX, 1101)  # step 0.01


@dataclass
class Runs:
    """The runs one gap law sees: z = sign * metric, the seed of each run, and its x (NaN = baseline)."""

    z: np.ndarray  # (N,)
    seed: np.ndarray  # (N,) seed index 0..S-1
    x: np.ndarray  # (N,) x of variant runs, NaN for baseline runs
    n_seeds: int

    @property
    def variant(self) -> np.ndarray:
        return np.isfinite(self.x)


def runs_from_cells(x: np.ndarray, variant: np.ndarray, baseline: np.ndarray, sign: float) -> Runs:
    """From the (J, S) tables of GapCells (NaN = no run). A baseline run is counted once per seed
    (the tables repeat it in every row). Runs are ordered by seed, each seed's baseline run first,
    then its variant runs by x."""
    J, S = variant.shape
    has_base = np.isfinite(baseline).any(axis=0)  # (S,)
    first_base = baseline[np.argmax(np.isfinite(baseline), axis=0), np.arange(S)] if J else np.zeros(S)
    # (S, 1 + J): per seed, its baseline run then its variant runs; NaN = no run
    values = np.concatenate([np.where(has_base, first_base, np.nan)[:, None], variant.T], axis=1)
    xs = np.concatenate([np.full((S, 1), np.nan), np.broadcast_to(np.asarray(x, float)[None, :], (S, J))], axis=1)
    present = np.isfinite(values)
    seed_of = np.broadcast_to(np.arange(S)[:, None], present.shape)[present]
    used, seed_index = np.unique(seed_of, return_inverse=True)
    return Runs(sign * values[present], seed_index.reshape(-1).astype(int), xs[present], len(used))


@dataclass
class RunSums:
    """What the profile needs of the runs, in a size that does not grow with them.

    The seed levels are projected out of z and of the design columns. A design column is a function
    of x only (C x^-alpha on variant runs, 0 on baseline runs; g_inf: 1 on variant runs), so after
    the projection two seeds with the same runs per x give the same column values: the information
    X'X is a sum over seed *patterns* (how many baseline and variant runs at each x), each weighted
    by how many seeds have it. X'z needs, per x, only the sum of the demeaned z of its runs, and the
    RSS with no gap the sum of squares of the demeaned z. So a study of 100,000 runs over 5 d_osc
    values is a handful of patterns and 5 sums: O(N) once, then O(grid x patterns) per profile."""

    x: np.ndarray  # (J,) the distinct x of variant runs
    zc_sum: np.ndarray  # (J,) per x: the sum of z minus its seed's mean, over the runs at that x
    zz: float  # sum of squares of z minus its seed's mean (the RSS of "no gap")
    rep_x: np.ndarray  # (R,) one representative seed per pattern: its runs' x (NaN = baseline run)
    rep_pattern: np.ndarray  # (R,) which pattern each representative run belongs to
    rep_weight: np.ndarray  # (R,) how many seeds have that pattern
    n_patterns: int
    runs: Runs  # the runs themselves: the refinement of alpha-hat fits them at ~25 exponents, O(N) each
    z_c: np.ndarray  # (N,) z minus its seed's mean

    @classmethod
    def of(cls, runs: Runs) -> "RunSums":
        S = runs.n_seeds
        var = runs.variant
        xs, jx = np.unique(runs.x[var], return_inverse=True)
        J = len(xs)
        z_c = _demean_by_seed(runs.z, runs.seed, S)
        zc_sum = np.bincount(jx.reshape(-1), weights=z_c[var], minlength=J)
        # per seed: baseline runs (column 0) and variant runs at each x (columns 1..J)
        counts = np.zeros((S, J + 1), dtype=np.int64)
        np.add.at(counts, (runs.seed[~var], 0), 1)
        np.add.at(counts, (runs.seed[var], 1 + jx.reshape(-1)), 1)
        patterns, weight = np.unique(counts, axis=0, return_counts=True)
        rep_x, rep_pattern, rep_weight = [], [], []
        for p, row in enumerate(patterns):
            run_x = np.repeat(np.concatenate([[np.nan], xs]), row)
            rep_x.append(run_x)
            rep_pattern.append(np.full(len(run_x), p))
            rep_weight.append(np.full(len(run_x), float(weight[p])))
        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        return cls(xs, zc_sum, float(z_c @ z_c), cat(rep_x, float), cat(rep_pattern, int), cat(rep_weight, float),
                   len(patterns), runs, z_c)

    def normal_equations(self, alphas: np.ndarray, floor: bool) -> tuple[np.ndarray, np.ndarray]:
        """(X'X (G, K, K), X'z (G, K)) of the seed-demeaned design at each alpha."""
        var = np.isfinite(self.rep_x)
        x = np.where(var, self.rep_x, 1.0)
        f = np.where(var[None, :], x[None, :] ** (-alphas[:, None]), 0.0)  # (G, R)
        cols = [f] + ([np.broadcast_to(var.astype(float), f.shape)] if floor else [])
        F = _demean_by_seed(np.stack(cols, axis=1), self.rep_pattern, self.n_patterns)  # (G, K, R)
        FtF = np.einsum("gkn,gln,n->gkl", F, F, self.rep_weight)
        # X'z: the design is constant within an x; the seed means of z_c are zero, so the demeaning
        # of the design drops out of this product
        B = self.x[None, :] ** (-alphas[:, None])  # (G, J)
        Ftz = [B @ self.zc_sum] + ([np.full(len(alphas), self.zc_sum.sum())] if floor else [])
        return FtF, np.stack(Ftz, axis=1)


@dataclass
class Profile:
    """RSS and the linear constants on the alpha grid, and what the intervals need."""

    floor: bool
    alpha: np.ndarray  # (G,)
    rss: np.ndarray  # (G,)
    beta: np.ndarray  # (G, K): C (and g_inf)
    M: np.ndarray  # (G, K, K): inverse information of beta after the seed levels
    df: int
    rss_min: float
    alpha_hat: float
    beta_hat: np.ndarray  # (K,)
    threshold: float
    t: float  # the t quantile used
    level: float
    rss_zero: float  # RSS with no gap at all (C = 0, g_inf = 0)
    p_gap: float  # F test of "no gap at any x" against the law (K + 1 numerator df)
    calibration: str  # "profile": t^2 threshold; "joint": the projected joint region (moderate evidence)
    notes: list[str] = field(default_factory=list)

    @property
    def sigma(self) -> float:
        return math.sqrt(self.rss_min / self.df)

    @property
    def inside(self) -> np.ndarray:
        inside = self.rss <= self.threshold
        inside[int(np.argmin(np.abs(self.alpha - self.alpha_hat)))] = True  # the estimate is always inside
        return inside

    def alpha_interval(self) -> tuple[float, float, bool]:
        """(low, high, bounded): the alpha set's hull; endpoints refined between grid points."""
        idx = np.flatnonzero(self.inside)
        lo_i, hi_i = idx[0], idx[-1]
        bounded = lo_i > 0 and hi_i < len(self.alpha) - 1
        low = _crossing(self.alpha, self.rss, self.threshold, lo_i - 1, lo_i) if lo_i > 0 else self.alpha[0]
        high = _crossing(self.alpha, self.rss, self.threshold, hi_i, hi_i + 1) if hi_i < len(self.alpha) - 1 else self.alpha[-1]
        return float(low), float(high), bool(bounded)

    def functional(self, c_of_alpha: np.ndarray) -> tuple[float, float, float]:
        """(estimate, low, high) of c(alpha)' beta; c_of_alpha (G, K)."""
        inside = self.inside
        v_hat = np.einsum("gk,gk->g", c_of_alpha, self.beta)
        var = np.einsum("gk,gkl,gl->g", c_of_alpha, self.M, c_of_alpha)
        room = np.clip(self.threshold - self.rss, 0.0, None)
        half = np.sqrt(room * np.maximum(var, 0.0))
        low = float(np.min((v_hat - half)[inside]))
        high = float(np.max((v_hat + half)[inside]))
        c_hat = self._c_at(c_of_alpha)
        return float(c_hat @ self.beta_hat), low, high

    def _c_at(self, c_of_alpha: np.ndarray) -> np.ndarray:
        """c at alpha_hat (interpolated on the grid)."""
        return np.array([np.interp(self.alpha_hat, self.alpha, c_of_alpha[:, k]) for k in range(c_of_alpha.shape[1])])

    def value_c(self, x0: float) -> np.ndarray:
        """c(alpha) for g(x0) = C x0^-alpha (+ g_inf)."""
        cols = [float(x0) ** (-self.alpha)]
        if self.floor:
            cols.append(np.ones_like(self.alpha))
        return np.stack(cols, axis=1)

    def value_interval(self, x0: float) -> tuple[float, float, float]:
        """g(x0) with its profile confidence interval (the band of the law's mean)."""
        _, low, high = self.functional(self.value_c(x0))
        est = float(self.beta_hat[0] * x0 ** (-self.alpha_hat) + (self.beta_hat[1] if self.floor else 0.0))
        return est, min(low, est), max(high, est)

    def constant_interval(self, index: int) -> tuple[float, float, float]:
        c = np.zeros((len(self.alpha), self.beta.shape[1]))
        c[:, index] = 1.0
        _, low, high = self.functional(c)
        est = float(self.beta_hat[index])
        return est, min(low, est), max(high, est)


def _crossing(a: np.ndarray, r: np.ndarray, thr: float, i: int, j: int) -> float:
    """Where RSS crosses the threshold between grid points i and j (linear interpolation)."""
    ri, rj = r[i] - thr, r[j] - thr
    if ri == rj:
        return float(a[j])
    return float(a[i] + (a[j] - a[i]) * ri / (ri - rj))


def _demean_by_seed(v: np.ndarray, seed: np.ndarray, n_seeds: int) -> np.ndarray:
    """v minus its mean within each seed (the seed levels theta projected out), along the last axis
    of v (..., N). Group sums by one sort and `np.add.reduceat`: O(N) per row (a dense one-hot
    product was O(N x seeds), 60 s of a 10,000-trial study's fits)."""
    if len(seed) == 0:
        return np.array(v, dtype=float, copy=True)
    shape = v.shape
    flat = np.asarray(v, dtype=float).reshape(-1, shape[-1])
    order = np.argsort(seed, kind="stable")
    present, starts, counts = np.unique(seed[order], return_index=True, return_counts=True)
    means = np.zeros((flat.shape[0], n_seeds))
    means[:, present] = np.add.reduceat(flat[:, order], starts, axis=1) / counts
    return (flat - means[:, seed]).reshape(shape)


def profile(runs: Runs, *, floor: bool = False, level: float = 0.95, grid: np.ndarray = GRID) -> Profile | None:
    """The profile of the gap law over alpha; None when there are no residual degrees of freedom."""
    from scipy.special import fdtrc, fdtri, stdtrit

    K = 2 if floor else 1
    N, S = len(runs.z), runs.n_seeds
    df = N - S - K - 1
    if df < 1:
        return None
    sums = RunSums.of(runs)
    FtF, Ftz = sums.normal_equations(grid, floor)
    det_ok = np.linalg.det(FtF) > 1e-12 * np.maximum(np.einsum("gkk->g", FtF) ** K, 1e-300)
    FtF_safe = np.where(det_ok[:, None, None], FtF, np.eye(K)[None])
    M = np.linalg.inv(FtF_safe)
    beta = np.einsum("gkl,gl->gk", M, Ftz)
    rss = sums.zz - np.einsum("gk,gk->g", Ftz, beta)
    rss = np.where(det_ok, np.maximum(rss, 0.0), np.inf)
    rss_zero = sums.zz
    g_min = int(np.argmin(rss))
    alpha_hat, rss_min, beta_hat = float(grid[g_min]), float(rss[g_min]), beta[g_min]
    if 0 < g_min < len(grid) - 1:  # refine between the neighbours
        alpha_hat, rss_min, beta_hat = _refine(sums, floor, grid[g_min - 1], grid[g_min + 1], (alpha_hat, rss_min, beta_hat))
    rss_floor = max(rss_min, 1e-12 * rss_zero, 1e-300)  # exact data: a round-off floor, not a zero
    q = K + 1  # constants of the law: C (g_inf) and alpha
    p_gap = float(fdtrc(q, df, max((rss_zero - rss_floor) / q, 0.0) / (rss_floor / df)))
    if p_gap < STRONG_EVIDENCE:
        calibration, mult = "profile", float(stdtrit(df, (1 + level) / 2))
    else:  # moderate evidence: the one-parameter calibration under-covers (measured), so project the joint region
        calibration, mult = "joint", math.sqrt(q * float(fdtri(q, df, level)))
    threshold = rss_floor * (1 + mult * mult / df)
    return Profile(floor, grid, rss, beta, M, df, rss_floor, alpha_hat, np.asarray(beta_hat, float), threshold, mult,
                   level, rss_zero, p_gap, calibration)


def _refine(sums: RunSums, floor: bool, lo: float, hi: float, start):
    from scipy.optimize import minimize_scalar

    one = lambda a: _fit_at(sums.runs, sums.z_c, floor, a)  # noqa: E731
    result = minimize_scalar(lambda a: one(a)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    rss, beta = one(result.x)
    return (float(result.x), rss, beta) if rss <= start[1] else start


def _fit_at(runs: Runs, z_c: np.ndarray, floor: bool, alpha: float) -> tuple[float, np.ndarray]:
    """RSS and the linear constants at one alpha, from the runs' residuals (O(N); the sums of
    RunSums would do in O(patterns), but this exact residual keeps alpha-hat what it always was,
    bit for bit, where the minimiser's tolerance would otherwise let it move by ~1e-8)."""
    var = runs.variant
    f = np.where(var, np.where(var, runs.x, 1.0) ** (-alpha), 0.0)
    cols = [f] + ([var.astype(float)] if floor else [])
    F = _demean_by_seed(np.stack(cols, axis=0), runs.seed, runs.n_seeds)
    beta, *_ = np.linalg.lstsq(F.T, z_c, rcond=None)
    resid = z_c - F.T @ beta
    return float(resid @ resid), beta


def identify(runs: Runs, prof: Profile | None, cell_seeds: list[int], x_values: int, *, floor: bool,
             x_name: str = "d_osc") -> str:
    """'' when the law is identified, else the one sentence that says why not (rules 1-4 above)."""
    need = 4 if floor else 3
    if x_values < need:
        return f"{x_values} {x_name} value(s) with runs; the law needs at least {need}"
    if cell_seeds and min(cell_seeds) < 2:
        return (f"a {x_name} cell has {min(cell_seeds)} seed; every cell needs at least 2 to tell the law from "
                f"seed noise")
    if prof is None or prof.df < 2:
        df = prof.df if prof is not None else 0
        return f"{df} residual degree(s) of freedom; at least 2 are needed to estimate seed noise"
    if prof.p_gap >= DETECTION:
        return (f"no gap detected: a zero gap at every {x_name} fits the runs about as well as the law "
                f"(F test p = {prof.p_gap:.2g}; a law is reported from p < {DETECTION:g})")
    low, high, bounded = prof.alpha_interval()
    if not bounded:
        side = "above" if high >= ALPHA_MAX - 1e-9 else "below"
        return (f"the data do not bound alpha {side}: its 95% profile interval reaches the search range "
                f"[{ALPHA_MIN:g}, {ALPHA_MAX:g}]")
    return ""
