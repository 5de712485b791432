"""llama.cpp router's model-management routes beyond load/unload:

- `POST /models {"model": "org/repo:QUANT"}` downloads a GGUF into the Hugging Face cache the
  router reads (`hfcache.llama_cache_dir`), in the background, through huggingface-hub and the
  same file choice as `swapper pull` (quant tag, split shards, mmproj companion); answers
  `{"success": true}` at once; the model is listed once the download finished.
- `DELETE /models?model=org/repo:QUANT` stops the model if it runs and removes its files from the
  cache (`can_remove` is true for exactly these cache models): the tag's snapshot links, then
  blobs nothing else links to, as llama.cpp's `common_download_remove` does.
- `GET /models/sse`: server-sent events `{"model", "event", "data"}` with `event` one of
  `status_change` (data: `{"status"}`), `download_progress` (data: `{"progress": {url: {done,
  total}}}`), `download_finished`, `download_failed` (data: `{"error"}`), `model_remove`,
  `models_reload`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .errors import bad_request, error_response, not_found_model

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("swapper.router")

# `version: 7063 (abc1234)` (older) or `version: 0.5.0-dev (build 1, commit 0c1e570)`
_VERSION_RE = re.compile(r"version:\s*(?:(\d+)\s*\(([0-9a-f]+|unknown)\)|\S+\s*\(build\s*(\d+),\s*commit\s*([^)\s]+)\))")


async def engine_build_info(rt: Runtime) -> str:
    """llama-server's `b<number>-<commit>` (from `--version`, asked once), as the router reports it."""
    cached = getattr(rt, "_build_info", None)
    if cached:
        return cached
    info = "unknown"
    try:
        from .backends.llamacpp import LlamaCppBackend

        cmd = LlamaCppBackend(rt.settings).command(rt.probe)
        proc = await asyncio.create_subprocess_exec(*cmd, "--version", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        m = _VERSION_RE.search(out.decode(errors="replace"))
        if m:
            number, commit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            info = f"b{number}-{commit}"
    except Exception as e:  # no engine installed: say so in the field, never fail /props
        log.warning("cannot read llama-server's version: %s", e)
    rt._build_info = info  # type: ignore[attr-defined]
    return info


class EventBus:
    """Fan-out of router events to every `/models/sse` subscriber."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue] = set()

    def publish(self, model: str, event: str, data: Any = None) -> None:
        doc: dict[str, Any] = {"model": model, "event": event}
        if data is not None:
            doc["data"] = data
        for q in list(self.subscribers):
            q.put_nowait(doc)


class RouterApi:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.bus: EventBus = getattr(rt, "router_events", None) or EventBus()
        rt.router_events = self.bus  # type: ignore[attr-defined]
        self.downloads: dict[str, asyncio.Task] = {}
        rt.scheduler.listeners.append(self._on_swap)

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/models", self.download)
        app.router.add_delete("/models", self.remove)
        app.router.add_get("/models/sse", self.sse)

    def _on_swap(self, ev: Any) -> None:
        m = self.rt.scheduler.models.get(ev.model)
        if m is not None:
            data: dict[str, Any] = {"status": m.state.public}
            if m.state.public == "unloaded":
                data["exit_code"] = m.exit_code or 0
            self.bus.publish(ev.model, "status_change", data)

    # ------------------------------------------------------------------ events

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        q: asyncio.Queue = asyncio.Queue()
        self.bus.subscribers.add(q)
        try:
            await resp.prepare(request)
            while not self.rt.closing:
                try:
                    doc = await asyncio.wait_for(q.get(), 15)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await resp.write(f"data: {json.dumps(doc)}\n\n".encode())
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.bus.subscribers.discard(q)
        return resp

    # ------------------------------------------------------------------ download

    async def download(self, request: web.Request) -> web.Response:
        from .pull import PullError, parse_spec

        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return bad_request("request body is not valid JSON")
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return bad_request("model must be a non-empty string", "model")
        try:
            spec = parse_spec(name)
        except PullError as e:
            return bad_request(str(e), "model")
        if self.rt.catalog.resolve(name) is not None or name in self.downloads:
            return bad_request(f"model '{name}' already exists", "model")
        loop = asyncio.get_running_loop()
        try:  # what to fetch, asked before answering (unknown repos and tags are the client's error)
            plan_ = await loop.run_in_executor(None, _plan, spec)
        except PullError as e:
            return error_response(str(e), 400, "invalid_request", "model")
        task = asyncio.ensure_future(self._download(name, spec, plan_))
        self.downloads[name] = task
        task.add_done_callback(lambda _t: self.downloads.pop(name, None))
        return web.json_response({"success": True})

    async def _download(self, name: str, spec: Any, plan_: tuple[str, list[str]]) -> None:
        from .hfcache import llama_cache_dir

        loop = asyncio.get_running_loop()

        def progress(url: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(self.bus.publish, name, "download_progress",
                                      {"progress": {url: {"done": done, "total": total}}})

        try:
            await loop.run_in_executor(None, _fetch_to_cache, spec.repo, plan_, llama_cache_dir(), progress)
        except Exception as e:
            log.warning("download of %s failed: %s", name, e)
            self.bus.publish(name, "download_failed", {"error": str(e)})
            return
        await self.rt.reload()
        log.info("downloaded %s into %s", name, llama_cache_dir())
        self.bus.publish(name, "download_finished")

    # ------------------------------------------------------------------ remove

    async def remove(self, request: web.Request) -> web.Response:
        name = request.query.get("model")
        if not name:
            return bad_request("model must be a non-empty string", "model")
        res = self.rt.catalog.resolve(name)
        if res is None:
            return not_found_model(name, self.rt.catalog.names())
        entry = res.entry
        if entry.source != "cache":
            return bad_request(f"model name={entry.id} is not removable (not from cache)", "model")
        m = self.rt.scheduler.models.get(entry.id)
        if m is not None and m.state.public != "unloaded":
            await self.rt.scheduler.unload(entry.id, force=True, reason="remove")
        await asyncio.get_running_loop().run_in_executor(None, remove_cached, entry.files)
        await self.rt.reload()
        self.bus.publish(entry.id, "model_remove")
        return web.json_response({"success": True})


def _plan(spec: Any) -> tuple[str, list[str]]:
    """(commit, files in the repo) that `swapper pull` would fetch for this spec."""
    from huggingface_hub import HfApi

    from .pull import _explain, plan

    try:
        info = HfApi().model_info(spec.repo, revision=None)
    except Exception as e:
        raise _explain(e, spec) from None
    files = [s.rfilename for s in (info.siblings or [])]
    return info.sha or "main", plan(spec, files, snapshot=False).files


def _fetch_to_cache(repo: str, plan_: tuple[str, list[str]], cache_dir: Path, progress: Any) -> None:
    """Files into the Hugging Face cache with huggingface-hub, reporting bytes as they arrive."""
    from huggingface_hub import constants, hf_hub_download
    from tqdm.auto import tqdm

    commit, files = plan_
    for f in files:
        url = f"{constants.ENDPOINT}/{repo}/resolve/{commit}/{f}"

        class Progress(tqdm):  # huggingface-hub reports bytes through its tqdm class
            def __init__(self, *a: Any, **kw: Any) -> None:
                kw["disable"] = False
                kw["file"] = io.StringIO()  # nothing on the server's terminal
                super().__init__(*a, **kw)

            def update(self, n: float | None = 1) -> bool | None:
                out = super().update(n)
                progress(url, int(self.n), int(self.total or 0))
                return out

        path = hf_hub_download(repo, f, revision=commit, cache_dir=cache_dir, tqdm_class=Progress)
        size = os.path.getsize(path)
        progress(url, size, size)
    # fetched by commit, which records no ref: `main` is what was asked for, and llama.cpp reads a
    # cached repo only through one of its refs
    ref = Path(cache_dir) / ("models--" + repo.replace("/", "--")) / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


_lock = threading.Lock()


def _target(link: Path) -> Path:
    """Where a snapshot entry points (one level: blobs may themselves be links we must not follow)."""
    return Path(os.path.normpath(link.parent / os.readlink(link)))


def remove_cached(files: tuple[Path, ...] | list[Path]) -> None:
    """Snapshot links of one model, then the blobs no other snapshot entry links to."""
    with _lock:
        blobs = []
        for p in files:
            if p.is_symlink():
                blobs.append(_target(p))
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        for b in blobs:
            if b.parent.name != "blobs":
                continue  # not huggingface-hub's layout: leave it alone
            snapshots = b.parent.parent / "snapshots"
            still = any(q.is_symlink() and _target(q) == b for q in snapshots.rglob("*"))
            if not still:
                b.unlink(missing_ok=True)
