"""Ledger scale benchmark (issue 22): a synthetic study of N trials made with `scaling import`
(one task, softmax + oscillator at d_osc 2-32, N/6 seeds), then the wall time of the commands a
user runs, each a fresh process as a user would run it:

    python -m scaling.ledger_bench --sizes 1000 10000 100000 [--s3] [--out bench_ledger.json]

`--s3` repeats every size on a local S3-protocol server (moto, 127.0.0.1; needs moto[server]).
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


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scaling.cli", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


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
    args = parser.parse_args(argv)
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
            import_s = timed(["import", csv_path, "--into", study])
            for backend in backends:
                where = study if backend == "local" else f"s3://bench/study-{n}"
                if backend == "s3":
                    copy_to(study, where)
                row = {"trials": trials, "backend": backend, "import_s": round(import_s, 2)}
                for name, command in COMMANDS.items():
                    row[name] = round(timed([c.format(study=where) for c in command]), 2)
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
