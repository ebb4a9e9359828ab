"""The studio's HTTP side (FastAPI): the page, and a JSON API over the library and the job runner.

Every route is a thin call into ``tunelab.studio.*``, which calls the library functions that
own each job (the config schema, ``data stats``, the rendering, ``env``, ``estimate``,
``train``/``eval`` as jobs, the serve engine for chat). Errors are one line:
``{"error": "train.lr: 'abc' is not a number", "field": "train.lr"}`` with 422, 403 for a
path outside the workspace, 401 without the token, 404 for a run that does not exist.

Requests are checked before any route runs (``_guard``): on a loopback bind the ``Host``
header must name the loopback (so a web page cannot reach the studio through DNS
rebinding); a state-changing request from another origin is refused; with a token, every
request needs it (``Authorization: Bearer``, ``X-Tunelab-Token``, or the cookie that opening
``/?token=...`` once sets).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse

from tunelab.errors import TunelabError
from tunelab.io import atomic_write_text
from tunelab.studio import compare, forms, preflight, runs
from tunelab.studio.chat import ChatPool, chat_messages, settings_from
from tunelab.studio.cli import is_loopback
from tunelab.studio.jobs import JobManager
from tunelab.studio.workspace import STUDIO_DIR, OutsideWorkspace, Workspace

log = logging.getLogger("tunelab.studio")
STATIC = Path(__file__).with_name("static")
STATIC_FILES = {"studio.js": "text/javascript", "studio.css": "text/css"}
SERVED_SUFFIXES = {".html": "text/html", ".png": "image/png", ".md": "text/plain", ".json": "application/json",
                   ".jsonl": "text/plain", ".yaml": "text/plain", ".log": "text/plain", ".txt": "text/plain"}
COOKIE = "tunelab_studio_token"
DEFAULT_RECIPE = """\
# A new run: pick a model and data on the left, or edit this YAML (it is what `tunelab train` reads).
model:
  name: builtin:smollm2-135m-instruct
data:
  train: []
  cutoff_len: 256
method:
  name: lora
train:
  epochs: 1
  batch_size: 8
  lr: 1.0e-3
  logging_steps: 1
output_dir: runs/{name}
"""


class NotFound(TunelabError):
    """A run or comparison that is not in the workspace."""


def create_app(workspace: str | Path, token: str | None = None, loopback: bool = True,
               stall_after: float = 300.0, stop_timeout: float = 60.0) -> FastAPI:
    """The studio for ``workspace``. Jobs found running there are re-attached at start-up."""
    ws = Workspace(workspace)
    jobs = JobManager(stop_timeout=stop_timeout)
    hardware = preflight.Hardware()
    pool = ChatPool()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        threading.Thread(target=preflight.warm_up, name="tunelab-studio-imports", daemon=True).start()
        jobs.attach(ws.run_folders() + [ws.path(c["folder"]) for c in compare.list_compares(ws, jobs)])
        jobs.watch()
        hardware.start()
        try:
            yield
        finally:
            jobs.close()
            pool.close()

    app = FastAPI(title="tunelab studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = {"workspace": ws, "jobs": jobs, "hardware": hardware, "chat": pool}
    _add_guard(app, token, loopback)
    _add_errors(app)

    def run_folder(run: str) -> Path:
        folder = ws.path(run, "run")
        if folder not in ws.run_folders():
            raise NotFound(f"run: {run} is not a run in the workspace")
        return folder

    # ------------------------------------------------------------ page

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC_FILES:
            raise NotFound(f"{name}: no such file")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    @app.get("/api/file")
    def file(path: str):
        target = ws.path(path, "path", must_exist=True)
        if not target.is_file() or target.suffix.lower() not in SERVED_SUFFIXES:
            raise NotFound(f"path: {path} is not a report, plot, log or text file")
        # A workspace file is data, not part of the studio: no scripts, no access to the studio's origin.
        return FileResponse(target, media_type=SERVED_SUFFIXES[target.suffix.lower()],
                            headers={"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------ what there is

    @app.get("/api/info")
    def info():
        from tunelab import __version__

        return {"workspace": str(ws.root), "version": __version__, "token": bool(token)}

    @app.get("/api/workspace")
    def listing():
        from tunelab.models.builtin import BUILTINS

        finished = [r["run"] for r in runs.list_runs(ws, jobs, stall_after) if r["status"] == "finished"]
        data = [f for f in ws.files(preflight_suffixes()) if not f.endswith(("report.json", "compare.json"))]
        return {"models": [f"builtin:{name}" for name in BUILTINS] + ws.model_folders(), "runs": finished,
                "datasets": data, "recipes": ws.recipes(),
                "dataset_dirs": [ws.rel(f) for f in ws.walk() if (f / "dataset_info.json").is_file()]}

    @app.get("/api/schema")
    def schema():
        return {"fields": forms.schema()}

    @app.get("/api/env")
    def env():
        return hardware.view()

    # ------------------------------------------------------------ new run

    @app.get("/api/recipe/default")
    def default_recipe():
        return {"yaml": DEFAULT_RECIPE.format(name=time.strftime("run-%Y%m%d-%H%M%S"))}

    @app.get("/api/recipe/file")
    def recipe_file(path: str):
        target = ws.path(path, "path", must_exist=True)
        if target.suffix.lower() not in (".yaml", ".yml") or not target.is_file():
            raise TunelabError(f"path: {path} is not a YAML recipe")
        return {"yaml": target.read_text(encoding="utf-8")}

    @app.post("/api/recipe")
    def recipe(body: dict = Body(...)):
        text, cfg = forms.compose(str(body.get("yaml") or ""), dict(body.get("changes") or {}))
        forms.check_paths(cfg, ws)
        return {"yaml": text, "values": forms.values_of(cfg)}

    @app.post("/api/data/stats")
    def data_stats(body: dict = Body(...)):
        return preflight.data_stats(ws, body.get("model") or "", body.get("template"), list(body.get("datasets") or []),
                                    body.get("dataset_dir"), _int(body, "cutoff_len", 1024))

    @app.post("/api/data/preview")
    def data_preview(body: dict = Body(...)):
        return {"examples": preflight.preview(
            ws, body.get("model") or "", body.get("template"), str(body.get("dataset") or ""), body.get("dataset_dir"),
            _int(body, "cutoff_len", 1024), bool(body.get("mask_history")), bool(body.get("train_on_prompt")))}

    @app.post("/api/estimate")
    def memory(body: dict = Body(...)):
        precision = body.get("precision") if body.get("precision") in ("fp32", "bf16", "fp16") else "fp32"
        seq = _int(body, "cutoff_len", 1024)
        if body.get("max_tokens"):
            seq = min(seq, _int(body, "max_tokens", seq))
        return preflight.memory_estimate(ws, body.get("model") or "", str(body.get("method") or "lora"),
                                         _int(body, "batch_size", 8), seq, _int(body, "r", 8),
                                         bool(body.get("gradient_checkpointing")), precision,
                                         _int(body, "freeze_trainable_layers", 2))

    @app.post("/api/runs")
    def launch(body: dict = Body(...)):
        text, cfg = forms.compose(str(body.get("yaml") or ""), {})
        forms.check_paths(cfg, ws)
        if not cfg.data.train:
            raise forms.FieldError("data.train: pick at least one training dataset", "data.train")
        folder = ws.path(cfg.output_dir, "output_dir")
        if folder.exists() and any(folder.iterdir()):
            raise forms.FieldError(f"output_dir: {ws.rel(folder)} already exists; pick a new name "
                                   "(a stopped run is resumed from the Runs page)", "output_dir")
        recipe_path = folder / STUDIO_DIR / "recipe.yaml"
        atomic_write_text(recipe_path, text)
        jobs.launch("train", folder, ["train", ws.rel(recipe_path)], ws.root, "train.log")
        return runs.run_view(ws, folder, jobs, stall_after, detail=True)

    # ------------------------------------------------------------ runs

    @app.get("/api/runs")
    def run_list():
        return {"runs": runs.list_runs(ws, jobs, stall_after)}

    @app.get("/api/run")
    def run_detail(run: str):
        return runs.run_view(ws, run_folder(run), jobs, stall_after, detail=True)

    @app.post("/api/run/stop")
    def stop(body: dict = Body(...)):
        folder = run_folder(str(body.get("run") or ""))
        jobs.stop(folder)
        return runs.run_view(ws, folder, jobs, stall_after, detail=True)

    @app.post("/api/run/resume")
    def resume(body: dict = Body(...)):
        folder = run_folder(str(body.get("run") or ""))
        view = runs.run_view(ws, folder, jobs, stall_after)
        if not view["resumable"]:
            why = ("it has no checkpoint" if not view["checkpoints"] else
                   "it was not started from the studio (no studio/recipe.yaml)" if not view["studio"] else
                   f"it is {view['status']}")
            raise TunelabError(f"run: {view['run']} cannot be resumed: {why}")
        recipe_path = folder / STUDIO_DIR / "recipe.yaml"
        jobs.launch("train", folder, ["train", ws.rel(recipe_path), "train.resume=auto",
                                      f"output_dir={ws.rel(folder)}"], ws.root, "train.log")
        return runs.run_view(ws, folder, jobs, stall_after, detail=True)

    # ------------------------------------------------------------ compare

    @app.get("/api/compares")
    def compare_list():
        return {"compares": compare.list_compares(ws, jobs)}

    @app.get("/api/compare")
    def compare_detail(name: str):
        folder = compare.compare_folder(ws, name)
        if not (folder / STUDIO_DIR / "compare.json").is_file():
            raise NotFound(f"name: no comparison '{name}' in the workspace")
        return compare.view(ws, jobs, folder)

    @app.post("/api/compares")
    def compare_launch(body: dict = Body(...)):
        return compare.launch(ws, jobs, body)

    # ------------------------------------------------------------ chat

    @app.post("/api/chat")
    async def chat(body: dict = Body(...)):
        spec = ws.model_spec(str(body.get("model") or ""), "model")
        messages = chat_messages(body)
        settings = settings_from(dict(body.get("settings") or {}))

        async def events():
            try:
                async for event in pool.answer(spec, messages, settings):
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except TunelabError as exc:
                yield f"data: {json.dumps({'error': str(exc)}, ensure_ascii=False)}\n\n"
            except Exception as exc:  # a model that fails to load or generate: said in the chat, logged here
                log.exception("chat failed")
                first = (str(exc).strip().splitlines() or [""])[0]
                yield f"data: {json.dumps({'error': f'{type(exc).__name__}: {first}'}, ensure_ascii=False)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def preflight_suffixes() -> tuple[str, ...]:
    from tunelab.studio.workspace import DATA_SUFFIXES

    return DATA_SUFFIXES


def _int(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise forms.FieldError(f"{key}: {value!r} is not a whole number", key) from None


# ---------------------------------------------------------------- errors and the request guard


def _add_errors(app: FastAPI) -> None:
    @app.exception_handler(TunelabError)
    async def user_error(_request: Request, exc: TunelabError):
        status = 403 if isinstance(exc, OutsideWorkspace) else 404 if isinstance(exc, NotFound) else 422
        field = exc.field if isinstance(exc, forms.FieldError) else forms.field_of(str(exc))
        return JSONResponse({"error": str(exc), "field": field}, status_code=status)

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception):  # a bug: logged with its traceback, one line to the page
        log.error("studio request failed", exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {first}", "field": None},
                            status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{"msg": "invalid request"}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse({"error": message, "field": where or None}, status_code=422)


def _host_name(host: str) -> str:
    return urlsplit(f"//{host}").hostname or ""


def _add_guard(app: FastAPI, token: str | None, loopback: bool) -> None:
    def supplied(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.headers.get("x-tunelab-token") or request.cookies.get(COOKIE)

    def matches(value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), token.encode())

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if loopback and not is_loopback(_host_name(host)):
            return JSONResponse({"error": f"host {host!r} is not this machine's loopback", "field": None},
                                status_code=403)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != host:
            return JSONResponse({"error": f"requests from {origin} are not accepted", "field": None},
                                status_code=403)
        if token:
            given = request.query_params.get("token")
            if given is not None and matches(given) and request.method == "GET":
                response = RedirectResponse(request.url.path, status_code=303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
            if not matches(supplied(request)):
                return JSONResponse({"error": "this studio needs its token: open the URL it printed at start "
                                              "(…/?token=...), or send 'Authorization: Bearer TOKEN'",
                                     "field": None}, status_code=401)
        return await call_next(request)
