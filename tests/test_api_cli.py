"""The query API from the command line: `scaling fits`, `scaling predict`, `scaling report` and
`scaling serve` (a real uvicorn process on the agreed interface)."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import write_synthetic_study
from scaling.cli import main


@pytest.fixture
def study_dir(tmp_path) -> Path:
    return write_synthetic_study(tmp_path / "synthetic", C=2.0, alpha=0.7, noise=0.01)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fits_json_csv_table(study_dir, capsys):
    code, out, _ = run_cli(capsys, "fits", str(study_dir), "--format", "json", "--n-boot", "300")
    rows = json.loads(out)
    assert code == 0 and {r["method"] for r in rows} == {"loglog-means", "nonlinear"}
    assert all(r["alpha_ci_low"] < 0.7 < r["alpha_ci_high"] for r in rows)
    code, out, _ = run_cli(capsys, "fits", str(study_dir), "--format", "csv", "--n-boot", "300", "--method", "nonlinear")
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["law"] == "gap_vs_dosc" and float(row["alpha"]) == pytest.approx(0.7, abs=0.05)
    code, out, _ = run_cli(capsys, "fits", str(study_dir), "--n-boot", "300", "--law", "gap_vs_dosc")
    assert code == 0 and "alpha [CI]" in out and "loglog-means" in out
    code, out, _ = run_cli(capsys, "fits", str(study_dir), "--law", "loss_vs_params", "--n-boot", "300")
    assert code == 0 and "no fits match" in out


def test_predict_text_and_json(study_dir, capsys):
    code, out, _ = run_cli(capsys, "predict", str(study_dir), "--task", "lm", "--variant", "oscillator", "--d-osc", "64",
                           "--n-boot", "300")
    assert code == 0 and "gap =" in out and "prediction interval" in out and "(extrapolated)" in out
    code, out, _ = run_cli(capsys, "predict", str(study_dir), "--task", "lm", "--variant", "oscillator", "--d-osc", "64",
                           "--format", "json", "--method", "loglog-means", "--n-seeds", "5", "--n-boot", "300")
    result = json.loads(out)
    assert result["gap"] == pytest.approx(2.0 * 64**-0.7, rel=0.15) and result["n_seeds"] == 5
    assert result["pi_low"] <= result["ci_low"] <= result["gap"] <= result["ci_high"] <= result["pi_high"]


def test_predict_errors_name_the_fix(study_dir, capsys):
    code, _, err = run_cli(capsys, "predict", str(study_dir), "--task", "lm", "--variant", "nope", "--d-osc", "8")
    assert code == 2 and "usable fits: ['lm/oscillator/gap_vs_dosc']" in err
    code, _, err = run_cli(capsys, "predict", str(study_dir), "--task", "lm", "--variant", "oscillator")
    assert code == 2 and "exactly one of --d-osc" in err
    code, _, err = run_cli(capsys, "fits", str(study_dir.parent / "missing"))
    assert code == 2 and "no study there yet" in err


def test_report_command(study_dir, capsys):
    code, out, _ = run_cli(capsys, "report", str(study_dir), "--n-boot", "300")
    assert code == 0 and (study_dir / "report.html").exists() and (study_dir / "report.md").exists()
    assert json.loads((study_dir / "fits.json").read_text())[0]["law"] == "gap_vs_dosc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_scaling_serve_on_the_agreed_interface(study_dir):
    """`scaling serve --host 0.0.0.0 --port P --root R`, token from SCALING_API_TOKEN, /healthz open."""
    pytest.importorskip("uvicorn")
    port = _free_port()
    env = {**os.environ, "SCALING_API_TOKEN": "s3cret", "SCALING_STUDIES_ROOT": "/nonexistent-overridden"}
    process = subprocess.Popen([sys.executable, "-m", "scaling.cli", "serve", "--host", "0.0.0.0", "--port", str(port),
                                "--root", str(study_dir.parent), "--log-level", "warning"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if _get(f"{base}/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        else:
            pytest.fail(f"server did not start: {process.stdout.read1().decode() if process.poll() is not None else ''}")
        assert _get(f"{base}/healthz") == (200, b'{"status":"ok"}')
        assert _get(f"{base}/studies")[0] == 401
        status, body = _get(f"{base}/studies", "s3cret")
        assert status == 200 and [s["name"] for s in json.loads(body)] == ["synthetic"]
        status, body = _get(f"{base}/openapi.json")
        assert status == 200 and "/studies/{name}/predict" in json.loads(body)["paths"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_scaling_serve_without_a_token_refuses_to_start(study_dir):
    env = {k: v for k, v in os.environ.items() if k != "SCALING_API_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "scaling.cli", "serve", "--root", str(study_dir.parent)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "SCALING_API_TOKEN" in done.stderr


def test_compare_two_variants(tmp_path, capsys):
    from scaling import synthetic
    from test_server import write_study

    rows = synthetic.gap_study_rows(C=1.5, alpha=0.6, rng=1) + [
        dict(r, variant="steeper", key=r["key"] + "s", cell=r["cell"].replace("oscillator", "steeper"))
        for r in synthetic.gap_study_rows(C=1.5, alpha=1.2, rng=2, seed_effect=0.0, variant_noise=0.005)
        if r["variant"] == "oscillator"]
    study = write_study(tmp_path / "cmp", rows, "cmp")
    code, out, _ = run_cli(capsys, "compare", str(study), "--a", "lm/steeper", "--b", "lm/oscillator", "--method",
                           "loglog-means")
    assert code == 0 and "alpha(lm/steeper gap_vs_dosc loglog-means) - alpha(lm/oscillator" in out and "conservative" in out
    code, out, _ = run_cli(capsys, "compare", str(study), "--a", "lm/steeper", "--b", "lm/oscillator", "--format", "json")
    result = json.loads(out)
    assert result["diff"] == pytest.approx(0.6, abs=0.15) and result["ci_low"] > 0
    code, _, err = run_cli(capsys, "compare", str(study), "--a", "steeper", "--b", "lm/oscillator")
    assert code == 2 and "TASK/VARIANT" in err


def test_fit_part_of_the_grid_and_check_the_held_out_d(tmp_path, capsys):
    """Paper A's check: fit d_osc 2-32, predict 64, compare with the measured 64. A 64 that breaks
    the law (a floor) falls outside the interval; the fit over 2-32 does not see it."""
    def study(gap64_shift):
        from conftest import make_record

        d64 = [make_record(key=f"lm-osc-d64-s{s}", cell="lm/oscillator/d64", task="lm", variant="oscillator", d_osc=64,
                           seed=s, metric_value=3.0 + 2.0 * 64**-0.7 + gap64_shift) for s in range(5)]
        return write_synthetic_study(tmp_path / f"s{gap64_shift}", C=2.0, alpha=0.7, noise=0.01, extra_rows=d64)

    clean = study(0)
    code, out, _ = run_cli(capsys, "fits", str(clean), "--format", "json", "--n-boot", "300", "--max-d-osc", "32")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["n_points"] == 5 and r["heldout_x"] == 32 for r in rows)
    code, out, _ = run_cli(capsys, "predict", str(clean), "--task", "lm", "--variant", "oscillator", "--d-osc", "64",
                           "--max-d-osc", "32", "--method", "loglog-means", "--n-boot", "300")
    assert code == 0 and "observed in this study" in out and "inside the prediction interval" in out

    broken = study(0.3)
    code, out, _ = run_cli(capsys, "predict", str(broken), "--task", "lm", "--variant", "oscillator", "--d-osc", "64",
                           "--max-d-osc", "32", "--method", "loglog-means", "--n-boot", "300", "--format", "json")
    result = json.loads(out)
    assert result["gap"] == pytest.approx(2.0 * 64**-0.7, rel=0.15)  # the law from d 2-32 only
    assert result["observed"]["gap"] == pytest.approx(2.0 * 64**-0.7 + 0.3, abs=0.03)
    assert result["observed"]["within_prediction_interval"] is False and result["observed"]["n_seeds"] == 5
    code, _, err = run_cli(capsys, "fits", str(clean), "--min-d-osc", "16", "--max-d-osc", "4")
    assert code == 2 and "min_d_osc=16.0 is above max_d_osc=4.0" in err
