"""`scaling submit / status / logs / cancel` against a real Ray head with its job server (local)."""

from __future__ import annotations

import os
import pathlib
import socket
import sys
import time

import pytest
import yaml

from conftest import tiny_study_dict

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(monkeypatch):
    import ray

    # the job's driver must find this interpreter's `python` with the project installed
    monkeypatch.setenv("PATH", f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()


def _wait(job_id, address, states, timeout=240):
    from studies import remote

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = remote.job_status(job_id, address)["status"]
        if status in states:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s: {remote.logs(job_id, address)[-3000:]}")


def test_submit_watch_and_cancel(ray_head, tmp_path, capsys):
    from scaling.cli import main
    from storage.ledger import Ledger
    from studies import remote
    from studies.spec import load_study

    study_dir = tmp_path / "studies"
    study_dir.mkdir(parents=True, exist_ok=True)
    data = tiny_study_dict(tmp_path, name="remote-tiny", storage=str(tmp_path / "remote-tiny"),
                           variants=[{"name": "softmax"}], seeds=[0, 1])
    path = study_dir / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    job_id = remote.submit(study, str(path), address=ray_head, working_dir=str(ROOT))
    assert _wait(job_id, ray_head, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", remote.logs(job_id, ray_head)
    assert len(Ledger(study.storage_uri()).keys()) == 2
    assert main(["status", job_id, "--address", ray_head]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["logs", job_id, "--address", ray_head]) == 0
    assert "study remote-tiny: 2 planned" in capsys.readouterr().out

    long = tiny_study_dict(tmp_path, name="remote-long", storage=str(tmp_path / "long"),
                           train={**data["train"], "steps": 100000, "eval_every": 1000})
    path.write_text(yaml.safe_dump(long))
    job_id = remote.submit(load_study(path), str(path), address=ray_head, working_dir=str(ROOT))
    _wait(job_id, ray_head, {"RUNNING"})
    assert main(["cancel", job_id, "--address", ray_head]) == 0
    assert _wait(job_id, ray_head, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    with pytest.raises(ValueError, match="secrets are not shipped"):
        remote.submit(study, str(path), address=ray_head, working_dir=str(ROOT), forward_env=("WANDB_API_KEY",))
    relative = load_study(path).model_copy(update={"storage": "runs/x"})
    with pytest.raises(ValueError, match="needs an absolute shared path"):
        remote.submit(relative, str(path), address=ray_head)
