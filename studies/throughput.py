"""Study throughput (trials per hour): the trials of a study run one per worker, against the same
trials run as packs of a cell's seeds (workers.stacked.run_pack), in one run on one machine
(`scaling bench --study-throughput`; issue 20's item 2).

Method. Each case is a study file (its cells and seeds; `variants` may keep a subset of its cells)
with a steps-limited budget: every trial trains the same `steps` in both modes, then evaluates once
on its validation and test splits, as any trial ends. Both modes run on a pool of `workers` processes
(default 2, one torch thread each: `cpus_per_trial: 1` on the 2-core machine), started and warmed
before the clock starts; the units of work are trials (one per worker) or packs (all of a cell's
seeds, `pack_seeds: auto`), handed to the next free worker as the runner's scheduler does. The pool
stands in for Ray's workers: per-trial scheduling, W&B and ledger writes are left out of both modes
(they cost the same per trial record, and the packed mode writes as many records). trials/hour =
trials finished x 3600 / wall seconds; `ratio` = stacked / one_per_worker. The dataset cache is
built before timing. The modes alternate `rounds` times (one_per_worker first, then the other way round) so load from
other processes hits both; each mode's figure is its fastest round (the least disturbed: on the shared
machine the very first timed round ran up to 1.9x slower than later ones even after the warm-up, and
it is always one_per_worker's), with the ratio of the median rounds beside it. Before timing, every
worker runs a 1-step trial of every cell (first-call costs paid once in both modes).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from storage.records import TrialSpec

@dataclasses.dataclass(frozen=True)
class Case:
    study: str  # the study file (relative to the repository root)
    steps: int  # per trial, in both modes
    variants: tuple[str, ...] | None = None  # cells kept ("softmax", "oscillator d2"); None: all
    seeds: tuple[int, ...] | None = None  # None: the study file's
    task_options: dict | None = None  # overrides of the task's options


CASES: dict[str, Case] = {
    "quickstart": Case("studies/examples/quickstart.yaml", 60),
    "sva": Case("studies/presets/reduced/sva.yaml", 100),
    "kws": Case("studies/presets/reduced/kws.yaml", 40),
    # the preset's shape (2 layers, D 128, 4 heads, V 10k, T 50) and its 5 seeds on the reduced study's
    # data; its test split is the small validation file, so that evaluation (the same in both modes)
    # does not drown the training steps being compared (the full test split is 245k tokens)
    "wikitext2": Case("studies/presets/reduced/wikitext2.yaml", 10, ("softmax", "oscillator d2"), (0, 1, 2, 3, 4),
                      {"test_file": "docs/results/wikitext2_reduced/data/valid.txt"}),
}


def case_trials(case: str, steps: int | None = None) -> list[TrialSpec]:
    from studies.plan import expand
    from studies.spec import load_study

    spec_of = CASES[case]
    study = load_study(spec_of.study)
    if spec_of.seeds is not None:
        study = study.model_copy(update={"seeds": list(spec_of.seeds)})
    if spec_of.task_options:
        tasks = [t.model_copy(update={"options": {**t.options, **spec_of.task_options}}) for t in study.tasks]
        study = study.model_copy(update={"tasks": tasks})
    steps = steps or spec_of.steps
    trials = []
    for spec in expand(study):
        label = spec.variant if spec.d_osc is None else f"{spec.variant} d{spec.d_osc}"
        if spec_of.variants is not None and label not in spec_of.variants:
            continue
        train = {k: v for k, v in spec.train.items() if k not in ("steps", "epochs", "tokens")}
        trials.append(dataclasses.replace(spec, train={**train, "steps": steps, "eval_every": steps}))
    return trials


_BARRIER = None


def _init_worker(barrier) -> None:
    global _BARRIER
    import torch

    import workers.stacked  # noqa: F401  (torch and the model code, imported before the clock starts)

    torch.set_num_threads(1)
    _BARRIER = barrier


def _warm_worker(specs: list[dict], storage: str, cache: str | None) -> None:
    """Held at a barrier until every worker runs one (so the pool has all its processes), then one
    1-step trial per cell of the case, evaluation included: what a worker's first trial of a cell
    pays once (imports, the cache's pages, torch's first calls) is paid before the clock starts, in
    both modes alike. (Measured without it: the first mode timed ran ~2.5x slower than a repeat.)"""
    from workers.trial import run_trial

    _BARRIER.wait()
    for spec in specs:
        trial = TrialSpec.from_dict(spec)
        trial = dataclasses.replace(trial, train={**trial.train, "steps": 1, "eval_every": 1})
        run_trial(trial, storage_uri=storage, cache_uri=cache)


def step_throughput(specs: list[TrialSpec], *, rounds: int = 8, cache: str | None = None) -> dict[str, float]:
    """Training steps alone (no evaluation, no start-up), in this process on its threads (or its GPU): one seed's
    step against one pack step of `specs`' seeds, interleaved over `rounds`; `ratio` = seeds per second
    packed / alone (the median of per-round ratios). What a long trial's throughput approaches."""
    import torch

    from storage.cache import DatasetCache
    from workers.stacked import StackedModel, _clip_per_seed
    from workers.tasks import get_task
    from workers.trial import build_model, resolve_train

    spec0 = specs[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = get_task(spec0.task).on_device(device)
    prepared = task.prepare(spec0.task_options, DatasetCache(cache))
    fields = task.model_fields(prepared)
    train = resolve_train(spec0.train, spec0.hparams)
    split = prepared.arrays["train"]
    n = len(next(iter(split.values())))
    models, generators = [], []
    for spec in specs:
        torch.manual_seed(spec.seed)
        models.append(build_model(spec, fields).to(device).train())
        generators.append(torch.Generator(device=device).manual_seed(spec.seed))
    index = [np.random.default_rng(spec.seed).permutation(n)[: train["batch_size"]] for spec in specs]
    opt_cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    solo_opt = opt_cls(models[0].parameters(), lr=train["lr"])
    stacked = StackedModel(models, generators)
    pack_opt = opt_cls(stacked.parameters(), lr=train["lr"])
    live = torch.ones(len(specs), dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def solo() -> None:
        loss = task.loss(models[0], task.batch(split, index[0]))
        solo_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[0].parameters(), 1.0)
        solo_opt.step()

    def pack() -> None:
        batches = [task.batch(split, i) for i in index]
        batch_S = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
        losses = stacked.losses(task, batch_S, batches, [True] * len(specs))
        pack_opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        _clip_per_seed(stacked.parameters(), 1.0, live)
        pack_opt.step()

    times: dict[str, list[float]] = {"solo": [], "pack": []}
    for fn in (solo, pack):
        fn()
    for _ in range(rounds):
        for name, fn in (("solo", solo), ("pack", pack)):
            sync()
            began = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - began)
    S = len(specs)
    return {"solo_ms": round(1e3 * statistics.median(times["solo"]), 2),
            "pack_ms": round(1e3 * statistics.median(times["pack"]), 2), "seeds": S,
            "ratio": round(statistics.median(S * a / b for a, b in zip(times["solo"], times["pack"])), 3)}


def _run_unit(specs: list[dict], storage: str, cache: str | None) -> list[dict[str, Any]]:
    from workers.stacked import run_pack
    from workers.trial import run_trial

    trials = [TrialSpec.from_dict(s) for s in specs]
    if len(trials) == 1:
        records = [run_trial(trials[0], storage_uri=storage, cache_uri=cache)]
    else:
        records = run_pack(trials, storage_uri=storage, cache_uri=cache)
    # a packed record's wall_seconds is the pack's: each seed's tokens/s is then its share of the pack
    return [{"status": r.status, "tokens": r.tokens_seen, "flops": r.flops, "wall": r.wall_seconds} for r in records]


def _packs(trials: list[TrialSpec]) -> list[list[TrialSpec]]:
    from workers.stacked import pack_key

    groups: dict[str, list[TrialSpec]] = {}
    for spec in trials:
        groups.setdefault(pack_key(spec), []).append(spec)
    return list(groups.values())


def _timed(pool: ProcessPoolExecutor, units: list[list[TrialSpec]], storage: str,
           cache: str | None) -> tuple[float, list[dict[str, Any]]]:
    began = time.perf_counter()
    futures = [pool.submit(_run_unit, [s.to_dict() for s in unit], storage, cache) for unit in units]
    trials = [t for f in futures for t in f.result()]
    return time.perf_counter() - began, trials


def _per_trial(trials: list[dict[str, Any]], peak_flops: float | None) -> dict[str, float]:
    """Median over trials of tokens/s and training FLOP/s (the trial's recorded FLOPs over its wall
    time, evaluation included), and MFU against `peak_flops` when given."""
    tokens = statistics.median(t["tokens"] / t["wall"] for t in trials)
    flops = statistics.median(t["flops"] / t["wall"] for t in trials)
    out = {"tokens_per_s": round(tokens, 1), "flops_per_s": float(f"{flops:.4g}")}
    if peak_flops:
        out["mfu"] = float(f"{flops / peak_flops:.4g}")
    return out


def study_throughput(cases: list[str] | None = None, *, workers: int = 2, steps: int | None = None, rounds: int = 1,
                     cache: str | None = None, peak_flops: float | None = None, log=print) -> dict[str, dict[str, Any]]:
    """{case: {one_per_worker, stacked (trials/hour), ratio, trials, packs, steps, seconds, per_trial
    (tokens/s, FLOP/s and MFU per trial, per mode), train_steps_one_thread}}."""
    from storage.cache import DatasetCache
    from workers.tasks import get_task

    out: dict[str, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(barrier,)) as pool, \
            tempfile.TemporaryDirectory(prefix="study-throughput-") as tmp:
        for case in cases or list(CASES):
            trials = case_trials(case, steps)
            packs = _packs(trials)
            for spec in {s.task: s for s in trials}.values():  # build the data before the clock starts
                get_task(spec.task).prepare(spec.task_options, DatasetCache(cache))
            cells = [p[0].to_dict() for p in packs]
            for f in [pool.submit(_warm_worker, cells, str(Path(tmp) / f"{case}-warm-{w}"), cache) for w in range(workers)]:
                f.result()
            seconds: dict[str, list[float]] = {"one_per_worker": [], "stacked": []}
            finished: dict[str, list[dict[str, Any]]] = {"one_per_worker": [], "stacked": []}
            modes = [("one_per_worker", [[s] for s in trials]), ("stacked", packs)]
            for r in range(rounds):
                for mode, units in (modes if r % 2 == 0 else modes[::-1]):
                    wall, done = _timed(pool, units, str(Path(tmp) / f"{case}-{mode}-{r}"), cache)
                    finished[mode] += done
                    failed = [t for t in done if t["status"] == "failed"]
                    if failed:
                        raise RuntimeError(f"study throughput, case {case}, {mode}: {len(failed)} trial(s) failed; "
                                           f"run one with workers.run_trial to see why")
                    seconds[mode].append(wall)
                    log(f"  {case:<11} {mode:<15} {len(trials)} trials in {len(units)} unit(s): {wall:6.1f} s")
            per_hour = {mode: len(trials) * 3600 / min(ts) for mode, ts in seconds.items()}
            of_medians = statistics.median(seconds["one_per_worker"]) / statistics.median(seconds["stacked"])
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                steps_only = {p[0].cell: step_throughput(p, cache=cache) for p in packs if len(p) > 1}
            finally:
                torch.set_num_threads(threads)
            out[case] = {"one_per_worker": round(per_hour["one_per_worker"], 1), "stacked": round(per_hour["stacked"], 1),
                         "ratio": round(per_hour["stacked"] / per_hour["one_per_worker"], 3),
                         "ratio_of_medians": round(of_medians, 3), "trials": len(trials),
                         "packs": [len(p) for p in packs], "steps": trials[0].train["steps"], "workers": workers, "threads_per_worker": 1,
                         "seconds": {mode: [round(t, 2) for t in ts] for mode, ts in seconds.items()},
                         "per_trial": {mode: _per_trial(done, peak_flops) for mode, done in finished.items()},
                         "train_steps_one_thread": steps_only}
    return out
