"""scaling.server: authentication, validated names, read-only queries, submission, and a
property-based fuzz of the OpenAPI document (schemathesis) that must never see a 5xx."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi", reason="scaling serve needs fastapi (pip install -e '.[dev]')")
from fastapi.testclient import TestClient  # noqa: E402

from scaling import synthetic  # noqa: E402
from scaling.server import SubprocessRunner, create_app  # noqa: E402

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def write_study(directory: Path, rows, name: str, description: str = "") -> Path:
    import yaml

    from storage.ledger import Ledger
    from storage.records import TrialRecord

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "study.yaml").write_text(yaml.safe_dump({"name": name, "description": description, "baseline": "softmax"}))
    ledger = Ledger(str(directory))
    for row in rows:
        ledger.append(TrialRecord(**{**row, "study": name}))
    return directory


def make_root(root: Path) -> Path:
    rows = synthetic.gap_study_rows(ds=(2, 4, 8, 16), seeds=range(3))
    rows.append({**rows[1], "key": "lm-osc-diverged", "seed": 9, "status": "diverged", "metric_value": None})
    write_study(root / "demo", rows, "demo", "a synthetic gap study")
    write_study(root / "grid", synthetic.scaling_grid_rows(tasks=("lm",), variants={"softmax": None, "oscillator": [2, 4, 8, 16]},
                                                           sizes=(1_000_000, 2_000_000, 4_000_000), seeds=range(3)), "grid")
    (root / "not-a-study").mkdir()
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("studies"))


def recording_runner(tmp: Path) -> SubprocessRunner:
    """The real subprocess plumbing with a recorder in place of `scaling run`: it writes the argv it
    got, so the test sees what the runner would have been asked to run."""
    record = "import sys, json, pathlib; pathlib.Path(sys.argv[-1]).with_suffix('.argv.json').write_text(json.dumps(sys.argv))"
    return SubprocessRunner(run_argv=[sys.executable, "-c", record])


@pytest.fixture
def client(root, tmp_path) -> TestClient:
    return TestClient(create_app(str(root), TOKEN, runner=recording_runner(tmp_path)))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_healthz_needs_no_token(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("path", ["/studies", "/studies/demo", "/studies/demo/trials", "/studies/demo/fits",
                                  "/studies/demo/predict?task=lm&variant=oscillator&d_osc=64", "/studies/demo/report"])
def test_every_other_endpoint_needs_the_token(client, path):
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(path, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
    response = client.get(path, headers=AUTH)
    assert response.status_code == 200, response.text
    assert client.post("/studies", json={"study": {"name": "x"}}).status_code == 401


def test_the_server_refuses_to_start_without_a_token(root, monkeypatch):
    monkeypatch.delenv("SCALING_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="SCALING_API_TOKEN"):
        create_app(str(root))
    monkeypatch.setenv("SCALING_API_TOKEN", TOKEN)
    monkeypatch.setenv("SCALING_STUDIES_ROOT", str(root))
    assert TestClient(create_app()).get("/studies", headers=AUTH).status_code == 200


def test_list_status_trials(client):
    studies = client.get("/studies", headers=AUTH).json()
    assert [s["name"] for s in studies] == ["demo", "grid"]  # directories without a study.yaml are not studies
    status = client.get("/studies/demo", headers=AUTH).json()
    assert status["totals"]["completed"] == 15 and status["totals"]["diverged"] == 1
    trials = client.get("/studies/demo/trials", params={"status": "diverged"}, headers=AUTH).json()
    assert len(trials) == 1 and trials[0]["metric_value"] is None
    page = client.get("/studies/demo/trials", params={"limit": 2, "offset": 1}, headers=AUTH).json()
    assert len(page) == 2


def test_fits_predict_compare_report(client):
    fits = client.get("/studies/demo/fits", params={"n_boot": 200}, headers=AUTH).json()
    assert {(f["law"], f["method"]) for f in fits} == {("gap_vs_dosc", "loglog-means"), ("gap_vs_dosc", "nonlinear")}
    assert all(f["excluded_diverged"] == 1 for f in fits)
    detail = client.get("/studies/demo/fits", params={"n_boot": 200, "detail": True, "method": "nonlinear"}, headers=AUTH).json()
    assert len(detail) == 1 and len(detail[0]["points"]) == 4 and detail[0]["constants"]["alpha"]["ci_low"] is not None
    csv_text = client.get("/studies/demo/fits", params={"format": "csv", "n_boot": 200}, headers=AUTH).text
    assert csv_text.splitlines()[0].startswith("study,task,law") and len(csv_text.splitlines()) == 3
    out = client.get("/studies/demo/predict", params={"task": "lm", "variant": "oscillator", "d_osc": 64}, headers=AUTH).json()
    assert out["ci_low"] <= out["gap"] <= out["ci_high"] and out["pi_low"] <= out["ci_low"]
    loss = client.get("/studies/grid/predict", params={"task": "lm", "variant": "softmax", "params": 8e6,
                                                       "law": "loss_vs_params"}, headers=AUTH).json()
    assert loss["quantity"] == "loss" and loss["loss"] == pytest.approx(2.0 + 300.0 * 8e6**-0.35, rel=0.03)  # the generating law
    diff = client.get("/studies/grid/compare", params={"task_a": "lm", "variant_a": "oscillator", "task_b": "lm",
                                                       "variant_b": "oscillator", "law": "gap_vs_params"}, headers=AUTH)
    assert diff.status_code == 422 and "at_d_osc" in diff.json()["detail"]  # one fit per d_osc: the error says so
    diff = client.get("/studies/grid/compare", params={"task_a": "lm", "variant_a": "oscillator", "task_b": "lm",
                                                       "variant_b": "softmax", "law": "loss_vs_params", "at_d_osc": 8},
                      headers=AUTH)
    assert diff.status_code == 422  # softmax has no d_osc=8 fit
    at = {"task": "lm", "variant": "oscillator", "d_osc": 32}
    assert client.get("/studies/grid/predict", params=at, headers=AUTH).status_code == 422  # three sizes
    out = client.get("/studies/grid/predict", params={**at, "target_params": 2_000_000}, headers=AUTH).json()
    assert out["group"] == {"target_params": 2_000_000} and out["gap"] > 0
    page = client.get("/studies/demo/report", headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<img" in page.text and "Fitted constants" in page.text
    assert client.get("/studies/demo/report.md", headers=AUTH).text.startswith("# Scaling report: demo")


def test_bad_queries_are_4xx_with_a_reason(client):
    assert client.get("/studies/nope", headers=AUTH).status_code == 404
    r = client.get("/studies/demo/predict", params={"task": "lm", "variant": "kuramoto", "d_osc": 8}, headers=AUTH)
    assert r.status_code == 422 and "usable fits" in r.json()["detail"]
    r = client.get("/studies/demo/predict", params={"task": "lm", "variant": "oscillator"}, headers=AUTH)
    assert r.status_code == 422 and "exactly one of d_osc or params" in r.json()["detail"]
    assert client.get("/studies/demo/fits", params={"law": "nonsense"}, headers=AUTH).status_code == 422


@pytest.mark.parametrize("name", ["..", "../demo", "%2e%2e", "..%2F..%2Fetc", ".hidden", "a" * 65, "demo%00", "demo;rm"])
def test_study_names_cannot_leave_the_root(client, name):
    response = client.get(f"/studies/{name}", headers=AUTH)
    assert response.status_code in (404, 422), (name, response.status_code)
    assert "root" not in response.text or response.status_code == 404


def test_a_symlink_out_of_the_root_is_not_followed(root, client, tmp_path):
    outside = write_study(tmp_path / "outside", synthetic.gap_study_rows(ds=(2, 4)), "outside")
    link = root / "escape"
    link.symlink_to(outside)
    try:
        assert client.get("/studies/escape", headers=AUTH).status_code == 404
    finally:
        link.unlink()


def test_read_only_endpoints_change_nothing(client, root):
    before = snapshot(root)
    for path in ["/studies", "/studies/demo", "/studies/demo/trials", "/studies/demo/fits?n_boot=200",
                 "/studies/demo/predict?task=lm&variant=oscillator&d_osc=40", "/studies/demo/report",
                 "/studies/demo/report.md", "/studies/grid/fits?n_boot=200"]:
        assert client.get(path, headers=AUTH).status_code == 200, path
    assert snapshot(root) == before


def test_submission_is_validated_then_forwarded_to_the_runner(client, root):
    study = {"name": "submitted", "tasks": [{"name": "mqar"}], "variants": [{"name": "softmax"}], "seeds": [0]}
    response = client.post("/studies", json={"study": study}, headers=AUTH)
    assert response.status_code == 202, response.text
    body = response.json()
    study_file = Path(body["study_file"])
    assert study_file.parent == root / "submitted" / "submissions"
    import yaml

    assert yaml.safe_load(study_file.read_text())["storage"] == str(root / "submitted")
    argv_file = study_file.with_suffix(".argv.json")
    for _ in range(600):  # up to 30 s on a busy machine
        if argv_file.exists():
            break
        time.sleep(0.05)
    assert json.loads(argv_file.read_text())[-1] == str(study_file)  # the runner was handed this study file
    status = client.get("/studies/submitted", headers=AUTH)
    assert status.status_code == 404  # no study.yaml yet: the recorder does not run anything


def test_invalid_submissions_are_422_with_the_validators_message(client, root):
    assert client.post("/studies", json={"study_yaml": "name: [unclosed"}, headers=AUTH).status_code == 422
    assert client.post("/studies", json={"study": {"name": "../x"}}, headers=AUTH).status_code == 422
    assert client.post("/studies", json={}, headers=AUTH).status_code == 422
    r = client.post("/studies", json={"study": {"name": "x", "storage": "/etc"}}, headers=AUTH)
    assert r.status_code == 422 and "set by the server" in r.json()["detail"]
    # the real validator (studies.spec, in a subprocess: the server itself never imports torch)
    before = snapshot(root)
    r = client.post("/studies", json={"study_yaml": "name: badone\ntasks: [{name: mqar}]\nvariants: [{name: nosuch}]\nseeds: [0]\n"},
                    headers=AUTH)
    assert r.status_code == 422 and "unknown variant 'nosuch'" in r.json()["detail"]
    assert r.json()["detail"].startswith("not a valid study: study: 1 problem(s)")  # no temporary path
    assert snapshot(root) == before  # a rejected submission leaves nothing behind (no badone/ directory)


def test_a_running_study_cannot_be_submitted_twice(root, tmp_path):
    runner = SubprocessRunner(run_argv=[sys.executable, "-c", "import time, sys; time.sleep(30)"],
                              validate_argv=[sys.executable, "-c", "pass"])
    client = TestClient(create_app(str(root), TOKEN, runner=runner))
    study = {"study": {"name": "twice", "tasks": [], "variants": [], "seeds": [0]}}
    first = client.post("/studies", json=study, headers=AUTH)
    try:
        assert first.status_code == 202
        assert client.post("/studies", json=study, headers=AUTH).status_code == 409
        assert [s for s in client.get("/studies", headers=AUTH).json() if s["name"] == "twice"] == []
    finally:
        os.kill(first.json()["pid"], 9)
        client.app.state.processes["twice"].wait()


def test_server_process_never_imports_torch_or_ray(root):
    code = ("import sys; from fastapi.testclient import TestClient; from scaling.server import create_app; "
            f"c = TestClient(create_app({str(root)!r}, 't')); h = {{'Authorization': 'Bearer t'}}; "
            "assert c.get('/studies/demo/fits?n_boot=100', headers=h).status_code == 200; "
            "assert c.get('/studies/demo/report', headers=h).status_code == 200; "
            "bad = [m for m in ('torch', 'ray', 'optuna') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- property-based fuzz of the OpenAPI document ------------------------------------------------

schemathesis = pytest.importorskip("schemathesis", reason="the API fuzz needs schemathesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


# schemathesis's fixture-based loader does not work with pytest 9, so the fuzzed app and its
# studies are built when the module loads, in a temporary root removed at exit.
FUZZ_ROOT = make_root(Path(tempfile.mkdtemp(prefix="scaling-fuzz-")))
atexit.register(shutil.rmtree, FUZZ_ROOT, True)
# Submissions go to a runner that accepts and does nothing, so no fuzzed study ever runs; everything
# before it (body parsing, names, the storage/cache refusal, the running check) is the real code.
_fuzz_app = create_app(str(FUZZ_ROOT), TOKEN, runner=SubprocessRunner(run_argv=[sys.executable, "-c", "pass"],
                                                                      validate_argv=[sys.executable, "-c", "pass"]))
schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_openapi_no_server_errors(case):
    """Random valid and invalid requests for every operation in the OpenAPI document, with the
    token: whatever they ask, the service answers without a 5xx."""
    if case.path_parameters and "name" in case.path_parameters and case.operation.method.upper() == "GET":
        # half the cases hit a real study, so the query parameters reach the fits
        if zlib.crc32(repr(case.query).encode()) % 2 == 0:
            case.path_parameters["name"] = "demo"
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error])


def test_read_only_server_refuses_submissions_with_the_alternative(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    client = TestClient(create_app(str(root), TOKEN, runner=recording_runner(tmp_path), read_only=True))
    response = client.post("/studies", headers=AUTH, json={"study_yaml": "name: x\n"})
    assert response.status_code == 501 and "scaling submit" in response.json()["detail"]
    assert not list(root.iterdir())  # nothing written


# ---- hardening: no indirection, capped bodies, bounded queries, short errors, public routes ------

def test_a_file_under_the_root_is_never_followed(root, client, tmp_path):
    """A `*.yaml` directly in the served root does not open whatever its `storage:` names."""
    import yaml

    outside = write_study(tmp_path / "elsewhere", synthetic.gap_study_rows(ds=(2, 4)), "elsewhere")
    pointer = root / "pointer.yaml"
    pointer.write_text(yaml.safe_dump({"name": "pointer", "storage": str(outside)}))
    try:
        for path in ["/studies/pointer.yaml", "/studies/pointer.yaml/trials", "/studies/pointer.yaml/fits",
                     "/studies/pointer.yaml/report"]:
            response = client.get(path, headers=AUTH)
            assert response.status_code == 404, (path, response.status_code)
            assert str(outside) not in response.text
        assert "pointer.yaml" not in [s["name"] for s in client.get("/studies", headers=AUTH).json()]
    finally:
        pointer.unlink()


def test_request_bodies_are_capped_with_413(root, tmp_path):
    client = TestClient(create_app(str(root), TOKEN, runner=recording_runner(tmp_path), max_body_bytes=4096))
    before = snapshot(root)
    big = {"study": {"name": "huge", "description": "x" * 10_000}}
    response = client.post("/studies", json=big, headers=AUTH)
    assert response.status_code == 413 and "4,096 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/studies", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert client.get("/studies/demo", headers=AUTH).status_code == 200  # small requests unaffected
    assert snapshot(root) == before
    default = TestClient(create_app(str(root), TOKEN, runner=recording_runner(tmp_path)))
    response = default.post("/studies", json={"study": {"name": "huge", "description": "x" * 300_000}}, headers=AUTH)
    assert response.status_code == 413 and "262,144 bytes (256 KiB)" in response.json()["detail"]
    assert snapshot(root) == before


def test_rejected_submissions_leave_nothing_behind(client, root):
    before = snapshot(root)
    cases = [{"study_yaml": "name: [unclosed"}, {"study": {"name": "../x"}}, {},
             {"study": {"name": "newone", "storage": "/etc"}}, {"study": {"name": "newone", "tasks": "nope"}},
             {"study_yaml": "name: newtwo\ntasks: [{name: mqar}]\nvariants: [{name: softmax}]\nseeds: []\n"}]
    for body in cases:
        assert client.post("/studies", json=body, headers=AUTH).status_code == 422, body
    assert snapshot(root) == before
    assert not (root / "newone").exists() and not (root / "newtwo").exists()


@pytest.mark.parametrize("query", [{"d_osc": 1e-300}, {"d_osc": 1}, {"d_osc": 0}, {"d_osc": -4}, {"d_osc": 1e9},
                                   {"d_osc": "nan"}, {"d_osc": "inf"}, {"params": 10}, {"params": 1e30},
                                   {"d_osc": 8, "min_d_osc": 0.5}, {"d_osc": 8, "max_d_osc": 1e12},
                                   {"d_osc": 8, "target_params": 5}, {"d_osc": 8, "level": 2},
                                   {"d_osc": 8, "n_seeds": 0}])
def test_predict_parameters_are_bounded(client, query):
    response = client.get("/studies/demo/predict", params={"task": "lm", "variant": "oscillator", **query}, headers=AUTH)
    assert response.status_code == 422, (query, response.text[:300])


def test_predict_bounds_hold_in_python_too(root):
    from scaling import api

    study = api.open_study(str(root / "demo"))
    with pytest.raises(api.QueryError, match=r"d_osc=1e-300 is outside \[2, 65536\]"):
        api.predict(study, task="lm", variant="oscillator", d_osc=1e-300)
    out = api.predict(study, task="lm", variant="oscillator", d_osc=2, n_boot=100)
    assert out["gap"] < 100  # inside the range: an answer of the law's size, not 1e230


def test_error_bodies_are_short(client):
    huge, long_query = "x" * 100_000, "x" * 20_000  # (a URL is at most 64 KB)
    for response in [
        client.get("/studies/demo/predict", params={"task": "lm", "variant": "oscillator", "d_osc": long_query}, headers=AUTH),
        client.get("/studies/demo/trials", params={"task": long_query}, headers=AUTH),
        client.get("/studies/demo/fits", params={"law": long_query}, headers=AUTH),
        client.post("/studies", json={"study_yaml": huge + ": [", "study": None}, headers=AUTH),
        client.post("/studies", json={"study": {"name": huge}}, headers=AUTH),
        client.post("/studies", json={"study": {"name": "shortbody", "tasks": [{"name": huge}], "variants": [{"name": "softmax"}],
                                                "seeds": [0]}}, headers=AUTH),
    ]:
        assert response.status_code == 422, response.text[:200]
        assert len(response.content) < 3000, len(response.content)
        assert "x" * 600 not in response.text  # an input is quoted in a few hundred characters at most


def test_public_routes_are_exactly_the_documented_ones(client):
    from scaling.server import PUBLIC_ROUTES

    assert PUBLIC_ROUTES == ("/healthz", "/openapi.json", "/docs")
    for path in PUBLIC_ROUTES:
        assert client.get(path).status_code == 200, path
    schema = client.get("/openapi.json").json()
    assert "Public, no token" in schema["info"]["description"]
    assert client.get("/redoc").status_code == 404  # one documentation page, not two
    secured = {path for path, ops in schema["paths"].items() for op in ops.values() if op.get("security")}
    assert secured == set(schema["paths"]) - {"/healthz"}  # every data route declares the bearer token
