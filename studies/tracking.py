"""Weights & Biases tracking: one run per trial (id derived from the trial key, so a retried trial
resumes the same run), grouped by study/cell, plus a study summary run with the fit table.

Offline unless a key is configured: mode `auto` goes online only when WANDB_API_KEY is set. The key
itself is read by wandb from the environment and never enters a config, the ledger or a report.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from typing import Any

from storage.records import TrialSpec, stable_hash
from studies.spec import WandbEntry

log = logging.getLogger(__name__)
_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


WANDB_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
               "disabled": "disabled", "shared": "online"}


def resolve_mode(cfg: WandbEntry) -> str:
    """The study's mode; `auto`: $WANDB_MODE when set (W&B's own switch, so `WANDB_MODE=offline`
    keeps a study offline even with a key), else online iff WANDB_API_KEY is set."""
    if cfg.mode != "auto":
        return cfg.mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in WANDB_MODES:
            raise ValueError(f"WANDB_MODE={env!r} (with tracking.wandb.mode: auto): allowed: {sorted(WANDB_MODES)}; "
                             "unset it, or set tracking.wandb.mode in the study file")
        return WANDB_MODES[env]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def run_id(study: str, key: str) -> str:
    """Stable, unique per (study, trial key), within W&B's allowed characters and length."""
    raw = _ID_BAD.sub("-", f"{study}-{key}")
    return raw if len(raw) <= 64 else f"{raw[:47]}-{stable_hash(raw, 16)}"


def prepare_environment(wandb_dir: str) -> None:
    """Must run before ray.init so every worker inherits it (else offline files can be copied half-written)."""
    os.makedirs(wandb_dir, exist_ok=True)
    os.environ["WANDB_DIR"] = wandb_dir
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def trial_config(spec: TrialSpec, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's config: the trial spec, plus the numbers researchers filter and group by at the
    top level: d_osc (None for the baseline), target and actual parameter counts, the shape, FLOPs."""
    info = info or {}
    model = spec.model
    shape = {k: model.get(k) for k in ("d_model", "n_layers", "n_heads", "d_ff") if k in model}
    return {
        **spec.to_dict(), "trial_key": spec.key, "cell": spec.cell, "d_osc": spec.d_osc,
        "target_params": spec.target_params, **shape,
        "shape": " ".join(f"{k}={v}" for k, v in shape.items()),
        **{k: info[k] for k in ("params_total", "params_non_embedding", "flops_per_token", "train_flops",
                                "total_steps", "seq_len", "metric", "pack_size") if k in info},
    }


def start_trial_run(spec: TrialSpec, cfg: WandbEntry, wandb_dir: str, info: dict[str, Any] | None = None):
    """The trial's W&B run, or None. Tracking never fails a trial: when the stable id cannot be
    taken (a killed worker's W&B service may still hold it), retry once, then log under a
    `-retry-N` id in the same group, and as a last resort train untracked."""
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    stable = run_id(spec.study, spec.key)
    ids = [stable, stable, f"{stable[:52]}-retry-{uuid.uuid4().hex[:4]}"]
    for attempt, wandb_id in enumerate(ids):
        try:
            run = _init_trial_run(wandb, spec, cfg, wandb_dir, mode, wandb_id, info)
            if mode == "offline":  # earlier attempts of this trial that never logged a row
                from studies.wandb_files import remove_empty_runs

                remove_empty_runs(wandb_dir, wandb_id, keep=os.path.dirname(run.dir))
            return run
        except Exception as error:  # noqa: BLE001 -- tracking must not fail the trial
            log.warning("W&B init for %s failed (%s: %s)", wandb_id, type(error).__name__, error)
            if attempt + 1 < len(ids):
                time.sleep(2.0)
    log.warning("training %s without W&B tracking", spec.key)
    return None


def _init_trial_run(wandb, spec: TrialSpec, cfg: WandbEntry, wandb_dir: str, mode: str, wandb_id: str,
                    info: dict[str, Any] | None = None):
    tags = [spec.task, spec.variant, spec.stage] + ([f"d_osc={spec.d_osc}"] if spec.d_osc else [])
    return wandb.init(
        id=wandb_id,
        name=f"{spec.cell}/s{spec.seed}",
        project=cfg.project,
        entity=cfg.entity,
        group=f"{spec.study}/{spec.cell}",
        job_type=spec.stage,
        config=trial_config(spec, info),
        tags=tags,
        dir=wandb_dir,
        mode=mode,
        resume="allow",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )


class TrialTracker:
    """The trial's W&B run. Opened at the first row logged, not when the trial starts, so an
    attempt stopped before it logs anything leaves no header-only run behind; and opened in a
    background thread so its start-up (~0.3 s, mostly waiting on W&B's service) overlaps training.
    Rows logged before the run is ready are buffered and written, in order, once it is. A trial
    that resumes logs under the same id (resume="allow"), continuing at the step it resumes from."""

    def __init__(self, spec: TrialSpec, cfg: WandbEntry, wandb_dir: str) -> None:
        self.intended_id = None if resolve_mode(cfg) == "disabled" else run_id(spec.study, spec.key)
        self.spec, self.cfg, self.wandb_dir = spec, cfg, wandb_dir
        self.info: dict[str, Any] = {}
        self._run = None
        self._buffer: list[tuple[dict[str, Any], int]] = []
        self._thread: threading.Thread | None = None

    def configure(self, info: dict[str, Any]) -> None:
        """The trial's size (parameters, FLOPs, steps), known once its model is built: run config."""
        self.info.update(info)
        if self._run is not None and self._thread is not None and not self._thread.is_alive():
            try:
                self._run.config.update(trial_config(self.spec, self.info), allow_val_change=True)
            except Exception as error:  # noqa: BLE001 -- tracking must not fail the trial
                log.warning("W&B config update of %s failed (%s: %s)", self._run.id, type(error).__name__, error)

    def _open(self) -> None:
        self._run = start_trial_run(self.spec, self.cfg, self.wandb_dir, dict(self.info))

    def _ensure_started(self) -> None:
        if self._thread is None and self.intended_id is not None:
            self._thread = threading.Thread(target=self._open, daemon=True)
            self._thread.start()

    @property
    def actual_id(self) -> str | None:
        """The id W&B ended up with (None when tracking is off or failed); call after finish()."""
        return self._run.id if self._run is not None else None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._ensure_started()
        if self._thread is not None and self._thread.is_alive():
            self._buffer.append((metrics, step))
            return
        self._flush()
        log_metrics(self._run, metrics, step)

    def _flush(self) -> None:
        while self._buffer:
            metrics, step = self._buffer.pop(0)
            log_metrics(self._run, metrics, step)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self._flush()

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        if self._thread is None and self.intended_id is not None and summary.get("status") != "pruned":
            self._ensure_started()  # a trial that logged no row (resumed at its end) still gets its summary
        self._join()
        finish_trial_run(self._run, summary, exit_code)

    def interrupted(self, step: int) -> None:
        """The trial stopped to resume later: close the run as preempted (the next attempt resumes
        it under the same id). A run never opened stays unopened: nothing to leave behind."""
        if self._thread is None:
            return
        self._join()
        if self._run is None:
            return
        try:
            self._run.mark_preempting()
            self._run.summary["interrupted_at_step"] = step
            self._run.finish(exit_code=1)
        except Exception as error:  # noqa: BLE001 -- tracking must not fail the trial
            log.warning("W&B finish of %s failed (%s: %s)", self._run.id, type(error).__name__, error)


def finish_trial_run(run, record_summary: dict[str, Any], exit_code: int) -> None:
    if run is None:
        return
    try:
        for name, value in record_summary.items():
            run.summary[name] = value
        run.finish(exit_code=exit_code)
    except Exception as error:  # noqa: BLE001 -- tracking must not fail the trial
        log.warning("W&B finish of %s failed (%s: %s)", run.id, type(error).__name__, error)


def log_metrics(run, metrics: dict[str, Any], step: int) -> None:
    if run is None:
        return
    try:
        run.log(metrics, step=step)
    except Exception as error:  # noqa: BLE001 -- tracking must not fail the trial
        log.warning("W&B log to %s failed (%s: %s)", run.id, type(error).__name__, error)


CELL_COLUMNS = ["cell", "task", "variant", "d_osc", "target_params", "params_total", "metric", "completed",
                "diverged", "pruned", "mean", "sd", "min", "max", "seeds"]


def cell_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell of the ledger's finished trials (replicates, or every trial when none is a
    replicate): counts per status and the metric's mean, sd, min and max over completed seeds."""
    import math
    import statistics

    finished = [r for r in rows if r["status"] != "failed"]
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in finished:
        by_cell.setdefault(r["cell"], []).append(r)
    out = []
    for cell, group in sorted(by_cell.items()):
        replicates = [r for r in group if r.get("stage") != "search"] or group
        values = [r["metric_value"] for r in replicates if r["status"] == "completed" and r["metric_value"] is not None
                  and math.isfinite(r["metric_value"])]
        first = replicates[0]
        out.append({
            "cell": cell, "task": first["task"], "variant": first["variant"], "d_osc": first["d_osc"],
            "target_params": first["target_params"], "params_total": first["params_total"],
            "metric": first["metric_name"],
            **{s: sum(1 for r in replicates if r["status"] == s) for s in ("completed", "diverged", "pruned")},
            "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "seeds": ",".join(str(s) for s in sorted({r["seed"] for r in replicates})),
        })
    return out


def log_study_summary(study_name: str, cfg: WandbEntry, wandb_dir: str, fit_rows: list[dict[str, Any]],
                      report_path: str | None, ledger_rows: list[dict[str, Any]] | None = None,
                      design: dict[str, Any] | None = None) -> str | None:
    """A study-level run holding the per-cell results table, the fit table (and the report as an
    artifact file); for an adaptive study also its design sequence and the target's width after each
    batch (scaling.api.design)."""
    mode = resolve_mode(cfg)
    if mode == "disabled":
        return None
    import wandb

    run = wandb.init(
        id=run_id(study_name, "summary"),
        name=f"{study_name}/summary",
        project=cfg.project,
        entity=cfg.entity,
        group=study_name,
        job_type="summary",
        dir=wandb_dir,
        mode=mode,
        resume="allow",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    cells = cell_table(ledger_rows or [])
    if cells:
        run.log({"cells": wandb.Table(columns=CELL_COLUMNS, data=[[row[c] for c in CELL_COLUMNS] for row in cells])})
    if fit_rows:
        columns = sorted({k for row in fit_rows for k in row})
        run.log({"fits": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in fit_rows])})
    if design:
        columns = ["number", "arm", "x", "seed", "rule", "reason", "expected_gain", "state", "value"]
        data = [[p["number"], p["point"]["arm"], p["point"]["x"], p["point"]["seed"], p["rule"], p["reason"],
                 p.get("expected_gain"), p["state"], p.get("value")] for p in design["proposals"]]
        run.log({"design": wandb.Table(columns=columns, data=data)})
        columns = ["after_trials", "batch", "runs", "width", "identified", "reason"]
        run.log({"design_widths": wandb.Table(columns=columns, data=[[w[c] for c in columns] for w in design["widths"]])})
    if report_path and os.path.exists(report_path):
        with open(report_path) as page:
            run.log({"report": wandb.Html(page.read())})  # the plots, embedded in the report page
        run.save(report_path, base_path=os.path.dirname(report_path), policy="now")
    run.finish()
    return run.id
