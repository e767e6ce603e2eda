"""`llama-lora dashboard`: the FastAPI app (a page, its scripts, and a JSON API over the runs directory) and
the uvicorn server around it.

    GET  /                       the page (static/index.html); the page's own routes are after `#`
    GET  /static/<file>          its script, charts and style (package files: no network, no build step)
    GET  /api/runs               the runs table
    GET  /api/run?id=            one run: settings, status, summary, compare figures, artifacts
    GET  /api/metrics?id=&since= metrics.jsonl from a line on (the page polls it: live curves, reloads)
    GET  /api/data?id=&n=        the run's data as `data inspect --json` shows it (trained spans)
    GET  /api/compare?ids=a,b    configs side by side, differences marked
    GET  /api/file?id=&name=     report.html or loss.png of a run
    POST /api/chat               {"prompt", "runs": [ids], "max_tokens"} -> JSON lines, streamed

Training never depends on the page: the page only reads the run directories (and loads models for chat).
With an API key every /api request needs `Authorization: Bearer KEY`; the page takes the key from `?key=`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llama_lora import run_status
from llama_lora.dashboard import views
from llama_lora.dashboard.chat import ChatModels
from llama_lora.errors import LlamaLoraError

STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "LLAMA_LORA_API_KEY"
FILES = {"report.html": "text/html", "loss.png": "image/png"}


class DataCache:
    """`data inspect` reports by run and config.yaml's time: building one loads the tokenizer and data."""

    def __init__(self):
        self.lock, self.reports = threading.Lock(), {}

    def report(self, run: Path, n: int) -> dict[str, Any]:
        from llama_lora.config import load_config
        from llama_lora.data import inspection

        key = (str(run), (run / "config.yaml").stat().st_mtime, n)
        with self.lock:
            if key not in self.reports:
                report = inspection.inspect(load_config(run / "config.yaml"), n)
                self.reports[key] = {"examples": report.examples, **report.summary()}
            return self.reports[key]


def create_app(root: Path, api_key: str | None = None, log=print, device: str = "auto") -> FastAPI:
    app = FastAPI(title="llama-lora dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chat = ChatModels(log, device)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The API key on /api."""
        if request.url.path.startswith("/api/") and api_key:
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
        return await call_next(request)

    @app.exception_handler(LlamaLoraError)
    async def one_line(request: Request, exc: LlamaLoraError):
        """llama-lora's errors as {"error": line}: 404 for a run that is not there, else 400."""
        return JSONResponse({"error": str(exc)}, status_code=404 if isinstance(exc, views.NotFound) else 400)

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if "/" in name or not path.is_file():
            return JSONResponse({"error": f"{name}: no such file"}, status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    _run_routes(app, root)
    _chat_route(app, root, app.state.chat)
    return app


def _run_routes(app: FastAPI, root: Path) -> None:
    """What the pages read: runs, one run, its metrics, data and files, configs compared."""
    data = DataCache()

    @app.get("/api/runs")
    def runs():
        return {"root": str(root), "runs": views.runs(root)}

    @app.get("/api/run")
    def run(id: str):
        return views.detail(root, views.locate(root, id))

    @app.get("/api/metrics")
    def metrics(id: str, since: int = 0):
        path = views.locate(root, id)
        return {**views.metrics(path, max(since, 0)), "row": run_status.run_row(path)}

    @app.get("/api/data")
    def data_tab(id: str, n: int = 5):
        return data.report(views.locate(root, id), min(max(n, 1), 50))

    @app.get("/api/compare")
    def compare(ids: str):
        names = [i for i in ids.split(",") if i]
        paths = [views.locate(root, name) for name in names]
        configs = [run_status.read_config(p / "config.yaml") for p in paths]
        return {"ids": names, "rows": views.config_table(configs)}

    @app.get("/api/file")
    def file(id: str, name: str):
        path = views.locate(root, id) / name
        if name not in FILES or not path.is_file():
            return JSONResponse({"error": f"{name}: not in run {id}"}, status_code=404)
        return Response(path.read_bytes(), media_type=FILES[name])


def _chat_route(app: FastAPI, root: Path, chat: ChatModels) -> None:
    @app.post("/api/chat")
    async def chat_answer(request: Request):
        body = await request.json()
        ids = [str(i) for i in body.get("runs") or []]
        runs = [(i, views.locate(root, i)) for i in ids]
        max_tokens = min(max(int(body.get("max_tokens") or 128), 1), 1024)
        lines = chat.answer(str(body.get("prompt") or ""), runs, max_tokens)
        first = await run_in_threadpool(next, lines)  # loading (errors answer 400), before the stream
        return StreamingResponse(_chain(first, lines), media_type="application/x-ndjson")


def _chain(first: str, rest):
    yield first
    yield from rest


def dashboard(root: Path, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None, log=print):
    """Serve the dashboard for the runs under `root` until interrupted."""
    import uvicorn

    from llama_lora.infer.serve import check_listen

    if not root.is_dir():
        raise views.DashboardError(f"{root}: no such directory (train a run first, or give RUNS_DIR)")
    check_listen(host, port)
    key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(root, key, log)
    address = f"http://{host}:{port}/" + ("?key=..." if key else "")
    log(f"dashboard for the runs under {root} on {address}; Ctrl-C stops")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        app.state.chat.close()
