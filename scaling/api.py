"""Query a study's results from Python: status, trials, fits, predictions, comparisons.
Needs no torch and no ray.

    >>> from scaling import api
    >>> study = api.open_study("runs/quickstart")          # a storage dir or a study .yaml
    >>> [f.constants["alpha"] for f in api.fits(study, law="gap_vs_dosc")]
    >>> api.predict(study, task="mqar", variant="oscillator", x=64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from scaling import fits as fitting
from scaling import laws
from scaling.fits import FitResult
from storage import fs as sfs
from storage.ledger import Ledger, table_rows
from storage.suggest import did_you_mean

STATUS_KEYS = ("completed", "diverged", "pruned", "failed", "in_progress", "pending")
# the ledger columns each reader needs (Ledger.table(columns=)): the JSON blobs (spec, metrics,
# hyperparameters) are most of a ledger's bytes and of the time to turn it into Python rows
STATUS_COLUMNS = ["key", "cell", "task", "stage", "status", "wall_seconds", "finished_at"]
FIT_COLUMNS = ["key", "cell", "task", "variant", "d_osc", "target_params", "params_total", "params_non_embedding",
               "seed", "stage", "status", "metric_name", "metric_value", "finished_at"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as studies.spec: names directories
# where a prediction may be asked for: d_osc as in a study file (>= 2: the sphere S^(d-1)), at most
# 2^16; parameter counts from 1e3 (a study's smallest target) to 1e15
D_OSC_RANGE = (2.0, 65536.0)
PARAMS_RANGE = (1e3, 1e15)


class StudyNotFound(FileNotFoundError):
    pass


class QueryError(ValueError):
    """A query that cannot be answered as asked; the message says what would work."""


@dataclass
class StudyResults:
    name: str
    storage: str
    config: dict[str, Any]  # the study file as saved beside the ledger
    rows: list[dict[str, Any]]  # every ledger row, failed attempts included (the columns read; [] with rows=False)
    plan: list[dict[str, Any]] | None  # planned trials (key, cell, task, variant, d_osc, seed)
    # files under ledger/ that are not finished records (temporary or partial files), skipped: path, reason
    ignored: list[dict[str, str]] = dataclasses.field(default_factory=list)
    table: Any = None  # the same rows as an Arrow table (trials export sorts and writes it without Python rows)

    @property
    def baseline(self) -> str:
        return self.config.get("baseline", "softmax")

    @property
    def done_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "failed"]

    @property
    def tasks(self) -> list[str]:
        if not self.rows and self.table is not None:  # opened with rows=False
            import pyarrow.compute as pc

            return sorted(t for t in pc.unique(self.table.column("task")).to_pylist() if t is not None)
        return sorted({r["task"] for r in self.rows})

    def arrow(self):
        """The ledger rows as an Arrow table (the one read, else built from `rows`)."""
        import pyarrow as pa

        return self.table if self.table is not None else pa.Table.from_pylist(self.rows)

    def metric_name(self, task: str) -> str:
        names = {r["metric_name"] for r in self.done_rows if r["task"] == task and r["metric_name"]}
        return ", ".join(sorted(names)) or "metric"

    def signature(self) -> str:
        """Changes whenever the ledger does (a new trial, a retried one)."""
        items = sorted((r["key"], r["status"], str(r["metric_value"]), str(r.get("finished_at"))) for r in self.rows)
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _read_yaml(fs, path: str) -> dict[str, Any]:
    # libyaml's parser where PyYAML has it: an imported study's file lists every seed, and the
    # pure-Python parser took 8 s for 16,000 of them
    data = yaml.load(sfs.read_bytes(fs, path), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(data, dict):
        raise StudyNotFound(f"{path}: not a study file (not a YAML mapping)")
    return data


def open_study(ref: str, *, rows: bool = True, columns: list[str] | None = None) -> StudyResults:
    """A study from its storage directory/URI, from its study file (storage read from it), or by
    name: a bare name that is no path here is looked up under `study_roots()`.
    rows=False: the Arrow table only (`rows` empty), for exports and counts that never need Python
    rows. columns: read only these ledger columns (e.g. FIT_COLUMNS, STATUS_COLUMNS; key and status
    always), for the rows and the table."""
    if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
        config = yaml.load(Path(ref).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        if not isinstance(config, dict) or "name" not in config:
            raise StudyNotFound(f"{ref}: not a study file (no `name`)")
        storage = sfs.study_storage_uri(config["name"], config.get("storage"))
    elif NAME_RE.match(ref) and not ref.endswith((".yaml", ".yml")) and not Path(ref).exists():
        storage = find_study(ref)
    else:
        storage = sfs.absolute_uri(ref)
    return open_storage(storage, rows=rows, columns=columns)


def study_roots() -> list[str]:
    """Where studies are looked for by name (and `scaling studies` lists by default):
    $SCALING_STUDIES_ROOT when set, then ./runs, where a study file without `storage:` keeps its results."""
    roots = [sfs.absolute_uri(r) for r in (os.environ.get("SCALING_STUDIES_ROOT"), sfs.DEFAULT_STUDY_ROOT) if r]
    return list(dict.fromkeys(roots))


def find_study(name: str, roots: list[str] | None = None) -> str:
    """The storage URI of the study called `name` (its directory's name, or the `name:` in its
    study.yaml) under the roots; StudyNotFound lists the close names and how to see them all."""
    roots = roots or study_roots()
    known: list[str] = []
    for root in roots:
        fs, base = sfs.resolve(root)
        if sfs.exists(fs, sfs.join(base, name, "study.yaml")):
            return sfs.join(root, name) if not sfs.is_local(root) else sfs.join(base, name)
        for entry in list_studies(root):
            if entry.get("study") == name:
                return sfs.join(root, entry["name"]) if not sfs.is_local(root) else sfs.join(base, entry["name"])
            known += [entry["name"]] + ([entry["study"]] if entry.get("study") else [])
    where = " or ".join(roots)
    hint = did_you_mean(name, sorted(set(known)))
    raise StudyNotFound(
        f"{name}: no such file or directory, and no study of that name under {where}{hint}; `scaling studies` lists "
        "the studies there (SCALING_STUDIES_ROOT sets the root); or give a study file or a study's storage directory"
    )


def open_storage(storage: str, *, rows: bool = True, columns: list[str] | None = None) -> StudyResults:
    """A study from its storage directory or URI only: never from a study file, so whatever a file's
    `storage:` names is not followed (what the HTTP API serves: directories under its root).
    rows and columns: as `open_study`."""
    fs, root = sfs.resolve(storage)
    if fs.get_file_info(root).type == pafs.FileType.File:
        raise StudyNotFound(f"{storage}: a file, not a study's storage directory")
    study_file = sfs.join(root, "study.yaml")
    if not sfs.exists(fs, study_file):
        raise StudyNotFound(
            f"{storage}: no study there yet (no study.yaml); run it first with `scaling run STUDY.yaml`, "
            "or give the study's storage directory"
        )
    config = _read_yaml(fs, study_file)
    plan_path = sfs.join(root, "plan.json")
    plan = json.loads(sfs.read_bytes(fs, plan_path)) if sfs.exists(fs, plan_path) else None
    ledger = Ledger(storage)
    table = ledger.table(columns=columns)
    return StudyResults(str(config.get("name", Path(root).name)), storage, config, table_rows(table) if rows else [], plan,
                        [item.as_dict() for item in ledger.ignored], table)


def list_studies(root: str) -> list[dict[str, Any]]:
    """Every study directory directly under `root` (a directory or URI): those holding a study.yaml."""
    fs, base = sfs.resolve(root)
    out = []
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not NAME_RE.match(info.base_name):
            continue
        study_file = sfs.join(info.path, "study.yaml")
        if not sfs.exists(fs, study_file):
            continue
        try:
            config = _read_yaml(fs, study_file)
        except Exception as error:  # a half-written or foreign file must not hide the other studies
            out.append({"name": info.base_name, "error": f"unreadable study.yaml: {error}"})
            continue
        out.append({"name": info.base_name, "study": config.get("name"), "description": config.get("description", ""),
                    "tasks": [t.get("name") for t in config.get("tasks", []) if isinstance(t, dict)],
                    "variants": [v.get("name") for v in config.get("variants", []) if isinstance(v, dict)]})
    return sorted(out, key=lambda s: s["name"])


def studies_overview(root: str) -> list[dict[str, Any]]:
    """`list_studies` with each study's trial counts (STATUS_KEYS, as `status`), planned total and
    last finished trial: what `scaling studies` shows. A study that cannot be read keeps its row,
    with the error."""
    out = []
    fs, base = sfs.resolve(root)
    for entry in list_studies(root):
        row = {**entry, "storage": sfs.join(base, entry["name"]) if sfs.is_local(root) else sfs.join(root, entry["name"])}
        if "error" not in entry:
            try:
                study = open_storage(row["storage"], rows=False, columns=STATUS_COLUMNS)
            except Exception as error:  # noqa: BLE001 -- one broken study must not hide the others
                row["error"] = f"{type(error).__name__}: {error}"
            else:
                totals = status_totals(status(study))
                finished = [str(f) for f in study.table.column("finished_at").to_pylist() if f]
                row.update(totals, planned=sum(totals.values()), last_finished=max(finished) if finished else None)
        out.append(row)
    return out


# ---- fits ---------------------------------------------------------------------------------------

_CACHE: "OrderedDict[tuple, list[FitResult]]" = OrderedDict()
_CACHE_SIZE = 32


DEFAULT_METHOD = "nonlinear"  # the documented default when a study's `fits:` names none


def fit_settings(study: StudyResults) -> dict[str, Any]:
    """The study's `fits:` choices: the one method of headlines, predictions, comparisons and HTTP,
    and the d_osc values held out of every fit (a plain list of laws keeps the defaults)."""
    raw = study.config.get("fits")
    raw = raw if isinstance(raw, dict) else {}
    held = (raw.get("holdout") or {}).get("d_osc") or []
    return {"method": raw.get("method") or DEFAULT_METHOD, "holdout_d_osc": sorted(float(d) for d in held),
            "floor": bool(raw.get("floor", False))}


def fits(
    study: StudyResults, *, task: str | None = None, variant: str | None = None, law: str | None = None,
    method: str | None = None, n_boot: int = fitting.N_BOOT, ci_level: float = fitting.CI_LEVEL, params: str = "non_embedding",
    seed: int = 0, min_d_osc: float | None = None, max_d_osc: float | None = None, holdout: bool = True,
) -> list[FitResult]:
    """Every law the study's data supports, for each task and variant (filters narrow the list):

    - gap_vs_dosc (methods loglog-means and nonlinear) per variant with d_osc and per size;
    - gap_vs_params (both methods) per variant and d_osc with >= 2 sizes;
    - loss_vs_params per variant and d_osc with >= 2 sizes (a fit needs >= 3).

    min_d_osc / max_d_osc fit on that part of the grid only (`within_d_osc`). The d_osc values the
    study holds out (`fits: {holdout: {d_osc: [64]}}`) are left out of every fit and predicted from
    it (FitResult.holdout: prediction interval, observed mean and its standard error, z, inside or
    not); `holdout=False` fits them too. Results are cached per ledger state and arguments."""
    full = study
    held = fit_settings(study)["holdout_d_osc"] if holdout else []
    if held:
        study = dataclasses.replace(study, rows=[r for r in study.rows if r.get("d_osc") is None
                                                 or float(r["d_osc"]) not in held])
    study = within_d_osc(study, min_d_osc=min_d_osc, max_d_osc=max_d_osc)
    if law is not None and law not in fitting.LAWS:
        raise QueryError(f"unknown law {law!r}; known: {list(fitting.LAWS)}")
    if method is not None and method not in (*fitting.GAP_METHODS, "huber-log"):
        raise QueryError(f"unknown method {method!r}; known: {[*fitting.GAP_METHODS, 'huber-log']}")
    if params not in fitting.PARAM_FIELDS:
        raise QueryError(f"unknown params {params!r}; known: {list(fitting.PARAM_FIELDS)}")
    if not 0 < ci_level < 1:
        raise QueryError(f"ci_level={ci_level} must be between 0 and 1, e.g. 0.95")
    key = (study.storage, study.signature(), n_boot, ci_level, params, seed, tuple(held))
    if key not in _CACHE:
        with laws.single_threaded_blas():
            found = _all_fits(study, n_boot=n_boot, ci_level=ci_level, params_field=fitting.PARAM_FIELDS[params], seed=seed)
            for fit in found:
                if fit.law == "gap_vs_dosc":
                    fit.holdout.extend(c for d in held if (c := holdout_check(full, fit, d)) is not None)
            _CACHE[key] = found
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return [f for f in _CACHE[key]
            if (task is None or f.task == task) and (variant is None or f.variant == variant)
            and (law is None or f.law == law) and (method is None or f.method == method)]


def holdout_check(study: StudyResults, fit: FitResult, d_osc: float) -> dict[str, Any] | None:
    """Paper A's out-of-sample check at a held-out d_osc: the law's prediction for the mean of as
    many seeds as were run there (confidence and prediction interval), the observed mean gap with
    its standard error, z = (observed - predicted) / sqrt(se_law^2 + se_observed^2), and whether
    the observed mean lies inside the prediction interval."""
    observed = observed_gap(study, task=fit.task, variant=fit.variant, d_osc=d_osc,
                            target_params=fit.group.get("target_params"))
    if observed is None:
        return None
    out: dict[str, Any] = {"x": float(d_osc), "observed": observed["gap"], "observed_sd": observed["sd"],
                           "n_seeds": observed["n_seeds"], "observed_se": None, "predicted": None, "z": None,
                           "inside": None}
    if observed["sd"] is not None:
        out["observed_se"] = observed["sd"] / math.sqrt(observed["n_seeds"])
    if not fit.ok:
        out["note"] = f"no prediction: the law is not identified ({fit.reason})"
        return fitting.json_safe(out)
    pred = fit.predict(float(d_osc), n_seeds=observed["n_seeds"])
    out.update(predicted=pred["value"], ci_low=pred["ci_low"], ci_high=pred["ci_high"], pi_low=pred.get("pi_low"),
               pi_high=pred.get("pi_high"), level=pred["level"])
    if pred["ci_low"] is not None:
        from scipy.special import stdtrit

        t = float(stdtrit(max(int(pred.get("df") or 1), 1), (1 + pred["level"]) / 2))
        se_law = (pred["ci_high"] - pred["ci_low"]) / (2 * t)
        se = math.hypot(se_law, out["observed_se"] or 0.0)
        out["z"] = (observed["gap"] - pred["value"]) / se if se > 0 else None
    if pred.get("pi_low") is not None:
        out["inside"] = bool(pred["pi_low"] <= observed["gap"] <= pred["pi_high"])
    return fitting.json_safe(out)


def _all_fits(study: StudyResults, *, n_boot: int, ci_level: float, params_field: str, seed: int) -> list[FitResult]:
    """Every fit, in a stable order. (Serial on purpose: with tens of points per fit, threads lose
    more to the GIL than they gain; measured 2x slower on 2 cores.)"""
    results = [job() for job in _fit_jobs(study, n_boot=n_boot, ci_level=ci_level, params_field=params_field, seed=seed)]
    return [fit for result in results for fit in (result if isinstance(result, list) else [result])]


def _fit_jobs(study: StudyResults, *, n_boot: int, ci_level: float, params_field: str, seed: int):
    """One callable per fit (or per pair of gap methods), each returning FitResult(s): every
    registered law's `jobs` for every (task, variant) of the study (scaling/laws.py)."""
    baseline = study.baseline
    floor = fit_settings(study)["floor"]
    for task in study.tasks:
        data = fitting.select_rows(study.rows, task)
        if not data.rows:
            continue
        draws = fitting.SeedDraws(data.seeds, n_boot, seed, stream=f"{study.name}/{task}")  # one stream per task: paired fits
        common = dict(study=study.name, task=task, metric=data.metric, draws=draws, ci_level=ci_level)
        has_baseline = any(r["variant"] == baseline for r in data.rows)
        base_sizes = {r["target_params"] for r in data.rows if r["variant"] == baseline}
        for variant in sorted({r["variant"] for r in data.rows} | {r["variant"] for r, _ in data.excluded}):
            vrows = [r for r in data.rows if r["variant"] == variant]
            scope = laws.FitScope(
                data=data, variant=variant, baseline=baseline, has_baseline=has_baseline,
                sizes=sorted({r["target_params"] for r in vrows}, key=lambda v: (v is not None, v or 0)),
                d_values=sorted({r["d_osc"] for r in vrows}, key=lambda v: (v is not None, v or 0)),
                base_sizes=base_sizes, params_field=params_field, floor=floor, common=common)
            for law in laws.LAWS.values():
                yield from law.jobs(scope)


def find_fit(
    study: StudyResults, *, task: str, variant: str, law: str = "gap_vs_dosc", method: str | None = None,
    group: dict[str, Any] | None = None, n_boot: int = fitting.N_BOOT, params: str = "non_embedding", holdout: bool = True,
) -> FitResult:
    """The one fit a prediction or comparison uses; the error lists what exists when it is ambiguous or absent."""
    method = method or laws.LAWS[law].default_method or fit_settings(study)["method"]
    found = fits(study, task=task, variant=variant, law=law, method=method, n_boot=n_boot, params=params, holdout=holdout)
    if group:
        found = [f for f in found if all(f.group.get(k) == v for k, v in group.items())]
    if len(found) > 1:  # one fit per size (or per d_osc), identified or not: the caller must choose
        option = laws.LAWS[law].group
        raise QueryError(f"{len(found)} {law} fits for {task}/{variant}, one per {option}: choose one of "
                         f"{[f.group_label for f in found]}")
    usable = [f for f in found if f.ok]
    if len(usable) == 1:
        return usable[0]
    if found and not usable:
        raise QueryError(f"the {law} fit for {task}/{variant} ({found[0].method}) is not identified: {found[0].reason}")
    if not usable:
        have = sorted({(f.task, f.variant, f.law) for f in fits(study) if f.ok})
        reason = "; ".join(found[0].notes) if found else "no such task/variant/law in the study" + unknown_names(study, task, variant)
        raise QueryError(
            f"no usable {law} fit for task={task!r} variant={variant!r} method={method!r} in study {study.name} "
            f"({reason}); usable fits: {[f'{t}/{v}/{lw}' for t, v, lw in have] or 'none'}"
        )
    groups = [f.group_label for f in usable]
    option = laws.LAWS[law].group
    raise QueryError(f"{len(usable)} {law} fits for {task}/{variant}, one per {option}: choose one of {groups}")


def unknown_names(study: StudyResults, task: str | None, variant: str | None) -> str:
    """'; task 'wikitxt2' is not in the study; did you mean 'wikitext2'?' for names the study lacks."""
    out = ""
    variants = sorted({r["variant"] for r in study.rows})
    for what, name, known in (("task", task, study.tasks), ("variant", variant, variants)):
        if name is not None and name not in known:
            out += f"; {what} {name!r} is not in the study{did_you_mean(name, known)} (it has {known})"
    return out


def group_of(law: str | None, *, target_params: int | None = None, at_d_osc: int | None = None) -> dict[str, Any] | None:
    """The group that picks one fit: a size for gap_vs_dosc, a d_osc for the laws in parameters."""
    group: dict[str, Any] = {}
    if target_params is not None:
        group["target_params"] = int(target_params)
    if at_d_osc is not None:
        group["d_osc"] = int(at_d_osc)
    return group or None


def predict(
    study: StudyResults, *, task: str, variant: str, x: float | None = None, d_osc: float | None = None,
    params: float | None = None, law: str | None = None, method: str | None = None,
    group: dict[str, Any] | None = None, n_seeds: int = 1, level: float | None = None, n_boot: int = fitting.N_BOOT,
    min_d_osc: float | None = None, max_d_osc: float | None = None, holdout: bool = True,
) -> dict[str, Any]:
    """The fitted law at a new point, with the confidence interval of the law and a prediction
    interval for the mean of `n_seeds` new runs. `d_osc=` implies gap_vs_dosc, `params=`
    gap_vs_params (or pass law and x). With min_d_osc / max_d_osc the law is fitted on that part of
    the grid only, and `observed` holds the study's measured gap at `d_osc` when it has one (the
    out-of-sample check: fit d 2-32, predict 64)."""
    full = study
    study = within_d_osc(study, min_d_osc=min_d_osc, max_d_osc=max_d_osc)
    if d_osc is not None:
        x, law = d_osc, law or laws.default_law("d_osc")
    elif params is not None:
        x, law = params, law or laws.default_law("params")
    law = law or laws.default_law("d_osc")
    if law not in laws.LAWS:
        raise QueryError(f"unknown law {law!r}; known: {list(laws.LAWS)}")
    if x is None or not math.isfinite(float(x)) or float(x) <= 0:
        raise QueryError(f"give a positive point to predict at (d_osc=... or params=...), got {x!r}")
    name, (low, high) = ("d_osc", D_OSC_RANGE) if laws.LAWS[law].x == "d_osc" else ("params", PARAMS_RANGE)
    if not low <= float(x) <= high:
        raise QueryError(f"{name}={float(x):g} is outside [{low:g}, {high:g}]: predict at a {name} a study could run")
    if n_seeds < 1:
        raise QueryError(f"n_seeds={n_seeds} must be >= 1")
    if level is not None and not 0 < level < 1:
        raise QueryError(f"level={level} must be between 0 and 1")
    fit = find_fit(study, task=task, variant=variant, law=law, method=method, group=group, n_boot=n_boot, holdout=holdout)
    out = fit.predict(float(x), n_seeds=n_seeds, level=level)
    constants = {k: e.value for k, e in fit.constants.items()}
    quantity = laws.LAWS[law].quantity
    observed = None
    if laws.LAWS[law].x == "d_osc" and laws.LAWS[law].baseline:  # the study's measured gap at that d_osc
        observed = observed_gap(full, task=task, variant=variant, d_osc=float(x),
                                target_params=fit.group.get("target_params"))
        if observed is not None:
            observed["within_prediction_interval"] = (
                out["pi_low"] is not None and out["pi_low"] <= observed["gap"] <= out["pi_high"])
    return fitting.json_safe({"observed": observed, "task": task, "variant": variant, "law": law, "method": fit.method, "model": fit.model,
                     "formula": fit.formula, "group": fit.group, "quantity": quantity, quantity: out["value"],
                     "d_osc" if fit.x_name == "d_osc" else "params": float(x), **out, "constants": constants,
                     "fitted_range": [min(p["x"] for p in fit.points if p.get("used", True)),
                                      max(p["x"] for p in fit.points if p.get("used", True))],
                     # kept for older callers: the confidence interval
                     "range_low": out["ci_low"], "range_high": out["ci_high"]})


def compare(
    study: StudyResults, *, a: tuple[str, str], b: tuple[str, str], law: str = "gap_vs_dosc",
    method: str | None = None, group_a: dict[str, Any] | None = None, group_b: dict[str, Any] | None = None,
    level: float | None = None, other: StudyResults | None = None,
) -> dict[str, Any]:
    """The difference of exponents alpha(a) - alpha(b), a and b = (task, variant), with its interval.
    `other` takes b from another study (its own, independent seed draws)."""
    fa = find_fit(study, task=a[0], variant=a[1], law=law, method=method, group=group_a)
    fb = find_fit(other or study, task=b[0], variant=b[1], law=law, method=method, group=group_b)
    return fitting.compare_exponents(fa, fb, level=level)


def exponent_differences(fit_list: list[FitResult], *, level: float | None = None) -> list[dict[str, Any]]:
    """alpha differences worth a table: variants of one task (same law, method, group), and one
    variant across tasks (same law, method)."""
    usable = [f for f in fit_list if f.ok and "alpha" in f.constants]
    out = []
    for i, a in enumerate(usable):
        for b in usable[i + 1:]:
            if (a.law, a.method) != (b.law, b.method):
                continue
            same_task = a.task == b.task and a.group == b.group and a.variant != b.variant
            cross_task = a.task != b.task and a.variant == b.variant and a.group == b.group
            if same_task or cross_task:
                out.append(fitting.compare_exponents(a, b, level=level))
    return out


# ---- status and trials --------------------------------------------------------------------------

def status(study: StudyResults) -> dict[str, dict[str, int]]:
    """Per cell: completed / diverged / pruned / failed / in_progress / pending.

    A searched cell's trials are slots in plan.json (key None: Optuna picks them as it goes). They
    are filled, stage by stage, by the cell's ledger records that the plan does not name; a
    checkpoint of the cell with no record is in progress; the open slots left are pending.
    Counted by Arrow (look-ups and a group-by over the key and status columns): no Python row per trial."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = study.arrow()
    is_failed = pc.fill_null(pc.equal(table.column("status"), "failed"), False)
    done = table.filter(pc.invert(is_failed))
    failed_keys = table.filter(is_failed).column("key")
    started = _started_keys(study.storage)
    slots: dict[str, dict[str, int]] = {}  # cell -> stage -> planned slots
    if study.plan:
        keyed = [t for t in study.plan if t["key"] is not None]
        for trial in study.plan:
            if trial["key"] is None:
                stages = slots.setdefault(trial["cell"], {})
                stage = trial.get("stage") or "search"
                stages[stage] = stages.get(stage, 0) + 1
        planned = pa.table({"key": pa.array([t["key"] for t in keyed], pa.string()),
                            "cell": pa.array([t["cell"] for t in keyed], pa.string())})
        # the design's open slots get their row in _fill_design, only while there are some
        cell_order = pc.unique(pa.array([t["cell"] for t in study.plan if t["cell"] != DESIGN_CELL],
                                        pa.string())).to_pylist()
    else:
        planned = table.select(["key", "cell"])
        cell_order = pc.unique(planned.column("cell")).to_pylist()
    planned = _first_per_key(planned)
    keys = planned.column("key")
    done_status = pc.take(done.column("status"), pc.index_in(keys, value_set=done.column("key")))
    unfinished = pc.if_else(pc.is_in(keys, value_set=failed_keys), "failed",
                            pc.if_else(pc.is_in(keys, value_set=pa.array(sorted(started), pa.string())),
                                       "in_progress", "pending"))
    outcome = pc.coalesce(done_status, unfinished)
    counted = pa.table({"cell": planned.column("cell"), "outcome": outcome}).group_by(["cell", "outcome"]).aggregate(
        [("outcome", "count")])
    cells: dict[str, dict[str, int]] = {cell: {s: 0 for s in STATUS_KEYS} for cell in cell_order}
    for cell, state, n in zip(*(counted.column(c).to_pylist() for c in ("cell", "outcome", "outcome_count"))):
        cells[cell][state] = cells[cell].get(state, 0) + n
    design_slots = slots.pop(DESIGN_CELL, {}).get("design", 0)
    if slots or design_slots:
        known = set(keys.to_pylist())
        wanted = pc.is_in(table.column("cell"), value_set=pa.array(list(slots), pa.string()))
        if design_slots and "stage" in table.column_names:
            wanted = pc.or_(wanted, pc.fill_null(pc.equal(table.column("stage"), "design"), False))
        in_slots = table.filter(wanted)
        rows = table_rows(in_slots.select([c for c in ("key", "cell", "status", "stage") if c in in_slots.column_names]))
        for cell, stages in slots.items():
            _fill_slots(cells[cell], cell, stages, rows, known, started)
        if design_slots:
            _fill_design(cells, design_slots, rows, known, started)
    return cells


def _first_per_key(table):
    """One row per key, the first (the old rule: a key is counted where it first appears)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    indexed = table.append_column("_i", pa.array(range(table.num_rows), pa.int64()))
    first = indexed.group_by("key").aggregate([("_i", "min")]).column("_i_min")
    if len(first) == table.num_rows:
        return table
    return table.take(pc.take(first, pc.array_sort_indices(first)))


DESIGN_CELL = "design"  # plan.json's cell of an adaptive design's open slots (studies.runner)


def _fill_design(cells: dict[str, dict[str, int]], slots: int, rows: list[dict[str, Any]], known: set[str],
                 started: set[str]) -> None:
    """An adaptive design's records count under the cells the design chose; its open slots (in
    progress: a checkpoint with no record; else pending) stay under the `design` row."""
    outcome: dict[str, tuple[str, str]] = {}
    for r in rows:
        if r.get("stage") != "design" or r["key"] in known:
            continue
        if r["status"] != "failed" or r["key"] not in outcome:
            outcome[r["key"]] = (r["cell"], r["status"])
    for cell, state in outcome.values():
        counts = cells.setdefault(cell, {s: 0 for s in STATUS_KEYS})
        counts[state] = counts.get(state, 0) + 1
    open_slots = max(0, slots - len(outcome))
    if not open_slots:  # the design is spent: no row of zeros
        return
    counts = cells.setdefault(DESIGN_CELL, {s: 0 for s in STATUS_KEYS})
    running = min(open_slots, len(started - outcome.keys() - known))
    counts["in_progress"] += running
    counts["pending"] += open_slots - running


def _fill_slots(counts: dict[str, int], cell: str, stages: dict[str, int], rows: list[dict[str, Any]],
                known: set[str], started: set[str]) -> None:
    """Count a searched cell's records (one per key: a finished record over failed attempts) and
    its open slots: in progress (a checkpoint of the cell, no record) or pending."""
    outcome: dict[str, str] = {}
    stage_of: dict[str, str] = {}
    for r in rows:
        if r["cell"] != cell or r["key"] in known:
            continue
        if r["status"] != "failed" or r["key"] not in outcome:
            outcome[r["key"]] = r["status"]
        stage_of[r["key"]] = r.get("stage") or "replicate"
    filled: dict[str, int] = {}
    for key, state in outcome.items():
        counts[state] = counts.get(state, 0) + 1
        filled[stage_of[key]] = filled.get(stage_of[key], 0) + 1
    open_slots = sum(max(0, n - filled.get(stage, 0)) for stage, n in stages.items())
    slug = cell.replace("/", "-")
    running = sum(1 for key in started - outcome.keys() - known if _cell_slug_of_key(key) == slug)
    counts["in_progress"] += min(running, open_slots)
    counts["pending"] += open_slots - min(running, open_slots)


_KEY_TAIL = re.compile(r"-s-?\d+-[0-9a-f]{12}$")  # TrialSpec.key: <cell with / as ->-s<seed>-<hash>


def _cell_slug_of_key(key: str) -> str | None:
    match = _KEY_TAIL.search(key)
    return key[: match.start()] if match else None


def status_totals(cells: dict[str, dict[str, int]]) -> dict[str, int]:
    return {k: sum(c.get(k, 0) for c in cells.values()) for k in STATUS_KEYS}


def eta(study: StudyResults, remaining: int) -> dict[str, Any]:
    """Time to finish `remaining` trials: remaining x median completed-trial wall time / concurrent
    slots (from the study file); seconds is None until a trial has completed."""
    resources = study.config.get("resources") or {}
    slots = resources.get("max_concurrent_trials") or max(
        1, int((os.cpu_count() or 1) // (resources.get("cpus_per_trial") or 1)))
    import pyarrow.compute as pc

    table = study.arrow()
    completed = table.filter(pc.fill_null(pc.equal(table.column("status"), "completed"), False))
    walls = [w for w in completed.column("wall_seconds").to_pylist() if w]
    median = statistics.median(walls) if walls else None
    seconds = 0.0 if remaining == 0 else (remaining * median / slots if median is not None else None)
    return {"remaining": remaining, "seconds": seconds, "concurrent_trials": slots, "median_trial_seconds": median}


def status_summary(study: StudyResults) -> dict[str, Any]:
    """What `GET /studies/{name}` and `scaling status STUDY --format json` return: counts per cell
    and in total (the keys of STATUS_KEYS), and an ETA."""
    cells = status(study)
    totals = status_totals(cells)
    return {"name": study.name, "storage": study.storage, "description": study.config.get("description", ""),
            "baseline": study.baseline, "tasks": study.tasks, "totals": totals, "cells": cells,
            "eta": eta(study, totals["pending"] + totals["in_progress"]), "ledger_ignored": study.ignored,
            "in_progress_trials": running(study)}


def ledger_notes(study: StudyResults) -> list[str]:
    """One line per file under ledger/ that readers skipped (not a finished record), saying why."""
    return [f"ledger: ignored {item['path']}: {item['reason']}" for item in study.ignored]


def design(study: StudyResults) -> dict[str, Any] | None:
    """An adaptive study's design (design.json, written by the runner): the proposals in order, each
    with its point, rule, reason and expected gain, and the target's width after each batch,
    refitted from the ledger (the grid's runs plus the design's first k batches). None without a design."""
    from scaling import design as D

    fs, root = sfs.resolve(study.storage)
    path = sfs.join(root, "design.json")
    if not sfs.exists(fs, path):
        return None
    info = json.loads(sfs.read_bytes(fs, path))
    target = D.Target(info["target"]["kind"], info["target"]["x0"])
    sign = 1.0 if fitting.lower_is_better(study.metric_name(info["task"])) else -1.0
    design_keys = {p["key"] for p in info["proposals"]}
    size = info.get("target_params")
    by_key: dict[str, Any] = {}
    prior = []
    for r in study.done_rows:
        if r["task"] != info["task"] or r["status"] != "completed" or not finite(r["metric_value"]):
            continue
        if (r["target_params"] or None) != (int(size) if size else None):
            continue
        if r["variant"] == info["baseline"]:
            point = D.Point(D.BASELINE, None, int(r["seed"]))
        elif r["variant"] == info["variant"] and r["d_osc"] is not None:
            point = D.Point(D.VARIANT, float(r["d_osc"]), int(r["seed"]))
        else:
            continue
        if r["key"] in design_keys:
            by_key[r["key"]] = (point, sign * float(r["metric_value"]))
        elif r.get("stage") != "search":
            prior.append((point, sign * float(r["metric_value"])))
    batch = max(1, int(info.get("batch") or 1))
    widths = []
    n = len(info["proposals"])
    for end in [0, *range(batch, n, batch), n] if n else [0]:
        runs = prior + [by_key[p["key"]] for p in info["proposals"][:end] if p["key"] in by_key]
        fit = D.current_fit(runs, target)
        widths.append({"after_trials": end, "batch": -(-end // batch), "runs": len(runs), "width": fit.width,
                       "identified": fit.reason == "", "reason": fit.reason})
    info["widths"] = widths
    return info


def searches(study: StudyResults) -> list[dict[str, Any]]:
    """Per searched cell (sorted): its search trials in the order they finished, and the configuration
    chosen. A search trial is one set of hyperparameters, run at every search seed; its objective is
    the mean metric over those seeds (for a pruned one: the best value it reached before ASHA stopped
    it). Chosen: the configuration the cell's replicates ran with; before any replicate, the best
    completed search trial, else the best pruned one (the runner's rule, studies.search)."""
    planned: dict[str, int] = {}  # cell -> planned search runs (plan.json slots: trials x search seeds)
    for t in study.plan or []:
        if t.get("stage") == "search":
            planned[t["cell"]] = planned.get(t["cell"], 0) + 1
    runs: dict[str, dict[str, dict[str, Any]]] = {}  # cell -> key -> record (finished over failed attempts)
    replicates: dict[str, list[dict[str, Any]]] = {}
    for i, r in enumerate(study.rows):
        if r.get("stage") == "search":
            by_key = runs.setdefault(r["cell"], {})
            if r["status"] != "failed" or r["key"] not in by_key:
                by_key[r["key"]] = {**r, "_order": i}
        elif r.get("stage") == "replicate" and r["status"] != "failed":
            replicates.setdefault(r["cell"], []).append(r)
    n_seeds = len((study.config.get("search") or {}).get("seeds") or [None])
    out = []
    for cell in sorted(planned.keys() | runs.keys()):
        records = sorted(runs.get(cell, {}).values(), key=lambda r: (str(r.get("finished_at") or ""), r["_order"]))
        metric = next((r["metric_name"] for r in records + replicates.get(cell, []) if r["metric_name"]), "metric")
        sign = 1.0 if fitting.lower_is_better(metric) else -1.0
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault(r["hparams_json"] or "{}", []).append(r)
        trials_, best = [], None
        for number, (hparams, group) in enumerate(groups.items(), 1):
            states = {r["status"] for r in group}
            state = next((s for s in ("failed", "diverged", "pruned") if s in states), "completed")
            if state == "completed" and len(group) < n_seeds:
                state = "in_progress"  # some search seeds still to finish
            values = [r["metric_value"] for r in group if finite(r["metric_value"])]
            value = statistics.fmean(values) if values and state in ("completed", "pruned", "in_progress") else None
            if state == "completed" and value is not None and (best is None or sign * value < sign * best):
                best = value
            trials_.append({"number": number, "hparams": json.loads(hparams), "status": state, "value": value,
                            "best_so_far": best, "seeds": sorted(r["seed"] for r in group),
                            "steps": max(r["steps"] or 0 for r in group)})
        chosen, rule = None, None
        reps = replicates.get(cell, [])
        if reps:
            hparams = statistics.mode(r["hparams_json"] or "{}" for r in reps)
            chosen = next((t for t in trials_ if t["hparams"] == json.loads(hparams)), None)
            chosen, rule = chosen or {"hparams": json.loads(hparams), "value": None}, "the replicates' configuration"
            reps = [r for r in reps if (r["hparams_json"] or "{}") == hparams]
        else:
            rules = (("completed", "best completed search trial"),
                     ("pruned", "best pruned search trial (every one was pruned)"))
            for state, label in rules:
                candidates = [t for t in trials_ if t["status"] == state and t["value"] is not None]
                if candidates:
                    chosen, rule = min(candidates, key=lambda t: sign * t["value"]), label
                    break
        rep_values = [r["metric_value"] for r in reps if r["status"] == "completed" and finite(r["metric_value"])]
        out.append({
            "cell": cell, "metric": metric, "lower_is_better": sign > 0, "search_seeds": n_seeds,
            "planned": planned[cell] // n_seeds if cell in planned else None, "trials": trials_,
            "counts": {s: sum(1 for t in trials_ if t["status"] == s)
                       for s in ("completed", "pruned", "diverged", "failed", "in_progress")},
            "chosen": None if chosen is None else {
                "number": chosen.get("number"), "hparams": chosen["hparams"], "value": chosen["value"], "rule": rule,
                "replicates": len(reps),
                "replicate_mean": statistics.fmean(rep_values) if rep_values else None,
                "replicate_sd": statistics.stdev(rep_values) if len(rep_values) > 1 else None},
        })
    return out


TRIAL_FIELDS = ("key", "cell", "task", "variant", "d_osc", "target_params", "params_total", "params_non_embedding",
                "seed", "stage", "status", "metric_name", "metric_value", "best_step", "steps", "tokens_seen",
                "flops", "wall_seconds", "started_at", "finished_at", "wandb_run_id", "host", "error")


def trials(
    study: StudyResults, *, task: str | None = None, variant: str | None = None, status: str | None = None,
    cell: str | None = None, limit: int = 1000, offset: int = 0,
) -> list[dict[str, Any]]:
    """Ledger rows (without the spec/metrics JSON blobs), sorted by cell and seed."""
    rows = [r for r in study.rows
            if (task is None or r["task"] == task) and (variant is None or r["variant"] == variant)
            and (status is None or r["status"] == status) and (cell is None or r["cell"] == cell)]
    rows.sort(key=lambda r: (r["cell"], r["seed"], r["key"], str(r.get("finished_at"))))
    return [fitting.json_safe({k: r.get(k) for k in TRIAL_FIELDS}) for r in rows[offset: offset + limit]]


def trials_table(study: StudyResults, *, task: str | None = None, variant: str | None = None,
                 status: str | None = None, cell: str | None = None):
    """The ledger rows of `trials` (TRIAL_FIELDS, same filters and order) as an Arrow table, for
    exports of any size: filtered and sorted by Arrow, never row by row in Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = study.table if study.table is not None else pa.Table.from_pylist(study.rows)
    for name, value in (("task", task), ("variant", variant), ("status", status), ("cell", cell)):
        if value is not None:
            table = table.filter(pc.equal(table.column(name), value))
    table = table.select([f for f in TRIAL_FIELDS if f in table.column_names])
    return table.sort_by([("cell", "ascending"), ("seed", "ascending"), ("key", "ascending"),
                          ("finished_at", "ascending")])


def within_d_osc(study: StudyResults, *, min_d_osc: float | None = None, max_d_osc: float | None = None) -> StudyResults:
    """The study with the trials whose d_osc lies outside [min_d_osc, max_d_osc] left out (baseline
    trials, which have no d_osc, are kept): fit a law on part of the grid, e.g. paper A's d 2-32,
    and predict the rest (d 64) out of sample."""
    if min_d_osc is None and max_d_osc is None:
        return study
    for name, value in (("min_d_osc", min_d_osc), ("max_d_osc", max_d_osc)):
        if value is not None and (not math.isfinite(float(value)) or float(value) <= 0):
            raise QueryError(f"{name}={value!r} must be a positive number, e.g. {name}=32")
    if min_d_osc is not None and max_d_osc is not None and float(min_d_osc) > float(max_d_osc):
        raise QueryError(f"min_d_osc={min_d_osc} is above max_d_osc={max_d_osc}: no d_osc could be fitted")
    lo = float(min_d_osc) if min_d_osc is not None else -math.inf
    hi = float(max_d_osc) if max_d_osc is not None else math.inf
    rows = [r for r in study.rows if r.get("d_osc") is None or lo <= float(r["d_osc"]) <= hi]
    return dataclasses.replace(study, rows=rows)


def observed_gap(study: StudyResults, *, task: str, variant: str, d_osc: float,
                 target_params: int | None = None) -> dict[str, Any] | None:
    """The measured gap to the baseline at one d_osc (mean and sd over seeds, paired by seed as in
    the fits), or None when the study has no such trials: what a held-out prediction is checked against."""
    data = fitting.select_rows(study.rows, task)
    sizes = {r["target_params"] for r in data.rows if r["variant"] == variant and r.get("d_osc") == d_osc}
    if not sizes:
        return None
    size = target_params if target_params is not None else next(iter(sizes))
    cells = fitting.gap_cells(data.rows, variant=variant, baseline=study.baseline, x_of="d_osc", metric=data.metric,
                        target_params=size)
    where = [j for j, x in enumerate(cells.x) if float(x) == float(d_osc)]
    if not where:
        return None
    gaps = [g for g in cells.seed_gaps()[where[0]].values() if math.isfinite(g)]
    if not gaps:
        return None
    return fitting.json_safe({"d_osc": float(d_osc), "gap": statistics.fmean(gaps),
                     "sd": statistics.stdev(gaps) if len(gaps) > 1 else None, "n_seeds": len(gaps)})


def _started_keys(storage: str) -> set[str]:
    """Trials that started and have no record yet: a checkpoint, or a progress file (written by a
    trial the moment it starts, removed when it ends)."""
    import pyarrow.fs as pafs

    fs, root = sfs.resolve(storage)
    selector = pafs.FileSelector(sfs.join(root, "checkpoints"), allow_not_found=True)
    keys = {info.base_name for info in fs.get_file_info(selector) if info.type == pafs.FileType.Directory}
    return keys | set(_progress_files(storage))


def _progress_files(storage: str) -> dict[str, str]:
    import pyarrow.fs as pafs

    fs, root = sfs.resolve(storage)
    selector = pafs.FileSelector(sfs.join(root, "progress"), allow_not_found=True)
    return {info.base_name[: -len(".json")]: info.path for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.endswith(".json")}


def running(study: StudyResults) -> list[dict[str, Any]]:
    """The trials that started and have not finished, from their progress files (workers.lifecycle):
    state (starting, running, or interrupted: saved and stopped, resumes on the next run), step of
    total steps, latest train and validation metrics, host, Ray node, pid, and when it last wrote."""
    fs, _ = sfs.resolve(study.storage)
    done = {r["key"] for r in study.done_rows}
    out = []
    for key, path in sorted(_progress_files(study.storage).items()):
        if key in done:  # the trial ended between its record and the removal of this file
            continue
        try:
            entry = json.loads(sfs.read_bytes(fs, path))
        except (OSError, ValueError):  # being replaced, or cut short: it is rewritten within seconds
            continue
        if isinstance(entry, dict):
            out.append({**entry, "key": key})
    return out


def finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
