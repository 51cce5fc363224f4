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


def resolve_mode(cfg: WandbEntry) -> str:
    if cfg.mode != "auto":
        return cfg.mode
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


def start_trial_run(spec: TrialSpec, cfg: WandbEntry, wandb_dir: str):
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
            return _init_trial_run(wandb, spec, cfg, wandb_dir, mode, wandb_id)
        except Exception as error:  # noqa: BLE001 -- tracking must not fail the trial
            log.warning("W&B init for %s failed (%s: %s)", wandb_id, type(error).__name__, error)
            if attempt + 1 < len(ids):
                time.sleep(2.0)
    log.warning("training %s without W&B tracking", spec.key)
    return None


def _init_trial_run(wandb, spec: TrialSpec, cfg: WandbEntry, wandb_dir: str, mode: str, wandb_id: str):
    tags = [spec.task, spec.variant, spec.stage] + ([f"d_osc={spec.d_osc}"] if spec.d_osc else [])
    return wandb.init(
        id=wandb_id,
        name=f"{spec.cell}/s{spec.seed}",
        project=cfg.project,
        entity=cfg.entity,
        group=f"{spec.study}/{spec.cell}",
        job_type=spec.stage,
        config={**spec.to_dict(), "trial_key": spec.key},
        tags=tags,
        dir=wandb_dir,
        mode=mode,
        resume="allow",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )


class TrialTracker:
    """The trial's W&B run, opened in a background thread so its start-up (~0.3 s per run, mostly
    waiting on W&B's service) overlaps training instead of delaying it. Metrics logged before the
    run is ready are buffered and written, in order, once it is."""

    def __init__(self, spec: TrialSpec, cfg: WandbEntry, wandb_dir: str) -> None:
        self.intended_id = None if resolve_mode(cfg) == "disabled" else run_id(spec.study, spec.key)
        self._run = None
        self._buffer: list[tuple[dict[str, Any], int]] = []
        self._thread = None
        if self.intended_id is not None:
            self._thread = threading.Thread(target=self._open, args=(spec, cfg, wandb_dir), daemon=True)
            self._thread.start()

    def _open(self, spec, cfg, wandb_dir) -> None:
        self._run = start_trial_run(spec, cfg, wandb_dir)

    @property
    def actual_id(self) -> str | None:
        """The id W&B ended up with (None when tracking is off or failed); call after finish()."""
        return self._run.id if self._run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._buffer.append((metrics, step))
            return
        self._flush()
        log_metrics(self._run, metrics, step)

    def _flush(self) -> None:
        while self._buffer:
            metrics, step = self._buffer.pop(0)
            log_metrics(self._run, metrics, step)

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        if self._thread is not None:
            self._thread.join()
        self._flush()
        finish_trial_run(self._run, summary, exit_code)


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


def log_study_summary(study_name: str, cfg: WandbEntry, wandb_dir: str, fit_rows: list[dict[str, Any]], report_path: str | None,
                      design: dict[str, Any] | None = None) -> str | None:
    """A study-level run holding the fit table (and the report as an artifact file); for an adaptive
    study also its design sequence and the target's width after each batch (scaling.api.design)."""
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
