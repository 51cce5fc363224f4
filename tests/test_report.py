"""scaling.report: the self-contained HTML report (checked in headless Chromium), the Markdown
summary, fits.json, paper A's numbers beside ours, and the fit table in the W&B summary run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from scaling import api, paper_a, synthetic
from scaling.report import render, write_report
from conftest import SHARED


def write_study(directory: Path, rows, name: str, **config) -> Path:
    import yaml

    from storage.ledger import Ledger
    from storage.records import TrialRecord

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "study.yaml").write_text(yaml.safe_dump({"name": name, "baseline": "softmax", **config}))
    ledger = Ledger(str(directory))
    for row in rows:
        ledger.append(TrialRecord(**{**row, "study": name}))
    return directory


def paper_a_like_rows(task: str = "wikitext2", seeds=range(5), rng: int = 0) -> list[dict]:
    """Perplexities drawn around paper A's published per-d means and sds (softmax at its v1 mean)."""
    ref = paper_a.LANGUAGE_MODELING[task]
    gen = np.random.default_rng(rng)
    rows = []
    for s in seeds:
        shared = gen.normal(0, 0.2 if task == "wikitext2" else 0.02)
        base = ref["softmax"]["mean"] + shared
        rows.append(synthetic.row(key=f"{task}-softmax-s{s}", cell=f"{task}/softmax", task=task, seed=s, metric_name="val_ppl",
                                  metric_value=float(base)))
        for d, entry in ref["oscillator"].items():
            value = entry["mean"] + shared + gen.normal(0, entry["std"])
            rows.append(synthetic.row(key=f"{task}-osc-d{d}-s{s}", cell=f"{task}/oscillator/d{d}", task=task,
                                      variant="oscillator", d_osc=d, seed=s, metric_name="val_ppl", metric_value=float(value)))
    return rows


@pytest.fixture(scope="module")
def grid_study(tmp_path_factory) -> Path:
    """Two tasks (one of them paper A's WikiText-2), sizes, d_osc, seeds, and a few diverged trials."""
    rows = synthetic.scaling_grid_rows(tasks=("lm",), variants={"softmax": None, "oscillator": [2, 4, 8, 16],
                                                                "oscillator_p2": [2, 4, 8]},
                                       sizes=(1_000_000, 2_000_000, 4_000_000), seeds=range(3), diverged_every=23)
    rows += paper_a_like_rows()
    return write_study(tmp_path_factory.mktemp("grid") / "grid", rows, "grid", description="a synthetic study")


@pytest.fixture(scope="module")
def written(grid_study):
    return write_report(str(grid_study), n_boot=300)


def test_report_files_and_contents(written, grid_study):
    page = Path(written.html_path).read_text()
    markdown = Path(written.markdown_path).read_text()
    assert written.html_path == str(grid_study / "report.html")
    # self-contained: every plot is embedded, nothing is fetched
    assert page.count('src="data:image/png;base64,') >= 6
    assert "http://" not in page and "https://" not in page
    for text in ("Task lm", "Task wikitext2", "Fitted constants", "Differences of exponents", "Trials per cell",
                 "gap_vs_dosc", "gap_vs_params", "loss_vs_params", "loglog-means", "nonlinear", "huber-log"):
        assert text in page, text
    assert markdown.startswith("# Scaling report: grid") and "| task | law | variant |" in markdown
    fits = json.loads(Path(written.fits_path).read_text())  # strict JSON (no NaN)
    assert {f["law"] for f in fits} == {"gap_vs_dosc", "gap_vs_params", "loss_vs_params"}
    assert all("boot" not in f for f in fits)
    assert len(written.fit_rows) == len(fits) and all("alpha_ci_low" in r for r in written.fit_rows)


def test_failures_are_counted_per_cell_and_per_fit(written, grid_study):
    study = api.open_study(str(grid_study))
    diverged = sum(r["status"] == "diverged" for r in study.rows)
    assert diverged > 0
    markdown = Path(written.markdown_path).read_text()
    table = markdown.split("## Trials per cell")[1]
    counted = sum(int(line.split("|")[3]) for line in table.splitlines() if line.startswith("| lm/"))
    assert counted == diverged  # the diverged column of the cell table
    assert sum(r["excluded_diverged"] for r in written.fit_rows if r["law"] == "loss_vs_params") == diverged


def test_paper_a_numbers_beside_ours(written):
    page = Path(written.html_path).read_text()
    assert "Paper A, wikitext2: published numbers beside ours" in page
    for published in ("110.7 ± 0.51 (n=5)", "99.58 (n=1)", "101.5 ± 0.47 (n=10)", "+11.1"):
        assert published in page, published
    paper = paper_a.paper_gap_fit("wikitext2")
    assert f"{paper['alpha']:.4g}" in page
    # our study reproduces paper A's means, so our paper-A-method exponent brackets theirs
    fits = [r for r in written.fit_rows if r["task"] == "wikitext2" and r["law"] == "gap_vs_dosc" and r["method"] == "loglog-means"]
    assert fits and fits[0]["alpha_ci_low"] < paper["alpha"] < fits[0]["alpha_ci_high"]


def test_paper_a_copy_matches_the_shared_reference():
    path = SHARED / "reference" / "paper_a_results.json"
    if not path.exists():
        pytest.skip(f"{path} not present (a fresh clone has no ../shared)")
    ref = json.loads(path.read_text())["language_modeling"]
    for task in ("wikitext2", "tinystories"):
        ours = paper_a.LANGUAGE_MODELING[task]
        assert ours["softmax"]["mean"] == ref[task]["softmax"]["mean"]
        for d, entry in ref[task]["oscillator"].items():
            assert ours["oscillator"][int(d)]["mean"] == entry["mean"] and ours["oscillator"][int(d)]["std"] == entry["std"]
        assert {str(k): v for k, v in ours["published_gap"].items()} == ref["published_gap"][task]


def test_paper_a_fit_reproduces_the_published_gaps():
    for task in ("wikitext2", "tinystories"):
        fit = paper_a.paper_gap_fit(task)
        published = paper_a.LANGUAGE_MODELING[task]["published_gap"]
        for d, gap in published.items():
            assert fit["gaps"][d] == pytest.approx(gap, abs=0.01)
        assert 0.3 < fit["alpha"] < 0.6


def test_report_for_a_loss_metric_fits_perplexity_for_the_paper_table(tmp_path):
    rows = paper_a_like_rows("tinystories")
    for row in rows:  # the primary metric is the loss; perplexity sits in metrics_json
        row["metrics_json"] = json.dumps({"val_ppl": row["metric_value"]})
        row["metric_name"], row["metric_value"] = "val_loss", float(np.log(row["metric_value"]))
    study = api.open_study(str(write_study(tmp_path / "ts", rows, "ts")))
    page, _ = render(study, api.fits(study, n_boot=200))
    assert "Paper A, tinystories" in page and "ours: loglog-means (val_ppl" in page


# ---- in a real browser --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium); the report's browser check is skipped",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def open_in_chromium(url: str, profile: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """(the DOM after load, the console messages) of a page in headless Chromium."""
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        subprocess.run([*base, "--window-size=1280,3200", f"--screenshot={screenshot}", url], capture_output=True,
                       timeout=120, check=True)
    return dom.stdout, console


@needs_chromium
def test_browser_check_catches_console_errors(tmp_path):
    """The check itself: a page with a script error and a broken plot is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><img alt="x" src="data:image/png;base64,AAAA">'
                   "<script>undefinedFunction();</script></body></html>")
    _, console = open_in_chromium(bad.as_uri(), tmp_path / "profile")
    assert any("undefinedFunction" in line for line in console), console


@needs_chromium
def test_report_renders_in_headless_chromium_without_console_errors(written, tmp_path):
    screenshot = tmp_path / "report.png"
    dom, console = open_in_chromium(Path(written.html_path).as_uri(), tmp_path / "profile", screenshot)
    assert console == [], console
    n_img = Path(written.html_path).read_text().count("<img ")
    assert f'data-plots-rendered="{n_img}/{n_img}"' in dom  # every embedded plot decoded
    from matplotlib.image import imread

    pixels = imread(str(screenshot))
    assert pixels.shape[0] == 3200 and pixels.shape[1] == 1280
    assert pixels[..., :3].std() > 0.05  # not a blank page
    keep = os.environ.get("SCALING_TEST_ARTIFACTS")
    if keep:  # CI can keep the screenshot
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / "report.png")


# ---- W&B ----------------------------------------------------------------------------------------

def test_fit_table_goes_to_the_wandb_summary_run(written, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    from studies import tracking
    from studies.spec import WandbEntry

    run_id = tracking.log_study_summary("grid", WandbEntry(mode="offline"), str(tmp_path), written.fit_rows, written.html_path)
    assert run_id
    (table_file,) = list(tmp_path.glob("wandb/offline-run-*/files/media/table/fits_*.table.json"))
    table = json.loads(table_file.read_text())
    assert len(table["data"]) == len(written.fit_rows)
    column = table["columns"].index("alpha_ci_low")
    logged = sorted(round(r[column], 9) for r in table["data"] if r[column] is not None)
    assert logged == sorted(round(r["alpha_ci_low"], 9) for r in written.fit_rows if r["alpha_ci_low"] is not None)
    assert {"law", "method", "group", "excluded_diverged", "loo_rmse"} <= set(table["columns"])


def test_paper_a_tables_for_keyword_spotting_and_agreement(tmp_path):
    rows = []
    for s in range(5):
        rows.append(synthetic.row(key=f"k-s{s}", cell="kws/softmax", task="kws", seed=s, metric_name="val_accuracy",
                                  metric_value=0.877 + 0.007 * (s - 2)))
        rows.append(synthetic.row(key=f"k-o-s{s}", cell="kws/oscillator/d2", task="kws", variant="oscillator", d_osc=2,
                                  seed=s, metric_name="val_accuracy", metric_value=0.888 + 0.003 * (s - 2)))
        for variant, d, hard in (("softmax", None, 0.80 if s == 0 else 0.95), ("oscillator", 2, 0.974)):
            rows.append(synthetic.row(key=f"s-{variant}-{s}", cell=f"sva/{variant}", task="sva", variant=variant, d_osc=d,
                                      seed=s, metric_name="val_accuracy", metric_value=0.95,
                                      metrics_json=json.dumps({"val_accuracy_hard": hard})))
    study = api.open_study(str(write_study(tmp_path / "a", rows, "a")))
    _, markdown = render(study, api.fits(study, n_boot=200))
    assert "Paper A, keyword spotting" in markdown and "| softmax | 87.71 ± 0.7 (n=5) | 87.7 ± 1.1 (n=5) |" in markdown
    agreement = markdown.split("Paper A, subject-verb agreement")[1]
    assert "| softmax | 92.19 ± 7.8 (n=5) | 92.11 ± 7.9 (n=5) | 1 |" in agreement and "| 1 of 5 |" in agreement  # our failure
    assert "| oscillator d_osc=2 | 97.81 ± 0.15 (n=5) |" in agreement and "| 0 of 5 |" in agreement


def test_gap_plot_when_no_gap_is_positive():
    """Every seed's gap <= 0 (the variant beats the baseline): the log panel is empty and says so,
    and drawing does not fail (an empty panel on a log x axis has no range)."""
    from scaling import fits as fitting
    from scaling.report import plot_gap_vs_dosc

    rows = synthetic.gap_study_rows(C=-1.0, alpha=0.5, ds=(2, 4, 8), seeds=range(3), rng=1)
    data = fitting.select_rows(rows, "lm")
    cells = fitting.gap_cells(data.rows, variant="oscillator", baseline="softmax", x_of="d_osc", metric="val_loss")
    fits = fitting.fit_gap_law(cells, study="s", task="lm", law="gap_vs_dosc", variant="oscillator", baseline="softmax",
                         metric="val_loss", draws=fitting.SeedDraws(data.seeds, 1, 0, "lm"))
    assert all(v < 0 for p in fits[0].points for v in p["values"].values())
    assert len(plot_gap_vs_dosc("lm", "oscillator", fits)) > 1000  # a PNG, base64
