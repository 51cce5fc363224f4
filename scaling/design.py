"""Adaptive designs for a gap law: which run to add next so the target's interval shrinks most
(numpy and scipy only; the Optuna sampler that serves these proposals is `studies.design`).

The model is the one the fits use (scaling.profile): every run of the baseline and of the variant at
x (d_osc or a parameter count) at seed s, with z = sign * metric,

    z(baseline, s) = theta_s + e,   z(variant, x, s) = theta_s + C x^-alpha (+ g_inf) + e.

A design is a set of runs (arm, x, seed). The TARGET is the width of alpha's 95% interval, or of the
95% prediction interval of the gap at a named x0 (a new run there, paired with its baseline). For a
design D and constants (C, alpha) the linearised width is

    w(D) = 2 t_{df, 0.975} sigma sqrt(c' M c  [+ 2 for a prediction]),
    M = (J' J)^-1,  J = d mu / d(C, alpha[, g_inf]) with the seed levels projected out,

df = runs - seeds - linear constants - 1, as the profile's; c picks alpha, or is the gradient of
g(x0). It depends on the unknown alpha, so the criterion is its average over alpha values drawn
from the current profile likelihood (RSS(alpha)^-(N-S)/2 on the profile's grid, C(alpha) its best
C): a pseudo-Bayesian design (Chaloner & Verdinelli 1995), robust where a locally optimal design
at alpha-hat would trust an estimate that is still loose.

The rules, in order (identifiability and honest intervals first, then efficiency):
  1. START: a space-filling design: the law's minimum number of x values (3, or 4 with a floor),
     spread evenly in log x over the range (its ends included), each at `initial_seeds` seeds with
     their baseline runs: the smallest design the fits can identify. Skipped when the runs already
     made (a grid) satisfy identification rules 1-2 of scaling.profile.
  2. COMPLETE: an x with one seed gets its second seed (rule 2: every x cell needs two), and a seed
     whose baseline ran gets a variant run, before anything new is opened.
  3. GAIN: every feasible move (one more seed at an x, by an existing seed's pairing or a new seed
     with its baseline; or a new x at two seeds) is scored by its expected reduction of the target
     width per trial, and the first run of the best move is proposed. A move is feasible when its
     trials fit the budget left and no x exceeds the cap on seeds per point.
  3'. PLAN (strategy "plan", instead of GAIN): the pseudo-Bayesian c-optimal augmentation of the
     design for the whole budget left (scaling.optimal_design), in whole blocks (a new seed with its
     baseline and some x, or one run more on a seed made); its most valuable block is proposed, a
     block begun is finished first, and the plan is made again at the next block (see `plan`).
Runs in flight count as runs already made (the "kriging believer" form of the constant liar: the
believed value is the current fit's, so the fit is unchanged and only the design grows), so a batch
of proposals for concurrent workers spreads instead of repeating the same point.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np

from scaling import profile as P

BASELINE, VARIANT = "baseline", "variant"
N_DRAWS = 9  # alpha values the criterion averages over
STRATEGIES = ("gain", "plan")
DEFAULT_STRATEGY = "gain"


@dataclass(frozen=True)
class Target:
    """What the design shrinks: alpha's interval, or the prediction interval of the gap at x0."""

    kind: str  # "alpha" | "predict"
    x0: float | None = None

    def label(self, x_name: str = "d_osc") -> str:
        if self.kind == "alpha":
            return "width of alpha's 95% interval"
        return f"width of the 95% prediction interval of the gap at {x_name} {_num(self.x0)}"


@dataclass(frozen=True)
class Point:
    arm: str  # baseline | variant
    x: float | None  # None for a baseline run
    seed: int

    def label(self, x_name: str = "d_osc") -> str:
        return f"baseline, seed {self.seed}" if self.arm == BASELINE else f"{x_name} {_num(self.x)}, seed {self.seed}"


@dataclass
class State:
    """What the design knows when it proposes: allowed values, finished runs, runs in flight."""

    xs: tuple[float, ...]  # allowed x values (ascending)
    seeds: tuple[int, ...]  # the seed pool, in the order new seeds are taken
    cap: int  # seeds per point (baseline included)
    remaining: int  # trials left in the budget
    target: Target
    observed: list[tuple[Point, float]] = field(default_factory=list)  # finished runs with z = sign * metric
    pending: list[Point] = field(default_factory=list)  # in flight
    lost: list[Point] = field(default_factory=list)  # diverged or failed: budget spent, no data
    floor: bool = False
    initial_seeds: int = 2
    known: tuple[float, float] | None = None  # (alpha, C) of a simulated law: the oracle reference of a benchmark
    strategy: str = DEFAULT_STRATEGY  # after start and completion: "gain" (greedy) or "plan" (c-optimal plan)
    blocks: list[list[Point]] = field(default_factory=list)  # the moves of earlier "plan" proposals

    @property
    def spent(self) -> set[Point]:
        return {p for p, _ in self.observed} | set(self.pending) | set(self.lost)

    def take(self, proposal: "Proposal") -> None:
        """The proposal is in flight: its run is pending, its trial spent, its block remembered."""
        self.pending.append(proposal.point)
        self.remaining -= 1
        if proposal.rule == "plan":
            self.blocks.append(list(proposal.move))


@dataclass
class Proposal:
    point: Point
    rule: str  # start | complete | gain | plan
    reason: str
    expected_gain: float | None  # expected reduction of the target width by the move (data units)
    gain_per_trial: float | None
    expected_width_before: float | None
    expected_width_after: float | None
    move: list[Point]
    width_now: float | None  # the target's actual interval width from the finished runs (None: not identified)
    identified: str  # '' when the finished runs identify the law, else why not

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["point"] = asdict(self.point)
        out["move"] = [asdict(p) for p in self.move]
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


# ---- the current fit ---------------------------------------------------------------------------

def runs_of(observed: Iterable[tuple[Point, float]]) -> P.Runs | None:
    obs = list(observed)
    if not obs:
        return None
    seeds = sorted({p.seed for p, _ in obs})
    index = {s: i for i, s in enumerate(seeds)}
    z = np.array([v for _, v in obs], float)
    seed = np.array([index[p.seed] for p, _ in obs], int)
    x = np.array([np.nan if p.arm == BASELINE else float(p.x) for p, _ in obs], float)
    return P.Runs(z, seed, x, len(seeds))


@dataclass
class Fit:
    prof: Any  # scaling.profile.Profile or None
    reason: str  # '' when identified
    width: float | None  # the target's actual 95% width when identified


def current_fit(observed: list[tuple[Point, float]], target: Target, *, floor: bool = False) -> Fit:
    """Memoised on the runs (a batch of proposals sees the same finished runs)."""
    return _current_fit(tuple(observed), target, floor)


@functools.lru_cache(maxsize=64)
def _current_fit(observed: tuple[tuple[Point, float], ...], target: Target, floor: bool) -> Fit:
    """The profile of the finished runs, whether it identifies the law (scaling.profile.identify),
    and the target's actual interval width (the width the report will show)."""
    runs = runs_of(observed)
    if runs is None:
        return Fit(None, "no runs yet", None)
    prof = P.profile(runs, floor=floor)
    variant = runs.variant
    xs = sorted({float(x) for x in runs.x[variant]})
    cell_seeds = [int(np.sum(runs.x[variant] == x)) for x in xs]
    reason = P.identify(runs, prof, cell_seeds, len(xs), floor=floor)
    if reason:
        return Fit(prof, reason, None)
    return Fit(prof, "", target_width(prof, target))


def target_width(prof, target: Target) -> float:
    if target.kind == "alpha":
        low, high, _ = prof.alpha_interval()
        return float(high - low)
    from scaling.fits import ProfileUncertainty

    out = ProfileUncertainty(prof).predict(float(target.x0), n_seeds=1)
    return float(out["pi_high"] - out["pi_low"])


def alpha_draws(prof, n: int = N_DRAWS, n_runs: int | None = None, n_seeds: int | None = None) -> list[tuple[float, np.ndarray]]:
    """(alpha, linear constants) at n quantiles of the profile likelihood of alpha."""
    ok = np.isfinite(prof.rss)
    alpha, rss, beta = prof.alpha[ok], prof.rss[ok], prof.beta[ok]
    power = 0.5 * max(1, (n_runs or 2) - (n_seeds or 1))
    logw = -power * np.log(np.maximum(rss, 1e-300) / max(prof.rss_min, 1e-300))
    w = np.exp(logw - logw.max())
    cdf = np.cumsum(w) / w.sum()
    out = []
    for q in (np.arange(n) + 0.5) / n:
        g = int(min(np.searchsorted(cdf, q), len(alpha) - 1))
        out.append((float(alpha[g]), np.asarray(beta[g], float)))
    return out


PRIOR_DRAWS = [(a, np.array([1.0])) for a in (0.1, 0.3, 0.6, 1.0, 1.5)]  # no fit yet: a vague spread


# ---- the criterion -----------------------------------------------------------------------------

def expected_width(points: list[Point], draws: list[tuple[float, np.ndarray]], target: Target, sigma: float,
                   *, floor: bool = False) -> float:
    """The target's linearised 95% width for the design `points`, averaged over the alpha draws
    (data units: sigma is one run's noise). Infinite where the design does not estimate the law."""
    from scipy.special import stdtrit

    if not points:
        return math.inf
    seeds = sorted({p.seed for p in points})
    index = {s: i for i, s in enumerate(seeds)}
    seed = np.array([index[p.seed] for p in points], int)
    variant = np.array([p.arm == VARIANT for p in points])
    x = np.array([float(p.x) if p.arm == VARIANT else 1.0 for p in points], float)
    K = 2 if floor else 1
    df = len(points) - len(seeds) - K - 1
    if df < 1 or len({float(v) for v in x[variant]}) < K + 1:
        return math.inf
    t = float(stdtrit(df, 0.975))
    # no interval is wider than this: alpha's search range, or for a prediction 100x the noise part
    cap = (P.ALPHA_MAX - P.ALPHA_MIN) if target.kind == "alpha" else 200.0 * t * sigma
    widths = []
    for alpha, beta in draws:
        C = float(beta[0])
        f = np.where(variant, x ** (-alpha), 0.0)
        cols = [f, np.where(variant, -C * f * np.log(x), 0.0)]
        if floor:
            cols.append(variant.astype(float))
        J = P._demean_by_seed(np.stack(cols, axis=0), seed, len(seeds))  # (P, N)
        info = J @ J.T
        if np.linalg.cond(info) > 1e12:  # this alpha leaves the design blind (e.g. x^-alpha ~ 0 everywhere)
            widths.append(cap)
            continue
        M = np.linalg.inv(info)
        if target.kind == "alpha":
            var = M[1, 1]
        else:
            x0 = float(target.x0)
            c = [x0 ** (-alpha), -C * x0 ** (-alpha) * math.log(x0)] + ([1.0] if floor else [])
            c = np.array(c)
            var = float(c @ M @ c) + 2.0  # a new run and its baseline run: noise 2 sigma^2
        widths.append(min(cap, 2.0 * t * sigma * math.sqrt(max(var, 0.0))))
    return float(np.mean(widths))


# ---- moves -------------------------------------------------------------------------------------

def _runs_at(spent: set[Point], x: float) -> set[int]:
    return {p.seed for p in spent if p.arm == VARIANT and p.x == x}


def _baseline_seeds(spent: set[Point]) -> list[int]:
    return sorted({p.seed for p in spent if p.arm == BASELINE})


def _new_seeds(state: State, spent: set[Point], n: int) -> list[int]:
    used = {p.seed for p in spent}
    room = state.cap - len(used)
    fresh = [s for s in state.seeds if s not in used]
    return fresh[: max(0, min(n, room))]


def _add_seed_moves(state: State, spent: set[Point], x: float) -> list[list[Point]]:
    """One more seed at x: an existing seed whose baseline ran (1 trial: the first such seed, and
    every seed that has only its baseline so far, which a variant run pairs with), or a new seed (2
    trials)."""
    have = _runs_at(spent, x)
    if len(have) >= state.cap:
        return []
    out = []
    paired = [s for s in _baseline_seeds(spent) if s not in have]
    with_variant = {p.seed for p in spent if p.arm == VARIANT}
    for s in paired[:1] + [s for s in paired[1:] if s not in with_variant]:
        out.append([Point(VARIANT, x, s)])
    new = _new_seeds(state, spent, 1)
    if new:
        out.append([Point(BASELINE, None, new[0]), Point(VARIANT, x, new[0])])
    return out


def _open_moves(state: State, spent: set[Point], x: float) -> list[list[Point]]:
    """A new x at two seeds (the fewest the fits accept), on seeds whose baseline ran where possible."""
    if state.cap < 2:
        return []
    paired = _baseline_seeds(spent)[:2]
    new = _new_seeds(state, spent, 2 - len(paired))
    if len(paired) + len(new) < 2:
        return []
    return [[Point(VARIANT, x, s) for s in paired] + [q for s in new for q in (Point(BASELINE, None, s), Point(VARIANT, x, s))]]


def start_points(state: State) -> list[Point]:
    """The space-filling start: the law's minimum number of x values, evenly spread in log x over the
    allowed values (ends included), each at `initial_seeds` seeds, with their baselines."""
    need = 4 if state.floor else 3
    xs = list(state.xs)
    if len(xs) <= need:
        chosen = xs
    else:
        logs = np.log(xs)
        wanted = np.linspace(logs[0], logs[-1], need)
        chosen, free = [], list(range(len(xs)))
        for w in wanted:  # nearest free value in log x (the ends are exact)
            j = min(free, key=lambda i: (abs(logs[i] - w), i))
            free.remove(j)
            chosen.append(xs[j])
        chosen.sort()
    seeds = list(state.seeds[: max(2, min(state.initial_seeds, state.cap))])
    out = []
    for s in seeds:
        out.append(Point(BASELINE, None, s))
        out += [Point(VARIANT, float(x), s) for x in chosen]
    return out


def start_size(xs: Iterable[float], initial_seeds: int, floor: bool) -> int:
    need = 4 if floor else 3
    return max(2, initial_seeds) * (1 + min(need, len(list(xs))))


def _identifiable_design(spent: set[Point], floor: bool) -> bool:
    """Rules 1-2 of scaling.profile on the design (runs made or in flight): enough x values, each at
    two or more seeds whose baseline ran."""
    need = 4 if floor else 3
    base = set(_baseline_seeds(spent))
    xs = {p.x for p in spent if p.arm == VARIANT}
    good = [x for x in xs if len(_runs_at(spent, x) & base) >= 2]
    return len(good) >= need


# ---- proposing ---------------------------------------------------------------------------------

def propose(state: State) -> Proposal | None:
    """The next run (None when the budget is spent or nothing feasible is left)."""
    if state.remaining <= 0:
        return None
    fit = current_fit(state.observed, state.target, floor=state.floor)
    spent = state.spent
    common = dict(width_now=fit.width, identified=fit.reason)
    if not _identifiable_design(spent, state.floor):
        for point in start_points(state):
            if point not in spent:
                return Proposal(point, "start", "space-filling start: the smallest design the fits can identify",
                                None, None, None, None, [point], **common)
    draws, sigma, how = _draws(fit, state)
    design = [p for p, _ in state.observed] + list(state.pending)
    before = expected_width(design, draws, state.target, sigma, floor=state.floor)
    if state.strategy == "plan":
        rest = _planned_rest(state, spent)
        if rest:
            after = expected_width(design + rest, draws, state.target, sigma, floor=state.floor)
            gain = before - after if math.isfinite(before) else None
            return Proposal(rest[0], "plan", f"continues its planned block ({_move_label(rest)})", _finite(gain),
                            _finite(gain / len(rest)) if gain is not None else None, _finite(before), _finite(after),
                            rest, **common)
    scored = []
    forced = _forced_moves(state, spent)
    if not forced and state.strategy == "plan":
        planned = plan(state, draws, how)
        if planned is not None:
            move, reason = planned
            after = expected_width(design + move, draws, state.target, sigma, floor=state.floor)
            gain = before - after if math.isfinite(before) else None
            return Proposal(move[0], "plan", reason, _finite(gain), _finite(gain / len(move)) if gain is not None else None,
                            _finite(before), _finite(after), move, **common)
    candidates = forced[1] if forced else _all_moves(state, spent)
    for move in candidates:
        if len(move) > state.remaining:
            continue
        after = expected_width(design + move, draws, state.target, sigma, floor=state.floor)
        gain = before - after if math.isfinite(before) else (math.inf if math.isfinite(after) else 0.0)
        scored.append((move, after, gain))
    if not scored:
        return None
    # best gain per trial; among infinite or equal gains, the smaller width after, then the cheaper move
    move, after, gain = max(scored, key=lambda m: (m[2] / len(m[0]), -m[1], -len(m[0])))
    if forced:
        rule, reason = "complete", forced[0]
    else:
        rule = "gain"
        reason = f"largest expected reduction of the target width per trial ({how})"
    return Proposal(move[0], rule, reason, _finite(gain), _finite(gain / len(move)), _finite(before), _finite(after),
                    move, **common)


# ---- the plan: a c-optimal design for the whole budget left ---------------------------------------

def _planned_rest(state: State, spent: set[Point]) -> list[Point]:
    """The runs of the first planned block not yet asked (a block with a lost run is dropped: a seed
    that lost its baseline or a run says less than planned, and the plan is made again)."""
    lost = set(state.lost)
    for move in state.blocks:
        rest = [p for p in move if p not in spent]
        if not rest or any(p in lost for p in move) or len(rest) > state.remaining:
            continue
        if any(p.arm == VARIANT and len(_runs_at(spent, p.x)) >= state.cap for p in rest):
            continue
        return rest
    return []


def plan(state: State, draws: list[tuple[float, np.ndarray]], how: str = "") -> tuple[list[Point], str] | None:
    """The c-optimal plan for the trials left, in whole blocks, and the first block to run.

    The approximate design (scaling.optimal_design.c_optimal) is the augmentation of the runs made
    or in flight that minimises the target's variance averaged (in logs) over the alpha draws: the
    pseudo-Bayesian c-optimal design over new seeds' blocks (each with its baseline, the pairing
    the fits and reports rest on). Its blocks are rounded down, filled greedily and improved by
    exchanges on the finite-sample criterion (t quantile on the degrees of freedom, two seeds per
    new x, the seed pool and cap), where one run more on a seed already made is also an option.
    The block proposed first is the plan's most valuable per trial (the one whose removal would
    cost the most); the rest of the plan is made again at the next block, with the fit of then.
    None when no block fits (the gain rule takes the last trials)."""
    from scaling import optimal_design as O

    spent = state.spent
    lost = set(state.lost)
    design = [p for p in spent if p not in lost]
    by_seed: dict[int, list] = {}
    for p in design:
        by_seed.setdefault(p.seed, []).append(None if p.arm == BASELINE else float(p.x))
    alphas = [float(a) for a, _ in draws]
    floor = state.floor
    target = state.target

    def info(block) -> np.ndarray:
        return np.array([O.block_info(tuple(block), a, floor=floor) for a in alphas])

    cache: dict[tuple, np.ndarray] = {}

    def seed_info(arms) -> np.ndarray:
        key = tuple(sorted(arms, key=lambda a: -1.0 if a is None else a))
        if key not in cache:
            cache[key] = info(key)
        return cache[key]

    M0 = sum((seed_info(arms) for arms in by_seed.values()), np.zeros((len(alphas), 2 + floor, 2 + floor)))
    c = np.array([O.target_vector(target.kind, a, x0=target.x0, floor=floor) for a in alphas])
    counts_x = {x: len(_runs_at(spent, x)) for x in state.xs}
    open_x = [x for x in state.xs if counts_x[x] < state.cap]
    seed_room = len(_new_seeds(state, spent, len(state.seeds)))
    items = []
    if seed_room:
        for block in O.block_types(open_x, paired=True):
            items.append(O.Item(("new", block), len(block), 1, seed_info(block), tuple(block[1:])))
    for s, arms in sorted(by_seed.items()):
        if None not in arms:
            continue
        for x in open_x:
            if x not in arms:
                gain = seed_info(arms + [x]) - seed_info(arms)
                items.append(O.Item(("extend", s, x), 1, 0, gain, (x,), group=s))
    items = [it for it in items if it.cost <= state.remaining]
    if not items:
        return None
    crit = O.ExactCriterion(items, M0, c, n_runs=len(design), n_seeds=len(by_seed), linear=1 + int(floor),
                            x_counts=counts_x, extra=2.0 if target.kind == "predict" else 0.0)
    new = [i for i, it in enumerate(items) if it.key[0] == "new"]
    start = np.zeros(len(items))
    if new:
        try:
            sol = O.c_optimal(crit.infos[new].transpose(1, 0, 2, 3), crit.costs[new], c, M0=M0,
                              budget=float(state.remaining), tol=1e-6, max_iter=300)
            start[new] = np.floor(sol.weights * state.remaining / crit.costs[new] + 1e-9)
        except (ValueError, np.linalg.LinAlgError):
            pass
    counts = O.integer_plan(crit, start, budget=state.remaining, seed_room=seed_room)
    chosen = np.flatnonzero(counts)
    if not len(chosen):
        return None
    value = float(crit(counts)[0])
    worth = []
    for i in chosen:
        less = counts.copy()
        less[i] -= 1
        worth.append(((float(crit(less)[0]) - value) / items[i].cost, -i))
    first = items[int(chosen[max(range(len(chosen)), key=lambda j: worth[j])])]
    if first.key[0] == "new":
        seed = _new_seeds(state, spent, 1)[0]
        move = [Point(BASELINE, None, seed)] + [Point(VARIANT, float(x), seed) for x in first.key[1][1:]]
    else:
        move = [Point(VARIANT, float(first.key[2]), first.key[1])]
    parts = [f"{int(counts[i])} x {_item_label(items[i])}" for i in chosen]
    reason = (f"c-optimal plan for the {state.remaining} trial(s) left ({how}): " + ", ".join(parts)
              + f"; this block: {_move_label(move)}")
    return move, reason


def _item_label(item) -> str:
    if item.key[0] == "new":
        return "{" + ", ".join("baseline" if a is None else _num(a) for a in item.key[1]) + "}"
    return f"{_num(item.key[2])} on seed {item.key[1]}"


def _move_label(move: list[Point]) -> str:
    seeds = sorted({p.seed for p in move})
    arms = ", ".join("baseline" if p.arm == BASELINE else _num(p.x) for p in move)
    return f"seed {', '.join(map(str, seeds))}: {arms}"


def _draws(fit: Fit, state: State) -> tuple[list, float, str]:
    if state.known is not None:
        return [(state.known[0], np.array([state.known[1]]))], 1.0, "at the known law (oracle)"
    prof = fit.prof
    if prof is None:
        return PRIOR_DRAWS, 1.0, "no fit yet: averaged over a vague spread of alpha"
    n = len(state.observed)
    seeds = len({p.seed for p, _ in state.observed})
    return (alpha_draws(prof, n=N_DRAWS, n_runs=n, n_seeds=seeds), prof.sigma,
            f"averaged over alpha drawn from the profile likelihood, alpha-hat {prof.alpha_hat:.3g}")


def _forced_moves(state: State, spent: set[Point]) -> tuple[str, list[list[Point]]] | None:
    """Rule 2: an x at one seed gets a second; a seed whose baseline ran gets a variant run."""
    for x in state.xs:
        have = _runs_at(spent, x)
        if len(have) == 1:
            moves = _add_seed_moves(state, spent, x)
            moves = [m for m in moves if len(m) <= state.remaining]
            if moves:
                return f"completes {_num(x)}: every x cell needs two seeds", moves
    variant_seeds = {p.seed for p in spent if p.arm == VARIANT}
    for s in _baseline_seeds(spent):
        if s not in variant_seeds:
            moves = [[Point(VARIANT, x, s)] for x in state.xs if s not in _runs_at(spent, x)
                     and 0 < len(_runs_at(spent, x)) < state.cap]
            if moves:
                return f"completes seed {s}: its baseline ran, a variant run pairs with it", moves
    return None


def _all_moves(state: State, spent: set[Point]) -> list[list[Point]]:
    out = []
    for x in state.xs:
        if _runs_at(spent, x):
            out += _add_seed_moves(state, spent, x)
        else:
            out += _open_moves(state, spent, x)
    return out


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) >= 1e4 else (str(int(value)) if float(value).is_integer() else f"{value:g}")
