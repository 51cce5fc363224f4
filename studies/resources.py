"""Will a trial fit this machine? Checked before Ray starts, so a study that cannot run is refused
with the numbers instead of failing trial by trial after Ray has started (or waiting forever for
CPUs or GPUs the local Ray does not have).

The memory of one training trial is estimated from its model shape, batch and sequence length
(fp32 training, as `workers.trial` does on CPU):

- state: 16 bytes per parameter (weights, gradients, AdamW's two moments);
- activations kept for the backward pass, per layer and token: about 10 d_model + 2 d_ff values
  (projections, attention output, norms, residuals; the FFN's hidden layer before and after its
  activation) plus 3 n_heads T for the (T, T) score, probability and dropout matrices a CPU
  attention materialises;
- the output: logits and their gradient, 2 x batch x T x outputs values.

It is a rough count (allocator slack and the framework's own workspace come on top), so it refuses
only a trial whose estimate exceeds the whole node's memory, and warns when the concurrent trials
together would.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from storage.records import TrialSpec
from studies.plan import Plan
from studies.spec import StudyError, StudySpec

BYTES_PER_VALUE = 4  # fp32
STATE_BYTES_PER_PARAM = 16  # weights + gradients + AdamW's exp_avg and exp_avg_sq


@dataclass(frozen=True)
class TrialMemory:
    cell: str
    params: int
    batch_size: int
    seq_len: int
    state_bytes: int
    activation_bytes: int
    output_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes + self.output_bytes

    def describe(self) -> str:
        return (f"{self.cell}: about {_gib(self.total_bytes)} per trial ({self.params:,} parameters -> "
                f"{_gib(self.state_bytes)} of weights, gradients and optimizer state; batch {self.batch_size:,} x "
                f"{self.seq_len:,} tokens -> {_gib(self.activation_bytes)} of activations and "
                f"{_gib(self.output_bytes)} of outputs)")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"


def estimate(*, params: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, batch_size: int, seq_len: int,
             outputs_per_example: int, cell: str = "") -> TrialMemory:
    """The estimate described in the module docstring; `outputs_per_example`: seq_len x vocabulary
    for a language model (logits at every position), else the number of classes."""
    per_token_layer = 10 * d_model + 2 * d_ff + 3 * n_heads * seq_len
    tokens = batch_size * seq_len
    return TrialMemory(cell=cell, params=params, batch_size=batch_size, seq_len=seq_len,
                       state_bytes=STATE_BYTES_PER_PARAM * params,
                       activation_bytes=BYTES_PER_VALUE * tokens * n_layers * per_token_layer,
                       output_bytes=BYTES_PER_VALUE * 2 * batch_size * outputs_per_example)


def node_memory_bytes() -> int | None:
    """This machine's memory: physical RAM, or the container's cgroup limit when that is lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (total or math.inf):
            total = int(text)
    return total


def largest_batch(study: StudySpec, spec: TrialSpec) -> int:
    """The trial's batch size, or the largest one a per-cell search can pick."""
    batch = int({**spec.train, **spec.hparams}.get("batch_size") or study.train.batch_size)
    space = study.search.space if study.search else {}
    if "batch_size" in space:
        dist = space["batch_size"]
        candidates = [c for c in (dist.choices or []) if isinstance(c, (int, float))] + [dist.high or 0]
        batch = max([batch, *(int(c) for c in candidates)])
    return batch


def trial_memory(study: StudySpec, plan: Plan) -> list[TrialMemory]:
    """One estimate per cell (its trials share shape, batch and data). Prepares (caches) the data,
    which the run does anyway: the vocabulary and sequence length come from it."""
    import torch

    from storage.cache import DatasetCache
    from workers.tasks import get_task
    from workers.trial import build_model

    cache = DatasetCache(study.cache)
    seen: dict[str, TrialMemory] = {}
    for spec in plan.todo + plan.search_cells + plan.design_cells:
        if spec.cell in seen:
            continue
        task = get_task(spec.task)
        prepared = task.prepare(spec.task_options, cache)
        with torch.device("meta"):  # counts without allocating
            model = build_model(spec, task.model_fields(prepared))
        cfg = model.cfg
        seq_len = int(task.tokens_per_example(prepared))
        outputs = seq_len * cfg.vocab_size if cfg.head == "lm" else max(1, cfg.num_classes)
        seen[spec.cell] = estimate(params=model.param_counts()[0], d_model=cfg.d_model, n_layers=cfg.n_layers,
                                   n_heads=cfg.n_heads, d_ff=cfg.d_ff, batch_size=largest_batch(study, spec),
                                   seq_len=seq_len, outputs_per_example=outputs, cell=spec.cell)
    return list(seen.values())


def check_resources(study: StudySpec, plan: Plan, *, address: str | None, num_cpus: int | None) -> list[TrialMemory]:
    """Refuse (StudyError) a study the embedded local Ray cannot run: a trial asking for more CPUs
    or GPUs than this machine has, or whose memory estimate exceeds this machine's memory. On a
    cluster (`address`) the nodes are not known here; nothing is checked."""
    if address:
        return []
    res = study.resources
    problems: list[str] = []
    cpus = num_cpus or os.cpu_count() or 1
    if res.cpus_per_trial > cpus:
        problems.append(f"resources.cpus_per_trial: {res.cpus_per_trial:g} CPUs per trial, but the local Ray has {cpus}; "
                        f"set it to at most {cpus} (or run on a cluster with --address)")
    gpu_bytes = None
    if res.gpus_per_trial > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if res.gpus_per_trial > gpus:
            problems.append(f"resources.gpus_per_trial: {res.gpus_per_trial:g} GPUs per trial, but this machine has "
                            f"{gpus}; set it to at most {gpus} (0: CPU), or run on a cluster with --address")
        else:
            gpu_bytes = int(torch.cuda.get_device_properties(0).total_memory * max(1.0, res.gpus_per_trial))
    if problems:
        raise StudyError(f"study {study.name} cannot run on this machine; nothing was run:\n"
                         + "\n".join(f"  - {p}" for p in problems))
    memory = trial_memory(study, plan)
    limit, where = (gpu_bytes, "GPU memory") if gpu_bytes else (node_memory_bytes(), "this machine's memory")
    if not limit:
        return memory
    too_big = [m for m in memory if m.total_bytes > limit]
    if too_big:
        lines = "\n".join(f"  - {m.describe()}" for m in too_big)
        raise StudyError(
            f"study {study.name}: {len(too_big)} cell(s) need more memory per trial than {where} "
            f"({_gib(limit)}); nothing was run:\n{lines}\n"
            "  fix: lower train.batch_size (or the task's sequence length), or the model's size (model: / target_params:)")
    slots = res.max_concurrent_trials or max(1, int(cpus // res.cpus_per_trial))
    worst = max(memory, key=lambda m: m.total_bytes, default=None)
    if worst is not None and slots > 1 and worst.total_bytes * slots > limit:
        fit = max(1, int(limit // worst.total_bytes))
        print(f"warning: {slots} concurrent trials of {worst.describe()} would need {_gib(worst.total_bytes * slots)}, "
              f"more than {where} ({_gib(limit)}); about {fit} fit at once: set resources.max_concurrent_trials: {fit}",
              file=sys.stderr)
    return memory
