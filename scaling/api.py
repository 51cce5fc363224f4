"""Query a study's results from Python: status, fits, predictions. Needs no torch and no ray.

    >>> from scaling import api
    >>> study = api.open_study("runs/quickstart")          # a storage dir or a study .yaml
    >>> [f.constants["alpha"] for f in api.fits(study)]
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scaling.fits import FitResult, fit_gap_vs_dosc
from storage import fs as sfs
from storage.ledger import Ledger


class StudyNotFound(FileNotFoundError):
    pass


@dataclass
class StudyResults:
    name: str
    storage: str
    config: dict[str, Any]  # the study file as saved beside the ledger
    rows: list[dict[str, Any]]  # every ledger row, failed attempts included
    plan: list[dict[str, Any]] | None  # planned trials (key, cell, task, variant, d_osc, seed)

    @property
    def baseline(self) -> str:
        return self.config.get("baseline", "softmax")

    @property
    def done_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "failed"]

    def metric_name(self, task: str) -> str:
        names = {r["metric_name"] for r in self.done_rows if r["task"] == task and r["metric_name"]}
        return ", ".join(sorted(names)) or "metric"


def _read_yaml(fs, path: str) -> dict[str, Any]:
    return yaml.safe_load(sfs.read_bytes(fs, path)) or {}


def open_study(ref: str) -> StudyResults:
    """A study from its storage directory/URI, or from its study file (storage read from it)."""
    if ref.endswith((".yaml", ".yml")) and Path(ref).is_file():
        config = yaml.safe_load(Path(ref).read_text()) or {}
        if "name" not in config:
            raise StudyNotFound(f"{ref}: not a study file (no `name`)")
        storage = sfs.study_storage_uri(config["name"], config.get("storage"))
    else:
        storage = sfs.absolute_uri(ref)
    fs, root = sfs.resolve(storage)
    study_file = sfs.join(root, "study.yaml")
    if not sfs.exists(fs, study_file):
        raise StudyNotFound(
            f"{storage}: no study there yet (no study.yaml); run it first with `scaling run STUDY.yaml`, "
            "or give the study's storage directory"
        )
    config = _read_yaml(fs, study_file)
    plan_path = sfs.join(root, "plan.json")
    plan = json.loads(sfs.read_bytes(fs, plan_path)) if sfs.exists(fs, plan_path) else None
    return StudyResults(config["name"], storage, config, Ledger(storage).rows(), plan)


def fits(
    study: StudyResults, *, task: str | None = None, variant: str | None = None, law: str | None = None, n_boot: int = 2000
) -> list[FitResult]:
    laws = study.config.get("fits") or ["gap_vs_dosc"]
    out = []
    tasks = sorted({r["task"] for r in study.done_rows})
    for t in tasks:
        if task and t != task:
            continue
        variants = sorted({r["variant"] for r in study.done_rows if r["task"] == t and r["d_osc"] is not None})
        for v in variants:
            if variant and v != variant:
                continue
            if "gap_vs_dosc" in laws and law in (None, "gap_vs_dosc"):
                out.append(
                    fit_gap_vs_dosc(study.rows, study=study.name, task=t, variant=v, baseline=study.baseline,
                                    metric=study.metric_name(t), n_boot=n_boot)
                )
    return out


def predict(study: StudyResults, *, task: str, variant: str, d_osc: float) -> dict[str, Any]:
    """The fitted gap at d_osc, with the bootstrap interval of the constants propagated by the fit."""
    matches = [f for f in fits(study, task=task, variant=variant, law="gap_vs_dosc") if f.ok]
    if not matches:
        raise ValueError(f"no usable gap_vs_dosc fit for task={task!r} variant={variant!r} in study {study.name}")
    fit = matches[0]
    c, a = fit.constants["C"], fit.constants["alpha"]
    corners = [
        ci_c * d_osc ** (-ci_a)
        for ci_c in (c.ci_low, c.ci_high) if ci_c is not None
        for ci_a in (a.ci_low, a.ci_high) if ci_a is not None
    ]
    return {"task": task, "variant": variant, "d_osc": d_osc, "gap": fit.predict(d_osc),
            "range_low": min(corners) if corners else None, "range_high": max(corners) if corners else None,
            "law": "gap = C * d_osc^-alpha", "C": c.value, "alpha": a.value}


def status(study: StudyResults) -> dict[str, dict[str, int]]:
    """Per cell: completed / diverged / pruned / failed / in_progress / pending."""
    done = {r["key"]: r["status"] for r in study.rows if r["status"] != "failed"}
    failed = {r["key"] for r in study.rows if r["status"] == "failed"}
    started = _started_keys(study.storage)
    planned = study.plan or [
        {"key": r["key"], "cell": r["cell"]} for r in study.rows
    ]
    cells: dict[str, dict[str, int]] = {}
    seen = set()
    for trial in planned:
        if trial["key"] in seen:
            continue
        seen.add(trial["key"])
        counts = cells.setdefault(trial["cell"], {s: 0 for s in ("completed", "diverged", "pruned", "failed", "in_progress", "pending")})
        key = trial["key"]
        if key in done:
            counts[done[key]] = counts.get(done[key], 0) + 1
        elif key in started:
            counts["in_progress"] += 1
        elif key in failed:
            counts["failed"] += 1
        else:
            counts["pending"] += 1
    return cells


def _started_keys(storage: str) -> set[str]:
    import pyarrow.fs as pafs

    fs, root = sfs.resolve(storage)
    selector = pafs.FileSelector(sfs.join(root, "checkpoints"), allow_not_found=True)
    return {info.base_name for info in fs.get_file_info(selector) if info.type == pafs.FileType.Directory}


def finite(value: Any) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
