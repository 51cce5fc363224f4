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
- its loss, as the task defines it (`Task.stacked_losses`: the seed's `loss_from_output`, or for
  language modelling the same mean over the seed's scored tokens from one stacked cross-entropy);
- its optimizer state (Adam is elementwise, so a stacked Adam is S independent ones) and its
  gradient clipping (the norm is taken per seed);
- its evaluation, checkpoint (under its own trial key), ledger record and W&B run;
- its operations, as `run_trial`'s: a progress file and log under its own key, a train-metrics row
  every `log_every` steps (its own mean loss and gradient norm), a checkpoint every
  `checkpoint_every_s` seconds besides evaluations, and a stop request (SIGTERM, Tune stopping the
  trial) saves every seed at the step it is on and raises `TrialInterrupted`.
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
from workers import lifecycle
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
        return task.stacked_losses(self.forward(*args, **kwargs), batches, batch_S)

    def sync_to_models(self) -> None:
        """Copy the stacked parameters into the per-seed models (for evaluation and checkpoints)."""
        with torch.no_grad():
            for s, model in enumerate(self.models):
                named = dict(model.named_parameters())
                for name, value in self.params.items():
                    named[name].copy_(value[s])


def _seed_norms(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Every seed's gradient norm over all its gradients (what `clip_grad_norm_` returns for it)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)


def _clip_per_seed(params: list[torch.Tensor], max_norm: float, active: torch.Tensor) -> torch.Tensor | None:
    """`clip_grad_norm_` for every seed alone: its norm over all its gradients, its own scale.
    Returns the norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    norms_S = _seed_norms(params)
    if norms_S is None:
        return None
    coef_S = torch.clamp(max_norm / (norms_S + 1e-6), max=1.0)
    coef_S = torch.where(active, coef_S, torch.zeros_like(coef_S))
    for g in grads:
        g.mul_(coef_S.view(-1, *([1] * (g.dim() - 1))))
    return norms_S


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
    log: PackReporter | None = None,
    log_every: int = lifecycle.DEFAULT_LOG_EVERY,
    checkpoint_every_s: float | None = lifecycle.DEFAULT_CHECKPOINT_SECONDS,
    progress_every_s: float = lifecycle.DEFAULT_PROGRESS_SECONDS,
    on_start: PackReporter | None = None,
    node_id: str | None = None,
) -> list[TrialRecord]:
    """Train `specs` (one cell, different seeds) as one stacked model; one record per seed, in order.
    Never raises for a failing pack: every seed then gets a `failed` record with the traceback.
    The hooks are `run_trial`'s, with the seed's index in the pack first: `report(i, evaluation)`,
    `log(i, train-metrics row)` every `log_every` steps, `on_start(i, size)`. A stop request saves
    every seed's checkpoint and raises `lifecycle.TrialInterrupted` (not a record)."""
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
    progresses = [lifecycle.TrialProgress(storage_uri, spec.key, node_id=node_id, every_seconds=progress_every_s,
                                          info={"cell": spec.cell, "stage": spec.stage, "seed": spec.seed,
                                                "study": spec.study, "pack": seeds})
                  for spec in specs]
    for spec, progress in zip(specs, progresses):
        progress.started(spec, node_id, packed_with=seeds)
    hooks = {"report": report, "log": log, "on_start": on_start, "log_every": log_every,
             "checkpoint_every_s": checkpoint_every_s, "node_id": node_id}

    def interrupted(step: int, reason: str) -> None:
        for progress in progresses:
            progress.interrupted(step, reason)

    try:
        with lifecycle.sigterm_flush(), lifecycle.thread_log(progresses[0]):
            records = _train_pack(specs, storage_uri, cache_uri, hooks, num_threads, ids, keep_checkpoint, started,
                                  t0, states, progresses)
    except SystemExit:  # raised inside a report by a runner that stops the trial (Tune's session)
        step = max(int(state["step"]) for state in states)
        if not lifecycle.stop_requested():
            for progress in progresses:
                progress.say(f"stopped by the runner at step {step}")
                progress.remove()
            raise
        interrupted(step, lifecycle.stop_reason())
        raise lifecycle.TrialInterrupted(step, lifecycle.stop_reason()) from None
    except lifecycle.TrialInterrupted as stop:
        interrupted(stop.step, stop.reason)
        raise
    except Exception as exc:  # noqa: BLE001 -- a failure is data
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        for progress, state in zip(progresses, states):
            progress.failed(state["step"], error)
        return [_record(spec, state, "failed", None, {"pack": _pack_note(specs)}, None, started, t0, rid, error=error,
                        node_id=node_id)
                for spec, state, rid in zip(specs, states, ids)]
    for progress, record in zip(progresses, records):
        progress.finished(record)
    return records


def _pack_note(specs: list[TrialSpec]) -> dict[str, Any]:
    return {"size": len(specs), "seeds": [s.seed for s in specs], "keys": [s.key for s in specs]}


def _train_pack(specs, storage_uri, cache_uri, hooks, num_threads, ids, keep_checkpoint, started, t0, states,
                progresses):
    report, log, on_start = hooks["report"], hooks["log"], hooks["on_start"]
    policy = lifecycle.CheckpointPolicy(hooks["checkpoint_every_s"])
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

        def sub(hook, idx):
            return None if hook is None else (lambda j, m: hook(idx[j], m))

        for idx in groups.values():
            sub_hooks = {**hooks, "report": sub(report, idx), "log": sub(log, idx), "on_start": sub(on_start, idx)}
            for i, rec in zip(idx, _train_pack([specs[i] for i in idx], storage_uri, cache_uri, sub_hooks, num_threads,
                                               [ids[i] for i in idx], keep_checkpoint, started, t0,
                                               [states[i] for i in idx], [progresses[i] for i in idx])):
                out[i] = rec
        return out
    start_step = start_steps.pop()
    for s, r in enumerate(resumed):
        if r is not None:
            models[s].load_state_dict(r["model"])
            orders[s].generator.set_state(r["sampler"])
            generators[s].set_state(r["dropout_rng"])
            bests[s], histories[s] = r["best"], r["history"]
            states[s].update(step=start_step, tokens=orders[s].examples_seen(start_step) * seq_len)

    stacked = StackedModel(models, generators)
    params = stacked.parameters()
    for s in range(S):
        states[s]["params"] = models[s].param_counts()
    flops_per_token = models[0].flops_per_token(seq_len)
    flops_per_step = 3 * flops_per_token * seq_len * train["batch_size"]
    for s in range(S):
        states[s]["flops"] = start_step * flops_per_step
    opt_cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = opt_cls(params, lr=train["lr"], weight_decay=train["weight_decay"])
    for s, r in enumerate(resumed):
        if r is not None:
            _load_seed_state(optimizer, params, s, r["optimizer"])

    total, non_embedding = states[0]["params"]
    info = {"params_total": int(total), "params_non_embedding": int(non_embedding), "flops_per_token": flops_per_token,
            "train_flops": flops_per_step * train["steps"], "total_steps": train["steps"], "seq_len": seq_len,
            "resumed_from_step": start_step, "metric": task.metric, "lower_is_better": task.lower_is_better,
            "pack_size": S}
    for s, progress in enumerate(progresses):
        if on_start:
            on_start(s, dict(info))
        progress.training(start_step, train["steps"], task.metric, states[0]["params"])

    sign = 1 if task.lower_is_better else -1
    final = train["select"] == "final"
    status = ["completed"] * S
    reasons: list[str | None] = [None] * S
    active = [True] * S
    windows = [lifecycle.StepLog(hooks["log_every"], tokens_per_step=train["batch_size"] * seq_len) for _ in specs]
    latest: list[dict[str, Any]] = [{} for _ in specs]
    saved_at = [start_step]
    note = _pack_note(specs)

    def save_all(step: int) -> None:
        """Every live seed's checkpoint at `step` (a diverged seed keeps its last one)."""
        stacked.sync_to_models()
        for s in range(S):
            if active[s]:
                checkpoints[s].save({
                    "model": models[s].state_dict(), "optimizer": _seed_state(optimizer, params, s),
                    "sampler": orders[s].generator.get_state(), "dropout_rng": generators[s].get_state(),
                    "best": bests[s], "history": histories[s], "step": step, "pack": note,
                })
        policy.saved()
        saved_at[0] = step

    def flush() -> None:
        """Called from another thread while this one is parked in a report (after a step): save."""
        step = max(int(state["step"]) for state in states)
        if saved_at[0] != step:
            save_all(step)

    with lifecycle.running_trainer(flush) as stop:
        for step in range(start_step, train["steps"]):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, train)
            batches = [task.batch(train_split, orders[s].indices(step)) for s in range(S)]
            batch_S = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
            losses_S = stacked.losses(task, batch_S, batches, active)
            loss_values = losses_S.detach().tolist()
            for s in range(S):
                if active[s] and not math.isfinite(loss_values[s]):
                    active[s] = False
                    status[s], reasons[s] = "diverged", f"non-finite training loss ({loss_values[s]}) at step {step + 1}"
                    states[s]["step"] = step
            if not any(active):
                break
            live = torch.tensor(active, device=device)
            optimizer.zero_grad(set_to_none=True)
            torch.where(live, losses_S, torch.zeros_like(losses_S)).sum().backward()
            if train["grad_clip"]:
                norms_S = _clip_per_seed(params, train["grad_clip"], live)
            else:
                norms_S = None
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(live.view(-1, *([1] * (p.dim() - 1))).to(p.dtype))
            last = step + 1 == train["steps"]
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
            logging_now = [False] * S
            for s in range(S):
                if active[s]:
                    windows[s].add(loss_values[s])
                    logging_now[s] = windows[s].due(step + 1, last)
            if any(logging_now) and norms_S is None:  # the norm before the step (no clipping): read, never changed
                norms_S = _seed_norms(params)
            for s in range(S):
                if logging_now[s]:
                    norm = float(norms_S[s]) if norms_S is not None else 0.0
                    row = windows[s].row(step + 1, learning_rate(step, train), norm, states[s]["tokens"])
                    latest[s].update(row)
                    if log:
                        log(s, dict(row))

            evaluated = (step + 1) % train["eval_every_steps"] == 0 or last
            if evaluated:
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
                    point = {"step": step + 1, "train_loss": loss_values[s], "lr": learning_rate(step, train), **metrics}
                    histories[s].append(point)
                    latest[s].update({task.metric: value, "eval_step": step + 1})
                if not last:  # before reporting: a pack killed while reporting resumes from here
                    save_all(step + 1)
                for s in range(S):
                    if not active[s] or not histories[s] or histories[s][-1]["step"] != step + 1:
                        continue
                    best = bests[s]
                    progresses[s].say(f"step {step + 1}/{train['steps']}: {task.metric} {histories[s][-1][task.metric]:.6g} "
                                      f"(best {best['value']:.6g} at step {best['step']}), train_loss {loss_values[s]:.6g}")
                    progresses[s].update(force=True, step=step + 1, latest=dict(latest[s]))
                    if report:
                        report(s, {**histories[s][-1], f"best_{task.metric}": best["value"], "tokens": states[s]["tokens"]})
                if not any(active):
                    break
            elif not last and policy.due():  # wall-clock checkpoint, or a stop was requested
                save_all(step + 1)
            if not evaluated:
                for s in range(S):
                    if active[s]:
                        progresses[s].update(step=step + 1, latest=dict(latest[s]))  # at most every progress_every_s
            if stop.is_set() and not last:
                if saved_at[0] != step + 1:  # the stop came after this step's save decision
                    save_all(step + 1)
                raise lifecycle.TrialInterrupted(step + 1, lifecycle.stop_reason())

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
        metrics["pack"] = note
        if reasons[s]:
            metrics["diverged_reason"] = reasons[s]
        if not keep_checkpoint:
            checkpoints[s].remove()
        records.append(_record(spec, states[s], status[s], best["value"], metrics, best["step"], started, t0, ids[s],
                               task.metric, error=reasons[s], node_id=hooks["node_id"]))
    return records
