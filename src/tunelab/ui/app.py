"""The HTTP side of `tunelab ui`: the FastAPI app, its token, its error JSON, the page and its assets, the run routes
(list, detail, live events, report, recipe, launch, stop, resume, export, file picker), and uvicorn.

Shared state, for every router (plan.py, playground.py read it as `request.app.state.ui`), a `UI`:
- `workspace`: the resolved workspace folder: runs are found under it, recipes and exports are written in it, and
  the subprocesses run in it (relative paths in recipes are relative to it, as on the command line);
- `roots`: resolved extra folders the user listed (--root) where models and data may be read from; nothing is
  written there;
- `token`: the token every request must carry, or None (loopback only);
- `trust_remote_code`, `allow_pickle`: the user's switches at start, passed on to what loads a model (a run's
  own config.yaml never turns them on);
- `jobs`: the `jobs.Jobs` of this workspace: launch / stop / resume / export subprocesses;
- `confine(path, what)`: a path the API was given, resolved (symlinks too) inside the workspace or a root, or an
  `ApiError` 403; `run_dir(id)`: a run id as its folder, confined, or 404.
Errors: raise `ApiError(status, message, field)`; every error reaches the client as
`{"error": {"message", "field"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

from ..errors import TunelabError
from ..serve.app import field_name, is_loopback
from . import jobs as jobs_mod
from . import plan, playground
from . import workspace as ws
from .workspace import ApiError

STATIC = Path(__file__).parent / "static"
COOKIE = "tunelab_ui_token"
POLL_S = 0.5  # how often a live event stream looks at the run's files


@dataclass
class UI:
    workspace: Path
    roots: list[Path] = field(default_factory=list)
    token: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    jobs: jobs_mod.Jobs = None  # type: ignore[assignment]

    def __post_init__(self):
        self.workspace = Path(self.workspace).resolve()
        self.roots = [Path(r).resolve() for r in self.roots]
        if self.jobs is None:
            self.jobs = jobs_mod.Jobs(self.workspace, self.trust_remote_code, self.allow_pickle)

    def confine(self, path: str | Path, what: str = "path") -> Path:
        return ws.confine(path, self.workspace, self.roots, what)

    def run_dir(self, run_id: str) -> Path:
        return ws.run_dir(run_id, self.workspace, self.jobs)


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status, headers=headers)


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Launch(Strict):
    yaml: str
    output_dir: str | None = None


class Export(Strict):
    format: str
    quant: str | None = None


def create_app(workspace: str | Path, roots=(), token: str | None = None, trust_remote_code: bool = False,
               allow_pickle: bool = False) -> FastAPI:
    ui = UI(Path(workspace), list(roots), token, trust_remote_code, allow_pickle)
    if not ui.workspace.is_dir():
        raise TunelabError(f"--workspace '{workspace}' is not a folder. Give the folder that holds (or will hold) your "
                           f"runs, e.g. --workspace . in your project.")
    for root in ui.roots:
        if not root.is_dir():
            raise TunelabError(f"--root '{root}' is not a folder. Give a folder that holds models or data files.")
    app = FastAPI(title="tunelab ui", description="Plan, launch, watch, compare and try fine-tuning runs.")
    app.state.ui = ui

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if ui.token is None:
            return await call_next(request)
        given = request.query_params.get("token")
        if given is not None and request.url.path == "/":  # a link with the token: keep it in a cookie, drop it from the URL
            if not hmac.compare_digest(given.encode(), ui.token.encode()):
                return error(401, "The token in the link is wrong: open the link `tunelab ui` printed, or ask whoever "
                                  "started it for the token (--token / TUNELAB_UI_TOKEN).")
            response = RedirectResponse("/", 303)
            response.set_cookie(COOKIE, ui.token, httponly=True, samesite="strict")
            return response
        header = request.headers.get("authorization", "")
        cookie = request.cookies.get(COOKIE, "")
        if not (hmac.compare_digest(header.encode(), f"Bearer {ui.token}".encode()) or
                hmac.compare_digest(cookie.encode(), ui.token.encode())):
            return error(401, "This tunelab ui needs its token: open the link it printed (/?token=TOKEN), or send "
                              "'Authorization: Bearer TOKEN' with the token it was started with (--token or "
                              "TUNELAB_UI_TOKEN).")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.field)

    @app.exception_handler(TunelabError)
    async def tunelab_error(request: Request, exc: TunelabError):
        return error(400, str(exc), ws.field_of(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        name = field_name(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid" or not name:
            return error(400, "The request body must be a JSON object sent with 'Content-Type: application/json'.")
        if first.get("type") == "missing":
            return error(400, f"'{name}' is required in the request body.", name)
        if first.get("type") == "extra_forbidden":
            return error(400, f"'{name}' is not a field of this request; leave it out.", name)
        return error(400, f"'{name}': {first.get('msg')} (got {first.get('input')!r:.80}).", name)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    # --- the page
    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse(f"The UI's page is missing from this install ({page} does not exist): reinstall "
                                     f"tunelab (pip install 'tunelab[ui]'); the API under /api still answers.", 500)
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- runs: the suffix routes come before the bare one, since an id holds slashes
    @app.get("/api/runs")
    async def list_runs():
        found = await asyncio.to_thread(ws.list_runs, ui.workspace, ui.jobs)
        return {"workspace": str(ui.workspace), "runs": found}

    def refuse_outside(text: str) -> None:
        # The files a recipe names are paths the API takes: outside the workspace and the roots they are refused
        # before anything starts. Other mistakes (a missing file, a bad key) are launch_train's to report, as the CLI
        # would.
        cfg, _ = plan.parse(ui.workspace, text)
        outside = [p for p in plan.path_problems(ui, cfg) if p.status == 403] if cfg is not None else []
        if outside:
            raise outside[0]

    @app.post("/api/runs", status_code=201)
    async def launch(req: Launch):
        await asyncio.to_thread(refuse_outside, req.yaml)
        run_dir = await asyncio.to_thread(ui.jobs.launch_train, req.yaml, req.output_dir)
        return {"id": ws.run_id(run_dir, ui.workspace)}

    @app.get("/api/runs/{run_id:path}/events")
    async def events(run_id: str, request: Request):
        run_dir = ui.run_dir(run_id)
        start = request.headers.get("last-event-id") or request.query_params.get("from") or "0"
        if not start.isdigit():
            raise ApiError(400, f"Last-Event-ID '{start:.40}' is not a byte offset; reconnect without it to start "
                                f"from the beginning.", "Last-Event-ID")
        return StreamingResponse(stream(run_dir, int(start), request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(run_dir: Path, offset: int, request: Request):
        tail = ws.Tail(run_dir / "metrics.jsonl", offset)
        last = None
        yield "retry: 2000\n\n"
        while True:
            for event in await asyncio.to_thread(metric_events, tail):
                yield event
            status = await asyncio.to_thread(ws.live_status, run_dir, ui.jobs, tail)
            if status != last:
                last = status
                yield f"event: status\ndata: {json.dumps(status)}\n\n"
            if status["status"] != "running":
                for event in await asyncio.to_thread(metric_events, tail):  # what it wrote as it stopped
                    yield event
                yield f"event: end\ndata: {json.dumps({'status': status['status']})}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)

    def metric_events(tail: ws.Tail) -> list[str]:
        """The lines written since the last read as `metric` events; a `reset` first when the log was cut back (a
        resume) or begun again (--overwrite), and the lines are read again from its top."""
        lines = tail.read()
        out = ["event: reset\ndata: {}\n\n"] if tail.rewound else []
        tail.rewound = False
        return out + [f"event: metric\nid: {end}\ndata: {line}\n\n" for end, line in lines]

    @app.get("/api/runs/{run_id:path}/report")
    async def run_report(run_id: str):
        page = ui.run_dir(run_id) / "report.html"
        if page.is_symlink():  # served as it is: it must not lead out of the allowed folders
            page = ui.confine(page, "report.html")
        if not page.is_file():
            raise ApiError(404, f"Run '{run_id}' has no report.html yet: a run writes it when it finishes (`tunelab "
                                f"report {run_id}` writes it again).")
        return FileResponse(page, media_type="text/html")

    @app.get("/api/runs/{run_id:path}/recipe.yaml")
    async def recipe(run_id: str):
        found = ui.run_dir(run_id) / "config.yaml"
        if found.is_symlink():
            found = ui.confine(found, "config.yaml")
        if not found.is_file():
            raise ApiError(404, f"Run '{run_id}' has no config.yaml yet (it is still starting, or failed before its "
                                f"recipe was checked); its log says which.")
        name = quote(f"{Path(run_id).name}.yaml")
        return FileResponse(found, media_type="application/x-yaml",
                            headers={"Content-Disposition": f"attachment; filename*=UTF-8''{name}"})

    @app.post("/api/runs/{run_id:path}/stop", status_code=202)
    async def stop(run_id: str):
        await asyncio.to_thread(ui.jobs.stop, ui.run_dir(run_id))
        return {"status": "stopping"}

    @app.post("/api/runs/{run_id:path}/resume", status_code=202)
    async def resume(run_id: str):
        run_dir = ui.run_dir(run_id)
        await asyncio.to_thread(ui.jobs.resume, run_dir)
        return {"id": ws.run_id(run_dir, ui.workspace)}

    @app.post("/api/runs/{run_id:path}/export", status_code=201)
    async def export(run_id: str, req: Export):
        out = await asyncio.to_thread(ui.jobs.export, ui.run_dir(run_id), req.format, req.quant)
        return {"path": ws.run_id(out, ui.workspace)}

    @app.get("/api/runs/{run_id:path}")
    async def run_detail(run_id: str):
        return await asyncio.to_thread(ws.detail, ui.run_dir(run_id), ui.workspace, ui.jobs)

    @app.get("/api/files")
    async def files(dir: str = "."):
        return await asyncio.to_thread(ws.listing, ui.confine(dir, "dir"), ui.workspace)

    app.include_router(plan.router)  # schema, recipes, validate, advise, compare
    app.include_router(playground.router)  # chat and predict with a run, tuned and base
    return app


def check_host(host: str, token: str | None) -> None:
    """A non-loopback address without a token is refused before anything binds."""
    if not is_loopback(host) and not token:
        raise TunelabError(f"--host {host} would let other machines reach the UI, which can start training runs and "
                           f"read files in the workspace: give --token TOKEN (or set TUNELAB_UI_TOKEN) so that every "
                           f"request must carry it, or leave --host at 127.0.0.1.")


def build(workspace: str | Path = ".", roots=(), host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
          trust_remote_code: bool = False, allow_pickle: bool = False,
          log_config=uvicorn.config.LOGGING_CONFIG) -> uvicorn.Server:
    """The uvicorn server, not started (`server.run()` serves)."""
    check_host(host, token)
    app = create_app(workspace, roots, token, trust_remote_code, allow_pickle)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=log_config,
                                         timeout_graceful_shutdown=2))


def serve(workspace: str | Path = ".", roots=(), host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
          trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Serve the UI until Ctrl-C / SIGTERM. Runs it launched go on: they are processes of their own."""
    server = build(workspace, roots, host, port, token, trust_remote_code, allow_pickle)
    shown = "localhost" if is_loopback(host) else host
    link = f"http://{shown}:{port}/" + (f"?token={quote(token)}" if token else "")
    print(f"tunelab ui: {link}  (workspace {Path(workspace).resolve()})", flush=True)
    # relative paths in recipes are the workspace's, for the checks made here as for the runs it starts
    os.chdir(Path(workspace).resolve())
    server.run()
