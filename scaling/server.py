"""`scaling serve`: the query API over HTTP (FastAPI/ASGI, OpenAPI document at /openapi.json).

    scaling serve --host 0.0.0.0 --port 8000 --root /data/runs     # token from SCALING_API_TOKEN

- `root` holds one storage directory per study (also from SCALING_STUDIES_ROOT).
- Public (no token): `GET /healthz`, and the API's own description, `GET /openapi.json` and the
  Swagger page `GET /docs` (they show the routes, never a study; the page's Authorize button takes
  the token). Every other route needs `Authorization: Bearer <SCALING_API_TOKEN>` (401 otherwise).
- A study is a directory directly under the root: names are checked against the study-file pattern
  (letters, digits, `._-`, no leading dot, <= 64 characters), the resolved path must be a directory
  whose parent is the root (no symlink out of it), and a file there is never followed (a
  `pointer.yaml` under the root does not open what its `storage:` names).
- Every request body is capped (MAX_BODY_BYTES, 256 KiB: 413 with the limit), query parameters are
  bounded (d_osc >= 2 as in a study file, params >= 1e3, ...), and error bodies are short: a bad
  input is quoted in at most ~80 characters, a message in at most 2,000.
- GET endpoints only read (ledger, study.yaml, plan.json); fits and reports are computed in memory.
- `POST /studies` validates the study file in a subprocess from a temporary directory outside the
  root; only a valid study gets `<root>/<name>/submissions/`, and the runner as a subprocess
  (`scaling run FILE`). A rejected submission leaves nothing behind. The server process never
  imports torch or ray.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hmac
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from scaling import api
from scaling import fits as fitting
from scaling.laws import LAW_NAMES, METHODS
from storage import fs as sfs

TOKEN_ENV, ROOT_ENV, RUN_ADDRESS_ENV = "SCALING_API_TOKEN", "SCALING_STUDIES_ROOT", "SCALING_RUN_ADDRESS"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SUBMISSIONS = "submissions"
Law = Literal[LAW_NAMES]  # generated from the law registry (scaling/laws.py)
Method = Literal[METHODS]
MAX_BODY_BYTES = 256 * 1024  # a study file is a few KB; the YAML text field allows 200,000 characters
MAX_DETAIL_CHARS = 2000  # an error message, at most
MAX_INPUT_CHARS = 80  # a bad input quoted in an error, at most
PUBLIC_ROUTES = ("/healthz", "/openapi.json", "/docs")
D_OSC_LOW, D_OSC_HIGH = api.D_OSC_RANGE
PARAMS_LOW, PARAMS_HIGH = api.PARAMS_RANGE


def _cut(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was: errors never echo a large input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _short(value: Any) -> str:
    """A bad input as quoted in an error: its repr, at most MAX_INPUT_CHARS characters."""
    return _cut(repr(value), MAX_INPUT_CHARS)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app sees it,
    whether it declares its length (refused unread) or streams it (refused at the first byte over)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, send)
                return
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        response = JSONResponse({"detail": f"request body over the limit of {self.limit:,} bytes "
                                           f"({self.limit // 1024} KiB); a study file is a few KB"}, status_code=413)
        await response(scope, None, send)


# ---- the runner behind POST /studies -----------------------------------------------------------

VALIDATE_CODE = """import sys
from studies.spec import StudyError, load_study
try:
    load_study(sys.argv[1])
except StudyError as error:
    print(error, file=sys.stderr)
    sys.exit(2)
"""


@dataclass
class SubprocessRunner:
    """Validates a study file and runs it, each in a child process (torch and ray load there)."""

    validate_argv: list[str] = field(default_factory=lambda: [sys.executable, "-c", VALIDATE_CODE])
    run_argv: list[str] = field(default_factory=lambda: [sys.executable, "-m", "scaling.cli", "run", "--no-progress"])
    address: str | None = None  # a Ray cluster to run on (scaling run --address)
    validate_timeout_s: float = 300.0

    def validate(self, study_file: Path) -> str | None:
        """None when valid, else the validator's message."""
        try:
            done = subprocess.run([*self.validate_argv, str(study_file)], capture_output=True, text=True,
                                  timeout=self.validate_timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"validating the study took longer than {self.validate_timeout_s:.0f}s"
        if done.returncode == 0:
            return None
        text = (done.stderr or done.stdout).strip()
        if done.returncode != 2:  # not a StudyError: keep the end of the traceback
            text = "\n".join(text.splitlines()[-5:])
        return text or f"the validator exited with {done.returncode}"

    def launch(self, study_file: Path, log_file: Path) -> subprocess.Popen:
        argv = [*self.run_argv, str(study_file)] + (["--address", self.address] if self.address else [])
        with open(log_file, "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=str(study_file.parent))


class Submission(BaseModel):
    """A study to run: the study file's text (YAML), or the same content as a JSON object (the whole
    request body is at most 256 KiB)."""

    study_yaml: str | None = Field(None, max_length=200_000, description="the study file, as YAML text")
    study: dict[str, Any] | None = Field(None, description="the study file's content as a JSON object")


# ---- the app ------------------------------------------------------------------------------------

def create_app(root: str | None = None, token: str | None = None, *, runner: SubprocessRunner | None = None,
               read_only: bool = False, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """read_only: queries only; POST /studies answers 501 (a server on a read-only volume).
    max_body_bytes: larger request bodies are answered 413."""
    root = root or os.environ.get(ROOT_ENV)
    token = token if token is not None else os.environ.get(TOKEN_ENV)
    if not root:
        raise ValueError(f"no studies root: pass --root or set {ROOT_ENV}")
    if not token:
        raise ValueError(f"no API token: set {TOKEN_ENV} (every endpoint but /healthz requires it as a bearer token)")
    root_uri = sfs.absolute_uri(root)
    local_root = Path(root_uri).resolve() if sfs.is_local(root_uri) else None
    runner = runner or SubprocessRunner(address=os.environ.get(RUN_ADDRESS_ENV) or None)
    processes: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()

    app = FastAPI(
        title="Oscillator scaling studies",
        version="1",
        description="Studies, trials, fitted scaling laws with confidence intervals, predictions, reports; "
                    "study submission. Public, no token: `GET /healthz`, this description (`GET /openapi.json`) "
                    "and its page (`GET /docs`); they hold no study data. Every other route needs "
                    f"`Authorization: Bearer <{TOKEN_ENV}>`. Request bodies are capped at "
                    f"{max_body_bytes // 1024} KiB (413).",
        redoc_url=None,  # one documentation page (/docs) is public, not two
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description=f"the value of {TOKEN_ENV}")

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or credentials.scheme.lower() != "bearer" or \
                not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def study_dir(name: str) -> str:
        """The study's storage under the root; refuses names that would leave it."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise HTTPException(422, f"study name {_short(name)} must match {NAME_PATTERN}")
        return sfs.join(root_uri, name)

    def load(name: str) -> api.StudyResults:
        """A study directory directly under the root: never a file there (no `storage:` indirection),
        never a symlink out of the root."""
        path = study_dir(name)
        if local_root is not None:
            resolved = Path(path).resolve()
            if resolved.parent != local_root or not resolved.is_dir():
                raise HTTPException(404, f"study {name!r} not found under the root")
        try:
            return api.open_storage(path)
        except api.StudyNotFound:
            raise HTTPException(404, f"study {name!r} not found under the root") from None

    @app.exception_handler(api.QueryError)
    async def _query_error(_: Request, error: api.QueryError) -> JSONResponse:
        return JSONResponse({"detail": _cut(str(error))}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 body, less the echo: each bad input quoted in at most ~80 characters."""
        problems = []
        for item in error.errors()[:20]:
            problem = {"type": item.get("type"), "loc": list(item.get("loc", ())), "msg": _cut(str(item.get("msg", "")), 300)}
            if "input" in item and not isinstance(item["input"], (dict, list)) and item.get("type") != "missing":
                problem["input"] = _short(item["input"])
            problems.append(problem)
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = _cut(error.detail) if isinstance(error.detail, str) else error.detail
        return JSONResponse({"detail": detail}, status_code=error.status_code, headers=getattr(error, "headers", None))

    Name = PathParam(..., pattern=NAME_PATTERN, max_length=64, description="the study's name (its directory under the root)")

    def DOscQuery(description: str):  # noqa: N802 -- a Query factory
        return Query(None, ge=D_OSC_LOW, le=D_OSC_HIGH, allow_inf_nan=False,
                     description=f"{description}; {D_OSC_LOW:g} to {D_OSC_HIGH:g} (d_osc >= 2, as in a study file)")

    TargetQuery = Query(None, ge=1000, le=10**15, description="the size, a study's target_params (gap_vs_dosc)")
    AtDOscQuery = Query(None, ge=int(D_OSC_LOW), le=int(D_OSC_HIGH), description="the d_osc (laws in parameters)")
    common = {"dependencies": [Depends(authorised)],
              "responses": {401: {"description": "missing or wrong bearer token"},
                            404: {"description": "no such study"}, 422: {"description": "invalid query"}}}

    @app.get("/healthz", tags=["service"], summary="liveness (public: no token needed)")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/studies", tags=["studies"], summary="every study under the root", **common)
    def list_studies() -> list[dict[str, Any]]:
        out = api.list_studies(root_uri)
        for entry in out:
            entry["running"] = _running(entry["name"]) is not None
        return out

    @app.get("/studies/{name}", tags=["studies"], summary="a study's status per cell", **common)
    def study_status(name: str = Name) -> dict[str, Any]:
        return {**api.status_summary(load(name)), "submission": _submission(name)}  # = `scaling status --format json`

    @app.get("/studies/{name}/design", tags=["studies"], summary="an adaptive study's design: proposals and target width per batch",
             **common)
    def study_design(name: str = Name) -> dict[str, Any]:
        found = api.design(load(name))
        if found is None:
            raise HTTPException(404, f"study {name!r} has no adaptive design (no `design:` block, or not run yet)")
        return found

    @app.get("/studies/{name}/trials", tags=["studies"], summary="ledger rows (filterable, paged)", **common)
    def trials(name: str = Name, task: str | None = Query(None, max_length=200),
               variant: str | None = Query(None, max_length=200),
               status: Literal["completed", "diverged", "failed", "pruned"] | None = None,
               limit: int = Query(1000, ge=1, le=10_000), offset: int = Query(0, ge=0, le=10_000_000)) -> list[dict[str, Any]]:
        return api.trials(load(name), task=task, variant=variant, status=status, limit=limit, offset=offset)

    @app.get("/studies/{name}/fits", tags=["fits"], summary="fitted laws with confidence intervals",
             responses={**common["responses"], 200: {"content": {"application/json": {}, "text/csv": {}}}},
             dependencies=common["dependencies"])
    def fits(name: str = Name, task: str | None = Query(None, max_length=200),
             variant: str | None = Query(None, max_length=200), law: Law | None = None, method: Method | None = None,
             format: Literal["json", "csv"] = "json", detail: bool = Query(False, description="points, curves, leave-one-out"),
             n_boot: int = Query(fitting.N_BOOT, ge=100, le=5000),
             ci_level: float = Query(fitting.CI_LEVEL, gt=0.5, lt=0.999, allow_inf_nan=False),
             min_d_osc: float | None = DOscQuery("fit only d_osc >= this"),
             max_d_osc: float | None = DOscQuery("fit only d_osc <= this"),
             holdout: bool = Query(True, description="leave the study's held-out d_osc out of the fits")) -> Response:
        found = api.fits(load(name), task=task, variant=variant, law=law, method=method, n_boot=n_boot, ci_level=ci_level,
                         min_d_osc=min_d_osc, max_d_osc=max_d_osc, holdout=holdout)
        rows = [f.to_dict() for f in found] if detail else [f.to_row() for f in found]
        if format == "csv":
            return PlainTextResponse(_csv([f.to_row() for f in found]), media_type="text/csv")
        return JSONResponse(fitting.json_safe(rows))

    @app.get("/studies/{name}/predict", tags=["fits"], summary="the fitted law at a new point, with intervals", **common)
    def predict(name: str = Name, task: str = Query(..., max_length=200), variant: str = Query(..., max_length=200),
                d_osc: float | None = DOscQuery("predict the gap at this d_osc (gap_vs_dosc)"),
                params: float | None = Query(None, ge=PARAMS_LOW, le=PARAMS_HIGH, allow_inf_nan=False,
                                             description="predict at this parameter count (laws in parameters)"),
                law: Law | None = None, method: Method | None = None, n_seeds: int = Query(1, ge=1, le=1000),
                level: float | None = Query(None, gt=0.5, lt=0.999, allow_inf_nan=False),
                target_params: int | None = TargetQuery, at_d_osc: int | None = AtDOscQuery,
                min_d_osc: float | None = DOscQuery("fit only d_osc >= this"),
                max_d_osc: float | None = DOscQuery("fit only d_osc <= this"),
                holdout: bool = Query(True, description="leave the study's held-out d_osc out of the fit")) -> dict[str, Any]:
        if (d_osc is None) == (params is None):
            raise HTTPException(422, "give exactly one of d_osc or params")
        return api.predict(load(name), task=task, variant=variant, d_osc=d_osc, params=params, law=law,
                           method=method, n_seeds=n_seeds, level=level,
                           group=api.group_of(law, target_params=target_params, at_d_osc=at_d_osc),
                           min_d_osc=min_d_osc, max_d_osc=max_d_osc, holdout=holdout)

    @app.get("/studies/{name}/compare", tags=["fits"], summary="alpha(a) - alpha(b) with its interval", **common)
    def compare(name: str = Name, task_a: str = Query(..., max_length=200), variant_a: str = Query(..., max_length=200),
                task_b: str = Query(..., max_length=200), variant_b: str = Query(..., max_length=200),
                law: Law = "gap_vs_dosc", method: Method | None = None,
                target_params: int | None = TargetQuery, at_d_osc: int | None = AtDOscQuery) -> dict[str, Any]:
        group = api.group_of(law, target_params=target_params, at_d_osc=at_d_osc)
        return fitting.json_safe(api.compare(load(name), a=(task_a, variant_a), b=(task_b, variant_b), law=law, method=method,
                                    group_a=group, group_b=group))

    @app.get("/studies/{name}/report", tags=["reports"], summary="the HTML report (rendered now, nothing written)",
             response_class=HTMLResponse, **common)
    def report(name: str = Name) -> HTMLResponse:
        from scaling.report import render

        study = load(name)
        page, _ = render(study, api.fits(study))
        return HTMLResponse(page)

    @app.get("/studies/{name}/report.md", tags=["reports"], summary="the Markdown summary",
             response_class=PlainTextResponse, **common)
    def report_md(name: str = Name) -> PlainTextResponse:
        from scaling.report import render

        study = load(name)
        return PlainTextResponse(render(study, api.fits(study))[1], media_type="text/markdown")

    @app.get("/studies/{name}/log", tags=["studies"], summary="the tail of the latest submission's runner log",
             response_class=PlainTextResponse, **common)
    def log(name: str = Name, lines: int = Query(200, ge=1, le=10_000)) -> PlainTextResponse:
        info = _submission(name)
        if not info or not info.get("log") or not Path(info["log"]).is_file():
            raise HTTPException(404, f"study {name!r} has no submission log")
        text = Path(info["log"]).read_text(errors="replace").splitlines()[-lines:]
        return PlainTextResponse("\n".join(text) + "\n")

    @app.post("/studies", tags=["studies"], status_code=202, summary="submit a study: validated, then run by the runner",
              dependencies=[Depends(authorised)],
              responses={401: {"description": "missing or wrong bearer token"}, 409: {"description": "already running"},
                         422: {"description": "not a valid study"}, 501: {"description": "root is not a local directory"}})
    def submit(submission: Submission) -> dict[str, Any]:
        if read_only:
            raise HTTPException(501, "this server is read-only (--read-only): submit with `scaling submit STUDY.yaml "
                                     "--address http://HEAD:8265` or the RayJob template in k8s/")
        if local_root is None:
            raise HTTPException(501, "submissions need a local (or mounted) studies root")
        config = _parse_submission(submission)
        name = config["name"]
        directory = Path(study_dir(name))
        for key in ("storage", "cache"):
            if key in config:
                raise HTTPException(422, f"`{key}` is set by the server (studies live under its root); remove it")
        if _running(name) is not None:
            raise HTTPException(409, f"study {name!r} is already running; follow it at /studies/{name}")
        text = yaml.safe_dump({**config, "storage": str(directory)}, sort_keys=False)
        # validated from a temporary directory outside the root: a rejected study leaves nothing behind
        with tempfile.TemporaryDirectory(prefix="scaling-submission-") as scratch:
            candidate = Path(scratch) / "study.yaml"
            candidate.write_text(text)
            problem = runner.validate(candidate)
            problem = problem and problem.replace(str(candidate), "study")
        if problem:
            raise HTTPException(422, f"not a valid study: {problem}")
        with lock:
            if _running(name) is not None:
                raise HTTPException(409, f"study {name!r} is already running; follow it at /studies/{name}")
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            sub_dir = directory / SUBMISSIONS
            sub_dir.mkdir(parents=True, exist_ok=True)
            study_file = sub_dir / f"{stamp}.yaml"
            study_file.write_text(text)
            log_file = sub_dir / f"{stamp}.log"
            process = runner.launch(study_file, log_file)
            processes[name] = process
            info = {"pid": process.pid, "submitted_at": stamp, "study_file": str(study_file), "log": str(log_file)}
            (sub_dir / "current.json").write_text(json.dumps(info))
        return {"name": name, "storage": str(directory), "status_url": f"/studies/{name}", **info}

    def _parse_submission(submission: Submission) -> dict[str, Any]:
        if (submission.study_yaml is None) == (submission.study is None):
            raise HTTPException(422, "give exactly one of study_yaml (text) or study (object)")
        if submission.study_yaml is not None:
            try:
                config = yaml.safe_load(submission.study_yaml)
            except yaml.YAMLError as error:
                raise HTTPException(422, f"study_yaml is not valid YAML: {_cut(str(error), 500)}") from None
        else:
            config = submission.study
        if not isinstance(config, dict):
            raise HTTPException(422, "a study is a mapping (name:, tasks:, variants:, seeds:, ...)")
        name = config.get("name")
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            raise HTTPException(422, f"study name {_short(name)} must match {NAME_PATTERN}")
        return config

    def _submission(name: str) -> dict[str, Any] | None:
        if local_root is None:
            return None
        path = local_root / name / SUBMISSIONS / "current.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        process = processes.get(name)
        returncode = process.poll() if process is not None and process.pid == info.get("pid") else None
        info["running"] = _running(name) is not None
        info["returncode"] = returncode
        return info

    def _running(name: str) -> int | None:
        """The pid of the study's runner while it runs."""
        process = processes.get(name)
        if process is not None:
            return process.pid if process.poll() is None else None
        if local_root is None:
            return None
        try:  # a runner started by an earlier server process
            pid = int(json.loads((local_root / name / SUBMISSIONS / "current.json").read_text())["pid"])
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] if Path(f"/proc/{pid}/stat").exists() else "R"
            return None if state == "Z" else pid
        except (OSError, ValueError, KeyError):
            return None

    app.state.processes = processes
    app.state.root = root_uri
    return app


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def serve(host: str, port: int, root: str | None, *, log_level: str = "info", read_only: bool = False) -> None:
    import uvicorn

    app = create_app(root, read_only=read_only)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
