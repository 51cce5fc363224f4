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
) -> TrialRecord:
    """Train, evaluate, and return the ledger record. Never raises for a failing trial: the
    exception becomes a `failed` record (with traceback) so the study goes on."""
    started, t0 = now_iso(), time.perf_counter()
    state: dict[str, Any] = {"params": (0, 0), "flops": 0.0, "step": 0, "tokens": 0}
    try:
        return _train(spec, storage_uri, cache_uri, report, num_threads, wandb_run_id, keep_checkpoint, started, t0, state)
    except Exception as exc:  # noqa: BLE001 -- a failure is data
        return _record(
            spec, state, "failed", None, {}, None, started, t0, wandb_run_id,
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}",
        )


def _train(spec, storage_uri, cache_uri, report, num_threads, wandb_run_id, keep_checkpoint, started, t0, state):
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
    flops_per_step = 3 * model.flops_per_token(seq_len) * seq_len * train["batch_size"]  # fwd + bwd

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

    sign = 1 if task.lower_is_better else -1
    final = train["select"] == "final"
    status, reason = "completed", None
    for step in range(start_step, train["steps"]):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, train)
        loss = task.loss(model, task.batch(train_split, order.indices(step)))
        if not torch.isfinite(loss):
            status, reason = "diverged", f"non-finite training loss ({loss.item()}) at step {step + 1}"
            state["step"] = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        optimizer.step()
        state.update(step=step + 1, tokens=order.examples_seen(step + 1) * seq_len, flops=(step + 1) * flops_per_step)

        last = step + 1 == train["steps"]
        if (step + 1) % train["eval_every_steps"] == 0 or last:
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
            point = {"step": step + 1, "train_loss": loss.item(), "lr": learning_rate(step, train), **metrics}
            history.append(point)
            if not last:  # before reporting: a trial killed while reporting resumes from here
                checkpoints.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "sampler": order.generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "best": best, "history": history, "step": step + 1,
                })
            if report:
                report({**point, f"best_{task.metric}": best["value"], "tokens": state["tokens"]})

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
                   error=reason)


def _record(spec, state, status, value, metrics, best_step, started, t0, wandb_run_id, metric_name="", error=None):
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
    )
