"""Dataset cache benchmark: open time of a cached 10M-token split in fresh worker processes,
random-batch throughput from the memory-mapped split on one CPU core, and preparation throughput,
cache size and open time of every task on the real samples.

    python -m workers.tasks.bench [--tokens 10000000] [--shared ../shared/data] [--json out.json]

The 10M-token split is WikiText-2's train split built from real text (the shared WikiText-2 sample
repeated to size; synthetic words when it is absent), so "preparing it again" is the real paper A
tokenisation. Open time is measured inside each fresh process, after its imports (which a worker
pays once, not per split), from `Task.prepare` (source identity, manifest, size and xxh3 checks of
every split, memory map) to the numpy arrays the trainer reads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"

_WORKER = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from storage.cache import DatasetCache
from workers.tasks import get_task
imported = time.perf_counter() - t0
root, options = sys.argv[1], json.loads(sys.argv[2])
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one CPU core
torch.set_num_threads(1)
task = get_task("wikitext2")
t1 = time.perf_counter()
prepared = task.prepare(options, DatasetCache(root))
opened = time.perf_counter() - t1
train = prepared.arrays["train"]
t2 = time.perf_counter()
entry = DatasetCache(root).open("wikitext2", prepared.fingerprint, verify=False)
unchecked = time.perf_counter() - t2
rng = np.random.default_rng(0)
n, tokens, batches = len(train["tokens"]), 0, 0
t3 = time.perf_counter()
while time.perf_counter() - t3 < 2.0:
    batch = task.batch(train, rng.integers(0, n, 64))
    tokens += int(batch["input_ids"].numel())
    batches += 1
elapsed = time.perf_counter() - t3
print(json.dumps({"import_s": imported, "open_s": opened, "open_unchecked_s": unchecked,
                  "batch_tokens_per_s": tokens / elapsed, "batches": batches,
                  "train_tokens": int(prepared.meta["splits"]["train"]["tokens"])}))
"""


def corpus(directory: Path, tokens: int, shared: Path | None) -> dict:
    """A WikiText-2-format directory whose train file holds about `tokens` paper A tokens."""
    import numpy as np

    from storage.prep.text import wikitext_tokens

    directory.mkdir(parents=True, exist_ok=True)
    wt2 = shared / "wikitext2" if shared else None
    if wt2 and (wt2 / "valid.txt").exists():
        valid, test = (wt2 / "valid.txt").read_text(), (wt2 / "test.txt").read_text()
        base, source = valid + test, "shared WikiText-2 valid+test, repeated"
    else:
        rng = np.random.default_rng(0)
        words = [f"w{i}" for i in range(30_000)]
        p = 1 / np.arange(1, 30_001)
        lines = [" " + " ".join(rng.choice(words, 60, p=p / p.sum())) + " . \n" for _ in range(20_000)]
        base, source = "".join(lines), "synthetic Zipf words"
        valid = test = "".join(lines[:2000])
    per_copy = sum(len(wikitext_tokens(line)) for line in base.splitlines() if line.strip())
    copies = -(-tokens // per_copy)
    (directory / "wiki.train.tokens").write_text(base * copies)
    (directory / "wiki.valid.tokens").write_text(valid)
    (directory / "wiki.test.tokens").write_text(test)
    return {"source": source, "train_bytes": len(base.encode()) * copies, "copies": copies}


def open_and_batch(tokens: int, shared: Path | None, runs: int, work: Path) -> dict:
    from storage.cache import DatasetCache
    from workers.tasks import get_task

    info = corpus(work / "wt2", tokens, shared)
    root = str(work / "cache")
    options = {"data_dir": str(work / "wt2")}
    t0 = time.perf_counter()
    prepared = get_task("wikitext2").prepare(options, DatasetCache(root))
    prepare_s = time.perf_counter() - t0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _WORKER, root, json.dumps(options)], capture_output=True,
                             text=True, check=True, env=env)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    median = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
    split_bytes = prepared.meta["splits"]["train"]["chunks"] * 50 * 2
    return {
        "split": "wikitext2 train (paper A tokenisation, 50-token chunks, uint16)",
        "corpus": info,
        "train_tokens": results[0]["train_tokens"],
        "train_split_bytes": split_bytes,
        "prepare_s": prepare_s,
        "prepare_mb_per_s": info["train_bytes"] / 1e6 / prepare_s,
        "fresh_process_runs": runs,
        "open_ms_median": 1e3 * median("open_s"),
        "open_ms_max": 1e3 * max(r["open_s"] for r in results),
        "open_without_checksums_ms_median": 1e3 * median("open_unchecked_s"),
        "worker_import_s_median": median("import_s"),
        "prepare_over_open": prepare_s / median("open_s"),
        "batch_tokens_per_s_one_core": median("batch_tokens_per_s"),
        "batch_size": 64,
    }


def task_sources(shared: Path | None) -> dict[str, dict]:
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = {"sva": {}, "codeparrot": {"data_dir": stdlib}}
    if shared and shared.exists():
        sources.update({
            "kws": {"data_dir": str(shared / "kws")},
            "sva": {"data_dir": str(shared / "sva")},
            "wikitext2": {"train_file": str(shared / "wikitext2" / "valid.txt"), "val_file": str(shared / "wikitext2" / "test.txt"),
                          "test_file": str(shared / "wikitext2" / "test.txt")},
            "tinystories": {"train_file": str(shared / "tinystories" / "tinystories_val_head.txt"), "separator": "\n\n",
                            "val_fraction": 0.05},
            "enwik8": {"data_file": str(shared / "enwik8" / "enwik8_head4M")},
        })
    return sources


def per_task(shared: Path | None, work: Path) -> dict:
    from storage.cache import DatasetCache
    from workers.tasks import get_task

    out = {}
    for name, options in task_sources(shared).items():
        root = str(work / f"cache-{name}")
        t0 = time.perf_counter()
        entry = get_task(name).entry(options, DatasetCache(root))
        wall = time.perf_counter() - t0
        build = float(entry.manifest["build_seconds"])
        source = int(entry.meta.get("source_bytes") or 0)
        opens = []
        for _ in range(5):
            t1 = time.perf_counter()
            DatasetCache(root).open(name, entry.fingerprint)  # a new cache object: sizes + xxh3 checked
            opens.append(time.perf_counter() - t1)
        out[name] = {
            "options": options,
            "source_mb": source / 1e6,
            "build_s": build,
            "wall_s": wall,
            "prepare_mb_per_s": source / 1e6 / build if build else None,
            "cache_mb": entry.nbytes / 1e6,
            "rows": {s: info["rows"] for s, info in entry.manifest["splits"].items()},
            "open_ms_median": 1e3 * statistics.median(opens),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=5, help="fresh worker processes to time")
    parser.add_argument("--shared", default=str(DEFAULT_SHARED), help="the real samples (../shared/data)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--skip-tasks", action="store_true", help="only the 10M-token open/batch benchmark")
    args = parser.parse_args(argv)
    shared = Path(args.shared) if args.shared and Path(args.shared).exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SCALING_DIGEST_MEMO", os.path.join(tmp, "digests.json"))
        result = {
            "host": os.uname().nodename,
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "open_and_batch": open_and_batch(args.tokens, shared, args.runs, Path(tmp) / "lm"),
        }
        if not args.skip_tasks:
            result["tasks"] = per_task(shared, Path(tmp) / "tasks")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
