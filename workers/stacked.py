"""Train the seeds of one cell together, as one stacked model: `run_pack(specs)` -> one TrialRecord
per seed. No Ray here either (as `workers.trial`), so a pack can be re-run in a Python shell.

Legend: S seeds in the pack, B batch, T sequence.

A pack holds trials that differ only in their seed (same task, variant, shape, recipe). Their
parameters are stacked along a leading seed dimension (`torch.func.stack_module_state`) and one
natively stacked forward pass (`workers.stacked_forward`: batched GEMMs over [S, in, out] weights,
the seed axis folded into the batch of every parameter-free op) runs every seed at once, so every
kernel is S times larger at the dispatch cost of one trial: what a 14k-parameter model spends most
of its time on.

Stacking never changes what a trial means. Each seed keeps, from its own seed alone:
- its initialisation: `torch.manual_seed(seed)` then the model, exactly as `run_trial`;
- its data order: its own `BatchOrder`;
- its dropout masks: drawn from its own generator, which continues the random stream `run_trial`
  would continue after the initialisation, in the same order and shapes;
- its loss, as the task defines it (`Task.loss_from_output` on the seed's slice of the output);
- its optimizer state (Adam is elementwise, so a stacked Adam is S independent ones) and its
  gradient clipping (the norm is taken per seed);
- its evaluation, checkpoint (under its own trial key), ledger record and W&B run.
A seed whose loss stops being finite is recorded `diverged` and drops out of the pack's updates;
the others go on. A stacked seed's training loss matches the same seed run alone to float32
rounding (the batched GEMMs sum in a different order; tests/test_stacked.py checks 1e-4 over
100 steps).
"""

from __future__ import annotations

import math
import time
import traceback
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from storage.cache import DatasetCache
from storage.records import TrialRecord, TrialSpec
from workers.runtime import tune_allocator
from workers.stacked_forward import StackedForward
from workers.tasks import get_task
from workers.trial import (
    BatchOrder,
    Checkpoints,
    _record,
    build_model,
    learning_rate,
    now_iso,
    resolve_budget,
    resolve_train,
)

PackReporter = Callable[[int, dict[str, Any]], None]  # (index of the seed in the pack, metrics)

def pack_key(spec: TrialSpec) -> str:
    """Trials with equal pack keys differ only in their seed, and may be trained as one pack."""
    import dataclasses

    return dataclasses.replace(spec, seed=0).key


def packable(spec: TrialSpec) -> bool:
    """Whether a trial can train in a pack: the oscillator's ODE modes (verification runs with their
    own random starts and statistics) always run alone."""
    return not (spec.variant == "oscillator" and spec.variant_options.get("mode", "analytic") != "analytic")


def _dropout_mask(shape, p: float, generator: torch.Generator, device) -> torch.Tensor:
    """What `F.dropout(x, p)` multiplies x by, drawn as torch draws it (bernoulli_(1 - p), then / (1 - p))."""
    noise = torch.empty(shape, device=device).bernoulli_(1 - p, generator=generator)
    return noise.div_(1 - p)


class StackedModel:
    """S models of one architecture as stacked parameters (`torch.func.stack_module_state`), trained
    through one natively stacked forward pass (`workers.stacked_forward`)."""

    def __init__(self, models: list[nn.Module], generators: list[torch.Generator]) -> None:
        self.models, self.generators = models, generators
        params, _ = torch.func.stack_module_state(models)
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.forward = StackedForward(models[0], self.params, generators)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def losses(self, task, batch_S: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
               active: list[bool]) -> torch.Tensor:
        """(S,) training losses: every seed's forward on its own batch (`batch_S`: the seeds' batches
        stacked), with its own dropout masks, and its loss as the task defines it. Seeds not `active`
        (diverged) draw no masks: their generators stay where they stopped."""
        self.forward.active = list(active)
        self.models[0].train()
        args, kwargs = task.model_inputs(batch_S)
        out_S = self.forward(*args, **kwargs)
        # unbind, not out_S[s]: each indexing's backward would write a zero gradient of the whole
        # stacked output (5 x 640 MB of logits per step for a pack of 5 at the WikiText-2 shape)
        return torch.stack([task.loss_from_output(out, batch) for out, batch in zip(out_S.unbind(0), batches)])

    def sync_to_models(self) -> None:
        """Copy the stacked parameters into the per-seed models (for evaluation and checkpoints)."""
        with torch.no_grad():
            for s, model in enumerate(self.models):
                named = dict(model.named_parameters())
                for name, value in self.params.items():
                    named[name].copy_(value[s])


def _clip_per_seed(params: list[torch.Tensor], max_norm: float, active: torch.Tensor) -> None:
    """`clip_grad_norm_` for every seed alone: its norm over all its gradients, its own scale."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms_S = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)
    coef_S = torch.clamp(max_norm / (norms_S + 1e-6), max=1.0)
    coef_S = torch.where(active, coef_S, torch.zeros_like(coef_S))
    for g in grads:
        g.mul_(coef_S.view(-1, *([1] * (g.dim() - 1))))


def _seed_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], s: int) -> dict[str, Any]:
    """Seed s's slice of the stacked optimizer, as a state dict of its solo model's optimizer."""
    state = {}
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        state[i] = {k: (v[s].clone() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0] else
                        (v.clone() if torch.is_tensor(v) else v)) for k, v in st.items()}
    return {"state": state, "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                                              "params": list(range(len(params)))} for g in optimizer.param_groups]}


def _load_seed_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], s: int, saved: dict) -> None:
    for i, p in enumerate(params):
        st = saved["state"].get(i) or saved["state"].get(str(i))
        if not st:
            continue
        target = optimizer.state.setdefault(p, {})
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                if k not in target:
                    target[k] = torch.zeros_like(p)
                target[k][s].copy_(v)
            else:
                target[k] = v.clone() if torch.is_tensor(v) else v


def run_pack(
    specs: list[TrialSpec],
    *,
    storage_uri: str,
    cache_uri: str | None = None,
    report: PackReporter | None = None,
    num_threads: int | None = None,
    wandb_run_ids: list[str | None] | None = None,
    keep_checkpoint: bool = False,
) -> list[TrialRecord]:
    """Train `specs` (one cell, different seeds) as one stacked model; one record per seed, in order.
    Never raises for a failing pack: every seed then gets a `failed` record with the traceback."""
    if not specs:
        return []
    keys = {pack_key(s) for s in specs}
    if len(keys) != 1:
        raise ValueError(f"run_pack: the trials differ in more than their seed ({len(keys)} pack keys); "
                         "pack only trials of one cell and recipe")
    seeds = [s.seed for s in specs]
    if not all(packable(s) for s in specs):
        raise ValueError("run_pack: oscillator ODE modes (mode: euler | rk45) train alone; run them with run_trial")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"run_pack: seeds {seeds} repeat; each seed once per pack")
    ids = list(wandb_run_ids or [None] * len(specs))
    started, t0 = now_iso(), time.perf_counter()
    states = [{"params": (0, 0), "flops": 0.0, "step": 0, "tokens": 0} for _ in specs]
    try:
        return _train_pack(specs, storage_uri, cache_uri, report, num_threads, ids, keep_checkpoint, started, t0, states)
    except Exception as exc:  # noqa: BLE001 -- a failure is data
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        return [_record(spec, state, "failed", None, {"pack": _pack_note(specs)}, None, started, t0, rid, error=error)
                for spec, state, rid in zip(specs, states, ids)]


def _pack_note(specs: list[TrialSpec]) -> dict[str, Any]:
    return {"size": len(specs), "seeds": [s.seed for s in specs], "keys": [s.key for s in specs]}


def _train_pack(specs, storage_uri, cache_uri, report, num_threads, ids, keep_checkpoint, started, t0, states):
    tune_allocator()
    if num_threads:
        torch.set_num_threads(num_threads)
    spec0 = specs[0]
    train = resolve_train(spec0.train, spec0.hparams)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(spec0.task).on_device(device)
    prepared = task.prepare(spec0.task_options, DatasetCache(cache_uri))
    fields = task.model_fields(prepared)
    seq_len = task.tokens_per_example(prepared)
    train_split, val_split = prepared.arrays["train"], prepared.arrays["val"]
    n_train = len(next(iter(train_split.values())))
    train = resolve_budget(train, n_train, seq_len)

    # every seed's model and random stream exactly as run_trial makes them
    models, generators = [], []
    for spec in specs:
        torch.manual_seed(spec.seed)
        np.random.seed(spec.seed)
        models.append(build_model(spec, fields).to(device))
        generator = torch.Generator(device=device)
        generator.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        generators.append(generator)
    orders = [BatchOrder(train, n_train, spec.seed) for spec in specs]
    checkpoints = [Checkpoints(storage_uri, spec.key) for spec in specs]
    S = len(specs)
    bests: list[dict[str, Any]] = [{"value": None, "step": None, "state": None, "metrics": {}} for _ in specs]
    histories: list[list[dict[str, float]]] = [[] for _ in specs]
    resumed = [c.load(device) for c in checkpoints]
    start_steps = {0 if r is None else int(r["step"]) for r in resumed}
    if len(start_steps) > 1:  # killed between two seeds' checkpoints: run each resume point as its own pack
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(resumed):
            groups.setdefault(0 if r is None else int(r["step"]), []).append(i)
        out: list[TrialRecord | None] = [None] * S
        for idx in groups.values():
            sub_report = None if report is None else (lambda j, m, idx=idx: report(idx[j], m))
            for i, rec in zip(idx, run_pack([specs[i] for i in idx], storage_uri=storage_uri, cache_uri=cache_uri,
                                            report=sub_report, num_threads=num_threads,
                                            wandb_run_ids=[ids[i] for i in idx], keep_checkpoint=keep_checkpoint)):
                out[i] = rec
        return out
    start_step = start_steps.pop()
    for s, r in enumerate(resumed):
        if r is not None:
            models[s].load_state_dict(r["model"])
            orders[s].generator.set_state(r["sampler"])
            generators[s].set_state(r["dropout_rng"])
            bests[s], histories[s] = r["best"], r["history"]

    stacked = StackedModel(models, generators)
    params = stacked.parameters()
    for s in range(S):
        states[s]["params"] = models[s].param_counts()
    flops_per_step = 3 * models[0].flops_per_token(seq_len) * seq_len * train["batch_size"]
    opt_cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=train["lr"], weight_decay=train["weight_decay"])
    for s, r in enumerate(resumed):
        if r is not None:
            _load_seed_state(optimizer, params, s, r["optimizer"])

    sign = 1 if task.lower_is_better else -1
    final = train["select"] == "final"
    status = ["completed"] * S
    reasons: list[str | None] = [None] * S
    active = [True] * S
    for step in range(start_step, train["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train)
        batches = [task.batch(train_split, orders[s].indices(step)) for s in range(S)]
        batch_S = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
        losses_S = stacked.losses(task, batch_S, batches, active)
        finite_S = torch.isfinite(losses_S.detach())
        for s in range(S):
            if active[s] and not bool(finite_S[s]):
                active[s] = False
                status[s], reasons[s] = "diverged", f"non-finite training loss ({losses_S[s].item()}) at step {step + 1}"
                states[s]["step"] = step
        if not any(active):
            break
        live = torch.tensor(active, device=device)
        optimizer.zero_grad(set_to_none=True)
        torch.where(live, losses_S, torch.zeros_like(losses_S)).sum().backward()
        if train["grad_clip"]:
            _clip_per_seed(params, train["grad_clip"], live)
        else:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(live.view(-1, *([1] * (p.dim() - 1))).to(p.dtype))
        frozen = {}
        if not all(active):  # a diverged seed keeps its last parameters (AdamW would still decay them)
            frozen = {i: p.detach()[~live].clone() for i, p in enumerate(params)}
        optimizer.step()
        for i, saved in frozen.items():
            with torch.no_grad():
                params[i][~live] = saved
        for s in range(S):
            if active[s]:
                states[s].update(step=step + 1, tokens=orders[s].examples_seen(step + 1) * seq_len,
                                 flops=(step + 1) * flops_per_step)

        last = step + 1 == train["steps"]
        if (step + 1) % train["eval_every_steps"] == 0 or last:
            stacked.sync_to_models()
            for s in range(S):
                if not active[s]:
                    continue
                model = models[s]
                model.eval()
                metrics = task.evaluate(model, val_split, train["eval_batch_size"], "val")
                value = metrics[task.metric]
                if not math.isfinite(value):
                    active[s] = False
                    status[s], reasons[s] = "diverged", f"non-finite validation {task.metric} ({value}) at step {step + 1}"
                    continue
                if final or bests[s]["value"] is None or sign * value < sign * bests[s]["value"]:
                    bests[s] = {"value": value, "step": step + 1, "metrics": metrics,
                                "state": None if final else {k: v.detach().clone() for k, v in model.state_dict().items()}}
                point = {"step": step + 1, "train_loss": losses_S[s].item(), "lr": learning_rate(step, train), **metrics}
                histories[s].append(point)
                if not last:
                    checkpoints[s].save({
                        "model": model.state_dict(), "optimizer": _seed_state(optimizer, params, s),
                        "sampler": orders[s].generator.get_state(), "dropout_rng": generators[s].get_state(),
                        "best": bests[s], "history": histories[s], "step": step + 1, "pack": _pack_note(specs),
                    })
                if report:
                    report(s, {**point, f"best_{task.metric}": bests[s]["value"], "tokens": states[s]["tokens"]})
            if not any(active):
                break

    stacked.sync_to_models()
    records = []
    for s, spec in enumerate(specs):
        best, model = bests[s], models[s]
        metrics = dict(best["metrics"])
        if status[s] == "completed" and best["value"] is not None:
            reasons[s] = task.divergence(metrics, fields)
            status[s] = "diverged" if reasons[s] else status[s]
        if best["value"] is not None:
            if best["state"] is not None:
                model.load_state_dict(best["state"])
            model.eval()
            if "test" in prepared.arrays:
                metrics.update(task.evaluate(model, prepared.arrays["test"], train["eval_batch_size"], "test"))
        metrics["history"] = histories[s]
        metrics["data_fingerprint"] = prepared.fingerprint
        metrics["selected"] = train["select"]
        metrics["pack"] = _pack_note(specs)
        if reasons[s]:
            metrics["diverged_reason"] = reasons[s]
        if not keep_checkpoint:
            checkpoints[s].remove()
        records.append(_record(spec, states[s], status[s], best["value"], metrics, best["step"], started, t0, ids[s],
                               task.metric, error=reasons[s]))
    return records
