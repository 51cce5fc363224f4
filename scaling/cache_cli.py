"""`scaling cache build | ls | verify`: the dataset cache from the command line.

    scaling cache build TASK [--option KEY=VALUE ...] [--cache URI]   prepare one task's splits
    scaling cache build --study study.yaml                            every task of a study, into its cache
    scaling cache ls [--cache URI] [--format table|json]              what the cache holds
    scaling cache verify [--cache URI] [--quick] [--remove | --rebuild]

Option values are YAML (numbers, booleans, lists and null work; paths stay strings). `ls` and
`verify` need only pyarrow; `build` (and `verify --rebuild`) load the task code in `workers`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_cache_parser(sub) -> None:
    """Register `cache` and its subcommands on the `scaling` CLI's subparsers."""
    cache = sub.add_parser("cache", help="the shared dataset cache: build a task's splits, list, verify")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    cache_help = "cache root: a directory or a pyarrow.fs URI (default: $SCALING_CACHE or ~/.cache/oscillator-scaling)"

    p = csub.add_parser("build", help="prepare a task's splits into the cache (no-op when already there)")
    p.add_argument("task", nargs="?", help="task name (see `--list`)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. data_dir=/data/wikitext-2 (repeatable; values are YAML)")
    p.add_argument("--study", help="build every task of this study file into the study's cache")
    p.add_argument("--cache", help=cache_help)
    p.add_argument("--list", action="store_true", help="list the tasks and their options, then exit")
    p.set_defaults(func=cmd_build)

    p = csub.add_parser("ls", help="list the cached entries")
    p.add_argument("--cache", help=cache_help)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_ls)

    p = csub.add_parser("verify", help="check every entry's sizes and checksums against its manifest")
    p.add_argument("--cache", help=cache_help)
    p.add_argument("--quick", action="store_true", help="sizes and the fast checksum only (skip sha256)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--remove", action="store_true", help="delete damaged entries and dead builders' temp dirs")
    group.add_argument("--rebuild", action="store_true", help="rebuild damaged entries from their recorded request")
    p.set_defaults(func=cmd_verify)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option data_dir=/data/wikitext-2")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def describe(entry, seconds: float, built: bool) -> str:
    manifest = entry.manifest
    rows = ", ".join(f"{s} {info['rows']:,} rows" for s, info in manifest["splits"].items())
    line = f"{entry.name}-{entry.fingerprint}: {'built' if built else 'already cached'} in {seconds:.2f}s ({rows}; {_mb(entry.nbytes)})"
    source = entry.meta.get("source_bytes")
    if built and source:
        build_s = max(float(manifest.get("build_seconds") or seconds), 1e-9)
        line += f"\n  prepared {_mb(source)} of source at {source / 1e6 / build_s:.1f} MB/s"
    return line + f"\n  {entry.uri or entry.path}"


def cmd_build(args) -> int:
    from workers.tasks import TASKS
    from workers.tasks.cli import build_task

    if args.list:
        for name, task in sorted(TASKS.items()):
            print(f"{name}: metric {task.metric}\n  " + "\n  ".join(f"{k} = {v!r}" for k, v in task.DEFAULTS.items()))
        return EXIT_OK
    if args.study:
        from studies.spec import load_study

        if args.task or args.option:
            raise ValueError("--study builds the study's own tasks and options; give no TASK or --option with it")
        study = load_study(args.study)
        for entry in study.tasks:
            result, seconds, built = build_task(entry.name, dict(entry.options), args.cache or study.cache)
            print(describe(result, seconds, built))
        return EXIT_OK
    if not args.task:
        raise ValueError(f"give a TASK (one of {sorted(TASKS)}) or --study FILE")
    result, seconds, built = build_task(args.task, parse_options(args.option), args.cache)
    print(describe(result, seconds, built))
    return EXIT_OK


def cmd_ls(args) -> int:
    from storage.cache import DatasetCache

    cache = DatasetCache(args.cache)
    manifests = cache.entries()
    if args.format == "json":
        print(json.dumps([{k: m.get(k) for k in ("name", "fingerprint", "created", "build_seconds", "splits", "request")}
                          for m in manifests], indent=1))
        return EXIT_OK
    print(f"cache {cache.uri}: {len(manifests)} entries")
    header = ["entry", "created", "splits (rows)", "size", "request"]
    rows = []
    for m in manifests:
        splits = " ".join(f"{s}:{info.get('rows', '?'):,}" for s, info in m.get("splits", {}).items() if s != "vocab")
        size = sum(int(info.get("bytes", 0)) for info in m.get("splits", {}).values())
        request = m.get("request") or {}
        options = {k: v for k, v in (request.get("options") or {}).items() if v is not None}
        shown = json.dumps(options, sort_keys=True) if options else "-"
        rows.append([f"{m.get('name')}-{m.get('fingerprint')}", m.get("created", "?"), splits, _mb(size),
                     shown if len(shown) <= 100 else shown[:97] + "..."])
    _print_rows(header, rows)
    return EXIT_OK


def cmd_verify(args) -> int:
    from storage.cache import DatasetCache

    cache = DatasetCache(args.cache)
    t0 = time.perf_counter()
    rows = cache.verify(full=not args.quick)
    bad = [r for r in rows if not r["ok"]]
    for row in rows:
        status = "ok" if row["ok"] else "DAMAGED" if row["kind"] == "entry" else "stale"
        label = f"{row['name']}-{row['fingerprint']}" if row["kind"] == "entry" else row["name"]
        print(f"{status:8s} {label}  {row['problem'] or _mb(row['bytes'])}")
    entries = sum(1 for r in rows if r["kind"] == "entry")
    print(f"{entries} entries checked ({'sizes + xxh3' if args.quick else 'sizes + sha256 + xxh3'}) in "
          f"{time.perf_counter() - t0:.2f}s: {len(bad)} problem(s)")
    if not bad:
        return EXIT_OK
    if args.remove:
        for row in bad:
            cache.remove_path(f"{row['name']}-{row['fingerprint']}" if row["kind"] == "entry" else row["name"])
        print(f"removed {len(bad)}; damaged entries are rebuilt by the next `scaling cache build` or study run")
        return EXIT_OK
    if args.rebuild:
        from workers.tasks.cli import rebuild_entry

        failed = 0
        for row in bad:
            if row["kind"] != "entry":
                cache.remove_path(row["name"])
                continue
            try:
                entry = rebuild_entry(cache, row["name"], row["fingerprint"])
                print(f"rebuilt  {entry.name}-{entry.fingerprint}")
            except Exception as error:  # noqa: BLE001 -- report every entry, then fail
                failed += 1
                print(f"FAILED   {row['name']}-{row['fingerprint']}: {error}", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK
    print("run `scaling cache verify --rebuild` to rebuild them, or `--remove` to delete them", file=sys.stderr)
    return EXIT_FAILED


def _print_rows(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)] if rows else [len(h) for h in header]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    """`python -m scaling.cache_cli cache ...`: the same commands without the rest of the `scaling` CLI."""
    parser = argparse.ArgumentParser(prog="scaling")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
