"""The `scaling` command line on synthetic studies (no training) and on bad input."""

from __future__ import annotations

import json

import yaml

from conftest import write_synthetic_study
from scaling.cli import main


def test_bad_study_file_exits_2_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "tasks": [{"name": "mqar"}], "seeds": [],
                                   "variants": [{"name": "softmax"}, {"name": "oscillator", "d_osc": [0]}]}))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "seeds: is empty" in err and "variants[1].d_osc" in err and "nothing was run" in err
    assert not (tmp_path / "runs").exists()


def test_status_fits_report_on_a_study_dir(tmp_path, capsys):
    storage = write_synthetic_study(tmp_path / "s")
    assert main(["status", str(storage)]) == 0
    assert "lm/oscillator/d32" in capsys.readouterr().out
    assert main(["fits", str(storage), "--format", "csv"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[:2]
    assert header.startswith("study,task,law") and ",gap_vs_dosc," in row
    assert main(["predict", str(storage), "--task", "lm", "--variant", "oscillator", "--d-osc", "64", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["d_osc"] == 64
    assert main(["report", str(storage)]) == 0
    assert (storage / "report.html").read_text().count("data:image/png;base64,") == 1


def test_unknown_study_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "run it first with `scaling run STUDY.yaml`" in capsys.readouterr().err
