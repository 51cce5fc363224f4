"""Operating studies from the CLI without a cluster: what `scaling submit` would ship (as Ray packs
it) and its size check, the Ray token options, `scaling studies`, studies by name, "did you mean",
and a `scaling plan` that builds nothing and splits done from remaining cost. No Ray is started."""

from __future__ import annotations

import json
import os
import stat
import zipfile

import pytest
import yaml

from conftest import TINY_MQAR, make_record, tiny_study_dict, write_synthetic_study
from scaling.cli import main


# ---- scaling submit: the package --------------------------------------------------------------

def _tree(root):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "code.py").write_text("x = 1\n")
    (root / "pkg" / ".gitignore").write_text("*.log\n")
    (root / "pkg" / "run.log").write_text("noise")
    (root / "data").mkdir()
    (root / "data" / "shard.bin").write_bytes(b"\0" * 4096)
    (root / ".rayignore").write_text("data/\n")
    (root / "notes.tmp").write_text("scratch")
    (root / "empty").mkdir()
    (root / "runs" / "old").mkdir(parents=True)  # in remote.EXCLUDES
    (root / "runs" / "old" / "ledger.parquet").write_bytes(b"\0" * 100)
    (root / "study.yaml").write_text("name: x\n")
    return root


def test_package_is_what_ray_zips(tmp_path):
    """Same files and the same byte size as Ray's own package of the directory (its ignore files
    at every level, the default excludes and --exclude patterns)."""
    from ray._private.runtime_env.packaging import create_package

    from studies import remote

    root = _tree(tmp_path / "wd")
    patterns = [*remote.EXCLUDES, "*.tmp"]
    package = remote.working_dir_package(str(root), patterns)
    names = sorted(name for name, _ in package.files)
    assert names == [".rayignore", "empty/", "pkg/.gitignore", "pkg/code.py", "study.yaml"]
    assert sorted(package.ignore_files) == [".rayignore", "pkg/.gitignore"]
    zipped = tmp_path / "ray.zip"
    create_package(str(root), zipped, include_gitignore=True, excludes=patterns)
    assert sorted(zipfile.ZipFile(zipped).namelist()) == names
    assert package.bytes == zipped.stat().st_size


def test_submit_refuses_a_package_over_rays_limit_before_connecting(tmp_path, capsys, monkeypatch):
    """A sparse 101 MiB file (no disk used): refused with the size, the limit, the largest entry and
    the fix, before any connection (the address is a closed port); excluded, submit goes on to
    connect and says the address cannot be reached, without a traceback."""
    from studies import remote

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "wd"
    (root / "weights").mkdir(parents=True)
    with open(root / "weights" / "model.pt", "wb") as f:
        f.truncate(101 * 2**20)
    (root / "code.py").write_text("x = 1\n")
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study_dict(tmp_path, storage=str(tmp_path / "shared" / "tiny"))))
    limit, _ = remote.upload_limit()
    assert limit == 100 * 2**20  # Ray 2.60: the dashboard's request size limit
    args = ["submit", str(study), "--address", "http://127.0.0.1:9", "--working-dir", str(root)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--working-dir {root}: the package Ray would upload is 101.0 MiB (3 files), over Ray's limit of 100.0 MiB" in err
    assert "nothing was submitted" in err and "101.0 MiB  weights/ (1 files)" in err
    assert ".rayignore" in err and "--exclude PATTERN" in err
    assert main([*args, "--exclude", "weights/"]) == 2
    out, err = capsys.readouterr()
    assert "working directory" in out and "2 files" in out  # code.py and study.yaml
    assert "--address http://127.0.0.1:9: cannot reach a Ray job API there" in err and "Traceback" not in err


# ---- token authentication ---------------------------------------------------------------------

@pytest.fixture
def token_env(monkeypatch, tmp_path):
    """No token anywhere, HOME in tmp (no ~/.ray/auth_token); afterwards Ray's in-process config
    is re-read from the restored environment, so no later test sees this test's token mode."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield monkeypatch
    monkeypatch.undo()
    import sys

    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def test_token_file_turns_token_mode_on(token_env, tmp_path):
    from studies.remote import use_token

    warnings = []
    token = tmp_path / "token"
    token.write_text("abc123\n")
    token.chmod(0o600)
    token_env.setenv("RAY_AUTH_TOKEN", "other")
    assert use_token(str(token), warn=warnings.append) == f"--token-file {token}"
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert "RAY_AUTH_TOKEN" not in os.environ  # Ray reads it before the file: the file given wins
    assert warnings == []
    token.chmod(0o644)
    use_token(str(token), warn=warnings.append)
    assert len(warnings) == 1 and "can be read by other users" in warnings[0] and f"chmod 600 {token}" in warnings[0]


@pytest.mark.parametrize("content, problem", [(None, "no such file"), ("", "the file is empty"), ("dir", "not a file")])
def test_bad_token_file_names_the_option(token_env, tmp_path, content, problem):
    from studies.remote import use_token

    path = tmp_path / "token"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--token-file {path}: {problem}"):
        use_token(str(path))
    assert "RAY_AUTH_MODE" not in os.environ


def test_token_from_env_and_fallback_warning(token_env, tmp_path):
    from studies.remote import use_token

    warnings = []
    assert use_token(None, warn=warnings.append) is None and "RAY_AUTH_MODE" not in os.environ
    fallback = tmp_path / "home" / ".ray" / "auth_token"
    fallback.parent.mkdir(parents=True)
    fallback.write_text("shared")
    assert use_token(None, warn=warnings.append) == "~/.ray/auth_token"
    assert len(warnings) == 1 and "shared by every Ray cluster and program of this account" in warnings[0]
    assert "--token-file" in warnings[0] and os.environ["RAY_AUTH_MODE"] == "token"
    token_env.setenv("RAY_AUTH_TOKEN", "t0k")
    assert use_token(None, warn=warnings.append) == "RAY_AUTH_TOKEN" and len(warnings) == 1
    token_env.delenv("RAY_AUTH_TOKEN")
    token_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH=.*missing: no such file"):
        use_token(None)
    token_env.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice is respected
    token_env.setenv("RAY_AUTH_TOKEN_PATH", str(fallback))
    fallback.chmod(stat.S_IRUSR | stat.S_IWUSR)
    use_token(None)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


# ---- studies: list, by name, did you mean -----------------------------------------------------

def test_studies_lists_counts_and_status_finds_a_study_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCALING_STUDIES_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    write_synthetic_study(tmp_path / "runs" / "gap-law", seeds=(0, 1), ds=(2, 4))
    failed = make_record(key="lm-osc-d8-s0", cell="lm/oscillator/d8", variant="oscillator", d_osc=8, status="failed",
                         task="lm")
    write_synthetic_study(tmp_path / "elsewhere" / "other", seeds=(0,), ds=(2,), extra_rows=[failed])
    (tmp_path / "runs" / "not-a-study").mkdir()
    assert main(["studies", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["gap-law"]
    assert rows[0]["completed"] == 6 and rows[0]["failed"] == 0 and rows[0]["last_finished"].startswith("2026")
    assert main(["studies", str(tmp_path / "elsewhere"), "--format", "json"]) == 0
    (other,) = json.loads(capsys.readouterr().out)
    assert (other["name"], other["completed"], other["failed"]) == ("other", 2, 1)
    assert main(["studies"]) == 0
    assert "gap-law" in capsys.readouterr().out

    assert main(["status", "gap-law", "--format", "json"]) == 0  # by name under ./runs
    assert json.loads(capsys.readouterr().out)["totals"]["completed"] == 6
    monkeypatch.setenv("SCALING_STUDIES_ROOT", str(tmp_path / "elsewhere"))
    assert main(["fits", "other", "--format", "json"]) == 0  # by name under $SCALING_STUDIES_ROOT
    capsys.readouterr()
    assert main(["status", "gap-lwa"]) == 2
    err = capsys.readouterr().err
    assert "no study of that name under" in err and "did you mean 'gap-law'?" in err and "`scaling studies`" in err


def test_did_you_mean_for_commands_choices_tasks_variants(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["stauts", "x"])
    assert exit_.value.code == 2
    assert "invalid choice: 'stauts'" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(SystemExit):
        main(["fist", "x"])
    assert "did you mean 'fits'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fits", "x", "--law", "gap_vs_dsoc"])
    assert "did you mean 'gap_vs_dosc'" in capsys.readouterr().err

    from workers.tasks import get_task

    with pytest.raises(ValueError, match=r"known tasks: .*; did you mean 'wikitext2'\?"):
        get_task("wikitext")
    storage = write_synthetic_study(tmp_path / "s")
    assert main(["predict", str(storage), "--task", "lm", "--variant", "oscilator", "--d-osc", "64"]) == 2
    assert "variant 'oscilator' is not in the study; did you mean 'oscillator'?" in capsys.readouterr().err
    assert main(["fits", str(storage), "--task", "lmm"]) == 0
    assert "task 'lmm' is not in the study; did you mean 'lm'?" in capsys.readouterr().out


# ---- scaling plan: builds nothing, done vs remaining ------------------------------------------

def test_plan_builds_nothing_and_splits_done_from_remaining(tmp_path, capsys):
    from storage.ledger import Ledger
    from studies.plan import make_plan
    from studies.spec import parse_study

    data = tiny_study_dict(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2]}], seeds=[0, 1],
                           tasks=[{"name": "mqar", "options": {**TINY_MQAR, "train_examples": 200}}])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "study").exists()  # nothing built or written
    assert "data not cached yet" in out and "to run:  4 trial(s)" in out
    assert f"`scaling cache build --study {path}` prepares them" in out

    assert main(["cache", "build", "--study", str(path)]) == 0
    study = parse_study(data)
    plan = make_plan(study)
    ledger = Ledger(study.storage_uri())
    for trial in plan.trials[:2]:  # softmax, seeds 0 and 1: finished, 2e8 FLOPs in 10 s each
        ledger.append(make_record(key=trial.key, cell=trial.cell, task="mqar", variant=trial.variant, seed=trial.seed,
                                  flops=2e8, wall_seconds=10.0))
    capsys.readouterr()
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "done:    2 trial(s) in the ledger" in out and "20s of measured trial time" in out
    assert "to run:  2 trial(s)" in out
    softmax = next(line for line in out.splitlines() if "mqar/softmax" in line and "│" in line)
    cells = [c.strip() for c in softmax.split("│")]
    assert cells[2:5] == ["2", "2", "0"] and cells[8] == "0s"  # trials, done, to run, est. time to run
    assert "estimated wall time to finish:" in out and "on 2 concurrent trial slot(s)" in out
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["ledger"]  # plan wrote nothing


def test_plan_of_a_sized_study_needs_the_cache_and_says_so(tmp_path, capsys):
    data = tiny_study_dict(tmp_path, target_params=[20000])
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert "sizes its models to target_params" in err and f"scaling cache build --study {path}" in err
    assert not (tmp_path / "cache").exists()
