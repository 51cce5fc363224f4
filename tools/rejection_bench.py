"""How fast and how cleanly `scaling run` refuses bad study files (issue 18's figures).

Each case is one category of malformed study file, written into its own empty directory; the
command runs in a fresh interpreter, as a user types it. A case passes when the run exits 2 with no
traceback, names the field it is about, and leaves nothing but the study file behind (no storage,
no cache, no Ray). Prints one line per case and the median wall time over `--repeat` runs of every
case, and writes the table as JSON with `--json`.

    python tools/rejection_bench.py [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

GOOD = {
    "name": "probe",
    "tasks": [{"name": "mqar", "options": {"num_pairs": 4, "num_keys": 8, "num_queries": 2, "train_examples": 64,
                                           "val_examples": 16, "test_examples": 16}}],
    "variants": [{"name": "softmax"}, {"name": "oscillator", "d_osc": [2, 4]}],
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
    "seeds": [0],
    "train": {"steps": 10, "batch_size": 16},
}


def _with(path: str, value):
    """GOOD with one dotted field set (a list index as a number); `...` deletes the field."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is ...:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


# (category, study text or data, the field the message must name); "{dir}" is the case's directory
CASES: list[tuple[str, object, str]] = [
    ("empty file", "", "empty"),
    ("only a comment", "# nothing\n", "empty"),
    ("a list, not a mapping", "- a\n- b\n", "mapping"),
    ("a scalar, not a mapping", "hello\n", "mapping"),
    ("YAML syntax error", "name: [unclosed\n", "line"),
    ("unknown top-level key", {**GOOD, "seedz": [0]}, "seedz"),
    ("missing name", _with("name", ...), "name"),
    ("missing tasks", _with("tasks", ...), "tasks"),
    ("missing variants", _with("variants", ...), "variants"),
    ("missing seeds", _with("seeds", ...), "seeds"),
    ("unknown task", _with("tasks.0.name", "mqarr"), "tasks[0]"),
    ("unknown task option", _with("tasks.0.options.num_pair", 4), "num_pair"),
    ("task option out of range", _with("tasks.0.options.num_pairs", -3), "num_pairs"),
    ("unknown variant", _with("variants.0.name", "softmaxx"), "variants[0]"),
    ("d_osc not a number", _with("variants.1.d_osc", ["two"]), "d_osc"),
    ("d_osc absurd", _with("variants.1.d_osc", [2, 10**9]), "d_osc"),
    ("d_osc zero", _with("variants.1.d_osc", [0]), "d_osc"),
    ("seeds negative", _with("seeds", [-1]), "seeds"),
    ("seeds repeated", _with("seeds", [0, 0]), "seeds"),
    ("seeds absurd", _with("seeds", [2**40]), "seeds"),
    ("steps zero", _with("train.steps", 0), "train.steps"),
    ("steps absurd", _with("train.steps", 10**12), "train.steps"),
    ("two budgets", _with("train.epochs", 2), "train"),
    ("batch_size 1e12 (YAML text)", "BATCH", "train.batch_size"),
    ("batch_size absurd", _with("train.batch_size", 10**12), "train.batch_size"),
    ("lr negative", _with("train.lr", -1.0), "train.lr"),
    ("unknown train key", _with("train.stepz", 5), "stepz"),
    ("d_model not divisible by heads", _with("model.n_heads", 3), "n_heads"),
    ("n_layers absurd", _with("model.n_layers", 100_000), "model.n_layers"),
    ("d_model absurd", _with("model.d_model", 2**20), "model.d_model"),
    ("target_params absurd", {**GOOD, "target_params": [1e6, 1e15]}, "target_params"),
    ("storage is a file", {**GOOD, "storage": "{dir}/afile"}, "storage"),
    ("storage not writable", {**GOOD, "storage": "/proc/scaling-nope"}, "storage"),
    ("resources: negative cpus", {**GOOD, "resources": {"cpus_per_trial": -1}}, "cpus_per_trial"),
    ("tracking: unknown W&B mode", {**GOOD, "tracking": {"wandb": {"mode": "sometimes"}}}, "mode"),
    ("a huge bad value", _with("model.positions", "x" * 100_000), "model.positions"),
]


def run_case(name: str, study, field: str, repeat: int) -> dict:
    import yaml

    times, ok, reasons, first = [], True, [], ""
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="rej-") as work:
            work_p = pathlib.Path(work)
            (work_p / "afile").write_text("x")
            if study == "BATCH":
                text = yaml.safe_dump(GOOD).replace("batch_size: 16", "batch_size: 1e12")
            elif isinstance(study, str):
                text = study
            else:
                text = yaml.safe_dump(study).replace("{dir}", work)
            path = work_p / "study.yaml"
            path.write_text(text)
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                   "SCALING_CACHE": str(work_p / "cache")}
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "scaling.cli", "run", str(path)], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=120)
            times.append(time.perf_counter() - t0)
            left = sorted(p.name for p in work_p.iterdir())
            first = first or done.stderr.strip().splitlines()[-1:][0] if done.stderr.strip() else first
            if done.returncode != 2:
                ok = False
                reasons.append(f"exit {done.returncode}")
            if "Traceback" in done.stderr:
                ok = False
                reasons.append("traceback")
            if field.lower() not in done.stderr.lower():
                ok = False
                reasons.append(f"does not name {field!r}")
            if left != ["afile", "study.yaml"]:
                ok = False
                reasons.append(f"left {left}")
    return {"case": name, "ok": ok, "median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times],
            "problems": sorted(set(reasons)), "message": first[:300]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for name, study, field in CASES:
        row = run_case(name, study, field, args.repeat)
        rows.append(row)
        mark = "ok " if row["ok"] else "BAD"
        print(f"{mark} {row['median_s']:6.2f}s  {name:<34} {'; '.join(row['problems']) or row['message'][:90]}", flush=True)
    all_times = [t for r in rows for t in r["times_s"]]
    summary = {"cases": len(rows), "clean": sum(r["ok"] for r in rows), "median_s": round(statistics.median(all_times), 3),
               "max_s": round(max(all_times), 3), "load_average": os.getloadavg()[0], "repeat": args.repeat}
    print(f"{summary['clean']}/{summary['cases']} categories refused cleanly; median {summary['median_s']} s, "
          f"max {summary['max_s']} s over {len(all_times)} runs (load average {summary['load_average']:.1f})")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"summary": summary, "cases": rows}, indent=1))
    return 0 if summary["clean"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
