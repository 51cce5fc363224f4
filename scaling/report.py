"""Scaling reports: one self-contained HTML file (plots embedded as PNG), a Markdown summary and
`fits.json`, written beside the study's ledger."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from scaling import api
from scaling.fits import FitResult
from storage import fs as sfs


@dataclass
class WrittenReport:
    html_path: str
    markdown_path: str
    fits_path: str
    fit_rows: list[dict[str, Any]]


def _plot_gap(fit: FitResult) -> str:
    """Gap vs d_osc on log-log axes: every seed, the per-d means, the fitted line and its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    for point in fit.points:
        gaps = [g for g in point["gaps"].values() if g > 0]
        ax.scatter([point["d_osc"]] * len(gaps), gaps, s=14, color="#7a9cc6", alpha=0.8, zorder=2,
                   label="seeds" if point is fit.points[0] else None)
    means = [(p["d_osc"], p["gap_mean"]) for p in fit.points if p["gap_mean"] > 0]
    if means:
        ax.scatter(*zip(*means), s=46, color="#1f4e8c", zorder=3, label="mean over seeds")
    if fit.ok:
        import numpy as np

        ds = np.array([p["d_osc"] for p in fit.points], dtype=float)
        grid = np.geomspace(ds.min(), ds.max(), 100)
        alpha = fit.constants["alpha"]
        ax.plot(grid, fit.constants["C"].value * grid ** (-alpha.value), color="#c0392b", zorder=4,
                label=f"fit: gap = {fit.constants['C'].value:.3g} d^-{alpha.value:.3g}")
        band = [(p["d_osc"], p.get("band_low"), p.get("band_high")) for p in fit.points]
        band = [b for b in band if b[1] is not None and b[1] > 0]
        if band:
            x, lo, hi = zip(*band)
            ax.fill_between(x, lo, hi, color="#c0392b", alpha=0.15, zorder=1, label=f"{fit.ci_level:.0%} bootstrap band")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("d_osc")
    ax.set_ylabel(f"gap in {fit.metric} ({fit.variant} - {fit.baseline})")
    ax.set_title(f"{fit.task}: {fit.variant} vs {fit.baseline}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _fit_table_rows(fits: list[FitResult]) -> list[list[str]]:
    rows = []
    for fit in fits:
        held = fit.heldout
        rows.append([
            fit.task, fit.variant, fit.law,
            fit.constants["C"].fmt(), fit.constants["alpha"].fmt(),
            _fmt(fit.r2, 3), str(fit.n_points), str(fit.n_seeds),
            f"d={held['x']:g}: {held['rel_error']:+.1%}" if held else "–",
            "; ".join(fit.notes) or "",
        ])
    return rows


FIT_HEADER = ["task", "variant", "law", "C [95% CI]", "alpha [95% CI]", "R²", "points", "seeds", "held-out largest d", "notes"]
STATUS_HEADER = ["cell", "completed", "diverged", "pruned", "failed", "in progress", "pending", "metric mean ± sd"]


def _cell_metric(study: api.StudyResults) -> dict[str, str]:
    import numpy as np

    values: dict[str, list[float]] = {}
    for row in study.done_rows:
        if row["status"] == "completed" and api.finite(row["metric_value"]):
            values.setdefault(row["cell"], []).append(row["metric_value"])
    return {
        cell: f"{np.mean(v):.4g} ± {np.std(v, ddof=1):.2g} (n={len(v)})" if len(v) > 1 else f"{v[0]:.4g} (n=1)"
        for cell, v in values.items()
    }


def _status_rows(study: api.StudyResults) -> list[list[str]]:
    metric = _cell_metric(study)
    return [
        [cell, *(str(c[k]) for k in ("completed", "diverged", "pruned", "failed", "in_progress", "pending")), metric.get(cell, "–")]
        for cell, c in sorted(api.status(study).items())
    ]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.plots{display:flex;flex-wrap:wrap;gap:1em}.note{color:#666;font-size:13px}"""


def render(study: api.StudyResults, fits: list[FitResult]) -> tuple[str, str]:
    title = f"Scaling report: {study.name}"
    description = study.config.get("description", "")
    n_done = len({r["key"] for r in study.done_rows})
    plots = "".join(
        f'<figure><img alt="gap vs d_osc, {html.escape(f.task)} {html.escape(f.variant)}" '
        f'src="data:image/png;base64,{_plot_gap(f)}"></figure>'
        for f in fits if f.points
    )
    method = fits[0].method if fits else "log-log least squares on per-d mean gaps; seed bootstrap"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(description)}</p>
<p class="note">storage: {html.escape(study.storage)} · {n_done} finished trials · baseline: {html.escape(study.baseline)}</p>
<h2>Fits</h2>{_html_table(FIT_HEADER, _fit_table_rows(fits))}
<p class="note">Method: {html.escape(method)}; intervals are 95% percentile bootstrap over seeds.</p>
<div class="plots">{plots}</div>
<h2>Trials per cell</h2>{_html_table(STATUS_HEADER, _status_rows(study))}
</body></html>"""
    markdown = "\n\n".join([
        f"# {title}", description,
        f"storage: `{study.storage}` · {n_done} finished trials · baseline: {study.baseline}",
        "## Fits", _md_table(FIT_HEADER, _fit_table_rows(fits)),
        f"Method: {method}; intervals are 95% percentile bootstrap over seeds.",
        "## Trials per cell", _md_table(STATUS_HEADER, _status_rows(study)),
    ]) + "\n"
    return page, markdown


def write_report(storage_or_study: str) -> WrittenReport:
    study = api.open_study(storage_or_study)
    fits = api.fits(study)
    page, markdown = render(study, fits)
    fs, root = sfs.resolve(study.storage)
    paths = {name: sfs.join(root, name) for name in ("report.html", "report.md", "fits.json")}
    sfs.write_bytes_atomic(fs, paths["report.html"], page.encode())
    sfs.write_bytes_atomic(fs, paths["report.md"], markdown.encode())
    sfs.write_bytes_atomic(fs, paths["fits.json"], json.dumps([f.to_dict() for f in fits], indent=1, default=str).encode())
    return WrittenReport(paths["report.html"], paths["report.md"], paths["fits.json"], [f.to_row() for f in fits])
