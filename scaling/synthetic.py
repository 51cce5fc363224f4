"""Synthetic ledgers drawn from known laws with seed noise: for validity tests (do the intervals
cover the true constants?) and for benchmarks. Rows are plain dicts shaped like ledger rows."""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np


def row(**fields: Any) -> dict[str, Any]:
    """A ledger row with plausible defaults (the TrialRecord fields)."""
    base = dict(key="k", study="synthetic", cell="lm/softmax", task="lm", variant="softmax", d_osc=None,
                target_params=None, params_total=1000, params_non_embedding=800, seed=0, stage="replicate",
                hparams_json="{}", spec_json="{}", status="completed", metric_name="val_loss", metric_value=1.0,
                metrics_json="{}", best_step=10, steps=10, tokens_seen=100, flops=1e6, wall_seconds=1.0,
                started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:00:01+00:00",
                wandb_run_id=None, host="synthetic", error=None)
    base.update(fields)
    return base


def cell_name(task: str, variant: str, d_osc: int | None, target_params: int | None) -> str:
    parts = [task, variant] + ([f"d{d_osc}"] if d_osc is not None else []) + ([f"N{target_params}"] if target_params else [])
    return "/".join(parts)


def gap_study_rows(
    *, C: float = 2.0, alpha: float = 0.7, g_inf: float = 0.0, base: float = 3.0, ds: Iterable[int] = (2, 4, 8, 16, 32),
    seeds: Iterable[int] = range(5), seed_effect: float = 0.05, variant_noise: float = 0.02, baseline_noise: float = 0.02,
    task: str = "lm", variant: str = "oscillator", baseline: str = "softmax", rng: np.random.Generator | int = 0,
    target_params: int | None = None, metric_name: str = "val_loss",
) -> list[dict[str, Any]]:
    """metric(variant, d, seed) - metric(baseline, seed) = C d^-alpha + g_inf + noise.

    A seed effect shared by variant and baseline (cancels when paired), the baseline's own noise
    (shared by every d through the pairing, so the per-d gaps are correlated) and the variant's."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    out = []
    for s in seeds:
        shared = rng.normal(0, seed_effect)
        b = base + shared + rng.normal(0, baseline_noise)
        out.append(row(key=f"{task}-{baseline}-s{s}-{target_params}", cell=cell_name(task, baseline, None, target_params),
                       task=task, variant=baseline, seed=int(s), metric_value=float(b), target_params=target_params,
                       metric_name=metric_name))
        for d in ds:
            value = base + shared + C * d ** (-alpha) + g_inf + rng.normal(0, variant_noise)
            out.append(row(key=f"{task}-{variant}-d{d}-s{s}-{target_params}",
                           cell=cell_name(task, variant, d, target_params), task=task, variant=variant, d_osc=int(d),
                           seed=int(s), metric_value=float(value), target_params=target_params, metric_name=metric_name))
    return out


def loss_study_rows(
    *, E: float = 2.0, A: float = 400.0, alpha: float = 0.4, sizes: Iterable[int] = (1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000),
    seeds: Iterable[int] = range(5), noise: float = 0.01, task: str = "lm", variant: str = "softmax",
    d_osc: int | None = None, rng: np.random.Generator | int = 0,
) -> list[dict[str, Any]]:
    """L(N) = (E + A N^-alpha) * exp(noise), N = the non-embedding parameter count (the target size)."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    out = []
    for n in sizes:
        for s in seeds:
            value = (E + A * n ** (-alpha)) * float(np.exp(rng.normal(0, noise)))
            out.append(row(key=f"{task}-{variant}-d{d_osc}-N{n}-s{s}", cell=cell_name(task, variant, d_osc, n), task=task,
                           variant=variant, d_osc=d_osc, target_params=int(n), params_non_embedding=int(n),
                           params_total=int(n * 1.3), seed=int(s), metric_value=float(value)))
    return out


def scaling_grid_rows(
    *, tasks: Iterable[str] = ("lm", "lm2"), variants: dict[str, list[int] | None] | None = None,
    sizes: Iterable[int] = (1_000_000, 2_000_000, 4_000_000, 8_000_000), seeds: Iterable[int] = range(5),
    rng: np.random.Generator | int = 0, diverged_every: int = 0,
) -> list[dict[str, Any]]:
    """A full study grid (task x variant x d_osc x size x seed) whose loss follows
    L = E + A N^-alpha + C d^-beta: every law has something to fit. `diverged_every` = k marks every
    k-th trial diverged (NaN metric) to exercise the exclusions."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    variants = variants or {"softmax": None, "oscillator": [2, 4, 8, 16, 32, 64], "oscillator_p2": [2, 4, 8, 16, 32, 64]}
    out = []
    i = 0
    for task in tasks:
        for s in seeds:
            seed_shift = rng.normal(0, 0.01)
            for n in sizes:
                for variant, ds in variants.items():
                    for d in ds or [None]:
                        gap = 0.0 if d is None else (1.5 if variant == "oscillator" else 1.0) * d ** (-0.7)
                        value = (2.0 + 300.0 * n ** (-0.35) + gap) * float(np.exp(seed_shift + rng.normal(0, 0.005)))
                        i += 1
                        status = "diverged" if diverged_every and i % diverged_every == 0 else "completed"
                        out.append(row(key=f"{task}-{variant}-d{d}-N{n}-s{s}", cell=cell_name(task, variant, d, n),
                                       task=task, variant=variant, d_osc=d, target_params=int(n),
                                       params_non_embedding=int(n * (1 + 0.001 * (d or 0))), params_total=int(n * 1.4),
                                       seed=int(s), status=status,
                                       metric_value=float("nan") if status == "diverged" else value,
                                       metrics_json=json.dumps({"val_loss": value})))
    return out
