"""c-optimal block designs for a gap law: the best any design can do for one target, and the plan
the adaptive sampler follows (numpy and scipy only; the sampler's rules are `scaling.design`).

The model is the fits' (scaling.profile): per seed s, z(baseline) = theta_s + e and
z(variant, x) = theta_s + C x^-alpha (+ g_inf) + e. A seed is a BLOCK: the set of arms it runs
(the baseline and some x values). Seeds are independent, so information adds over blocks:

    M = sum over blocks of I(block),   I(block) = J' P J,

J = d mean / d(C, alpha[, g_inf]) on the block's runs and P the projection that removes the seed's
level (the fixed seed effect the fits estimate; in units of the within-seed noise variance). With
`model="random"` the seed level is instead a random effect sharing `shared` of a run's variance,
V = (1 - shared) I + shared 11', and the block's information is X' V^-1 X with a common mean mu as
an extra parameter (generalised least squares: what an estimator that knew the variance split
could use). The target's asymptotic variance is c' M^-1 c (c = e_alpha, or the gradient of the
gap at x0); it is the same for every C != 0 (C rescales a column of J and of c), so C = 1 here.

An APPROXIMATE design is a share w_T of the trials for each block type T (a run costs one trial, a
block of |T| runs |T| trials); its information per trial is sum_T (w_T / |T|) I_T. The c-optimal
design minimises the criterion

    Phi(w) = mean over k of log c' M_k(w)^-1 c,   M_k = M0_k + R sum_T (w_T/|T|) I_T(alpha_k),

for R trials added to a design already made (information M0), averaged over alpha draws k (one
draw: the locally optimal design; several from the current profile likelihood: a pseudo-Bayesian
design, Chaloner & Verdinelli 1995, that a loose alpha-hat cannot send to one point). Phi is convex
in w (log c'M^-1c = -log of a concave function), so the equivalence theorem gives a certificate:
with g_T = mean_k (c'M_k^-1 I_T M_k^-1 c) / (|T| c'M_k^-1 c), no design beats w by more than
R (max_T g_T - sum_T w_T g_T) in Phi (the Frank-Wolfe duality gap; with M0 = 0, w is optimal
exactly when every g_T <= 1/R, Kiefer-Wolfowitz / Elfving). Two solvers, checked against each
other: the multiplicative algorithm (w_T <- w_T g_T^(1/2), normalised; Silvey, Titterington &
Torsney 1978, with the exponent 1/2 that suits c-optimality: with exponent 1 it stalls on the
extrapolation test) and SLSQP on the simplex with the analytic gradient (a softmax-parametrised
L-BFGS stalled at a vertex on the augmentation test: the softmax's gradient vanishes there).

`bound` is the asymptotic width ratio of the c-optimal design against another (the full-block
grid by default): no design, adaptive or not, does better in the limit of many trials.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

Block = tuple  # arms of one seed: None for the baseline, then x values ascending


# ---- information of one block ------------------------------------------------------------------

def _jacobian(block: Block, alpha: float, floor: bool) -> np.ndarray:
    """(runs, P) d mean / d(C, alpha[, g_inf]) at C = 1 for the runs of one block."""
    rows = []
    for x in block:
        if x is None:
            rows.append([0.0, 0.0] + ([0.0] if floor else []))
        else:
            f = float(x) ** (-alpha)
            rows.append([f, -f * math.log(float(x))] + ([1.0] if floor else []))
    return np.array(rows, float).reshape(len(block), 2 + int(floor))


def block_info(block: Block, alpha: float, *, floor: bool = False, model: str = "fixed",
               shared: float = 0.5) -> np.ndarray:
    """The information one seed's runs give about (C, alpha[, g_inf]) ("fixed": the seed level
    projected out, unit within-seed noise) or about (mu, C, alpha[, g_inf]) ("random": unit run
    variance, `shared` of it a seed effect)."""
    J = _jacobian(block, alpha, floor)
    n = len(block)
    if model == "fixed":
        if n == 0:
            return np.zeros((J.shape[1], J.shape[1]))
        Jc = J - J.mean(axis=0, keepdims=True)
        return Jc.T @ Jc
    if model != "random":
        raise ValueError(f"model must be 'fixed' or 'random' (got {model!r})")
    if not 0.0 <= shared < 1.0:
        raise ValueError(f"shared must be in [0, 1) (got {shared})")
    X = np.concatenate([np.ones((n, 1)), J], axis=1)
    V = (1.0 - shared) * np.eye(n) + shared * np.ones((n, n))
    return X.T @ np.linalg.solve(V, X)


def block_types(xs: Sequence[float], *, paired: bool = True, min_runs: int = 2) -> list[Block]:
    """Every block on the baseline and the x values: those with the baseline when `paired`, with
    at least `min_runs` runs (under fixed seed effects a lone run says nothing)."""
    arms: list = [None] + sorted(float(x) for x in xs)
    out = []
    for k in range(max(1, min_runs), len(arms) + 1):
        for combo in itertools.combinations(arms, k):
            if paired and combo[0] is not None:
                continue
            out.append(tuple(combo))
    return out


def target_vector(kind: str, alpha: float, *, x0: float | None = None, floor: bool = False,
                  model: str = "fixed") -> np.ndarray:
    """c of the target: alpha, or the gap at x0 (C = 1), over the model's parameters."""
    if kind == "alpha":
        c = [0.0, 1.0] + ([0.0] if floor else [])
    elif kind == "predict":
        f = float(x0) ** (-alpha)
        c = [f, -f * math.log(float(x0))] + ([1.0] if floor else [])
    else:
        raise ValueError(f"target kind must be 'alpha' or 'predict' (got {kind!r})")
    return np.array(([0.0] if model == "random" else []) + c, float)


# ---- the approximate c-optimal design ----------------------------------------------------------

@dataclass
class Solution:
    weights: np.ndarray  # (B,) trial shares, sum 1
    value: float  # Phi: mean over draws of log c' M^-1 c
    gap: float  # Frank-Wolfe duality gap: Phi - Phi* <= gap
    iterations: int
    method: str


def _criterion(w: np.ndarray, infos: np.ndarray, costs: np.ndarray, c: np.ndarray, M0: np.ndarray,
               budget: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Phi(w), g (B,) with dPhi/dw_T = -budget g_T, and the per-draw variances (K,)."""
    M = M0 + budget * np.einsum("b,kbij->kij", w / costs, infos)
    try:
        Mc = np.linalg.solve(M, c[:, :, None])[:, :, 0]  # (K, P) M^-1 c
    except np.linalg.LinAlgError:
        return math.inf, np.zeros(len(w)), np.full(len(c), math.inf)
    var = np.einsum("kp,kp->k", c, Mc)
    if not np.all(np.isfinite(var)) or np.any(var <= 0):
        return math.inf, np.zeros(len(w)), np.full(len(c), math.inf)
    quad = np.einsum("kp,kbpq,kq->kb", Mc, infos, Mc)  # c'M^-1 I_T M^-1 c
    g = np.mean(quad / var[:, None], axis=0) / costs
    return float(np.mean(np.log(var))), g, var


def c_optimal(infos: np.ndarray, costs: Sequence[float], c: np.ndarray, *, M0: np.ndarray | None = None,
              budget: float = 1.0, method: str = "multiplicative", tol: float = 1e-7, max_iter: int = 20000,
              start: np.ndarray | None = None) -> Solution:
    """The trial shares over block types that minimise Phi (module docstring).

    infos: (K, B, P, P) information of each block type at each of K draws (or (B, P, P): one draw);
    costs: (B,) trials per block; c: (K, P) or (P,) the target; M0: (K, P, P) information already
    in hand; budget: trials to add (with M0 = 0 the optimal shares do not depend on it)."""
    infos = np.asarray(infos, float)
    if infos.ndim == 3:
        infos = infos[None]
    K, B, P, _ = infos.shape
    costs = np.asarray(costs, float)
    c = np.broadcast_to(np.asarray(c, float), (K, P)).copy()
    M0 = np.zeros((K, P, P)) if M0 is None else np.broadcast_to(np.asarray(M0, float), (K, P, P)).copy()
    w = np.full(B, 1.0 / B) if start is None else np.asarray(start, float) / np.sum(start)
    if method == "multiplicative":
        it = 0
        value, g, _ = _criterion(w, infos, costs, c, M0, budget)
        if not math.isfinite(value):
            raise ValueError("the block types cannot estimate the target (singular information)")
        for it in range(1, max_iter + 1):
            if budget * (g.max() - w @ g) < tol:
                break
            step = w * np.sqrt(np.maximum(g, 0.0))  # exponent 1/2: with 1 (the D-optimal algorithm's) it stalls on an extrapolation
            step /= step.sum()
            new_value, new_g, _ = _criterion(step, infos, costs, c, M0, budget)
            if not new_value < value + 1e-15:  # rounding: the information of the support went singular or no progress
                break
            w, value, g = step, new_value, new_g
        return Solution(w, value, float(budget * (g.max() - w @ g)), it, method)
    if method == "slsqp":
        from scipy.optimize import minimize

        def fun(v):
            value, g, _ = _criterion(np.maximum(v, 0.0), infos, costs, c, M0, budget)
            return (value, -budget * g) if math.isfinite(value) else (1e300, np.zeros_like(v))

        result = minimize(fun, w, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * B,
                          constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1.0, "jac": lambda v: np.ones_like(v)}],
                          options={"maxiter": max_iter, "ftol": 1e-14})
        w = np.maximum(result.x, 0.0)
        w /= w.sum()
        value, g, _ = _criterion(w, infos, costs, c, M0, budget)
        return Solution(w, value, float(budget * (g.max() - w @ g)), int(result.nit), method)
    raise ValueError(f"method must be 'multiplicative' or 'slsqp' (got {method!r})")


def stack_infos(blocks: Sequence[Block], alphas: Iterable[float], *, floor: bool = False, model: str = "fixed",
                shared: float = 0.5) -> np.ndarray:
    """(K, B, P, P): every block's information at every alpha."""
    return np.array([[block_info(b, a, floor=floor, model=model, shared=shared) for b in blocks] for a in alphas])


# ---- the bound -----------------------------------------------------------------------------------

def bound(xs: Sequence[float], alpha: float, *, C: float = 1.0, target: str = "alpha", x0: float | None = None,
          floor: bool = False, model: str = "fixed", shared: float = 0.5, paired: bool = False,
          against: Sequence[tuple[Block, float]] | None = None) -> dict:
    """The locally c-optimal approximate block design at (C, alpha) and its asymptotic width ratio
    against `against` (block, trial share) pairs; default the grid: every seed runs the baseline
    and every x. `paired` restricts the blocks to those with the baseline. C does not change the
    ratio (module docstring); it is recorded with the result."""
    xs = sorted(float(x) for x in xs)
    min_runs = 1 if model == "random" else 2
    blocks = block_types(xs, paired=paired, min_runs=min_runs)
    infos = stack_infos(blocks, [alpha], floor=floor, model=model, shared=shared)
    c = target_vector(target, alpha, x0=x0, floor=floor, model=model)
    costs = np.array([len(b) for b in blocks], float)
    sol = c_optimal(infos, costs, c, tol=1e-9)
    grid = against if against is not None else [(tuple([None] + xs), 1.0)]
    M = sum(share / len(b) * block_info(b, alpha, floor=floor, model=model, shared=shared) for b, share in grid)
    var_against = float(c @ np.linalg.solve(M, c))
    var_opt = math.exp(sol.value)
    support = sorted(((blocks[i], float(sol.weights[i])) for i in np.flatnonzero(sol.weights > 1e-3)),
                     key=lambda s: -s[1])
    return {"ratio": math.sqrt(var_opt / var_against), "ratio_lower": math.sqrt(math.exp(sol.value - sol.gap) / var_against),
            "support": [{"block": ["baseline" if a is None else a for a in b], "share": s} for b, s in support],
            "C": C, "alpha": alpha, "xs": xs, "model": model, "shared": shared if model == "random" else None,
            "paired": paired, "target": target, "x0": x0, "gap": sol.gap}


# ---- whole blocks: the plan for the trials left ------------------------------------------------

@dataclass
class Item:
    """One thing the plan can add: a new seed's block, or one run more on a seed already in the
    design (an extension: at most one per seed, `group` the seed)."""

    key: tuple  # ("new", block) or ("extend", seed, x)
    cost: int  # trials
    seeds: int  # new seeds it takes
    info: np.ndarray  # (K, P, P) the information it adds, per draw
    xs: tuple  # x values it adds a run at
    group: object = None


class ExactCriterion:
    """The finite-sample criterion of whole-block designs: mean over draws of log(c'M^-1c + extra)
    plus 2 log t_{df, 0.975} (the width's t quantile: more seeds cost degrees of freedom). A plan
    that leaves an x it opens at one seed is infeasible (the fits need two seeds per x)."""

    def __init__(self, items: Sequence[Item], M0: np.ndarray, c: np.ndarray, *, n_runs: int, n_seeds: int,
                 linear: int, x_counts: dict, extra: float = 0.0) -> None:
        self.items, self.M0, self.c, self.extra = list(items), np.asarray(M0, float), np.asarray(c, float), extra
        self.n_runs, self.n_seeds, self.linear = n_runs, n_seeds, linear
        self.infos = np.array([it.info for it in self.items])  # (I, K, P, P)
        self.costs = np.array([it.cost for it in self.items], float)
        self.new_seeds = np.array([it.seeds for it in self.items], float)
        new_x = sorted({x for it in self.items for x in it.xs if x_counts.get(x, 0) == 0})
        self.new_x = np.array([[it.xs.count(x) for x in new_x] for it in self.items], float).reshape(len(self.items), len(new_x))

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        """F for each row of counts (R, I); +inf where infeasible."""
        from scipy.special import stdtrit

        counts = np.atleast_2d(np.asarray(counts, float))
        M = self.M0[None] + np.einsum("ri,ikpq->rkpq", counts, self.infos)
        df = self.n_runs + counts @ self.costs - self.n_seeds - counts @ self.new_seeds - self.linear - 1
        out = np.full(len(counts), math.inf)
        ok = (df >= 1) & ~np.any((counts @ self.new_x) == 1, axis=1)
        if not ok.any():
            return out
        c = np.broadcast_to(self.c, (int(ok.sum()),) + self.c.shape)
        det = np.linalg.det(M[ok])
        good = np.all(np.abs(det) > 1e-300, axis=1)
        Mi = np.where(good[:, None, None, None], M[ok], np.eye(M.shape[-1]))
        var = np.einsum("rkp,rkp->rk", c, np.linalg.solve(Mi, c[..., None])[..., 0])
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.mean(np.log(np.maximum(var, 0) + self.extra), axis=1) + 2 * np.log(stdtrit(np.maximum(df[ok], 1), 0.975))
        value = np.where(good & np.isfinite(value), value, math.inf)
        out[ok] = value
        return out

    def feasible_additions(self, counts: np.ndarray, budget: int, seed_room: int) -> list[int]:
        used = {self.items[i].group for i in np.flatnonzero(counts) if self.items[i].group is not None}
        spent = counts @ self.costs
        seeds = counts @ self.new_seeds
        return [i for i, it in enumerate(self.items)
                if spent + it.cost <= budget and seeds + it.seeds <= seed_room
                and (it.group is None or it.group not in used)]


def _fill(crit: ExactCriterion, counts: np.ndarray, budget: int, seed_room: int) -> np.ndarray:
    """Greedy: add the item (or two of a new block, which may open an x) with the largest decrease
    of the criterion per trial, while something fits."""
    counts = counts.copy()
    while True:
        here = float(crit(counts)[0])
        options = []
        for i in crit.feasible_additions(counts, budget, seed_room):
            one = counts.copy()
            one[i] += 1
            options.append((one, crit.items[i].cost))
            if crit.items[i].group is None:
                two = one.copy()
                two[i] += 1
                if crit.feasible_additions(one, budget, seed_room).count(i):
                    options.append((two, 2 * crit.items[i].cost))
        if not options:
            return counts
        values = crit(np.array([o for o, _ in options]))
        if math.isfinite(here):
            score = (here - values) / np.array([t for _, t in options], float)
        else:
            score = -values
        best = int(np.argmax(score))
        if not math.isfinite(values[best]) and math.isfinite(here):
            return counts
        if math.isfinite(here) and score[best] <= 0:
            return counts
        counts = options[best][0]


def integer_plan(crit: ExactCriterion, start: np.ndarray, *, budget: int, seed_room: int,
                 max_rounds: int = 50) -> np.ndarray:
    """Whole blocks from an approximate design: its rounded-down counts (`start`), filled greedily,
    then improved by exchanges (take one item out, refill greedily) while the criterion falls."""
    counts = np.asarray(start, float).copy()
    while counts @ crit.costs > budget or counts @ crit.new_seeds > seed_room:  # too many: drop the largest count
        counts[int(np.argmax(counts))] -= 1
    counts = _fill(crit, counts, budget, seed_room)
    best = float(crit(counts)[0])
    for _ in range(max_rounds):
        improved = False
        for i in np.flatnonzero(counts):
            trial = counts.copy()
            trial[i] -= 1
            trial = _fill(crit, trial, budget, seed_room)
            value = float(crit(trial)[0])
            if value < best - 1e-9:
                counts, best, improved = trial, value, True
                break
        if not improved:
            return counts
    return counts
