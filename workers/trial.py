"""Train and evaluate ONE trial: TrialSpec in, TrialRecord out. No Ray, no Optuna, no W&B here, so a
failing trial can be re-run in a plain Python shell:

    >>> from workers import run_trial
    >>> record = run_trial(spec, storage_uri="/tmp/study")
"""

from __future__ import annotations

import io
import json
import math
import socket
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import torch

from storage import fs as sfs
from storage.cache import DatasetCache
from storage.faults import fault_point
from storage.records import TrialRecord, TrialSpec, canonical_json
from workers.configs import TrainConfig, train_defaults
from workers.model import ModelConfig, Transformer
from workers.tasks import get_task
from workers import lifecycle
from workers.runtime import tune_allocator
from workers.variants import validate_dataclass

CODE_VERSION = "3"  # bump when a change alters what a trial computes: old ledger keys then re-run

TRAIN_DEFAULTS: dict[str, Any] = train_defaults()  # the recipe's keys and defaults: workers/configs.py TrainConfig

Reporter = Callable[[dict[str, Any]], None]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_train(train: dict[str, Any], hparams: dict[str, Any]) -> dict[str, Any]:
    """The study's recipe and the searched hyperparameters over the defaults, checked against
    TrainConfig (the values are kept as given: they are part of the trial's key)."""
    merged = {**TRAIN_DEFAULTS, **train, **hparams}
    unknown = set(merged) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"train: unknown option(s) {sorted(unknown)}; allowed: {sorted(TRAIN_DEFAULTS)}")
    validate_dataclass(TrainConfig, merged, "train")
    every = merged["eval_every"]
    if every != "epoch" and not (isinstance(every, int) and every >= 1):
        raise ValueError(f"train.eval_every={every!r}: give a number of steps >= 1, or \"epoch\"")
    return merged


def steps_per_epoch(train: dict[str, Any], n_train: int) -> float:
    """Optimizer steps in one pass over the train split: whole batches plus a short last one when
    sampling by epoch; n / batch on average when sampling with replacement."""
    if train["sampling"] == "epoch":
        return math.ceil(n_train / train["batch_size"])
    return n_train / train["batch_size"]


def resolve_budget(train: dict[str, Any], n_train: int, seq_len: int) -> dict[str, Any]:
    """Steps from the one budget given: steps, epochs over the train split, or tokens seen; and
    `eval_every: epoch` as a step count."""
    per_epoch = steps_per_epoch(train, n_train)
    if train.get("epochs") is not None:
        steps = math.ceil(train["epochs"] * per_epoch - 1e-9)
    elif train.get("tokens") is not None:
        steps = math.ceil(train["tokens"] / (train["batch_size"] * seq_len))
    else:
        steps = train["steps"]
    every = train["eval_every"]
    return {**train, "steps": max(1, int(steps)),
            "eval_every_steps": max(1, round(per_epoch)) if every == "epoch" else int(every)}


class BatchOrder:
    """Which train examples each step reads. `epoch`: epoch e is a permutation of the split drawn
    from (seed, e) alone, so a resumed trial reads exactly what it would have read, with no
    sampler state to carry; `replacement`: i.i.d. indices from a seeded generator (checkpointed)."""

    def __init__(self, train: dict[str, Any], n_train: int, seed: int) -> None:
        self.sampling, self.batch_size, self.n, self.seed = train["sampling"], train["batch_size"], n_train, seed
        self.per_epoch = math.ceil(n_train / self.batch_size)
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self._epoch: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([10_000 + self.seed, epoch]).permutation(self.n))
        return self._epoch[1]

    def indices(self, step: int) -> np.ndarray:
        if self.sampling == "replacement":
            return torch.randint(0, self.n, (self.batch_size,), generator=self.generator).numpy()
        epoch, within = divmod(step, self.per_epoch)
        return self.permutation(epoch)[within * self.batch_size : (within + 1) * self.batch_size]

    def examples_seen(self, steps: int) -> int:
        if self.sampling == "replacement":
            return steps * self.batch_size
        epochs, within = divmod(steps, self.per_epoch)
        return epochs * self.n + min(within * self.batch_size, self.n)


def build_model(spec: TrialSpec, model_fields: dict[str, Any]) -> Transformer:
    cfg = ModelConfig(**{**spec.model, **model_fields}, attention=spec.variant, attention_options=spec.variant_options)
    return Transformer(cfg)


def learning_rate(step: int, train: dict[str, Any]) -> float:
    lr, warmup, total = train["lr"], train["warmup_steps"], train["steps"]
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if train["schedule"] == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Checkpoints:
    """Checkpoints under `<storage>/checkpoints/<trial key>/`, so a retried trial resumes anywhere."""

    def __init__(self, storage_uri: str, key: str) -> None:
        self.fs, root = sfs.resolve(storage_uri)
        self.path = sfs.join(root, "checkpoints", key, "last.pt")

    def load(self, device: torch.device | str = "cpu") -> dict[str, Any] | None:
        if not sfs.exists(self.fs, self.path):
            return None
        state = torch.load(io.BytesIO(sfs.read_bytes(self.fs, self.path)), weights_only=False, map_location=device)
        for name in ("torch_rng", "cuda_rng", "sampler"):  # RNG states are CPU byte tensors
            if isinstance(state.get(name), torch.Tensor):
                state[name] = state[name].cpu()
        return state

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        sfs.write_bytes_atomic(self.fs, self.path, buffer.getvalue())
        fault_point("checkpoint.saved")

    def remove(self) -> None:
        directory = self.path.rsplit("/", 1)[0]
        if sfs.exists(self.fs, directory):
            self.fs.delete_dir(directory)


def run_trial(
    spec: TrialSpec,
    *,
    storage_uri: str,
    cache_uri: str | None = None,
    report: Reporter | None = None,
    num_threads: int | None = None,
    wandb_run_id: str | None = None,
    keep_checkpoint: bool = False,
    log: Reporter | None = None,
    log_every: int = lifecycle.DEFAULT_LOG_EVERY,
    checkpoint_every_s: float | None = lifecycle.DEFAULT_CHECKPOINT_SECONDS,
    progress_every_s: float = lifecycle.DEFAULT_PROGRESS_SECONDS,
    on_start: Reporter | None = None,
    node_id: str | None = None,
) -> TrialRecord:
    """Train, evaluate, and return the ledger record. Never raises for a failing trial: the
    exception becomes a `failed` record (with traceback) so the study goes on.

    `report` gets every evaluation; `log` a row of train metrics (mean loss, lr, grad norm,
    tokens/s) every `log_every` steps; `on_start` the trial's size once the model is built
    (parameters, FLOPs, total steps, the step it resumes from). A checkpoint is written at every
    evaluation and every `checkpoint_every_s` seconds in between. A stop request (SIGTERM, or
    `workers.lifecycle.request_stop`) saves one at the next step boundary and raises
    `TrialInterrupted`: not a record, the study resumes the trial from there. While it runs, the
    trial keeps `<storage>/progress/<key>.json` and appends to `<storage>/logs/<key>.log`."""
    started, t0 = now_iso(), time.perf_counter()
    state: dict[str, Any] = {"params": (0, 0), "flops": 0.0, "step": 0, "tokens": 0}
    progress = lifecycle.TrialProgress(
        storage_uri, spec.key, node_id=node_id, every_seconds=progress_every_s,
        info={"cell": spec.cell, "stage": spec.stage, "seed": spec.seed, "study": spec.study})
    hooks = {"report": report, "log": log, "on_start": on_start}
    progress.started(spec, node_id)
    try:
        with lifecycle.sigterm_flush(), lifecycle.thread_log(progress):
            record = _train(spec, storage_uri, cache_uri, hooks, num_threads, wandb_run_id, keep_checkpoint, started,
                            t0, state, progress, log_every, checkpoint_every_s, node_id)
    except SystemExit:  # raised inside a report by a runner that stops the trial (Tune's session)
        if not lifecycle.stop_requested():  # stopped for good (a scheduler pruned it): no progress left
            progress.say(f"stopped by the runner at step {state['step']} (pruned)")
            progress.remove()
            raise
        stop = lifecycle.TrialInterrupted(state["step"], lifecycle.stop_reason())
        progress.interrupted(stop.step, stop.reason)
        raise stop from None
    except lifecycle.TrialInterrupted as stop:
        progress.interrupted(stop.step, stop.reason)
        raise
    except Exception as exc:  # noqa: BLE001 -- a failure is data
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        progress.failed(state["step"], error)
        return _record(spec, state, "failed", None, {}, None, started, t0, wandb_run_id, error=error, node_id=node_id)
    progress.finished(record)
    return record


def _train(spec, storage_uri, cache_uri, hooks, num_threads, wandb_run_id, keep_checkpoint, started, t0, state,
           progress, log_every, checkpoint_every_s, node_id):
    report, log, on_start = hooks["report"], hooks["log"], hooks["on_start"]
    policy = lifecycle.CheckpointPolicy(checkpoint_every_s)
    tune_allocator()
    if num_threads:
        torch.set_num_threads(num_threads)
    train = resolve_train(spec.train, spec.hparams)
    # a GPU when the trial was given one (Ray sets CUDA_VISIBLE_DEVICES per trial), else the CPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(spec.task).on_device(device)
    prepared = task.prepare(spec.task_options, DatasetCache(cache_uri))
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    model = build_model(spec, task.model_fields(prepared)).to(device)
    seq_len = task.tokens_per_example(prepared)
    train = resolve_budget(train, len(next(iter(prepared.arrays["train"].values()))), seq_len)
    state["params"] = model.param_counts()
    flops_per_token = model.flops_per_token(seq_len)
    flops_per_step = 3 * flops_per_token * seq_len * train["batch_size"]  # fwd + bwd

    opt_cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = opt_cls(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    train_split, val_split = prepared.arrays["train"], prepared.arrays["val"]
    order = BatchOrder(train, len(next(iter(train_split.values()))), spec.seed)
    best: dict[str, Any] = {"value": None, "step": None, "state": None, "metrics": {}}
    history: list[dict[str, float]] = []
    checkpoints = Checkpoints(storage_uri, spec.key)
    start_step = 0
    resumed = checkpoints.load(device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        order.generator.set_state(resumed["sampler"])
        torch.set_rng_state(resumed["torch_rng"])
        if device.type == "cuda" and resumed.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resumed["cuda_rng"], device)
        best, history, start_step = resumed["best"], resumed["history"], resumed["step"]
        state.update(step=start_step, tokens=order.examples_seen(start_step) * seq_len,
                     flops=start_step * flops_per_step)

    saved_at = [start_step]

    def save(step: int) -> None:
        checkpoints.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": order.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best": best, "history": history, "step": step,
        })
        policy.saved()
        saved_at[0] = step

    total, non_embedding = state["params"]
    info = {"params_total": int(total), "params_non_embedding": int(non_embedding), "flops_per_token": flops_per_token,
            "train_flops": flops_per_step * train["steps"], "total_steps": train["steps"], "seq_len": seq_len,
            "resumed_from_step": start_step, "metric": task.metric, "lower_is_better": task.lower_is_better}
    if on_start:
        on_start(dict(info))
    progress.training(start_step, train["steps"], task.metric, state["params"])

    sign = 1 if task.lower_is_better else -1
    final = train["select"] == "final"
    status, reason = "completed", None
    window = lifecycle.StepLog(log_every, tokens_per_step=train["batch_size"] * seq_len)
    latest: dict[str, Any] = {}
    params = [p for p in model.parameters()]
    def flush() -> None:
        """Called from another thread while this one is parked in a report (after a step): save."""
        if saved_at[0] != state["step"]:
            save(state["step"])

    with lifecycle.running_trainer(flush) as stop:
        for step in range(start_step, train["steps"]):
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, train)
            loss = task.loss(model, task.batch(train_split, order.indices(step)))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                status, reason = "diverged", f"non-finite training loss ({loss_value}) at step {step + 1}"
                state["step"] = step
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if train["grad_clip"]:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, train["grad_clip"])
            optimizer.step()
            state.update(step=step + 1, tokens=order.examples_seen(step + 1) * seq_len, flops=(step + 1) * flops_per_step)
            window.add(loss_value)

            last = step + 1 == train["steps"]
            if window.due(step + 1, last):
                if grad_norm is None:  # the norm before the step (no clipping): read, never changed
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                row = window.row(step + 1, learning_rate(step, train), float(grad_norm), state["tokens"])
                latest.update(row)
                if log:
                    log(dict(row))
            evaluated = (step + 1) % train["eval_every_steps"] == 0 or last
            if evaluated:
                model.eval()
                metrics = task.evaluate(model, val_split, train["eval_batch_size"], "val")
                value = metrics[task.metric]
                if not math.isfinite(value):
                    status, reason = "diverged", f"non-finite validation {task.metric} ({value}) at step {step + 1}"
                    break
                if final or best["value"] is None or sign * value < sign * best["value"]:
                    best = {
                        "value": value,
                        "step": step + 1,
                        # the selected model is only needed again for the test split; `final` keeps the live one
                        "state": None if final else {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "metrics": metrics,
                    }
                point = {"step": step + 1, "train_loss": loss_value, "lr": learning_rate(step, train), **metrics}
                history.append(point)
                latest.update({task.metric: value, "eval_step": step + 1})
                if not last:  # before reporting: a trial killed while reporting resumes from here
                    save(step + 1)
                progress.say(f"step {step + 1}/{train['steps']}: {task.metric} {value:.6g} "
                             f"(best {best['value']:.6g} at step {best['step']}), train_loss {loss_value:.6g}")
                progress.update(force=True, step=step + 1, latest=dict(latest))
                if report:
                    report({**point, f"best_{task.metric}": best["value"], "tokens": state["tokens"]})
            elif not last and policy.due():  # wall-clock checkpoint, or a stop was requested
                save(step + 1)
            if not evaluated:
                progress.update(step=step + 1, latest=dict(latest))  # at most every progress_every_s
            if stop.is_set() and not last:
                if saved_at[0] != step + 1:  # the stop came after this step's save decision
                    save(step + 1)
                raise lifecycle.TrialInterrupted(step + 1, lifecycle.stop_reason())

    metrics = dict(best["metrics"])
    if status == "completed" and best["value"] is not None:
        reason = task.divergence(metrics, task.model_fields(prepared))
        status = "diverged" if reason else status
    if best["value"] is not None:
        if best["state"] is not None:
            model.load_state_dict(best["state"])
        model.eval()
        if "test" in prepared.arrays:
            metrics.update(task.evaluate(model, prepared.arrays["test"], train["eval_batch_size"], "test"))
    metrics["history"] = history
    metrics["data_fingerprint"] = prepared.fingerprint
    metrics["selected"] = train["select"]
    if reason:
        metrics["diverged_reason"] = reason
    if not keep_checkpoint:
        checkpoints.remove()
    return _record(spec, state, status, best["value"], metrics, best["step"], started, t0, wandb_run_id, task.metric,
                   error=reason, node_id=node_id)


def _record(spec, state, status, value, metrics, best_step, started, t0, wandb_run_id, metric_name="", error=None,
            node_id=None):
    total, non_embedding = state["params"]
    return TrialRecord(
        key=spec.key,
        study=spec.study,
        cell=spec.cell,
        task=spec.task,
        variant=spec.variant,
        d_osc=spec.d_osc,
        target_params=spec.target_params,
        params_total=int(total),
        params_non_embedding=int(non_embedding),
        seed=spec.seed,
        stage=spec.stage,
        hparams_json=canonical_json(spec.hparams),
        spec_json=canonical_json(spec.to_dict()),
        status=status,
        metric_name=metric_name,
        metric_value=None if value is None else float(value),
        metrics_json=json.dumps(metrics),
        best_step=best_step,
        steps=int(state["step"]),
        tokens_seen=int(state["tokens"]),
        flops=float(state["flops"]),
        wall_seconds=time.perf_counter() - t0,
        started_at=started,
        finished_at=now_iso(),
        wandb_run_id=wandb_run_id,
        host=socket.gethostname(),
        error=error,
        node_id=node_id,
    )
