"""A Hugging Face Hub endpoint on 127.0.0.1 serving local files, for download tests without
the network (huggingface-hub honours HF_ENDPOINT): the model-info API (`/api/models/REPO`,
`.../revision/REV`) and file downloads (`/REPO/resolve/REV/PATH`, HEAD and ranged GET), with the
headers huggingface-hub reads (X-Repo-Commit, ETag, Content-Length). Bodies go out in small
chunks with a pause, so that a download takes long enough to report progress."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

from aiohttp import web

from swapper.process import free_port


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]], chunk: int = 256 << 10, pause: float = 0.02):
        self.repos = repos
        self.commits = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.chunk, self.pause = chunk, pause
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        assert self._ready.wait(10), "fake hub did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/api/models/{org}/{name}", self.info)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", self.resolve)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def _repo(self, request: web.Request) -> str:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        self.requests.append(f"{request.method} {request.path}")
        if repo not in self.repos:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound"}, text="Repository not found")
        return repo

    async def info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response({"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False,
                                  "siblings": [{"rfilename": f} for f in sorted(self.repos[repo])]})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = self.repos[repo].get(request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text="Entry not found")
        data = path.read_bytes()
        headers = {"X-Repo-Commit": self.commits[repo], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data)), "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers=headers)
        start = 0
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        await resp.prepare(request)
        for i in range(0, len(body), self.chunk):
            await resp.write(body[i:i + self.chunk])
            await asyncio.sleep(self.pause)
        await resp.write_eof()
        return resp
