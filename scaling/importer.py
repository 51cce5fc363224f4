"""`scaling import`: bring your own results. A table of per-seed results (CSV or Parquet) becomes a
study directory that every query works on (`scaling status / fits / predict / report DIR`, the HTTP API).

Columns (one row per run and metric; names are case-insensitive):

    task, variant, d_osc, [target_params,] seed, metric, value

`d_osc` is empty for the baseline variant (default softmax) and a positive whole number for every
other variant; `target_params` is optional. A value of nan/inf is imported as a diverged run
(counted in reports, left out of fits). Every row is checked before anything is written, and the
study is assembled in a temporary sibling directory that is renamed into place at the end, so a bad
input leaves nothing behind. Needs no torch and no ray.

    >>> from scaling.importer import import_results
    >>> import_results("results.csv", "runs/theirs")        # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from scaling.fits import HIGHER_IS_BETTER_HINTS, lower_is_better
from storage.ledger import Ledger
from storage.records import TrialRecord, TrialSpec, canonical_json, stable_hash

REQUIRED_COLUMNS = ("task", "variant", "d_osc", "seed", "metric", "value")
OPTIONAL_COLUMNS = ("target_params",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as studies.spec and the server: names paths
MAX_LISTED = 20  # problems listed in one error message
_BLANK = ("", "nan", "na", "n/a", "none", "null")


class ResultsImportError(ValueError):
    """An input that cannot be imported; the message names the rows and the fix. Nothing was written."""


@dataclass(frozen=True)
class ResultRow:
    """One validated input row."""

    where: str  # "line 5" (CSV) or "row 3" (Parquet), for messages
    task: str
    variant: str
    d_osc: int | None
    target_params: int | None
    seed: int
    metric: str
    value: float

    @property
    def slot(self) -> tuple:
        return (self.task, self.variant, self.d_osc, self.target_params, self.seed, self.metric)

    @property
    def cell(self) -> str:
        return self.spec("").cell

    def spec(self, study: str, source: dict[str, Any] | None = None) -> TrialSpec:
        """A TrialSpec (so `TrialRecord.spec` parses) whose `train` says where the result came from."""
        return TrialSpec(study=study, task=self.task, task_options={}, variant=self.variant,
                         variant_options={"d_osc": self.d_osc} if self.d_osc is not None else {},
                         model={}, train={"import": source} if source else {}, seed=self.seed,
                         stage="replicate", target_params=self.target_params, code_version="import")

    @property
    def key(self) -> str:
        """Stable: the same row always gets the same key (the value is part of the hash)."""
        payload = {"task": self.task, "variant": self.variant, "d_osc": self.d_osc,
                   "target_params": self.target_params, "seed": self.seed, "metric": self.metric,
                   "value": repr(self.value)}
        return f"{self.cell.replace('/', '-')}-s{self.seed}-import-{stable_hash(payload, 10)}"


@dataclass
class ImportSummary:
    study: str
    storage: str  # the study directory written
    source: str
    rows: int
    diverged: int
    metrics: dict[str, str]  # task -> metric
    variants: dict[str, dict[str, list]]  # task -> variant -> sorted d_osc values (empty for the baseline)
    seeds: list[int]
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"imported {self.rows} result(s) from {self.source} into study {self.study} at {self.storage}"]
        for task, metric in self.metrics.items():
            direction = "lower" if lower_is_better(metric) else "higher"
            parts = [f"{v} d_osc {ds}" if ds else v for v, ds in self.variants[task].items()]
            out.append(f"  {task}: {metric} ({direction} is better); {'; '.join(parts)}")
        out.append(f"  seeds: {seeds_text(self.seeds)}" + (f"; {self.diverged} non-finite value(s) imported as diverged runs"
                                                            if self.diverged else ""))
        out += [f"  note: {n}" for n in self.notes]
        out.append(f"next: scaling status {self.storage}  |  scaling fits {self.storage}  |  scaling report {self.storage}")
        return out


# ---- reading ------------------------------------------------------------------------------------

def read_table(path: str | os.PathLike) -> tuple[list[str], list[tuple[str, dict[str, Any]]], str, bytes]:
    """(columns, [(where, row)], format, file bytes) of a CSV or Parquet file; column names lower-cased."""
    path = Path(path)
    if not path.is_file():
        raise ResultsImportError(f"{path}: no such file; give a CSV or Parquet file of results")
    data = path.read_bytes()
    if data[:4] == b"PAR1" or path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as error:
            raise ResultsImportError(f"{path}: not a readable Parquet file ({error})") from None
        columns = [c.strip().lower() for c in table.column_names]
        rows = table.to_pylist()
        return columns, [(f"row {i + 1}", {c.strip().lower(): v for c, v in r.items()}) for i, r in enumerate(rows)], \
            "parquet", data
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ResultsImportError(f"{path}: not UTF-8 text ({error}); save the CSV as UTF-8 or give a Parquet file") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise ResultsImportError(f"{path}: empty file; the first line must name the columns {', '.join(REQUIRED_COLUMNS)}")
    columns = [c.strip().lower() for c in header]
    rows = []
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(columns):
            raise ResultsImportError(f"{path} line {line}: {len(cells)} field(s) but the header has {len(columns)} "
                                     f"({', '.join(columns)}); quote values that contain commas")
        rows.append((f"line {line}", dict(zip(columns, cells))))
    return columns, rows, "csv", data


def check_columns(columns: list[str], source: str) -> None:
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(f"missing required column(s) {missing}; the columns are {list(REQUIRED_COLUMNS)} plus optional "
                        f"{list(OPTIONAL_COLUMNS)} (d_osc may be empty for the baseline, but the column must be there)")
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    for column in columns:
        if column not in known:
            close = difflib.get_close_matches(column, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown column {column!r}{hint}; drop or rename it (known: {sorted(known)})")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        problems.append(f"column(s) {duplicated} appear more than once; keep one of each")
    if problems:
        raise ResultsImportError(_problems(source, problems))


# ---- validating ---------------------------------------------------------------------------------

def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in _BLANK


def _whole(value: Any) -> int:
    """A whole number from an int, an integral float or text such as "3", "3.0" or "5e6"; else ValueError."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            value = float(text)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ValueError


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        return float(value.strip())
    raise ValueError


def parse_row(where: str, raw: dict[str, Any], *, baseline: str) -> tuple[ResultRow | None, list[str]]:
    """The validated row, or None and the problems found (each naming the row, column and fix)."""
    problems: list[str] = []
    names: dict[str, str] = {}
    for column in ("task", "variant", "metric"):
        value = raw.get(column)
        text = "" if _is_blank(value) and not (isinstance(value, str) and value.strip()) else str(value).strip()
        if not text:
            problems.append(f"{where}: {column} is empty; every row needs a {column}")
        elif column != "metric" and not NAME_RE.match(text):
            problems.append(f"{where}: {column}={text!r} must be letters, digits, '_', '.' or '-' (at most 64, starting "
                            f"with a letter or digit), e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '_', text).strip('_.-')[:64] or 'x'!r}")
        names[column] = text
    variant = names["variant"]

    d_osc = None
    raw_d = raw.get("d_osc")
    if variant and variant == baseline and not _is_blank(raw_d):
        problems.append(f"{where}: d_osc={raw_d!r} given for the baseline variant {baseline!r}; leave d_osc empty for "
                        f"the baseline (or pass --baseline NAME if {baseline!r} is not your baseline)")
    elif variant and variant != baseline and _is_blank(raw_d):
        problems.append(f"{where}: variant {variant!r} has no d_osc; give its oscillator dimension (only the baseline, "
                        f"{baseline!r}, has none; pass --baseline {variant} if this variant is the baseline)")
    elif not _is_blank(raw_d):
        try:
            d_osc = _whole(raw_d)
        except (ValueError, OverflowError):
            problems.append(f"{where}: d_osc={raw_d!r} is not a whole number; give the oscillator dimension, e.g. 2 or 64")
        else:
            if d_osc <= 0:
                problems.append(f"{where}: d_osc={d_osc} must be positive, e.g. 2 or 64")

    target_params = None
    raw_n = raw.get("target_params")
    if not _is_blank(raw_n):
        try:
            target_params = _whole(raw_n)
        except (ValueError, OverflowError):
            problems.append(f"{where}: target_params={raw_n!r} is not a whole number; give a parameter count such as "
                            "5000000 or 5e6, or leave it empty")
        else:
            if target_params <= 0:
                problems.append(f"{where}: target_params={target_params} must be positive, or empty")

    seed = None
    raw_seed = raw.get("seed")
    if _is_blank(raw_seed):
        problems.append(f"{where}: seed is empty; every row needs the integer seed of its run, e.g. 0")
    else:
        try:
            seed = _whole(raw_seed)
        except (ValueError, OverflowError):
            problems.append(f"{where}: seed={raw_seed!r} is not an integer; give the run's integer seed, e.g. 0, 1, 2")

    value = None
    raw_value = raw.get("value")
    try:
        value = _number(raw_value)
    except (ValueError, OverflowError):
        empty = raw_value is None or (isinstance(raw_value, str) and not raw_value.strip())
        said = "value is empty" if empty else f"value={raw_value!r} is not a number"
        problems.append(f"{where}: {said}; give the metric as a plain number such as 101.52 "
                        "(a run that diverged may be given as nan)")

    if problems:
        return None, problems
    return ResultRow(where, names["task"], variant, d_osc, target_params, int(seed), names["metric"], float(value)), []


def validate(
    raw_rows: list[tuple[str, dict[str, Any]]], *, baseline: str, metric: str | None = None,
    higher_is_better: bool | None = None,
) -> tuple[list[ResultRow], list[str]]:
    """(rows, problems): every problem of the table, not just the first."""
    problems: list[str] = []
    if metric is not None:
        present = sorted({str(r.get("metric")).strip() for _, r in raw_rows if not _is_blank(r.get("metric"))})
        if metric not in present:
            raise ResultsImportError(f"--metric {metric!r}: no row has that metric; the table has {present}")
        raw_rows = [(w, r) for w, r in raw_rows if str(r.get("metric")).strip() == metric]
    rows: list[ResultRow] = []
    for where, raw in raw_rows:
        row, found = parse_row(where, raw, baseline=baseline)
        problems += found
        if row is not None:
            rows.append(row)

    first: dict[tuple, ResultRow] = {}
    for row in rows:
        if row.slot in first:
            size = f", target_params={row.target_params}" if row.target_params is not None else ""
            d = f", d_osc={row.d_osc}" if row.d_osc is not None else ""
            problems.append(f"{row.where} repeats {first[row.slot].where} (task={row.task}, variant={row.variant}{d}{size}, "
                            f"seed={row.seed}, metric={row.metric}): keep one row per cell, seed and metric")
        else:
            first[row.slot] = row

    by_task: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = by_task.setdefault(row.task, {})
        counts[row.metric] = counts.get(row.metric, 0) + 1
    for task, counts in sorted(by_task.items()):
        if len(counts) > 1:
            listed = ", ".join(f"{m} ({n} row{'s' if n > 1 else ''})" for m, n in sorted(counts.items()))
            problems.append(f"task {task!r} has several metrics: {listed}; a study fits one metric per task: pass "
                            f"--metric NAME to import one of them (e.g. --metric {sorted(counts)[0]})")
        elif higher_is_better is not None:
            name = next(iter(counts))
            if lower_is_better(name) == higher_is_better:
                said = "--higher-is-better" if higher_is_better else "--lower-is-better"
                reads = "lower" if lower_is_better(name) else "higher"
                fix = (f"rename it so it contains one of {list(HIGHER_IS_BETTER_HINTS)}, e.g. {name}_score"
                       if higher_is_better else f"rename it so it contains none of {list(HIGHER_IS_BETTER_HINTS)}")
                problems.append(f"task {task!r}: metric {name!r} reads as {reads}-is-better to the fits (which take the "
                                f"direction from the metric's name), but {said} was given; {fix}")
    return rows, problems


def _problems(source: str, problems: list[str]) -> str:
    shown = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return (f"cannot import {source}: {len(problems)} problem(s); nothing was written\n  - " + "\n  - ".join(shown) + more)


# ---- writing ------------------------------------------------------------------------------------

def check_target(into: str | os.PathLike, name: str | None) -> tuple[Path, str]:
    """(absolute study directory, study name); refuses a directory that already holds a study."""
    if "://" in str(into) and not str(into).startswith("file://"):
        raise ResultsImportError(f"{into}: import writes a local directory; import there, then copy the directory to "
                                 "object storage")
    target = Path(str(into)[len("file://"):] if str(into).startswith("file://") else into).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ResultsImportError(f"--into {target}: a file, not a directory; give a new directory")
    held = [p for p in ("study.yaml", "ledger", "plan.json") if (target / p).exists()]
    if held:
        raise ResultsImportError(f"--into {target} already holds a study ({', '.join(held)}); import into a new "
                                 "directory (records are immutable, so an import never merges into a ledger); "
                                 "nothing was written")
    name = name if name is not None else target.name
    if not NAME_RE.match(name):
        raise ResultsImportError(f"study name {name!r} must be letters, digits, '_', '.' or '-' (at most 64, starting "
                                 "with a letter or digit); pass --name NAME" + (
                                     " (the default is the directory's name)" if name == target.name else ""))
    return target, name


def _fields(spec: TrialSpec) -> dict[str, Any]:
    """spec.to_dict() for serialising only: the same JSON without dataclasses.asdict's deep copy."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(row: ResultRow, *, study: str, source: dict[str, Any], finished_at: str) -> TrialRecord:
    finite = math.isfinite(row.value)
    size = row.target_params or 0
    return TrialRecord(
        key=row.key, study=study, cell=row.cell, task=row.task, variant=row.variant, d_osc=row.d_osc,
        target_params=row.target_params, params_total=size, params_non_embedding=size, seed=row.seed,
        stage="replicate", hparams_json="{}",
        spec_json=canonical_json(_fields(row.spec(study, {**source, "where": row.where}))),
        status="completed" if finite else "diverged", metric_name=row.metric, metric_value=row.value,
        metrics_json=canonical_json({row.metric: row.value if finite else None}), best_step=None, steps=0,
        tokens_seen=0, flops=0.0, wall_seconds=0.0, started_at=finished_at, finished_at=finished_at,
        wandb_run_id=None, host="import", error=None if finite else f"imported value {row.value!r} is not finite",
    )


SEEDS_LISTED = 64  # study.yaml lists up to this many seeds; more are summarised


def seeds_entry(seeds: list[int]) -> list[int] | dict[str, Any]:
    """The `seeds:` of an imported study.yaml: the list, or for more than SEEDS_LISTED seeds a
    summary (count, min, max, contiguous). Every reader parses study.yaml, and 16,667 listed seeds
    took longer to parse than counting the ledger's 100,000 trials; the ledger holds every seed."""
    if len(seeds) <= SEEDS_LISTED:
        return seeds
    return {"count": len(seeds), "min": seeds[0], "max": seeds[-1], "contiguous": seeds[-1] - seeds[0] + 1 == len(seeds)}


def seeds_text(seeds: list[int]) -> str:
    if len(seeds) <= SEEDS_LISTED:
        return str(seeds)
    contiguous = seeds[-1] - seeds[0] + 1 == len(seeds)
    return f"{len(seeds)} seeds, {seeds[0]}-{seeds[-1]}" + ("" if contiguous else " (with gaps)")


def study_config(rows: list[ResultRow], *, name: str, storage: Path, baseline: str, description: str,
                 source: dict[str, Any]) -> dict[str, Any]:
    """The study.yaml saved beside the ledger: what `scaling.api.open_study` and the server read."""
    tasks = {}
    for row in rows:
        tasks.setdefault(row.task, row.metric)
    variants: dict[str, set] = {}
    for row in rows:
        variants.setdefault(row.variant, set())
        if row.d_osc is not None:
            variants[row.variant].add(row.d_osc)
    config: dict[str, Any] = {
        "name": name,
        "description": description,
        "storage": str(storage),
        "baseline": baseline,
        "tasks": [{"name": t, "metric": m, "lower_is_better": lower_is_better(m)} for t, m in sorted(tasks.items())],
        "variants": [{"name": v, **({"d_osc": sorted(ds)} if ds else {})}
                     for v, ds in sorted(variants.items(), key=lambda kv: (kv[0] != baseline, kv[0]))],
        "seeds": seeds_entry(sorted({r.seed for r in rows})),
    }
    sizes = sorted({r.target_params for r in rows if r.target_params is not None})
    if sizes:
        config["target_params"] = sizes
    config["imported"] = {k: v for k, v in source.items()}
    return config


def import_results(
    path: str | os.PathLike, into: str | os.PathLike, *, name: str | None = None, baseline: str = "softmax",
    metric: str | None = None, higher_is_better: bool | None = None, description: str | None = None,
) -> ImportSummary:
    """Validate every row of `path`, then write the study directory `into` (study.yaml + ledger).
    Raises ResultsImportError (a ValueError) naming every problem; then nothing is written."""
    target, name = check_target(into, name)
    if not NAME_RE.match(baseline):
        raise ResultsImportError(f"--baseline {baseline!r} must be a variant name (letters, digits, '_', '.', '-')")
    columns, raw_rows, fmt, data = read_table(path)
    source_name = str(path)
    check_columns(columns, source_name)
    if not raw_rows:
        raise ResultsImportError(f"cannot import {source_name}: no data rows under the header; nothing was written")
    rows, problems = validate(raw_rows, baseline=baseline, metric=metric, higher_is_better=higher_is_better)
    if problems:
        raise ResultsImportError(_problems(source_name, problems))

    imported_at = now_iso()
    source = {"source": os.path.basename(str(path)), "format": fmt,
              "sha256": hashlib.sha256(data).hexdigest()[:16]}
    study_source = {**source, "path": str(Path(path).absolute()), "rows": len(rows), "imported_at": imported_at}
    notes = []
    for task in sorted({r.task for r in rows}):
        if not any(r.task == task and r.variant == baseline for r in rows):
            notes.append(f"task {task!r} has no {baseline!r} rows, so no gap can be fitted; pass --baseline NAME "
                         "if the baseline has another name")
    if metric is not None:
        notes.append(f"only metric {metric!r} imported (--metric)")
    description = description if description is not None else (
        f"Results imported with `scaling import` from {source['source']} ({len(rows)} rows)")
    config = study_config(rows, name=name, storage=target, baseline=baseline, description=description,
                          source=study_source)
    records = [make_record(r, study=name, source=source, finished_at=imported_at) for r in rows]
    _write_study(target, config, records)

    variants: dict[str, dict[str, list]] = {}
    for row in rows:
        ds = variants.setdefault(row.task, {}).setdefault(row.variant, [])
        if row.d_osc is not None and row.d_osc not in ds:
            ds.append(row.d_osc)
    for task in variants:
        variants[task] = {v: sorted(ds) for v, ds in sorted(variants[task].items(), key=lambda kv: (kv[0] != baseline, kv[0]))}
    return ImportSummary(study=name, storage=str(target), source=source_name, rows=len(rows),
                         diverged=sum(not math.isfinite(r.value) for r in rows),
                         metrics={t["name"]: t["metric"] for t in config["tasks"]}, variants=variants,
                         seeds=sorted({r.seed for r in rows}), notes=notes)


def _write_study(target: Path, config: dict[str, Any], records: list[TrialRecord]) -> None:
    """Assemble the study in a temporary sibling directory, then move it into place: a failure
    part-way leaves no half-written study behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.import-", dir=target.parent))
    try:
        Ledger(str(tmp)).append_many(records)  # one part file, however many rows (100k in about a second)
        (tmp / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        if not target.exists():
            os.rename(tmp, target)
        else:  # an existing directory without a study: move the ledger in first, study.yaml (which marks a study) last
            os.rename(tmp / "ledger", target / "ledger")
            os.rename(tmp / "study.yaml", target / "study.yaml")
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
