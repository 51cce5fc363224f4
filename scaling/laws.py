"""The numerical core of the fits: power-law models and batched solvers (numpy, scipy; no torch).

Every solver takes a batch: row b of `Y` (or of the weights `W`) is one data set, so the point fit
(one row) and 2,000 bootstrap refits (2,000 rows) run through the same code in a few array
operations instead of a Python loop. Legend: B batch (bootstrap draws or starting points),
J points (one per x value, e.g. per d_osc), G grid of exponents, P parameters.

Models (x = d_osc or a parameter count):
- `power`:        y = C * x^-alpha
- `power_floor`:  y = C * x^-alpha + g_inf   (an irreducible gap g_inf)
- `offset_power`: L = E + A * x^-alpha       (loss vs parameters, Chinchilla-style)
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

# Exponent search range for the variable-projection fits. Every bound hit is reported by the caller.
# alpha < 0 (a gap that grows) is allowed without a floor; with a floor alpha -> 0 is degenerate.
ALPHA_MIN, ALPHA_MAX = -2.0, 6.0
ALPHA_GRID = np.linspace(ALPHA_MIN, ALPHA_MAX, 161)
ALPHA_GRID_FLOOR = np.linspace(0.02, ALPHA_MAX, 120)


def evaluate(model: str, constants: dict[str, np.ndarray | float], x: np.ndarray | float) -> np.ndarray:
    """The model's value at x; constants may be arrays (one entry per bootstrap draw) broadcast over x."""
    x = np.asarray(x, dtype=float)
    c = {k: np.asarray(v, dtype=float)[..., None] if np.ndim(v) else float(v) for k, v in constants.items()}
    if model == "power":
        return c["C"] * x ** (-c["alpha"])
    if model == "power_floor":
        return c["C"] * x ** (-c["alpha"]) + c["g_inf"]
    if model == "offset_power":
        return c["E"] + c["A"] * x ** (-c["alpha"])
    raise ValueError(f"unknown model {model!r}; known: power, power_floor, offset_power")


FORMULAS = {"power": "C * x^-alpha", "power_floor": "C * x^-alpha + g_inf", "offset_power": "E + A * x^-alpha"}


# ---- the law registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FitScope:
    """What a law's `jobs` see: one task's ledger rows (`scaling.fits.select_rows`) and one variant
    of it, with the study's fit settings. Built by `scaling.api` for every (task, variant)."""

    data: Any  # scaling.fits.TaskRows: rows, excluded rows, notes, metric
    variant: str
    baseline: str
    has_baseline: bool  # the task has completed baseline trials
    sizes: list  # the variant's target_params values (None first)
    d_values: list  # the variant's d_osc values (None first)
    base_sizes: set  # the baseline's target_params values
    params_field: str  # the parameter count column fits in N use
    floor: Any  # the study's fits.floor setting
    common: dict  # study, task, metric, draws (one bootstrap stream per task), ci_level


FitJob = Callable[[], Any]  # returns one FitResult or a list of them


@dataclass(frozen=True)
class Law:
    """One scaling law the service fits. The study schema's `fits.laws`, the CLI's --law and --method
    choices, the HTTP API's enums, the API's per-law choices (default method, the x it predicts
    at, the group that picks one fit) and the fits themselves (`jobs`) come from this registry."""

    name: str
    x: str  # what the law is a function of: "d_osc" or "params" (the CLI's --d-osc / --params)
    x_symbol: str  # in formulas and report sentences
    quantity: str  # "gap" (variant - baseline, paired) or "loss" (one variant's metric)
    methods: tuple[str, ...]  # fitting methods, see scaling/fits.py
    default_method: str | None  # None: the study's `fits.method`
    group: str  # what picks one fit when a study has several, and where to give it
    description: str
    # the fits of this law for one (task, variant): callables, each returning FitResult(s); a law
    # that does not apply to the scope (no d_osc, fewer than two sizes) yields none
    jobs: Callable[[FitScope], Iterator[FitJob]] = field(repr=False, compare=False, default=lambda scope: iter(()))

    @property
    def baseline(self) -> bool:
        """Paired with the study's baseline (a gap), or not (a loss)."""
        return self.quantity == "gap"


def _merge(*counts: dict[str, int]) -> dict[str, int]:
    """Excluded-row counts added up by reason."""
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _gap_vs_dosc_jobs(scope: FitScope) -> Iterator[FitJob]:
    """gap(d_osc) at each size, for a variant with d_osc values (not the baseline)."""
    from scaling import fits as fitting  # scaling.fits imports this module

    data, variant, baseline = scope.data, scope.variant, scope.baseline
    if variant == baseline or not any(d is not None for d in scope.d_values):
        return
    for size in scope.sizes:
        group = {"target_params": size} if size is not None else {}
        if not scope.has_baseline:
            cells = fitting.GapCells(np.zeros(0), [], np.zeros((0, 0)), np.zeros((0, 0)), 1.0,
                                     [f"no completed {baseline} baseline trials for task {scope.common['task']}"])
        else:
            cells = fitting.gap_cells(data.rows, variant=variant, baseline=baseline, x_of="d_osc",
                                      metric=scope.common["metric"], target_params=size, params_field=scope.params_field)
        excluded = _merge(data.excluded_where(variant=variant, target_params=size),
                          data.excluded_where(variant=baseline, target_params=size))
        yield functools.partial(fitting.fit_gap_law, cells, law="gap_vs_dosc", variant=variant, baseline=baseline,
                                group=group, excluded=excluded, extra_notes=data.notes, floor=scope.floor, **scope.common)


def _sized(scope: FitScope) -> bool:
    """A law in N needs at least two sizes of the variant."""
    return len([s for s in scope.sizes if s is not None]) >= 2


def _gap_vs_params_jobs(scope: FitScope) -> Iterator[FitJob]:
    """gap(N) at each d_osc, for a variant (not the baseline) and a baseline with >= 2 sizes each."""
    from scaling import fits as fitting

    data, variant, baseline = scope.data, scope.variant, scope.baseline
    if not _sized(scope) or variant == baseline or not scope.has_baseline or len(scope.base_sizes - {None}) < 2:
        return
    for d in scope.d_values:
        cells = fitting.gap_cells(data.rows, variant=variant, baseline=baseline, x_of="params",
                                  metric=scope.common["metric"], d_osc=d, params_field=scope.params_field)
        excluded = _merge(data.excluded_where(variant=variant, d_osc=d), data.excluded_where(variant=baseline))
        yield functools.partial(fitting.fit_gap_law, cells, law="gap_vs_params", variant=variant, baseline=baseline,
                                group={"d_osc": d} if d is not None else {}, excluded=excluded,
                                extra_notes=data.notes, params_field=scope.params_field, floor=scope.floor,
                                **scope.common)


def _loss_vs_params_jobs(scope: FitScope) -> Iterator[FitJob]:
    """L(N) at each d_osc, for every variant (the baseline too) with >= 2 sizes."""
    from scaling import fits as fitting

    if not _sized(scope):
        return
    for d in scope.d_values:
        yield functools.partial(fitting.fit_loss_vs_params, scope.data.rows, variant=scope.variant, d_osc=d,
                                params_field=scope.params_field,
                                excluded=scope.data.excluded_where(variant=scope.variant, d_osc=d),
                                extra_notes=scope.data.notes, **scope.common)


_SIZE = "target_params (CLI --target-params)"
_AT_D_OSC = "d_osc (CLI --at-d-osc, HTTP at_d_osc)"
LAWS: dict[str, Law] = {law.name: law for law in (
    Law("gap_vs_dosc", "d_osc", "d_osc", "gap", ("loglog-means", "nonlinear"), None, _SIZE,
        "gap(d) = C d^-alpha (+ g_inf) to the baseline, per variant with d_osc and per size", _gap_vs_dosc_jobs),
    Law("gap_vs_params", "params", "N", "gap", ("loglog-means", "nonlinear"), None, _AT_D_OSC,
        "gap(N) = C N^-alpha (+ g_inf) to the baseline, per variant and d_osc with >= 2 sizes", _gap_vs_params_jobs),
    Law("loss_vs_params", "params", "N", "loss", ("huber-log",), "huber-log", _AT_D_OSC,
        "L(N) = E + A N^-alpha per variant and d_osc with >= 2 sizes (a fit needs >= 3)", _loss_vs_params_jobs),
)}
LAW_NAMES = tuple(LAWS)
METHODS = tuple(dict.fromkeys(m for law in LAWS.values() for m in law.methods))


def default_law(x: str) -> str:
    """The first registered law in `x` ("d_osc" or "params"): what a prediction at that x uses."""
    return next(name for name, law in LAWS.items() if law.x == x)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS on one thread while fitting. These problems are tiny (3 constants, tens of points);
    OpenBLAS threads only add hand-offs, and on a busy 2-core machine they made one L-BFGS fit
    ~15x slower (0.25 s instead of 0.017 s, measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: fits are correct without it, only slower on busy machines
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


# ---- log-log least squares (paper A's method) --------------------------------------------------

def loglog_batch(x: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, alpha, n_used) of log y = log C - alpha log x per row; non-positive or NaN y are left out.

    A row with fewer than two usable points gives NaN constants."""
    Y = np.atleast_2d(Y)
    valid = np.isfinite(Y) & (Y > 0)
    w = valid.astype(float)
    n = w.sum(axis=1)
    lx = np.log(np.asarray(x, dtype=float))[None, :]
    ly = np.log(np.where(valid, Y, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (w * lx).sum(axis=1) / n
        my = (w * ly).sum(axis=1) / n
        dx = (lx - mx[:, None]) * w
        sxx = (dx * dx).sum(axis=1)
        sxy = (dx * (ly - my[:, None])).sum(axis=1)
        slope = sxy / sxx
        intercept = my - slope * mx
    ok = (n >= 2) & (sxx > 0)
    return np.where(ok, np.exp(intercept), np.nan), np.where(ok, -slope, np.nan), n


def r2_score(observed: np.ndarray, predicted: np.ndarray) -> float | None:
    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    if len(observed) < 3:
        return None
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    if ss_tot <= 0:
        return None
    return 1.0 - float(np.sum((observed - predicted) ** 2)) / ss_tot


# ---- nonlinear least squares by variable projection --------------------------------------------

def _vp_sums(W: np.ndarray, Y: np.ndarray):
    """Weighted sums of y that do not depend on the exponent."""
    Yz = np.where(W > 0, Y, 0.0)
    s_w = W.sum(axis=-1)
    s_y = (W * Yz).sum(axis=-1)
    s_yy = (W * Yz * Yz).sum(axis=-1)
    return Yz, s_w, s_y, s_yy


def _vp_solve(floor: bool, s_w, s_y, s_yy, s_f, s_ff, s_fy):
    """(C, g_inf, SSE) of the weighted linear least squares for a fixed exponent."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if floor:
            det = s_w * s_ff - s_f * s_f
            c = (s_w * s_fy - s_f * s_y) / det
            g = (s_ff * s_y - s_f * s_fy) / det
            sse = s_yy - c * s_fy - g * s_y
        else:
            c = s_fy / s_ff
            g = np.zeros_like(c)
            sse = s_yy - c * s_fy
    return c, g, np.maximum(sse, 0.0)


def power_vp_batch(
    x: np.ndarray, Y: np.ndarray, *, floor: bool, W: np.ndarray | None = None, rounds: int = 5
) -> dict[str, np.ndarray]:
    """Least squares of y = C x^-alpha (+ g_inf) per row of Y (B, J), exact in C and g_inf for each
    alpha (variable projection); alpha by a grid over [ALPHA_MIN, ALPHA_MAX] (from 0.02 with a
    floor, where alpha -> 0 makes C and g_inf inseparable), then `rounds` of parabolic refinement
    on a bracket shrinking fourfold each round (alpha to ~1e-5 of the grid step).

    NaN entries of Y are missing points. Returns C, alpha, g_inf (0 without floor), sse, n (points),
    at_bound (alpha on the edge of the search range)."""
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    W = np.isfinite(Y).astype(float) if W is None else np.where(np.isfinite(Y), W, 0.0)
    x = np.asarray(x, dtype=float)
    Yz, s_w, s_y, s_yy = _vp_sums(W, Y)
    WY = W * Yz
    lx = np.log(x)
    grid = ALPHA_GRID_FLOOR if floor else ALPHA_GRID
    if Y.shape[0] > 64:  # bootstrap batches: a 4x coarser grid and one more refinement round
        grid, rounds = grid[::4], rounds + 1
    lo_bound, hi_bound = grid[0], grid[-1]

    def solve_at(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = np.exp(-alpha[:, None] * lx[None, :])  # (B, J)
        s_f, s_ff, s_fy = (W * f).sum(-1), (W * f * f).sum(-1), (WY * f).sum(-1)
        return _vp_solve(floor, s_w, s_y, s_yy, s_f, s_ff, s_fy)

    def sse_at(alpha: np.ndarray) -> np.ndarray:
        sse = solve_at(alpha)[2]
        return np.where(np.isfinite(sse), sse, np.inf)

    # coarse grid: (B, G) sums by matrix products
    F = np.exp(-grid[:, None] * lx[None, :])  # (G, J)
    s_f, s_ff, s_fy = W @ F.T, W @ (F * F).T, WY @ F.T
    _, _, sse_grid = _vp_solve(floor, s_w[:, None], s_y[:, None], s_yy[:, None], s_f, s_ff, s_fy)
    sse_grid = np.where(np.isfinite(sse_grid), sse_grid, np.inf)
    k = np.argmin(sse_grid, axis=1)
    alpha, f0 = grid[k], sse_grid[np.arange(len(k)), k]
    h = np.full(len(k), grid[1] - grid[0])
    for _ in range(rounds):
        a_lo, a_hi = np.maximum(alpha - h, lo_bound), np.minimum(alpha + h, hi_bound)
        f_lo, f_hi = sse_at(a_lo), sse_at(a_hi)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            curv = f_lo - 2 * f0 + f_hi
            vertex = alpha - h * (f_hi - f_lo) / (2 * curv)
        vertex = np.where(np.isfinite(vertex) & (curv > 0), np.clip(vertex, a_lo, a_hi), alpha)
        f_v = sse_at(vertex)
        # keep the best of the four evaluated points
        cand_a = np.stack([alpha, a_lo, a_hi, vertex], axis=1)
        cand_f = np.stack([f0, f_lo, f_hi, f_v], axis=1)
        best = np.argmin(cand_f, axis=1)
        alpha, f0 = cand_a[np.arange(len(best)), best], cand_f[np.arange(len(best)), best]
        h = h / 4
    c, g, sse = solve_at(alpha)
    n = (W > 0).sum(axis=1)
    need = 3 if floor else 2
    bad = (n < need) | ~np.isfinite(c) | ~np.isfinite(sse)
    nan = np.full_like(alpha, np.nan)
    step = grid[1] - grid[0]
    at_bound = (alpha <= lo_bound + step / 2) | (alpha >= hi_bound - step / 2)
    return {"C": np.where(bad, nan, c), "alpha": np.where(bad, nan, alpha), "g_inf": np.where(bad, nan, g),
            "sse": np.where(bad, nan, sse), "n": n, "at_bound": at_bound & ~bad}


# ---- L = E + A x^-alpha: Huber loss on log residuals -------------------------------------------

class HuberLogProblem:
    """sum_i w_i Huber_delta(log(E + A x_i^-alpha) - log L_i) / sum_i w_i, per row of W.

    Parameters theta = (a, e, alpha) with A = exp(a) * x0^alpha, E = exp(e): E and A stay positive,
    and centring log x at x0 (the geometric mean) decorrelates a from alpha. The objective is
    divided by delta^2 so that it is O(1) whatever delta is."""

    def __init__(self, x: np.ndarray, y: np.ndarray, delta: float) -> None:
        self.x = np.asarray(x, dtype=float)
        self.log_x0 = float(np.mean(np.log(self.x)))
        self.u = np.log(self.x) - self.log_x0
        self.ly = np.log(np.asarray(y, dtype=float))
        self.delta = float(delta)

    def constants(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        theta = np.atleast_2d(theta)
        a, e, alpha = theta[:, 0], theta[:, 1], theta[:, 2]
        return {"E": np.exp(e), "A": np.exp(a + alpha * self.log_x0), "alpha": alpha}

    def _parts(self, theta: np.ndarray):
        a, e, alpha = theta[:, :1], theta[:, 1:2], theta[:, 2:3]
        z = a - alpha * self.u[None, :]
        pred = np.logaddexp(z, e)
        r = (pred - self.ly[None, :]) / self.delta
        return z, pred, r

    def value(self, theta: np.ndarray, W: np.ndarray) -> np.ndarray:
        _, _, r = self._parts(theta)
        absr = np.abs(r)
        h = np.where(absr <= 1.0, 0.5 * r * r, absr - 0.5)
        return (W * h).sum(axis=1) / W.sum(axis=1)

    def value_grad_hess(self, theta: np.ndarray, W: np.ndarray):
        """Objective, gradient and Gauss-Newton Hessian per row: (B,), (B, 3), (B, 3, 3)."""
        z, pred, r = self._parts(theta)
        absr = np.abs(r)
        inside = absr <= 1.0
        h = np.where(inside, 0.5 * r * r, absr - 0.5)
        psi = np.clip(r, -1.0, 1.0)
        wn = W / W.sum(axis=1, keepdims=True)
        sig = np.exp(z - pred)  # d pred / d a;  d pred / d e = 1 - sig;  d pred / d alpha = -u sig
        jac = (sig, 1.0 - sig, -self.u[None, :] * sig)
        value = (wn * h).sum(axis=1)
        wp = wn * psi
        grad = np.stack([(wp * j).sum(axis=1) for j in jac], axis=1) / self.delta
        # The exact Hessian (Newton converges quadratically near the optimum): psi' = 1 inside the
        # quadratic zone, 0 outside, times the Jacobian outer product, plus the second derivative of
        # log(E + A x^-alpha), sig (1 - sig) v v^T with v = (1, -1, -u). The caller damps it where it
        # is not positive definite.
        wc = wn * inside
        wv = wp * sig * (1.0 - sig) * self.delta
        v = (1.0, -1.0, -self.u[None, :])
        hess = np.empty((theta.shape[0], 3, 3))
        for p in range(3):
            wj = wc * jac[p]
            for q in range(p, 3):
                hess[:, p, q] = hess[:, q, p] = (wj * jac[q] + wv * (v[p] * v[q])).sum(axis=1)
        return value, grad, hess / self.delta**2

    def fun_and_grad_single(self, theta: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad, _ = self.value_grad_hess(theta[None, :], w[None, :])
        return float(value[0]), grad[0]


def damped_newton_batch(
    problem: HuberLogProblem, theta0: np.ndarray, W: np.ndarray, *, max_iter: int = 200, tol: float = 1e-9
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise every row's objective from its own start: Newton steps with a backtracking line
    search (a step is kept only if it lowers that row's objective; otherwise it is quartered),
    Levenberg-Marquardt damping where the curvature is not positive definite.
    Returns (theta, value, converged)."""
    theta = np.array(theta0, dtype=float, copy=True)
    B = theta.shape[0]
    value, grad, hess = problem.value_grad_hess(theta, W)
    converged = np.zeros(B, dtype=bool)
    direction = np.zeros_like(theta)
    t = np.ones(B)  # step length along the current direction
    fresh = np.ones(B, dtype=bool)  # the direction needs recomputing (theta moved)
    eye = np.eye(3)[None]
    for _ in range(max_iter):
        idx = np.flatnonzero(~converged)
        if not len(idx):
            break
        new_dir = idx[fresh[idx]]
        if len(new_dir):
            h, g = hess[new_dir], grad[new_dir]
            scale = np.abs(np.einsum("bii->bi", h)).max(axis=1)[:, None, None] + 1e-12
            d = np.linalg.solve(h + 1e-12 * scale * eye, -g[:, :, None])[:, :, 0]
            bad = ~np.isfinite(d).all(axis=1) | ((d * g).sum(axis=1) >= 0)  # not a descent direction
            if bad.any():
                # Marquardt: damp until positive definite (a scaled gradient step in the limit)
                hb, gb = h[bad], g[bad]
                lam = 1e-2 * scale[bad]
                d[bad] = np.linalg.solve(hb + lam * eye, -gb[:, :, None])[:, :, 0]
            direction[new_dir], t[new_dir], fresh[new_dir] = d, 1.0, False
        step = t[idx, None] * direction[idx]
        trial = theta[idx] + step
        new_value = problem.value(trial, W[idx])
        better = np.isfinite(new_value) & (new_value < value[idx])
        improvement = value[idx] - new_value
        good = idx[better]
        theta[good] = trial[better]
        if len(good):
            value[good], grad[good], hess[good] = problem.value_grad_hess(theta[good], W[good])
            fresh[good] = True
        t[idx[~better]] *= 0.25
        small_step = np.abs(step).max(axis=1) < tol * 1000  # 1e-6 in log A, log E, alpha: far below any interval
        tiny_gain = better & (improvement <= tol * 1e-3 * (1.0 + np.abs(value[idx])))
        # a tiny step that does not lower the objective: at the optimum up to rounding
        at_noise = ~better & small_step
        converged[idx[(better & small_step) | tiny_gain | at_noise]] = True
    return theta, value, converged


def offset_power_point_fit(problem: HuberLogProblem, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """The point fit of L = E + A x^-alpha, as in Epoch AI's Chinchilla replication: the Huber
    objective minimised by L-BFGS from a grid of starting points.

    Every grid start first takes up to 25 batched Newton steps (cheap, all at once, enough to tell
    the basins apart); the best four are run to convergence, then each is polished by scipy's
    L-BFGS-B and the lowest objective wins."""
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=float)
    y_min, y_span = float(np.min(y)), float(np.max(y) - np.min(y))
    starts = []
    for e_frac in (0.05, 0.5, 0.9, 0.98):
        for alpha in (0.1, 0.3, 0.6, 1.0, 2.0):
            for a_scale in (0.5, 2.0):
                E = y_min * e_frac
                A0 = max(float(np.mean(y)) - E, 1e-3 * y_min, y_span) * a_scale  # A at x0
                starts.append([math.log(A0), math.log(E), alpha])
    starts = np.array(starts)
    W = np.ones((len(starts), len(y)))
    theta, value, _ = damped_newton_batch(problem, starts, W, max_iter=25)  # to find the basins
    order = np.argsort(np.where(np.isfinite(value), value, np.inf))[:4]
    theta, value, _ = damped_newton_batch(problem, theta[order], W[order])  # the best four, to convergence
    order = np.argsort(np.where(np.isfinite(value), value, np.inf))
    w1 = np.ones(len(y))
    best_theta, best_value, info = None, np.inf, {"n_starts": len(starts), "optimizer": "L-BFGS-B"}
    for j in order:
        res = minimize(problem.fun_and_grad_single, theta[j], args=(w1,), jac=True, method="L-BFGS-B",
                       options={"maxiter": 500, "gtol": 1e-9, "ftol": 1e-14})
        if res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
            # L-BFGS-B reports ABNORMAL when its line search cannot improve a start that is already
            # optimal; the gradient says whether it is
            grad_ok = float(np.abs(problem.fun_and_grad_single(res.x, w1)[1]).max()) < 1e-5
            info.update(converged=bool(res.success) or grad_ok, message=str(res.message), objective=best_value)
    return np.asarray(best_theta), info
