"""`swapper pull` against a local stand-in for the Hugging Face Hub (HF_ENDPOINT).

The stand-in serves the routes huggingface-hub calls for a download: model info
(`/api/models/REPO[/revision/REV]`), the tree listing, and `HEAD`/`GET /REPO/resolve/REV/PATH`
with the commit and ETag headers, Range requests, gated repos (401 + `X-Error-Code: GatedRepo`)
and injected faults. `swapper pull` runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from aiohttp import web

from swapper.catalog import build_catalog
from swapper.config import Settings
from swapper.pull import PullError, choose_gguf, parse_spec, plan

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def blob(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]]
    gated: dict[str, str] = field(default_factory=dict)  # repo -> token that opens it
    cut_once: set[str] = field(default_factory=set)  # "repo/path": first GET breaks off mid-body
    broken: set[str] = field(default_factory=set)  # "repo/path": every GET answers 500
    log: list[dict] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}", self.info)
        app.router.add_get("/api/models/{owner}/{name}/revision/{rev}", self.info)
        app.router.add_get("/api/models/{owner}/{name}/tree/{rev}", self.tree)
        app.router.add_get("/{owner}/{name}/resolve/{rev}/{path:.*}", self.resolve)  # GET and HEAD
        return app

    def _check(self, request: web.Request) -> tuple[str, web.Response | None]:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        self.log.append({"method": request.method, "path": request.path, "range": request.headers.get("Range"),
                         "auth": request.headers.get("Authorization")})
        if repo not in self.repos:
            return repo, web.json_response({"error": "Repository not found"}, status=404,
                                           headers={"X-Error-Code": "RepoNotFound"})
        token = self.gated.get(repo)
        if token and request.headers.get("Authorization") != f"Bearer {token}":
            return repo, web.json_response(
                {"error": f"Access to model {repo} is restricted. You must have access to it and be authenticated."},
                status=401, headers={"X-Error-Code": "GatedRepo",
                                     "X-Error-Message": f"Access to model {repo} is restricted."})
        return repo, None

    async def info(self, request: web.Request) -> web.Response:
        repo, err = self._check(request)
        if err:
            return err
        return web.json_response({
            "_id": "0" * 24, "id": repo, "modelId": repo, "sha": COMMIT, "private": False,
            "gated": "manual" if repo in self.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(self.repos[repo])]})

    async def tree(self, request: web.Request) -> web.Response:
        repo, err = self._check(request)
        if err:
            return err
        return web.json_response([{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                  for p, d in sorted(self.repos[repo].items())])

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo, err = self._check(request)
        if err:
            return err
        path = request.match_info["path"]
        data = self.repos[repo].get(path)
        if data is None:
            return web.json_response({"error": "Entry not found"}, status=404,
                                     headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        key = f"{repo}/{path}"
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(len(data))})
        if key in self.broken:
            return web.json_response({"error": "internal error"}, status=500)
        start = 0
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        body = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        if key in self.cut_once:
            self.cut_once.discard(key)
            await resp.write(body[: len(body) * 3 // 4])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()  # the connection breaks off mid-file
            return resp
        for i in range(0, len(body), 1 << 16):
            await resp.write(body[i:i + (1 << 16)])
        await resp.write_eof()
        return resp

    def gets(self, repo: str, path: str) -> list[dict]:
        return [r for r in self.log if r["method"] == "GET" and r["path"].endswith(f"{repo}/resolve/{COMMIT}/{path}")]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    h = FakeHub(repos={})
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner_box: list[web.AppRunner] = []

    async def start() -> None:
        runner = web.AppRunner(h.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        h.url = f"http://127.0.0.1:{port}"
        runner_box.append(runner)
        started.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    t.start()
    assert started.wait(10)
    yield h
    asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def pull(hub: FakeHub, tmp_path: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               SWAPPER_HF_CACHE="0")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "swapper", "pull", *args, "--models-dir", str(tmp_path / "models")],
                          capture_output=True, text=True, env=env, timeout=120)


GGUF_REPO = {
    "Q4_K_M/tiny-Q4_K_M-00001-of-00002.gguf": blob("s1", 300_000),
    "Q4_K_M/tiny-Q4_K_M-00002-of-00002.gguf": blob("s2", 200_000),
    "tiny-Q8_0.gguf": blob("q8", 400_000),
    "mmproj-tiny-f16.gguf": blob("mm", 50_000),
    "README.md": b"# tiny\n",
}
VLLM_REPO = {
    "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}).encode(),
    "model.safetensors": blob("st", 250_000),
    "tokenizer.json": b"{}",
    "pytorch_model.bin": blob("bin", 100_000),
    "original/consolidated.00.pth": blob("pth", 100_000),
}


# ------------------------------------------------------------------------------ choosing


def test_spec_parsing():
    assert parse_spec("org/m-GGUF:Q4_K_M") == parse_spec("https://huggingface.co/org/m-GGUF:Q4_K_M")
    assert parse_spec("org/m-GGUF:Q4_K_M").tag == "Q4_K_M"
    assert parse_spec("org/m:sub/file.gguf").file == "sub/file.gguf"
    assert parse_spec("org/m").tag is None
    with pytest.raises(PullError, match="owner/name"):
        parse_spec("just-a-name")


def test_quant_choice_like_llama_cpp():
    files = ["m-Q4_K.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-f16.gguf", "mmproj-m-Q8_0.gguf"]
    assert choose_gguf(files, "q4_k").files == ["m-Q4_K.gguf", "mmproj-m-f16.gguf"], "exact quant, not a prefix"
    assert choose_gguf(files, None).files[0] == "m-Q4_K_M.gguf", "no tag: Q4_K_M first"
    assert choose_gguf(files, "Q8_0").files == ["m-Q8_0.gguf", "mmproj-m-Q8_0.gguf"], "mmproj of the same quant"
    assert choose_gguf(list(GGUF_REPO), "Q4_K_M").files == [
        "Q4_K_M/tiny-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/tiny-Q4_K_M-00002-of-00002.gguf", "mmproj-tiny-f16.gguf"]
    assert choose_gguf(list(GGUF_REPO), "Q4_K_M").name == "tiny-Q4_K_M"
    with pytest.raises(PullError, match="Q4_K_M, Q8_0"):
        choose_gguf(list(GGUF_REPO), "Q5_K_S")
    with pytest.raises(PullError, match="missing"):
        choose_gguf(["m-00001-of-00003.gguf", "m-00002-of-00003.gguf"], None)
    assert plan(parse_spec("o/r"), list(VLLM_REPO), snapshot=False).snapshot, "config.json and no GGUF: snapshot"


# ------------------------------------------------------------------------- downloading


def test_pull_a_split_quant_with_its_mmproj(hub, tmp_path):
    hub.repos["org/tiny-GGUF"] = dict(GGUF_REPO)
    r = pull(hub, tmp_path, "org/tiny-GGUF:Q4_K_M")
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "models" / "tiny-Q4_K_M"
    assert "tiny-Q4_K_M" in r.stdout and str(dest) in r.stdout
    for name in GGUF_REPO:
        want = name in choose_gguf(list(GGUF_REPO), "Q4_K_M").files
        assert (dest / name).exists() == want, name
        if want:
            assert (dest / name).read_bytes() == GGUF_REPO[name]
    assert hub.gets("org/tiny-GGUF", "tiny-Q8_0.gguf") == [], "only the chosen quant is fetched"
    cat = build_catalog(Settings(models_dir=str(tmp_path / "models")))
    e = cat.get("tiny-Q4_K_M")
    assert e is not None and e.engine == "llamacpp"
    assert e.path == dest / "tiny-Q4_K_M-00001-of-00002.gguf", "shards linked to the folder's top level"
    assert e.mmproj == dest / "mmproj-tiny-f16.gguf"
    assert len(e.files) == 3 and e.size == 550_000
    manifest = json.loads((dest / ".swapper-pull.json").read_text())
    assert manifest["commit"] == COMMIT and manifest["tag"] == "Q4_K_M"

    listed = subprocess.run([sys.executable, "-m", "swapper", "models", "--json", "--no-estimate", "--models-dir",
                             str(tmp_path / "models")], capture_output=True, text=True, check=True,
                            env={**os.environ, "SWAPPER_HF_CACHE": "0"})
    assert [m["id"] for m in json.loads(listed.stdout)] == ["tiny-Q4_K_M"]


def test_pull_a_snapshot_for_vllm(hub, tmp_path):
    hub.repos["org/tiny-llama"] = dict(VLLM_REPO)
    r = pull(hub, tmp_path, "org/tiny-llama")
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "models" / "tiny-llama"
    assert (dest / "model.safetensors").read_bytes() == VLLM_REPO["model.safetensors"]
    assert (dest / "config.json").exists() and (dest / "tokenizer.json").exists()
    assert not (dest / "pytorch_model.bin").exists() and not (dest / "original").exists(), \
        "safetensors are there: other weight formats are skipped"
    e = build_catalog(Settings(models_dir=str(tmp_path / "models"))).get("tiny-llama")
    assert e is not None and e.engine == "vllm" and e.path == dest
    assert "vLLM snapshot" in r.stdout


def test_a_broken_download_resumes_with_a_range_request(hub, tmp_path):
    # huggingface-hub writes in 10 MB chunks: a resumable break needs a file larger than one
    big = blob("big", 24 << 20)
    hub.repos["org/big-GGUF"] = {"big-Q8_0.gguf": big}
    hub.cut_once.add("org/big-GGUF/big-Q8_0.gguf")
    r = pull(hub, tmp_path, "org/big-GGUF:Q8_0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "models" / "big-Q8_0" / "big-Q8_0.gguf").read_bytes() == big
    gets = hub.gets("org/big-GGUF", "big-Q8_0.gguf")
    assert len(gets) == 2 and gets[0]["range"] is None
    assert gets[1]["range"] is not None and int(gets[1]["range"].split("=")[1].split("-")[0]) > 0, \
        "the second request continues where the first broke off"


def test_an_interrupted_pull_keeps_finished_files(hub, tmp_path):
    hub.repos["org/tiny-GGUF"] = dict(GGUF_REPO)
    hub.broken.add("org/tiny-GGUF/Q4_K_M/tiny-Q4_K_M-00002-of-00002.gguf")
    r = pull(hub, tmp_path, "org/tiny-GGUF:Q4_K_M")
    assert r.returncode == 1 and "swapper pull:" in r.stderr
    dest = tmp_path / "models" / "tiny-Q4_K_M"
    assert (dest / "Q4_K_M" / "tiny-Q4_K_M-00001-of-00002.gguf").exists()
    assert not (dest / ".swapper-pull.json").exists(), "an unfinished pull is not recorded as done"
    hub.broken.clear()
    r = pull(hub, tmp_path, "org/tiny-GGUF:Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert len(hub.gets("org/tiny-GGUF", "Q4_K_M/tiny-Q4_K_M-00001-of-00002.gguf")) == 1, "not fetched twice"
    assert (dest / "Q4_K_M" / "tiny-Q4_K_M-00002-of-00002.gguf").read_bytes() == \
        GGUF_REPO["Q4_K_M/tiny-Q4_K_M-00002-of-00002.gguf"]


def test_gated_repo_needs_hf_token(hub, tmp_path):
    hub.repos["org/gated-GGUF"] = {"m-Q4_K_M.gguf": blob("g", 10_000)}
    hub.gated["org/gated-GGUF"] = "hf_secret"
    r = pull(hub, tmp_path, "org/gated-GGUF")
    assert r.returncode == 1
    assert "gated" in r.stderr and "HF_TOKEN" in r.stderr and f"{hub.url}/org/gated-GGUF" in r.stderr
    r = pull(hub, tmp_path, "org/gated-GGUF", token="hf_secret")
    assert r.returncode == 0, r.stderr
    assert all(x["auth"] == "Bearer hf_secret" for x in hub.gets("org/gated-GGUF", "m-Q4_K_M.gguf"))


def test_missing_repo_and_unknown_quant_say_what_exists(hub, tmp_path):
    hub.repos["org/tiny-GGUF"] = dict(GGUF_REPO)
    r = pull(hub, tmp_path, "org/nope")
    assert r.returncode == 1 and "org/nope was not found" in r.stderr and "HF_TOKEN" in r.stderr
    r = pull(hub, tmp_path, "org/tiny-GGUF:Q5_K_S")
    assert r.returncode == 1 and "Q4_K_M, Q8_0" in r.stderr


def test_offline_refuses_and_says_what_to_do(hub, tmp_path):
    hub.repos["org/tiny-GGUF"] = dict(GGUF_REPO)
    r = pull(hub, tmp_path, "org/tiny-GGUF:Q8_0", "--offline")
    assert r.returncode == 1
    assert "--offline" in r.stderr and "without --offline" in r.stderr and "HF_ENDPOINT" in r.stderr
    assert hub.log == [], "offline means not a single request"
    assert pull(hub, tmp_path, "org/tiny-GGUF:Q8_0").returncode == 0
    n = len(hub.log)
    r = pull(hub, tmp_path, "org/tiny-GGUF:Q8_0", "--offline")
    assert r.returncode == 0 and "already pulled" in r.stdout
    assert len(hub.log) == n
