"""scaling.importer / `scaling import`: bring your own results.

Acceptance: paper A's public per-seed WikiText-2 perplexities (tests/data/paper_a_wt2_uniform.csv,
see tests/data/SOURCE.md), imported and fitted by the log-log method on d_osc <= 32, give the
published alpha 0.420, C 15.17 and the d_osc 64 prediction 2.64. Then: every query works on an
imported study, every bad input names the row/column and the fix and writes nothing, Parquet in
gives the same study as CSV in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaling import api
from scaling.cli import main
from scaling.importer import ResultsImportError, import_results

PAPER_A_CSV = Path(__file__).resolve().parent / "data" / "paper_a_wt2_uniform.csv"
# results/lm_dimension_scaling/wt2_uniform.json of FabioPasqualetti/attention-by-synchronization
PUBLISHED = {"alpha": 0.4202988371299427, "C": 15.16572289419718, "pred_delta_point": 2.640752950194218,
             "r2": 0.9973511242515344, "obs_mean_delta": 2.5232615636386613}
N_BOOT = 100  # point estimates only; the bootstrap just has to run


@pytest.fixture(scope="module")
def paper_a(tmp_path_factory) -> api.StudyResults:
    target = tmp_path_factory.mktemp("imports") / "paper_a_wt2"
    summary = import_results(PAPER_A_CSV, target)
    assert summary.rows == 40 and summary.study == "paper_a_wt2" and summary.metrics == {"wikitext2": "val_ppl"}
    return api.open_study(str(target))


def test_paper_a_wt2_reproduces_the_published_loglog_fit(paper_a):
    found = [f for f in api.fits(paper_a, task="wikitext2", variant="oscillator", law="gap_vs_dosc",
                                 method="loglog-means", max_d_osc=32, n_boot=N_BOOT) if f.ok]
    assert len(found) == 1
    fit = found[0]
    alpha, C = fit.constants["alpha"].value, fit.constants["C"].value
    assert round(alpha, 3) == 0.420 and round(C, 2) == 15.17  # the published rounding
    assert alpha == pytest.approx(PUBLISHED["alpha"], rel=1e-6) and C == pytest.approx(PUBLISHED["C"], rel=1e-6)

    out = api.predict(paper_a, task="wikitext2", variant="oscillator", d_osc=64, method="loglog-means",
                      max_d_osc=32, n_boot=N_BOOT)
    assert out["method"] == "loglog-means"
    assert round(out["value"], 2) == 2.64
    assert out["value"] == pytest.approx(PUBLISHED["pred_delta_point"], rel=1e-6)
    # the 10 held-out d_osc 64 seeds, against the 5-seed baseline mean (seeds 5-9 have no paired baseline)
    assert out["observed"]["n_seeds"] == 10
    assert out["observed"]["gap"] == pytest.approx(PUBLISHED["obs_mean_delta"], rel=1e-9)


def test_imported_records_are_complete_trials(paper_a):
    assert paper_a.name == "paper_a_wt2" and paper_a.baseline == "softmax" and paper_a.plan is None
    totals = api.status_totals(api.status(paper_a))
    assert totals["completed"] == 40 and sum(totals.values()) == 40
    rows = {r["key"]: r for r in paper_a.rows}
    assert len(rows) == 40
    row = next(r for r in paper_a.rows if r["d_osc"] == 64 and r["seed"] == 9)
    assert row["cell"] == "wikitext2/oscillator/d64" and row["key"].startswith("wikitext2-oscillator-d64-s9-import-")
    assert (row["status"], row["stage"], row["host"], row["metric_name"]) == ("completed", "replicate", "import", "val_ppl")
    assert row["metric_value"] == pytest.approx(101.58642677984176, rel=1e-15)
    assert (row["params_total"], row["wall_seconds"], row["target_params"]) == (0, 0.0, None)
    spec = json.loads(row["spec_json"])
    assert spec["train"]["import"]["source"] == PAPER_A_CSV.name and spec["code_version"] == "import"
    base = next(r for r in paper_a.rows if r["variant"] == "softmax")
    assert base["d_osc"] is None and base["cell"] == "wikitext2/softmax"
    from storage.ledger import Ledger

    assert {r.spec.cell for r in Ledger(paper_a.storage).records()} == {r["cell"] for r in paper_a.rows}


def test_every_cli_query_works_on_an_imported_study(tmp_path, capsys):
    target = tmp_path / "wt2"
    assert main(["import", str(PAPER_A_CSV), "--into", str(target), "--name", "wt2-paper-a",
                 "--description", "paper A, WikiText-2"]) == 0
    assert "imported 40 result(s)" in capsys.readouterr().out
    assert main(["status", str(target)]) == 0
    assert "wikitext2/oscillator/d64" in capsys.readouterr().out
    assert main(["fits", str(target), "--method", "loglog-means", "--max-d-osc", "32", "--n-boot", str(N_BOOT),
                 "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert round(row["alpha"], 3) == 0.420 and round(row["C"], 2) == 15.17
    assert main(["predict", str(target), "--task", "wikitext2", "--variant", "oscillator", "--d-osc", "64",
                 "--max-d-osc", "32", "--method", "loglog-means", "--n-boot", str(N_BOOT), "--format", "json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["value"], 2) == 2.64
    assert main(["report", str(target), "--n-boot", str(N_BOOT)]) == 0
    assert "paper A, WikiText-2" in (target / "report.md").read_text()


def test_http_api_serves_an_imported_study(paper_a):
    pytest.importorskip("fastapi", reason="scaling serve needs fastapi")
    from fastapi.testclient import TestClient

    from scaling.server import create_app

    token = "import-test-token-0123456789"
    client = TestClient(create_app(str(Path(paper_a.storage).parent), token, read_only=True))
    auth = {"Authorization": f"Bearer {token}"}
    listed = client.get("/studies", headers=auth).json()
    assert [s["name"] for s in listed] == ["paper_a_wt2"] and listed[0]["tasks"] == ["wikitext2"]
    assert client.get("/studies/paper_a_wt2", headers=auth).json()["totals"]["completed"] == 40
    assert len(client.get("/studies/paper_a_wt2/trials", headers=auth, params={"limit": 5}).json()) == 5
    predicted = client.get("/studies/paper_a_wt2/predict", headers=auth, params={
        "task": "wikitext2", "variant": "oscillator", "d_osc": 64, "max_d_osc": 32, "method": "loglog-means",
        "n_boot": N_BOOT})
    assert predicted.status_code == 200 and round(predicted.json()["value"], 2) == 2.64


# ---- bring your own: options ------------------------------------------------------------------

def _csv(tmp_path: Path, text: str, name: str = "results.csv") -> Path:
    path = tmp_path / name
    path.write_text(text.strip() + "\n")
    return path


GOOD = """
task,variant,d_osc,target_params,seed,metric,value
lm,mha,,1000000,0,val_accuracy,0.90
lm,mha,,1000000,1,val_accuracy,0.91
lm,kuramoto,2,1000000,0,val_accuracy,0.70
lm,kuramoto,2,1000000,1,val_accuracy,0.72
lm,kuramoto,4,1000000,0,val_accuracy,0.80
lm,kuramoto,4,1000000,1,val_accuracy,nan
lm,kuramoto,8,1000000,0,val_accuracy,0.85
lm,kuramoto,8,1000000,1,val_accuracy,0.86
lm,kuramoto,8,1000000,1,val_loss,0.5
"""


def test_any_task_custom_baseline_target_params_metric_filter_and_diverged_rows(tmp_path):
    summary = import_results(_csv(tmp_path, GOOD), tmp_path / "mine", baseline="mha", metric="val_accuracy",
                             higher_is_better=True)
    assert summary.rows == 8 and summary.diverged == 1 and summary.variants == {"lm": {"mha": [], "kuramoto": [2, 4, 8]}}
    study = api.open_study(summary.storage)
    assert study.baseline == "mha" and study.config["tasks"] == [{"name": "lm", "metric": "val_accuracy",
                                                                  "lower_is_better": False}]
    assert study.config["target_params"] == [1_000_000]
    diverged = [r for r in study.rows if r["status"] == "diverged"]
    assert len(diverged) == 1 and diverged[0]["cell"] == "lm/kuramoto/d4/N1000000"
    assert {r["params_non_embedding"] for r in study.rows} == {1_000_000}
    [fit] = api.fits(study, law="gap_vs_dosc", method="nonlinear", n_boot=N_BOOT)
    means = [p["mean"] for p in fit.points]  # higher is better: gap = mha - kuramoto, shrinking with d_osc
    assert all(m > 0 for m in means) and means == sorted(means, reverse=True)
    assert fit.ok or fit.reason  # 2 seeds of 3 d_osc: identified or not, it says which


def test_parquet_round_trip_gives_the_same_study_and_keys(paper_a, tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(PAPER_A_CSV, convert_options=pacsv.ConvertOptions(
        column_types={"d_osc": pa.int64(), "seed": pa.int64(), "value": pa.float64()}))
    assert table.column("d_osc").null_count == 5  # the baseline's empty d_osc
    pq.write_table(table, tmp_path / "wt2.parquet")
    # a float d_osc column with NaN for the baseline (how pandas writes it) reads the same
    floats = table.set_column(2, "d_osc", pa.array([float("nan") if v is None else float(v)
                                                    for v in table.column("d_osc").to_pylist()]))
    pq.write_table(floats, tmp_path / "wt2_floats.pq")

    for name in ("wt2.parquet", "wt2_floats.pq"):
        study = api.open_study(import_results(tmp_path / name, tmp_path / f"from_{name.split('.')[0]}").storage)
        assert study.config["imported"]["format"] == "parquet"
        fields = ("key", "cell", "d_osc", "seed", "metric_name", "metric_value", "status")
        assert sorted(tuple(r[f] for f in fields) for r in study.rows) == \
            sorted(tuple(r[f] for f in fields) for r in paper_a.rows)  # keys too: stable across imports


# ---- validation: every error names the row or column and the fix; nothing is written ------------

HEADER = "task,variant,d_osc,seed,metric,value\n"
BAD = {
    "missing column": ("task,variant,seed,metric,value\nlm,softmax,0,loss,1.0",
                       ["missing required column(s) ['d_osc']"]),
    "unknown column": (HEADER.strip() + ",target_param\nlm,softmax,,0,loss,1.0,5",
                       ["unknown column 'target_param'", "did you mean 'target_params'"]),
    "non-numeric value": (HEADER + "lm,softmax,,0,loss,1.0\nlm,oscillator,2,0,loss,abc",
                          ["line 3: value='abc' is not a number"]),
    "empty value": (HEADER + "lm,softmax,,0,loss,", ["line 2: value is empty"]),
    "non-integer seed": (HEADER + "lm,softmax,,0,loss,1.0\nlm,softmax,,1.5,loss,1.0",
                         ["line 3: seed='1.5' is not an integer"]),
    "d_osc missing": (HEADER + "lm,softmax,,0,loss,1.0\nlm,oscillator,,0,loss,1.2",
                      ["line 3: variant 'oscillator' has no d_osc", "--baseline oscillator"]),
    "d_osc for the baseline": (HEADER + "lm,softmax,2,0,loss,1.0",
                               ["line 2: d_osc='2' given for the baseline variant 'softmax'", "leave d_osc empty"]),
    "fractional d_osc": (HEADER + "lm,oscillator,2.5,0,loss,1.0", ["line 2: d_osc='2.5' is not a whole number"]),
    "duplicate": (HEADER + "lm,softmax,,0,loss,1.0\nlm,oscillator,2,0,loss,1.2\nlm,oscillator,2,0,loss,1.3",
                  ["line 4 repeats line 3", "d_osc=2", "seed=0", "keep one row per cell, seed and metric"]),
    "several metrics": (HEADER + "lm,softmax,,0,loss,1.0\nlm,softmax,,0,accuracy,0.5",
                        ["task 'lm' has several metrics", "--metric"]),
    "bad task name": (HEADER + "lm/x,softmax,,0,loss,1.0", ["line 2: task='lm/x'"]),
    "ragged line": (HEADER + "lm,softmax,,0,loss", ["line 2: 5 field(s) but the header has 6"]),
    "no rows": (HEADER, ["no data rows"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_row_and_fix_and_writes_nothing(tmp_path, case):
    text, expected = BAD[case]
    source = tmp_path / "in" / "results.csv"
    source.parent.mkdir()
    source.write_text(text + "\n")
    out = tmp_path / "out"
    with pytest.raises(ResultsImportError) as error:
        import_results(source, out / "study")
    for fragment in expected:
        assert fragment in str(error.value), (fragment, str(error.value))
    assert not out.exists()


def test_every_problem_is_listed_at_once_and_the_cli_exits_2(tmp_path, capsys):
    source = _csv(tmp_path, HEADER + "lm,softmax,1,x,loss,abc\nlm,oscillator,,0,loss,1.0")
    assert main(["import", str(source), "--into", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s); nothing was written" in err
    assert all(f in err for f in ("line 2: d_osc", "line 2: seed", "line 2: value", "line 3: variant"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_direction_that_contradicts_the_metric_name_is_refused(tmp_path):
    with pytest.raises(ResultsImportError, match="'val_ppl' reads as lower-is-better.*--higher-is-better"):
        import_results(PAPER_A_CSV, tmp_path / "study", higher_is_better=True)
    with pytest.raises(ResultsImportError, match="--metric 'val_loss': no row has that metric; the table has"):
        import_results(PAPER_A_CSV, tmp_path / "study", metric="val_loss")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_holding_a_study_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "study"
    import_results(PAPER_A_CSV, target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    with pytest.raises(ResultsImportError, match="already holds a study"):
        import_results(PAPER_A_CSV, target)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    with pytest.raises(ResultsImportError, match="study name 'bad name'.*--name"):
        import_results(PAPER_A_CSV, tmp_path / "bad name")
    # an existing directory without a study (e.g. made beforehand) is filled
    (tmp_path / "empty").mkdir()
    assert api.open_study(import_results(PAPER_A_CSV, tmp_path / "empty").storage).name == "empty"


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from storage import fs as sfs

    real = sfs.write_bytes_atomic

    def failing(fs, path, data):  # the ledger part is written half, then the disk is full
        real(fs, path + ".tmp-0000dead", data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(sfs, "write_bytes_atomic", failing)
    with pytest.raises(OSError, match="disk full"):
        import_results(PAPER_A_CSV, tmp_path / "study")
    assert list(tmp_path.iterdir()) == []
