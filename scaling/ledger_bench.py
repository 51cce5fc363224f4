"""Ledger scale benchmark (issue 22): a synthetic study of N trials made with `scaling import`
(one task, softmax + oscillator at d_osc 2-32, N/6 seeds), then the wall time of the commands a
user runs, each a fresh process as a user would run it:

    python -m scaling.ledger_bench --sizes 1000 10000 100000 [--s3] [--out bench_ledger.json]

`--s3` repeats every size on a local S3-protocol server (moto, 127.0.0.1; needs moto[server]).

`--compare-with DIR` also runs every command with another version of this project (a source tree,
e.g. `git archive <commit> | tar -x -C DIR`), alternating the two on the same study, and reports
both times, their ratio, and whether the outputs agree (status and trials byte for byte, fits
numerically to 1e-9): before/after figures from one run on one machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

COMMANDS = {
    "status": ["status", "{study}", "--format", "json"],
    "fits (all laws, 2000 draws)": ["fits", "{study}", "--format", "json"],
    "trials csv": ["trials", "{study}", "--format", "csv"],
}


def write_results(n: int, path: str) -> int:
    ds = [2, 4, 8, 16, 32]
    seeds = max(2, round(n / (1 + len(ds))))
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "variant", "d_osc", "seed", "metric", "value"])
        for s in range(seeds):
            offset = rng.normal(0, 0.02)
            w.writerow(["lm", "softmax", "", s, "val_loss", 3.0 + offset])
            for d in ds:
                w.writerow(["lm", "oscillator", d, s, "val_loss", 3.0 + offset + 2 * d ** -0.7 + rng.normal(0, 0.02)])
    return seeds * (1 + len(ds))


def timed(args: list[str], src: str | None = None) -> tuple[float, bytes]:
    """Wall seconds of `scaling ARGS` in a fresh process (with the project at `src` when given), and its output."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.path.abspath(src)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "scaling.cli", *args], check=True, stdout=subprocess.PIPE,
                         env=env).stdout
    return time.perf_counter() - t0, out


def same_output(name: str, a: bytes, b: bytes) -> bool:
    """Status and trials byte for byte; fits: the same rows, numbers equal to 1e-9 (relative)."""
    if not name.startswith("fits"):
        return a == b
    import math

    def close(x, y) -> bool:
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(close(u, v) for u, v in zip(x, y))
        if isinstance(x, float) and isinstance(y, (int, float)):
            return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
        return x == y

    return close(json.loads(a), json.loads(b))


def copy_to(local: str, uri: str) -> None:
    import pyarrow.fs as pafs

    from storage import fs as sfs

    fs, root = sfs.resolve(uri)
    pafs.copy_files(local, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--s3", action="store_true", help="also on a local S3-protocol server (moto)")
    parser.add_argument("--out", default="bench_ledger.json")
    parser.add_argument("--compare-with", metavar="DIR",
                        help="another version's source tree: run every command with it too, alternately, and compare")
    args = parser.parse_args(argv)
    if args.compare_with and not os.path.isfile(os.path.join(args.compare_with, "scaling", "cli.py")):
        parser.error(f"--compare-with {args.compare_with}: no scaling/cli.py there; give a source tree of this "
                     "project, e.g. `mkdir /tmp/base && git archive 09e9e30 | tar -x -C /tmp/base`")
    work = tempfile.mkdtemp(prefix="ledger-bench-")
    results = []
    backends = ["local"] + (["s3"] if args.s3 else [])
    server = None
    if args.s3:
        from storage.s3local import local_s3

        server = local_s3("bench")
        server.__enter__()
    try:
        for n in args.sizes:
            csv_path = os.path.join(work, f"results-{n}.csv")
            trials = write_results(n, csv_path)
            study = os.path.join(work, f"study-{n}")
            import_s, _ = timed(["import", csv_path, "--into", study])
            row_import = {"import_s": round(import_s, 2)}
            if args.compare_with:
                before, _ = timed(["import", csv_path, "--into", study + "-before"], args.compare_with)
                row_import["import_s_before"] = round(before, 2)
            for backend in backends:
                where = study if backend == "local" else f"s3://bench/study-{n}"
                if backend == "s3":
                    copy_to(study, where)
                row = {"trials": trials, "backend": backend, **row_import}
                for name, command in COMMANDS.items():
                    argv_ = [c.format(study=where) for c in command]
                    if args.compare_with:  # before, after, before, after: the load of a shared machine hits both
                        before1, out_before = timed(argv_, args.compare_with)
                        after1, out_after = timed(argv_)
                        before2, _ = timed(argv_, args.compare_with)
                        after2, _ = timed(argv_)
                        before, after = min(before1, before2), min(after1, after2)
                        row[name] = round(after, 2)
                        row[f"{name} before"] = round(before, 2)
                        row[f"{name} speed-up"] = round(before / after, 1)
                        row[f"{name} same output"] = same_output(name, out_before, out_after)
                    else:
                        row[name] = round(timed(argv_)[0], 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"json: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
