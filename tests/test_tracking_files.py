"""W&B offline files as researchers sync them, and a running trial's progress as `scaling status` and
`scaling logs --trial` show it (no Ray; W&B offline, read back from its run files)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import tiny_spec


def _closed(run_dir: str) -> dict:
    """The run file once W&B's service has written its exit record (finish() can return before)."""
    import time

    from studies import wandb_files

    deadline = time.monotonic() + 30
    while True:
        run = wandb_files.read_run(wandb_files.run_file(run_dir))
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def test_resumed_trial_logs_under_its_id_and_header_only_attempts_are_removed(tmp_path, monkeypatch):
    import wandb

    from studies import tracking, wandb_files
    from studies.spec import WandbEntry

    monkeypatch.delenv("WANDB_MODE", raising=False)
    spec = tiny_spec(variant="oscillator", variant_options={"d_osc": 4})
    wandb_dir = str(tmp_path / "wandb")
    os.makedirs(wandb_dir)
    cfg = WandbEntry(mode="offline")
    run_id = tracking.run_id(spec.study, spec.key)
    # an attempt killed after W&B started and before it logged a row: a header-only run
    wandb.init(id=run_id, project="p", dir=wandb_dir, mode="offline", settings=wandb.Settings(silent=True)).finish()
    (empty,) = wandb_files.offline_runs(wandb_dir, run_id)
    # an earlier attempt: W&B names run directories by the second, and this one must not share the
    # next attempt's directory (two attempts within one second are one directory to W&B)
    earlier = os.path.join(os.path.dirname(empty), "offline-run-20000101_000000-" + run_id)
    os.rename(empty, earlier)
    empty = earlier
    assert not wandb_files.read_run(wandb_files.run_file(empty))["history"]

    tracker = tracking.TrialTracker(spec, cfg, wandb_dir)
    tracker.configure({"params_total": 1234, "params_non_embedding": 1000, "train_flops": 5e9, "total_steps": 40})
    assert not tracker.started  # nothing opened until there is a row to write
    for step in (10, 20):
        tracker.log({"train_loss": 1.0 / step, "lr": 0.01, "grad_norm": 0.5, "tokens_per_s": 1e4}, step=step)
    tracker.interrupted(20)
    (first,) = wandb_files.offline_runs(wandb_dir, run_id)  # the header-only attempt is gone
    assert first != empty
    run = _closed(first)
    assert [h["_step"] for h in run["history"]] == [10, 20] and run["preempting"] and run["exit_code"] == 1
    moved = os.path.join(os.path.dirname(first), "offline-run-20000101_000001-" + run_id)  # as above: an earlier second
    os.rename(first, moved)
    first = moved
    assert run["config"]["d_osc"] == 4 and run["config"]["params_total"] == 1234 and run["config"]["target_params"] is None

    resumed = tracking.TrialTracker(spec, cfg, wandb_dir)  # the next attempt, from the checkpoint at 20
    resumed.log({"train_loss": 0.01, "lr": 0.01, "grad_norm": 0.4, "tokens_per_s": 1e4}, step=30)
    resumed.finish({"status": "completed"}, exit_code=0)
    runs = wandb_files.offline_runs(wandb_dir, run_id)
    assert len(runs) == 2 and runs[0] == first  # both attempts hold rows: `wandb sync` resumes one run
    second = _closed(runs[1])
    assert second["id"] == run_id and [h["_step"] for h in second["history"]] == [30]
    assert second["summary"]["status"] == "completed"


@pytest.mark.parametrize("env, key, expected", [("offline", "k", "offline"), ("disabled", "k", "disabled"),
                                                ("", "k", "online"), ("", None, "offline")])
def test_auto_mode_respects_wandb_mode(monkeypatch, env, key, expected):
    from studies import tracking
    from studies.spec import WandbEntry

    monkeypatch.setenv("WANDB_MODE", env)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.resolve_mode(WandbEntry(mode="auto")) == expected
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'.*allowed"):
        tracking.resolve_mode(WandbEntry(mode="auto"))


def test_status_and_logs_show_a_running_trial(tmp_path, capsys):
    from scaling.cli import main
    from workers.lifecycle import TrialProgress

    storage = tmp_path / "study"
    storage.mkdir()
    key = "mqar-softmax-s0-0123456789ab"
    (storage / "study.yaml").write_text("name: tiny\nbaseline: softmax\n")
    (storage / "plan.json").write_text(json.dumps([{"key": key, "cell": "mqar/softmax", "task": "mqar",
                                                    "variant": "softmax", "d_osc": None, "seed": 0}]))
    progress = TrialProgress(str(storage), key, node_id="ab" * 28, info={"cell": "mqar/softmax"})
    progress.say("start on test")
    progress.update(force=True, state="running", step=400, total_steps=600, metric="val_loss",
                    latest={"val_loss": 0.61, "eval_step": 400, "train_loss": 0.53})
    assert main(["status", str(storage)]) == 0
    out = capsys.readouterr().out
    assert f"{key}  running  step 400/600 (67%)  val_loss 0.61 (step 400)  train_loss 0.53" in out
    assert "(node abababab)" in out
    assert main(["status", str(storage), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["totals"]["in_progress"] == 1 and summary["in_progress_trials"][0]["step"] == 400
    assert main(["logs", str(storage), "--trial", key[:20]]) == 0  # a unique prefix will do
    assert "start on test" in capsys.readouterr().out
    assert main(["logs", str(storage), "--trial", "mqar-sofmax"]) == 2
    assert f"did you mean: {key}" in capsys.readouterr().err
