"""Runner overhead benchmark: N trials of fixed CPU work through the real runner (Ray Tune, ledger,
W&B offline), makespan against the ideal N * work / CPUs.

    python -m studies.bench --trials 24 --work 2.0 --cpus 2 [--wandb offline|disabled]
        [--work-kind torch|python] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

WORK_ENV = "SCALING_BENCH_WORK_SECONDS"
KIND_ENV = "SCALING_BENCH_WORK_KIND"


def fixed_work_trial(spec, *, storage_uri, cache_uri=None, report=None, num_threads=None, wandb_run_id=None, **_):
    """Busy CPU work for a fixed time (not sleep: it occupies the core like training), then a record.

    `torch` work is one-thread matrix products, like a training step (torch releases the GIL, so
    the W&B run opening in a background thread gets the interpreter); `python` work is a pure
    Python loop that holds the GIL, the worst case for anything else in the worker process."""
    from workers.trial import _record, now_iso

    started, t0, wall0 = now_iso(), time.perf_counter(), time.time()
    seconds = float(os.environ.get(WORK_ENV, "2.0"))
    x = 0
    if os.environ.get(KIND_ENV, "torch") == "torch":
        import torch

        torch.set_num_threads(1)
        a = torch.randn(192, 192)
        while time.perf_counter() - t0 < seconds:
            a = torch.tanh(a @ a)
        x = int(a.abs().sum().item() * 0)
    else:
        while time.perf_counter() - t0 < seconds:
            for i in range(10_000):
                x += i * i
    if report:
        report({"step": 1, "best_val_loss": 1.0, "val_loss": 1.0})
    state = {"params": (0, 0), "flops": 0.0, "step": 1, "tokens": 0}
    metrics = {"x": x % 7, "t_start": wall0, "t_end": time.time()}
    return _record(spec, state, "completed", 1.0, metrics, 1, started, t0, wandb_run_id, "val_loss")


def run(trials: int, work: float, cpus: int, wandb: str, kind: str = "torch") -> dict:
    from studies.runner import run_study
    from studies.spec import parse_study

    os.environ[WORK_ENV] = str(work)
    os.environ[KIND_ENV] = kind
    with tempfile.TemporaryDirectory() as tmp:
        study = parse_study({
            "name": "bench-runner",
            "storage": os.path.join(tmp, "study"),
            "cache": os.path.join(tmp, "cache"),
            "tasks": [{"name": "mqar", "options": {"train_examples": 64, "val_examples": 8, "test_examples": 8}}],
            "variants": [{"name": "softmax"}],
            "seeds": list(range(trials)),
            "resources": {"cpus_per_trial": 1, "max_concurrent_trials": cpus},
            "tracking": {"wandb": {"mode": wandb}},
            "fits": [],
        })
        t0 = time.perf_counter()
        result = run_study(study, num_cpus=cpus, progress=False, report=False, trial_fn="studies.bench:fixed_work_trial")
        total = time.perf_counter() - t0
        assert result.counts.get("completed") == trials, result.counts
        from storage.ledger import Ledger

        spans = [json.loads(r["metrics_json"]) for r in Ledger(study.storage_uri()).rows()]
    # makespan: first trial start to last trial end (Ray's start-up and data preparation excluded,
    # as in Ray Tune's own bookkeeping benchmark); total: the whole `run_study` call
    makespan = max(s["t_end"] for s in spans) - min(s["t_start"] for s in spans)
    ideal = trials * work / cpus
    return {"trials": trials, "work_s": work, "cpus": cpus, "wandb": wandb, "work": kind, "makespan_s": round(makespan, 2),
            "ideal_s": ideal, "ratio": round(makespan / ideal, 3), "total_s": round(total, 2),
            "total_ratio": round(total / ideal, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--work", type=float, default=2.0)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--wandb", choices=["offline", "disabled"], default="offline")
    parser.add_argument("--work-kind", choices=["torch", "python"], default="torch",
                        help="torch: one-thread matrix products like training (default); python: a GIL-holding loop")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    out = run(args.trials, args.work, args.cpus, args.wandb, args.work_kind)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
