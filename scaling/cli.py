"""The `scaling` command line. Heavy packages (torch, ray) load only in the commands that need them,
and `run`, `plan` and `submit` validate the study file before loading them: a bad file is refused in
well under a second, with nothing written and no Ray started."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Any

from scaling.laws import LAW_NAMES, LAWS, METHODS  # the law registry (numpy only)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # stopped by a signal (Ctrl-C, SIGTERM): resumable


def _print_table(header: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, show_lines=False)
    for row in rows:
        table.add_row(*("" if c is None else str(c) for c in row))
    Console(width=max(100, os.get_terminal_size(0).columns if sys.stdout.isatty() else 160)).print(table)


def cmd_run(args) -> int:
    from studies.spec import check_can_run, load_study

    study = load_study(args.study)  # before torch and ray are imported: a bad file is refused at once
    check_can_run(study)
    if args.address:
        from studies.remote import use_token

        use_token(args.token_file)
    from studies.runner import run_study

    result = run_study(study, address=args.address, num_cpus=args.num_cpus, progress=not args.no_progress,
                       report=not args.no_report, study_file=args.study, resume_command=_run_command(args))
    if result.interrupted:  # the resume command is printed; the shell's convention for a signal
        return EXIT_INTERRUPTED
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items() if v)
    print(f"study {study.name}: {result.planned} planned, {result.skipped} already in the ledger, "
          f"{result.ran} run now ({counts}) in {result.seconds:.0f}s")
    print(f"ledger:  {result.storage.rstrip('/')}/ledger")  # a URI keeps its scheme (s3://...)
    if result.report_path:
        print(f"report:  {result.report_path}")
        for row in result.fits:  # every law and method; `scaling fits DIR` has the full table
            group = f" ({row['group']})" if row.get("group") else ""
            if row["ok"]:
                print(f"fit {row['task']}/{row['variant']}{group} {row['law']} [{row['method']}]: {row['formula']}, "
                      f"alpha = {_f(row['alpha'])} [{_f(row['alpha_ci_low'])}, {_f(row['alpha_ci_high'])}]")
            elif row.get("reason") and LAWS[row["law"]].baseline:  # a loss law's reasons are in `scaling fits`
                print(f"fit {row['task']}/{row['variant']}{group} {row['law']} [{row['method']}]: not identified: "
                      f"{row['reason']}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _run_command(args) -> str:
    """This `scaling run` as typed, options included (--address above all): what resumes it."""
    import shlex

    words = ["scaling", "run", args.study]
    if args.address:
        words += ["--address", args.address]
    if args.num_cpus:
        words += ["--num-cpus", str(args.num_cpus)]
    words += [flag for flag, on in (("--no-progress", args.no_progress), ("--no-report", args.no_report)) if on]
    return " ".join(shlex.quote(w) for w in words)


def _f(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def cmd_plan(args) -> int:
    """The trials and their cost, done and still to run. Runs nothing and builds nothing: the data's
    sizes are read from the dataset cache (memory-mapped), and a cell whose data are not cached says so."""
    from studies.spec import load_study

    study = load_study(args.study)  # before torch is imported: a bad file is refused at once
    from storage.cache import NotCached
    from studies.plan import cell_costs, make_plan

    try:
        plan = make_plan(study, build=False)
    except NotCached as missing:  # target_params: the trial keys depend on the model sized to the data
        print(f"error: study {study.name} sizes its models to target_params, which needs the data's vocabulary: "
              f"{missing}. `scaling plan` builds nothing; run `scaling cache build --study {args.study}`, then plan "
              "again", file=sys.stderr)
        return EXIT_FAILED
    if plan.trials:
        rows = [[t.key, t.task, t.variant, t.d_osc or "", t.seed, t.stage, "done" if t.key in plan.done else "to run"] for t in plan.trials]
        _print_table(["key", "task", "variant", "d_osc", "seed", "stage", "state"], rows)
    costs = cell_costs(study, plan, build=False)
    _print_table(
        ["cell", "trials", "done", "to run", "params (non-emb.)", "train FLOPs / trial", "est. time / trial",
         "est. time to run", "note"],
        [[c.cell, c.trials, c.done, c.remaining,
          f"{c.params_total:,} ({c.params_non_embedding:,})" if c.params_total else "–",
          f"{c.flops_per_trial:.3g}" if c.flops_per_trial else "–",
          f"{c.seconds_per_trial:.0f}s" if c.seconds_per_trial else "–",
          _duration(c.seconds_per_trial * c.remaining) if c.seconds_per_trial else ("0s" if not c.remaining else "–"),
          c.note] for c in costs],
    )
    stages = ", ".join(f"{n} {stage}" for stage, n in plan.stage_counts().items())
    done = sum(c.done for c in costs)
    remaining = sum(c.remaining for c in costs)
    design_left = 0
    if plan.design_trials:  # the design's trials: its finished ones are in the ledger under the cells it chose
        from storage.ledger import Ledger

        design_done = len({r["key"] for r in Ledger(study.storage_uri()).rows()
                           if r.get("stage") == "design" and r["status"] != "failed"})
        design_left = max(0, plan.design_trials - design_done)
        done, remaining = done + design_done, remaining + design_left
    flops_done = sum(c.flops_per_trial * c.done for c in costs if c.flops_per_trial)
    flops_left = sum(c.flops_per_trial * c.remaining for c in costs if c.flops_per_trial)
    print(f"{plan.planned} trials ({stages}); storage {study.storage_uri()}")
    print(f"done:    {done} trial(s) in the ledger ({flops_done:.3g} training FLOPs; "
          f"{_duration(sum(c.done_seconds for c in costs))} of measured trial time)")
    print(f"to run:  {remaining} trial(s) ({flops_left:.3g} training FLOPs"
          + ("" if all(c.flops_per_trial for c in costs if c.remaining) else "; cells without FLOPs not counted") + ")")
    slots = study.resources.max_concurrent_trials or max(1, int((os.cpu_count() or 1) // study.resources.cpus_per_trial))
    if remaining == 0:
        print("estimated wall time to finish: 0: every planned trial is in the ledger")
    elif all(c.seconds_per_trial for c in costs if c.remaining):
        total = sum(c.seconds_per_trial * c.remaining for c in costs if c.remaining)
        design = [c.seconds_per_trial for c in costs if c.seconds_per_trial and "design" in c.note]
        if design_left and design:  # at the mean time of the cells the design may choose
            total += design_left * sum(design) / len(design)
        total /= slots
        print(f"estimated wall time to finish: {total / 60:.1f} min on {slots} concurrent trial slot(s) "
              "(FLOP rate of this study's finished trials, else of `scaling bench` in bench.json / $SCALING_BENCH_JSON)")
    elif any("cache" in c.note for c in costs if c.remaining):
        print(f"estimated wall time to finish: unknown: some data are not in the cache yet (`scaling plan` builds "
              f"nothing; `scaling cache build --study {args.study}` prepares them)")
    else:
        print("estimated wall time to finish: unknown: no finished trials in this study and no `scaling bench` figures "
              "(run `scaling bench --json bench.json`, or set SCALING_BENCH_JSON)")
    return EXIT_OK


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def cmd_submit(args) -> int:
    from studies.spec import load_study

    study = load_study(args.study)  # before ray is imported: a bad file is refused at once
    from studies import remote

    remote.use_token(args.token_file)
    job_id = remote.submit(study, args.study, address=args.address, working_dir=args.working_dir,
                           forward_env=tuple(args.env), excludes=tuple(args.exclude), announce=print)
    where = f"--address {remote.default_address(args.address)}" + (f" --token-file {args.token_file}" if args.token_file else "")
    print(f"submitted study {study.name} as Ray job {job_id}\n"
          f"  scaling status {job_id} {where}\n"
          f"  scaling logs {job_id} {where} --follow\n"
          f"  scaling cancel {job_id} {where}")
    return EXIT_OK


def cmd_jobs(args) -> int:
    from studies import remote

    remote.use_token(args.token_file)
    jobs = remote.list_jobs(args.address)
    if args.format == "json":
        print(json.dumps(jobs, indent=1, default=str))
        return EXIT_OK
    if not jobs:
        print(f"no jobs on {remote.default_address(args.address)}")
        return EXIT_OK
    _print_table(["job", "status", "study", "started", "ended", "message"],
                 [[j["job_id"], j["status"], j["study"] or "", _when(j["start_time"]), _when(j["end_time"]),
                   (j["message"] or "")[:60]] for j in jobs])
    return EXIT_OK


def _when(ms) -> str:
    """A Ray job timestamp (ms since the epoch) as local time."""
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def cmd_studies(args) -> int:
    from scaling import api

    roots = [args.root] if args.root else api.study_roots()
    rows = [row for root in roots for row in api.studies_overview(root)]
    if args.format == "json":
        print(json.dumps(rows, indent=1, default=str))
        return EXIT_OK
    if not rows:
        print(f"no studies under {' or '.join(roots)} (a study's storage directory holds a study.yaml once it has run)")
        return EXIT_OK
    keys = api.STATUS_KEYS
    _print_table(["study", "tasks", "variants", *keys, "last finished", "storage"],
                 [[r["name"], ", ".join(r.get("tasks") or []), ", ".join(r.get("variants") or []),
                   *((r.get(k, "") for k in keys) if "error" not in r else ["error", *[""] * (len(keys) - 1)]),
                   (r.get("last_finished") or "")[:19], r["storage"] if "error" not in r else r["error"]]
                  for r in rows])
    return EXIT_OK


def cmd_logs(args) -> int:
    if args.trial:
        return _trial_log(args)
    from studies import remote

    remote.use_token(args.token_file)
    if args.follow:
        import asyncio

        async def tail():
            async for lines in remote.follow(args.job, args.address):
                print(lines, end="", flush=True)

        asyncio.run(tail())
    else:
        print(remote.logs(args.job, args.address), end="")
    return EXIT_OK


def _trial_log(args) -> int:
    """`scaling logs STUDY --trial KEY`: the trial's own log under the study's storage (every
    attempt: start, resume, evaluations, warnings, the end or the error). KEY may be a unique prefix."""
    import time

    from scaling import api
    from storage import fs as sfs

    study = api.open_study(args.job)
    fs, root = sfs.resolve(study.storage)
    folder = sfs.join(root, "logs")
    import pyarrow.fs as pafs

    names = sorted(i.base_name[: -len(".log")] for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
                   if i.base_name.endswith(".log"))
    matches = [n for n in names if n == args.trial] or [n for n in names if n.startswith(args.trial)]
    if len(matches) != 1:
        import difflib

        close = difflib.get_close_matches(args.trial, names, n=5, cutoff=0.4)
        hint = (f"; did you mean: {', '.join(close)}" if close and not matches else
                f"; it matches {len(matches)}: {', '.join(matches[:10])}" if matches else
                f"; trials with a log: {', '.join(names[:10]) + (' ...' if len(names) > 10 else '') or 'none yet'}")
        raise ValueError(f"--trial {args.trial!r}: no single trial of study {study.name} has that key{hint}")
    path = sfs.join(folder, f"{matches[0]}.log")
    shown = 0
    while True:
        text = sfs.read_bytes(fs, path).decode(errors="replace")
        print(text[shown:], end="", flush=True)
        shown = len(text)
        progress = sfs.join(root, "progress", f"{matches[0]}.json")
        if not args.follow or not sfs.exists(fs, progress):  # --follow: until the trial ends
            return EXIT_OK
        if b'"interrupted"' in sfs.read_bytes(fs, progress):
            return EXIT_OK
        time.sleep(1.0)


def cmd_cancel(args) -> int:
    from studies import remote

    remote.use_token(args.token_file)
    stopped = remote.cancel(args.job, args.address)
    print(f"job {args.job}: {'stop requested' if stopped else 'already finished'}")
    return EXIT_OK


def cmd_status(args) -> int:
    if args.address:  # a Ray job on a remote cluster
        from studies import remote

        remote.use_token(args.token_file)
        info = remote.job_status(args.study, args.address)
        if args.format == "json":
            print(json.dumps(info, indent=1, default=str))
            return EXIT_OK
        for name, value in info.items():
            print(f"{name:>10}: {value}")
        return EXIT_OK
    from scaling import api

    study = api.open_study(args.study, rows=False, columns=api.STATUS_COLUMNS)
    summary = api.status_summary(study)  # the HTTP API's GET /studies/{name}, less `submission`
    if args.format == "json":
        print(json.dumps(summary, indent=1))
        return EXIT_OK
    cells, totals = summary["cells"], summary["totals"]
    keys = api.STATUS_KEYS
    rows = [[cell, *(c[k] for k in keys)] for cell, c in sorted(cells.items())]
    rows.append(["total", *(totals[k] for k in keys)])
    _print_table(["cell", *keys], rows)
    for entry in summary["in_progress_trials"]:
        print(_trial_line(entry))
    print(_eta_line(summary["eta"]))
    return EXIT_OK


def _trial_line(entry: dict) -> str:
    """`KEY  running  step 400/600 (67%)  val_loss 0.61 (step 400)  train_loss 0.53  on HOST (node ab12cd34)  5s ago`"""
    from datetime import datetime, timezone

    step, total = entry.get("step") or 0, entry.get("total_steps")
    parts = [entry["key"], entry.get("state", "?"), f"step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")]
    latest = entry.get("latest") or {}
    metric = entry.get("metric")
    if metric and metric in latest:
        parts.append(f"{metric} {latest[metric]:.4g} (step {latest.get('eval_step', '?')})")
    if "train_loss" in latest:
        parts.append(f"train_loss {latest['train_loss']:.4g}")
    where = entry.get("host") or "?"
    if entry.get("node_id"):
        where += f" (node {entry['node_id'][:8]})"
    parts.append(f"on {where}")
    try:
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(entry["updated_at"])).total_seconds()
        parts.append(f"updated {age:.0f}s ago")
    except (KeyError, TypeError, ValueError):
        pass
    return "  ".join(parts)


def _eta_line(eta: dict) -> str:
    """ETA = remaining trials x median finished-trial time / concurrent slots (from the study file)."""
    remaining = eta["remaining"]
    if remaining == 0:
        return "all planned trials have finished"
    if eta["seconds"] is None:
        return f"{remaining} trial(s) to go; ETA unknown until one has finished"
    return (f"{remaining} trial(s) to go; ETA {eta['seconds'] / 60:.1f} min at {eta['concurrent_trials']} concurrent "
            f"trial(s) (median trial {eta['median_trial_seconds']:.0f}s)")


def cmd_fits(args) -> int:
    from scaling import api

    study = api.open_study(args.study, columns=api.FIT_COLUMNS)
    fits = api.fits(study, task=args.task, variant=args.variant, law=args.law, method=args.method, n_boot=args.n_boot,
                    ci_level=args.ci_level, params=args.params, min_d_osc=args.min_d_osc, max_d_osc=args.max_d_osc,
                    holdout=not args.no_holdout)
    rows = [f.to_row() for f in fits]
    if args.format == "json":
        print(json.dumps(rows, indent=1, default=str))
    elif args.format == "csv":
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(buffer.getvalue(), end="")
    else:
        from scaling.report import COMPACT_HEADER, compact_fit_rows

        if not fits:
            hint = api.unknown_names(study, args.task, args.variant)
            print(f"no fits match in study {study.name} (tasks: {', '.join(study.tasks) or 'none'}){hint}")
        _print_table(COMPACT_HEADER, compact_fit_rows(fits))
        for fit in fits:
            for note in fit.notes:
                print(f"  note {fit.task}/{fit.variant} {fit.law} {fit.method}: {note}")
    return EXIT_OK


def cmd_trials(args) -> int:
    """One row per ledger record (failed attempts too), sorted by cell, seed and key."""
    from scaling import api

    study = api.open_study(args.study, rows=False, columns=list(api.TRIAL_FIELDS))
    table = api.trials_table(study, task=args.task, variant=args.variant, status=args.status, cell=args.cell)
    table = table.slice(args.offset, args.limit) if args.limit is not None else table.slice(args.offset)
    if args.format == "csv":
        import pyarrow.csv as pacsv

        sink = sys.stdout.buffer
        sys.stdout.flush()
        pacsv.write_csv(table, sink, pacsv.WriteOptions(quoting_style="needed"))
        sink.flush()
    elif args.format == "json":
        from storage.ledger import table_rows

        print(json.dumps([api.fitting.json_safe(r) for r in table_rows(table)], indent=1))
    else:
        from storage.ledger import table_rows

        fields = ["key", "cell", "seed", "stage", "status", "metric_name", "metric_value", "wall_seconds", "host"]
        _print_table(fields, [[r[f] for f in fields] for r in table_rows(table.select(fields))])
        print(f"{table.num_rows} trial record(s) in study {study.name} (all columns: --format csv or json)")
    return EXIT_OK


def cmd_compact(args) -> int:
    from scaling import api
    from storage.ledger import Ledger

    storage = api.open_study(args.study, rows=False, columns=["key"]).storage if args.study.endswith((".yaml", ".yml")) else args.study
    ledger = Ledger(storage)
    result = ledger.compact(full=args.full)
    if result.part is None:
        print(f"ledger {ledger.uri}: {result.skipped}")
    else:
        print(f"ledger {ledger.uri}: merged {result.merged_files} record file(s) and {result.merged_parts} part(s) into "
              f"{result.part} ({result.records} records, {result.seconds:.1f}s); removed {result.removed} merged file(s)")
    return EXIT_OK


def cmd_predict(args) -> int:
    from scaling import api

    if (args.d_osc is None) == (args.params is None):
        raise ValueError("give exactly one of --d-osc (gap_vs_dosc) or --params (gap_vs_params, or --law loss_vs_params)")
    out = api.predict(api.open_study(args.study), task=args.task, variant=args.variant, d_osc=args.d_osc,
                      params=args.params, law=args.law, method=args.method, n_seeds=args.n_seeds, level=args.level,
                      n_boot=args.n_boot, group=api.group_of(args.law, target_params=args.target_params,
                                                             at_d_osc=args.at_d_osc),
                      min_d_osc=args.min_d_osc, max_d_osc=args.max_d_osc, holdout=not args.no_holdout)
    if args.format == "json":
        print(json.dumps(out, indent=1))
        return EXIT_OK
    x_name = "d_osc" if "d_osc" in out else "params"
    where = f"{out['task']}/{out['variant']} at {x_name}={out[x_name]:g}" + (" (extrapolated)" if out["extrapolated"] else "")
    print(f"{where}: {out['quantity']} = {out['value']:.4g}   [{out['method']}, {out['formula']}]")
    if out["ci_low"] is not None:
        print(f"  {out['level']:.0%} confidence interval of the law:        [{out['ci_low']:.4g}, {out['ci_high']:.4g}]")
    if out["pi_low"] is not None:
        print(f"  {out['level']:.0%} prediction interval, mean of {out['n_seeds']} new seed(s): "
              f"[{out['pi_low']:.4g}, {out['pi_high']:.4g}]")
    seen = out.get("observed")
    if seen:
        spread = f" ± {seen['sd']:.4g} (sd)" if seen.get("sd") is not None else ""
        inside = "inside" if seen["within_prediction_interval"] else "OUTSIDE"
        print(f"  observed in this study: {seen['gap']:.4g}{spread} over {seen['n_seeds']} seed(s), "
              f"{inside} the prediction interval")
    return EXIT_OK


def cmd_compare(args) -> int:
    from scaling import api

    def pair(text: str) -> tuple[str, str]:
        if text.count("/") != 1:
            raise ValueError(f"{text!r}: give TASK/VARIANT, e.g. wikitext2/oscillator")
        task, variant = text.split("/")
        return task, variant

    group = api.group_of(args.law, target_params=args.target_params, at_d_osc=args.at_d_osc)
    out = api.compare(api.open_study(args.study), a=pair(args.a), b=pair(args.b), law=args.law, method=args.method,
                      group_a=group, group_b=group)
    if args.format == "json" or out["diff"] is None:
        print(json.dumps(out, indent=1))
        return EXIT_OK if out["diff"] is not None else EXIT_FAILED
    ci = f" [{out['ci_low']:.3g}, {out['ci_high']:.3g}]" if out["ci_low"] is not None else " (no interval)"
    print(f"alpha({out['a']}) - alpha({out['b']}) = {out['diff']:+.3g}{ci} at {out['level']:.0%}"
          f" ({'paired seed draws' if out['paired'] else out.get('note') or 'independent'})")
    return EXIT_OK


def cmd_serve(args) -> int:
    from scaling.server import serve

    serve(args.host, args.port, args.root, log_level=args.log_level, read_only=args.read_only)
    return EXIT_OK


def cmd_report(args) -> int:
    from scaling.report import write_report

    written = write_report(args.study, n_boot=args.n_boot)
    print(f"report:   {written.html_path}\nmarkdown: {written.markdown_path}\nfits:     {written.fits_path}")
    return EXIT_OK


def cmd_import(args) -> int:
    from scaling.importer import import_results

    direction = True if args.higher_is_better else False if args.lower_is_better else None
    summary = import_results(args.results, args.into, name=args.name, baseline=args.baseline, metric=args.metric,
                             higher_is_better=direction, description=args.description)
    print("\n".join(summary.lines()))
    return EXIT_OK


def cmd_bench(args) -> int:
    if args.design:  # adaptive designs against the grid on simulated studies (studies/design_bench.py)
        from studies.design_bench import main as design_bench

        argv = ["--reps", str(args.reps), "--noise", str(args.noise), "--batch", str(args.design_batch),
                "--budgets", *map(str, args.budgets), "--json", args.json or "design_bench.json"]
        return design_bench(argv)
    args.json = args.json or "bench.json"
    from workers.bench import format_study_throughput, format_table, run_bench, study_header, write_json

    if args.study_throughput is not None:
        from storage.suggest import did_you_mean
        from studies.throughput import CASES

        unknown = [c for c in args.study_throughput if c not in CASES]
        if unknown:
            print(f"error: --study-throughput {unknown[0]!r}: unknown case; known: {', '.join(CASES)} "
                  f"(or give none for all){did_you_mean(unknown[0], CASES)}", file=sys.stderr)
            return EXIT_USAGE
    if args.no_attention and args.study_throughput is None:
        print("error: --no-attention leaves nothing to measure; add --study-throughput [CASE ...]", file=sys.stderr)
        return EXIT_USAGE
    if args.no_attention:
        result = study_header(args.threads, args.device)
    else:
        result = run_bench(seq_lens=tuple(args.seq_lens), d_osc=tuple(args.d_osc), batch_size=args.batch_size,
                           repeats=args.repeats, op_seconds=args.op_seconds, steps=not args.no_steps,
                           naive=not args.no_naive, threads=args.threads, device=args.device, compile_model=args.compile)
        print(format_table(result))
    if args.study_throughput is not None:
        from studies.throughput import study_throughput

        print(f"study throughput: {args.throughput_workers} worker processes, one thread each; one trial per worker vs "
              "a cell's seeds packed (run_pack)")
        result["study_throughput"] = study_throughput(args.study_throughput or None, workers=args.throughput_workers,
                                                      steps=args.throughput_steps, rounds=args.throughput_rounds,
                                                      peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
        print(format_study_throughput(result["study_throughput"]))
    write_json(result, args.json)
    print(f"json:     {args.json}")
    return EXIT_OK


def _fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws per fit (default 2000)")
    p.add_argument("--ci-level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--params", choices=["non_embedding", "total"], default="non_embedding",
                   help="parameter count of the *_vs_params laws (default non_embedding)")


def _range_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-d-osc", type=float, help="fit only trials with d_osc >= this (baseline trials are kept)")
    p.add_argument("--max-d-osc", type=float,
                   help="fit only trials with d_osc <= this, e.g. 32 for paper A's fit that predicts d_osc 64")
    p.add_argument("--no-holdout", action="store_true",
                   help="fit the d_osc values the study holds out (fits: holdout: d_osc) too; default: hold them out")


def _group_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-params", type=int, help="which size, when a study has several (gap_vs_dosc)")
    p.add_argument("--at-d-osc", type=int, help="which d_osc (gap_vs_params, loss_vs_params)")


class SuggestingParser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped command or choice (`scaling stauts`)."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            from storage.suggest import did_you_mean

            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices})"
                                                 f"{did_you_mean(value, action.choices)}")


TOKEN_HELP = ("file holding the cluster's Ray auth token (sets RAY_AUTH_TOKEN_PATH and RAY_AUTH_MODE=token); "
              "default: $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, which every Ray "
              "cluster of this account on this machine shares (a warning says so)")


def _cluster_options(p: argparse.ArgumentParser, address_help: str) -> None:
    p.add_argument("--address", help=address_help)
    p.add_argument("--token-file", metavar="PATH", help=TOKEN_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="scaling", description="Scaling studies of oscillator attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    study_help = "a study file (.yaml), a study's storage directory, or a study's name (under ./runs or $SCALING_STUDIES_ROOT)"

    p = sub.add_parser("run", help="run a study's missing trials on Ray, then fit and report")
    p.add_argument("study", help="the study file (.yaml)")
    _cluster_options(p, "join a running Ray cluster (e.g. auto or ray://HEAD:10001); default: embedded local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs for the embedded local Ray (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="skip fits and report at the end")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="the trial table and its cost, done and remaining (runs and builds nothing)")
    p.add_argument("study")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit", help="submit a study to a remote Ray cluster as a Ray Job")
    p.add_argument("study", help="the study file (.yaml); its text travels inside the job, so it may lie outside the working directory")
    job_api = "the cluster's job API, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    _cluster_options(p, job_api)
    p.add_argument("--working-dir", default=".",
                   help="directory shipped with the job (default: .), minus what its .gitignore/.rayignore files list")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out paths matching this gitignore-style pattern, e.g. 'data/' (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME", help="forward this environment variable (not secrets)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="the Ray jobs on a cluster (newest first): id, state, study")
    _cluster_options(p, job_api)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("studies", help="the studies under a root directory, with their trial counts")
    p.add_argument("root", nargs="?",
                   help="directory (or URI) holding study storage directories (default: $SCALING_STUDIES_ROOT, then ./runs)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_studies)

    p = sub.add_parser("logs", help="a submitted study's driver log, or (--trial) one trial's own log")
    p.add_argument("job", help="the Ray job id printed by `scaling submit`; with --trial, the study (file or storage directory)")
    _cluster_options(p, job_api)
    p.add_argument("--follow", action="store_true", help="keep printing as the job (or the trial) goes on")
    p.add_argument("--trial", metavar="KEY", help="print this trial's own log, kept under the study's storage "
                                                   "(logs/KEY.log); a unique prefix of the key will do")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="stop a submitted study (finished trials stay in the ledger)")
    p.add_argument("job")
    _cluster_options(p, job_api)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="per cell: completed / diverged / failed / in progress / pending")
    p.add_argument("study", help=study_help + "; with --address, a Ray job id from `scaling submit`")
    _cluster_options(p, "the cluster's job API: show the submitted job's state")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="json: counts per cell and in total, and the ETA (as the HTTP API's GET /studies/{name})")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("fits", help="the fitted laws with confidence intervals")
    p.add_argument("study", help=study_help)
    p.add_argument("--task")
    p.add_argument("--variant")
    p.add_argument("--law", choices=LAW_NAMES)
    p.add_argument("--method", choices=METHODS,
                   help="loglog-means: paper A's; nonlinear: with optional floor; huber-log: the loss law")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    _fit_options(p)
    _range_options(p)
    p.set_defaults(func=cmd_fits)

    p = sub.add_parser("trials", help="the ledger's records, one row per trial (and failed attempt)")
    p.add_argument("study", help=study_help)
    p.add_argument("--task")
    p.add_argument("--variant")
    p.add_argument("--status", choices=["completed", "diverged", "pruned", "failed"])
    p.add_argument("--cell", help="e.g. wikitext2/oscillator/d8")
    p.add_argument("--limit", type=int, help="at most this many rows (default: all)")
    p.add_argument("--offset", type=int, default=0, help="skip this many rows first")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_trials)

    p = sub.add_parser("compact", help="merge the ledger's record files into one part (safe beside a running study)")
    p.add_argument("study", help=study_help + " (or its storage URI, e.g. s3://bucket/studies/NAME)")
    p.add_argument("--full", action="store_true", help="merge every part too, however large (one file)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("predict", help="the fitted law at a new d_osc or parameter count, with intervals")
    p.add_argument("study", help=study_help)
    p.add_argument("--task", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--d-osc", type=float, help="predict the gap at this d_osc (gap_vs_dosc)")
    p.add_argument("--params", type=float, help="predict at this parameter count (gap_vs_params, or --law loss_vs_params)")
    p.add_argument("--law", choices=LAW_NAMES)
    p.add_argument("--method", choices=METHODS, help="default: nonlinear (huber-log for loss)")
    p.add_argument("--n-seeds", type=int, default=1, help="the prediction interval is for the mean of this many new seeds")
    _group_options(p)
    _range_options(p)
    p.add_argument("--level", type=float, help="interval level (default 0.95)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws (default 2000)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("compare", help="the difference of two fitted exponents, with its interval")
    p.add_argument("study", help=study_help)
    p.add_argument("--a", required=True, metavar="TASK/VARIANT")
    p.add_argument("--b", required=True, metavar="TASK/VARIANT")
    p.add_argument("--law", choices=LAW_NAMES, default="gap_vs_dosc")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--format", choices=["text", "json"], default="text")
    _group_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="write report.html, report.md and fits.json beside the ledger")
    p.add_argument("study", help=study_help)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws per fit (default 2000)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="the query API over HTTP (bearer token from SCALING_API_TOKEN)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--root", default=os.environ.get("SCALING_STUDIES_ROOT"),
                   help="directory holding the studies' storage directories (default $SCALING_STUDIES_ROOT)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--read-only", action="store_true",
                   help="queries only: refuse study submissions (a server on a read-only volume)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("import", help="bring your own results: a CSV/Parquet table of per-seed results becomes a study directory")
    p.add_argument("results", help="CSV or Parquet with columns task, variant, d_osc, [target_params,] seed, metric, value")
    p.add_argument("--into", required=True, metavar="DIR", help="the study directory to create (must not hold a study)")
    p.add_argument("--name", help="the study's name (default: DIR's name)")
    p.add_argument("--baseline", default="softmax", help="the variant gaps are measured against; its d_osc is empty (default softmax)")
    p.add_argument("--metric", help="import only this metric (a study fits one metric per task)")
    p.add_argument("--description", help="free text shown at the top of the report")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", action="store_true",
                           help="assert the metric's direction (default: inferred from its name: acc, f1, auc, score, ... are higher-is-better)")
    direction.add_argument("--lower-is-better", action="store_true", help="assert the metric is lower-is-better (losses, perplexities)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("bench", help="attention speed: fwd+bwd tokens/s and peak memory per variant, op and training step")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[50, 256, 1024], help="sequence lengths (default 50 256 1024)")
    p.add_argument("--d-osc", type=int, nargs="+", default=[2, 32], help="oscillator dimensions (default 2 32)")
    p.add_argument("--batch-size", type=int, help="fixed batch (default 64 at T 50, else about 3200 tokens)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per case, interleaved (default 10)")
    p.add_argument("--op-seconds", type=float, default=3.0,
                   help="attention ops: more rounds (up to 10x --repeats) until they have run this long (default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    p.add_argument("--device", help="cpu or cuda (default cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the training-step cases")
    p.add_argument("--no-steps", action="store_true", help="attention op only, no training steps")
    p.add_argument("--no-naive", action="store_true", help="leave out the naive (dense-formula) oscillator")
    p.add_argument("--study-throughput", nargs="*", metavar="CASE",
                   help="also measure study throughput (trials/hour), one trial per worker vs stacked seeds, for these "
                        "cases (none given: quickstart sva kws wikitext2); run from the repository root")
    p.add_argument("--throughput-steps", type=int, help="steps per trial in the study-throughput cases (default per case)")
    p.add_argument("--throughput-rounds", type=int, default=2, help="alternating rounds of the two modes (default 2)")
    p.add_argument("--throughput-workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s at the training precision: study throughput then reports MFU per trial")
    p.add_argument("--no-attention", action="store_true", help="skip the attention op and training-step cases")
    p.add_argument("--json", help="where to write the results (default bench.json; with --design design_bench.json)")
    p.add_argument("--design", action="store_true",
                   help="instead: adaptive designs against the uniform grid on simulated studies (alpha's interval "
                        "width and coverage at equal budgets; studies/design_bench.py)")
    p.add_argument("--reps", type=int, default=50, help="--design: simulated studies per budget (default 50)")
    p.add_argument("--budgets", type=int, nargs="+", default=[30, 60], help="--design: trial budgets (default 30 60)")
    p.add_argument("--noise", type=float, default=1.0, help="--design: seed noise x the smallest gap (default 1)")
    p.add_argument("--design-batch", type=int, default=5, help="--design: proposals per batch (default 5)")
    p.set_defaults(func=cmd_bench)

    from scaling.cache_cli import add_cache_parser  # `scaling cache build | ls | verify`

    add_cache_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:  # StudyError and QueryError are ValueErrors
        api = sys.modules.get("scaling.api")  # not imported up front: it loads pyarrow and pandas
        if isinstance(error, FileNotFoundError) and not (api and isinstance(error, api.StudyNotFound)):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
