"""A study file that cannot run is refused before anything heavy loads: the field, the bad value,
the allowed values and the fix; nothing written, no Ray started. Then the resource check that runs
before Ray starts: a trial this machine cannot hold is refused with the numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import tiny_study_dict
from studies.spec import StudyError, check_can_run, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]


def _error(tmp_path, **overrides) -> str:
    with pytest.raises(StudyError) as info:
        parse_study(tiny_study_dict(tmp_path, **overrides), "study.yaml")
    return str(info.value)


def _load_error(path: Path) -> str:
    with pytest.raises(StudyError) as info:
        load_study(path)
    return str(info.value)


# ---- the file itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_file_says_it_is_empty(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    message = _load_error(path)
    assert "is empty" in message and "name:, tasks:, variants: and seeds:" in message
    assert "studies/examples/quickstart.yaml" in message


@pytest.mark.parametrize("text, kind", [("- name: x\n- seeds: [0]\n", "a list (YAML sequence)"), ("just words\n", "a single string"),
                                        ("42\n", "a single number")])
def test_a_file_that_is_not_a_mapping_says_what_it_holds(tmp_path, text, kind):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    message = _load_error(path)
    assert f"holds {kind}, not a mapping" in message and "nothing was run" in message


# ---- storage ------------------------------------------------------------------------------------

def test_storage_that_is_a_file_names_the_field(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    message = _error(tmp_path, storage=str(a_file))
    assert f"storage: {a_file} is a file, not a directory" in message and "give a directory" in message
    message = _error(tmp_path, storage=str(a_file / "below"))
    assert f"storage: {a_file / 'below'} cannot be created: {a_file} is a file" in message


def test_default_storage_under_a_file_names_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the default storage's parent should be")
    data = tiny_study_dict(tmp_path)
    del data["storage"]
    with pytest.raises(StudyError, match=r"storage \(default runs/tiny\): .* cannot be created: .*runs is a file"):
        parse_study(data)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc (a directory nobody can write)")
def test_storage_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    study = parse_study(tiny_study_dict(tmp_path, storage="/proc/scaling-cannot-write-here"))  # valid as a file
    with pytest.raises(StudyError, match=r"storage: /proc/scaling-cannot-write-here is not writable"):
        check_can_run(study)
    check_can_run(parse_study(tiny_study_dict(tmp_path)))  # a writable one passes
    assert not (tmp_path / "study").exists()  # the probe left nothing


# ---- values no machine can run -----------------------------------------------------------------

@pytest.mark.parametrize("overrides, where, limit", [
    ({"train": {"steps": 10, "batch_size": 10**12}}, "train.batch_size", "1,048,576"),
    ({"train": {"steps": 10, "batch_size": 1.0e12}}, "train.batch_size", "1,048,576"),  # YAML's 1.0e12 is a float
    ({"train": {"steps": 10**12}}, "train.steps", "1,000,000,000"),
    ({"model": {"d_model": 64, "n_layers": 100_000, "n_heads": 2, "d_ff": 64}}, "model.n_layers", "1,024"),
    ({"model": {"d_model": 2**20, "n_heads": 2}}, "model.d_model", "65,536"),
    ({"model": {"d_ff": 2**30}}, "model.d_ff", "1,048,576"),
])
def test_absurd_sizes_are_refused_naming_field_value_and_limit(tmp_path, overrides, where, limit):
    message = _error(tmp_path, **overrides)
    assert f"{where}: must be at most {limit}" in message and "lower it" in message and "(got " in message


def test_absurd_d_osc_seed_and_target_params(tmp_path):
    assert "are > 65,536" in _error(tmp_path, variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2, 10**9]}])
    assert "seeds must be whole numbers from 0 to 4,294,967,295" in _error(tmp_path, seeds=[0, 2**40])
    assert "from 1.0e3 to 1.0e+12" in _error(tmp_path, target_params=[1e6, 1e15], model={})


def test_yaml_scientific_notation_without_a_dot_is_explained(tmp_path):
    path = tmp_path / "study.yaml"
    text = yaml.safe_dump(tiny_study_dict(tmp_path)).replace("batch_size: 16", "batch_size: 1e12")
    path.write_text(text)
    message = _load_error(path)
    assert "train.batch_size" in message and "YAML reads 1e12 as text: write it with a dot, e.g. 1.0e12" in message


def test_task_option_values_are_checked_with_the_file(tmp_path):
    message = _error(tmp_path, tasks=[{"name": "mqar", "options": {"num_pairs": -3}}])
    assert "tasks[0]: mqar: num_pairs=-3 must be a whole number from 1 to 4,096" in message
    message = _error(tmp_path, tasks=[{"name": "mqar", "options": {"num_pairs": 9, "num_keys": 8}}])
    assert "need num_queries <= num_pairs <= num_keys" in message


def test_a_huge_bad_value_is_quoted_short(tmp_path):
    message = _error(tmp_path, model={"positions": "x" * 100_000})
    assert "model.positions" in message and len(message) < 1000 and "100,002 characters" in message


# ---- before any heavy import --------------------------------------------------------------------

def _cli(tmp_path, study_text: str, command: str = "run") -> subprocess.CompletedProcess:
    """`scaling COMMAND FILE` in a fresh interpreter; it fails unless torch and ray stayed unloaded."""
    path = tmp_path / "bad.yaml"
    path.write_text(study_text)
    code = textwrap.dedent(f"""
        import sys
        from scaling.cli import main
        rc = main([{command!r}, {str(path)!r}])
        heavy = [m for m in ("torch", "ray", "optuna", "wandb") if m in sys.modules]
        assert not heavy, heavy
        sys.exit(rc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("command", ["run", "plan", "submit"])
def test_bad_files_are_refused_without_loading_torch_or_ray(tmp_path, command):
    bad = dict(tiny_study_dict(tmp_path), variants=[{"name": "softmax"}, {"name": "linear"}])
    done = _cli(tmp_path, yaml.safe_dump(bad), command)
    assert done.returncode == 2, done.stderr
    assert "variants[1]: unknown variant 'linear'; allowed: ['kuramoto', 'oscillator', 'softmax']" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_storage_problems_and_empty_files_are_refused_at_once_by_run(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    done = _cli(tmp_path, yaml.safe_dump(tiny_study_dict(tmp_path, storage=str(a_file))))
    assert done.returncode == 2 and f"storage: {a_file} is a file" in done.stderr and "Traceback" not in done.stderr
    done = _cli(tmp_path, "")
    assert done.returncode == 2 and "is empty" in done.stderr
    if Path("/proc/self").exists():
        done = _cli(tmp_path, yaml.safe_dump(tiny_study_dict(tmp_path, storage="/proc/scaling-nope")))
        assert done.returncode == 2 and "storage: /proc/scaling-nope is not writable" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "bad.yaml"]


def test_every_shipped_study_file_still_validates_without_torch():
    code = ("import sys, glob; from studies.spec import load_study; "
            "[load_study(p) for p in sorted(glob.glob('studies/examples/*.yaml') + glob.glob('studies/presets/**/*.yaml', recursive=True))]; "
            "heavy = [m for m in ('torch', 'ray') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- the resource check before Ray starts --------------------------------------------------------

def test_memory_estimate_grows_with_batch_and_shape():
    from studies.resources import estimate

    small = estimate(params=10_000, d_model=32, n_layers=1, n_heads=2, d_ff=32, batch_size=16, seq_len=10,
                     outputs_per_example=10 * 100)
    big = estimate(params=10_000, d_model=32, n_layers=1, n_heads=2, d_ff=32, batch_size=16_000, seq_len=10,
                   outputs_per_example=10 * 100)
    assert small.state_bytes == 16 * 10_000
    assert big.activation_bytes == 1000 * small.activation_bytes and big.output_bytes == 1000 * small.output_bytes
    assert "per trial" in big.describe() and "batch 16,000 x 10 tokens" in big.describe()


def test_a_trial_bigger_than_the_node_is_refused_with_the_numbers(tmp_path, monkeypatch):
    from studies import resources
    from studies.plan import make_plan

    study = parse_study(tiny_study_dict(tmp_path, train={"steps": 10, "batch_size": 1_000_000}))
    monkeypatch.setattr(resources, "node_memory_bytes", lambda: 2**30)  # a 1 GiB node
    with pytest.raises(StudyError) as info:
        resources.check_resources(study, make_plan(study), address=None, num_cpus=2)
    message = str(info.value)
    assert "need more memory per trial than this machine's memory (1.0 GiB)" in message
    assert "mqar/softmax: about" in message and "batch 1,000,000 x" in message and "GiB" in message
    assert "lower train.batch_size" in message
    assert resources.check_resources(study, make_plan(study), address="ray://elsewhere:10001", num_cpus=2) == []
    fine = parse_study(tiny_study_dict(tmp_path))
    assert all(m.total_bytes < 2**30 for m in resources.check_resources(fine, make_plan(fine), address=None, num_cpus=2))


def test_more_cpus_or_gpus_than_the_local_ray_has_are_refused(tmp_path):
    from studies.plan import make_plan
    from studies.resources import check_resources

    study = parse_study(tiny_study_dict(tmp_path, resources={"cpus_per_trial": 64}))
    with pytest.raises(StudyError, match=r"resources.cpus_per_trial: 64 CPUs per trial, but the local Ray has 2"):
        check_resources(study, make_plan(study), address=None, num_cpus=2)
    import torch

    if not torch.cuda.is_available():
        study = parse_study(tiny_study_dict(tmp_path, resources={"gpus_per_trial": 1}))
        with pytest.raises(StudyError, match=r"resources.gpus_per_trial: 1 GPUs per trial, but this machine has 0"):
            check_resources(study, make_plan(study), address=None, num_cpus=2)


def test_run_study_refuses_before_writing_or_starting_ray(tmp_path, monkeypatch):
    from studies import resources, runner

    study = parse_study(tiny_study_dict(tmp_path, train={"steps": 10, "batch_size": 1_000_000}))
    monkeypatch.setattr(resources, "node_memory_bytes", lambda: 2**30)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(runner, "_init_ray", no_ray)
    with pytest.raises(StudyError, match="need more memory per trial"):
        runner.run_study(study, num_cpus=2, progress=False, report=False)
    assert not (tmp_path / "study").exists()  # no study.yaml, no plan.json, no ledger


def test_run_study_checks_then_writes_then_runs(tmp_path, monkeypatch):
    """The happy path in order, with the Ray part replaced: checked, then the study's files, then trials."""
    from studies import runner

    study = parse_study(tiny_study_dict(tmp_path))
    calls = []
    monkeypatch.setattr(runner, "check_resources", lambda *a, **k: calls.append("check") or [])
    monkeypatch.setattr(runner, "run_trials", lambda *a, **k: calls.append(
        ("trials", (tmp_path / "study" / "study.yaml").exists(), (tmp_path / "study" / "plan.json").exists())))
    runner.run_study(study, num_cpus=2, progress=False, report=False)
    assert calls == ["check", ("trials", True, True)]
