"""The oscillator dynamics of paper A (VARIANTS.md section 2, items 3-4), integrated numerically to
verify the closed-form fixed point that training uses.

Legend: N oscillators (any leading shape, e.g. B H T), d oscillator dimension (d_osc).

Each oscillator z on the sphere S^(d-1) follows dz/dt = (I - z z^T) h with a constant drive h. Its
stable equilibrium is z* = h/|h|; the only other one, -z*, is unstable. Starts near -z* take long
to leave (the exact angle psi to z* obeys tan(psi(t)/2) = tan(psi(0)/2) exp(-|h| t)), which is why
the fraction converged by a finite horizon rises with d: uniform starts concentrate at right
angles to z* as d grows (Proposition 4 of paper A).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from workers.variants import OscillatorConfig

MODES, INITS = OscillatorConfig.MODES, OscillatorConfig.INITS  # declared once, with the variant's options

# Dormand-Prince 5(4) tableau, as scipy's RK45 (the method the paper's ODE check used).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)  # b5 - b4, 7 stages


def drift(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dz/dt = (I - z z^T) h: the component of the drive tangent to the sphere at z."""
    return h - (z * h).sum(-1, keepdim=True) * z


def random_starts(shape: torch.Size, *, dtype, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the sphere: a normalised Gaussian vector."""
    return F.normalize(torch.randn(shape, dtype=dtype, device=device, generator=generator), dim=-1)


def sequential_starts(
    z_star_NTd: torch.Tensor, *, jitter: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Position i starts at position i-1's fixed point plus N(0, jitter^2) noise, re-normalised;
    position 0 has no predecessor and starts uniformly at random."""
    noise = torch.randn(z_star_NTd.shape, dtype=z_star_NTd.dtype, device=z_star_NTd.device, generator=generator)
    z0 = torch.empty_like(z_star_NTd)
    z0[..., 0, :] = noise[..., 0, :]
    z0[..., 1:, :] = z_star_NTd[..., :-1, :] + jitter * noise[..., 1:, :]
    return F.normalize(z0, dim=-1)


def integrate_euler(z0: torch.Tensor, h: torch.Tensor, *, t_max: float, dt: float) -> tuple[torch.Tensor, dict]:
    """Explicit Euler with re-normalisation onto the sphere after every step."""
    steps = max(1, math.ceil(t_max / dt - 1e-9))
    z = z0
    for _ in range(steps):
        z = F.normalize(z + dt * drift(z, h), dim=-1)
    return z, {"steps": float(steps)}


def integrate_rk45(
    z0: torch.Tensor, h: torch.Tensor, *, t_max: float, rtol: float, atol: float, max_steps: int = 100_000
) -> tuple[torch.Tensor, dict]:
    """Adaptive Dormand-Prince 5(4) with scipy's error norm and step control, every oscillator with
    its own step size (each is an independent ODE); the state is not re-normalised (as scipy)."""
    shape = z0.shape
    z = z0.reshape(-1, shape[-1]).clone()
    hh = h.reshape(-1, shape[-1])
    n = z.shape[0]
    t = torch.zeros(n, dtype=z.dtype, device=z.device)
    # initial step (scipy's heuristic, simplified): 1% of the time scale |z| / |f(z)|
    f0 = drift(z, hh)
    step = (0.01 * z.norm(dim=-1) / f0.norm(dim=-1).clamp_min(1e-12)).clamp(1e-6, t_max)
    accepted = torch.zeros(n, dtype=torch.long, device=z.device)
    for _ in range(max_steps):
        active = t < t_max * (1 - 1e-12)
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        za, ha, ta = z[idx], hh[idx], t[idx]
        sa = torch.minimum(step[idx], t_max - ta)
        k = [drift(za, ha)]
        for stage in range(1, 6):
            zi = za + sa[:, None] * sum(a * ki for a, ki in zip(_DP_A[stage], k))
            k.append(drift(zi, ha))
        z_new = za + sa[:, None] * sum(b * ki for b, ki in zip(_DP_B, k) if b)
        k.append(drift(z_new, ha))
        err = sa[:, None] * sum(e * ki for e, ki in zip(_DP_E, k) if e)
        scale = atol + rtol * torch.maximum(za.abs(), z_new.abs())
        err_norm = (err / scale).square().mean(-1).sqrt()
        ok = err_norm < 1
        factor = torch.where(
            err_norm == 0,
            torch.full_like(err_norm, 10.0),
            (0.9 * err_norm.clamp_min(1e-300) ** -0.2).clamp(0.2, 10.0),
        )
        factor = torch.where(ok, factor, factor.clamp(max=1.0))
        z[idx] = torch.where(ok[:, None], z_new, za)
        t[idx] = torch.where(ok, ta + sa, ta)
        accepted[idx] += ok.long()
        step[idx] = sa * factor
    else:  # pragma: no cover -- only with pathological tolerances
        raise RuntimeError(f"rk45 did not reach t_max={t_max} in {max_steps} steps; loosen rtol/atol")
    return z.reshape(shape), {"steps": float(accepted.float().mean())}


def antipodal_probability(alpha: float, d: int) -> float:
    """Proposition 4 of paper A: for z(0) uniform on S^(d-1), P(angle(z(0), -z*) < alpha) =
    Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) * integral_0^alpha sin^(d-2)(t) dt."""
    const = math.exp(math.lgamma(d / 2) - math.lgamma((d - 1) / 2)) / math.sqrt(math.pi)
    n = 2000  # Simpson's rule on [0, alpha]
    xs = [alpha * i / n for i in range(n + 1)]
    ys = [math.sin(x) ** (d - 2) for x in xs]
    integral = alpha / (3 * n) * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))
    return const * integral


def integrate_fixed_points(
    h_NTd: torch.Tensor,
    z_star_NTd: torch.Tensor,
    *,
    mode: str,
    init: str,
    t_max: float,
    dt: float,
    rtol: float,
    atol: float,
    jitter: float,
    tol: float,
    antipodal_angle: float,
    valid_NT: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Integrate every oscillator to `t_max` and return (z(t_max), convergence statistics).

    Statistics are over valid oscillators (`valid_NT`, and a non-zero drive): the fraction within
    `tol` of z*, the fraction of starts within `antipodal_angle` of -z* with Proposition 4's
    expectation for uniform starts, and how many of the unconverged started there."""
    if mode not in ("euler", "rk45"):
        raise ValueError(f"mode={mode!r} is not an ODE mode; allowed: 'euler', 'rk45'")
    if init not in INITS:
        raise ValueError(f"init={init!r}; allowed: {list(INITS)}")
    with torch.no_grad():
        h, z_star = h_NTd.detach(), z_star_NTd.detach()
        if init == "random":
            z0 = random_starts(h.shape, dtype=h.dtype, device=h.device, generator=generator)
        else:
            z0 = sequential_starts(z_star, jitter=jitter, generator=generator)
        if mode == "euler":
            z, info = integrate_euler(z0, h, t_max=t_max, dt=dt)
        else:
            z, info = integrate_rk45(z0, h, t_max=t_max, rtol=rtol, atol=atol)
        valid = h.norm(dim=-1) > 1e-8
        if valid_NT is not None:
            valid = valid & valid_NT.expand_as(valid)
        distance = (z - z_star).norm(dim=-1)[valid]
        start_angle = torch.acos((z0 * -z_star).sum(-1).clamp(-1, 1))[valid]
        converged = distance < tol
        near = start_angle < antipodal_angle
        n = int(valid.sum())
        d = h.shape[-1]
        stats = {
            "mode": mode,
            "init": init,
            "t_max": float(t_max),
            "d_osc": int(d),
            "oscillators": n,
            "converged_fraction": float(converged.float().mean()) if n else float("nan"),
            "tolerance": float(tol),
            "max_distance": float(distance.max()) if n else float("nan"),
            "mean_distance": float(distance.mean()) if n else float("nan"),
            "antipodal_angle": float(antipodal_angle),
            "near_antipodal_fraction": float(near.float().mean()) if n else float("nan"),
            "near_antipodal_expected_uniform": antipodal_probability(antipodal_angle, d),
            "unconverged_near_antipodal": int((near & ~converged).sum()),
            "unconverged": int((~converged).sum()),
            **info,
        }
    return z, stats
