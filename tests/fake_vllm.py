"""A stand-in for vLLM's OpenAI server with CUDA sleep-mode semantics, for tests.

Runs as `python fake_vllm.py [serve] [MODEL] [--model MODEL] --host H --port P
--served-model-name NAME [...]`, the two argv shapes swapper produces (`vllm serve MODEL` and the
module form with `--model`); other vLLM flags are accepted and recorded. Routes and answers follow
vLLM's own server (`vllm/entrypoints/serve/dev/sleep/api_router.py`, `.../instrumentator/health.py`):
- `GET /health` 200 (the port opens only once the "engine" is up, after FAKE_VLLM_START_SECONDS);
- `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (stream or not); a
  request naming another model gets vLLM's 404;
- with `VLLM_SERVER_DEV_MODE=1` only: `POST /sleep?level=N` -> `{"status": "sleeping", "level": N}`
  (needs `--enable-sleep-mode`, as CUDA does; level 1 frees the "device" allocation),
  `POST /wake_up` -> `{"status": "awake", "tags": null}` (after FAKE_VLLM_WAKE_SECONDS),
  `GET /is_sleeping` -> `{"is_sleeping": bool}`;
- a generation request while asleep is an error (500) and is counted: on CUDA it would crash.
Memory: FAKE_VLLM_WEIGHTS_MIB of touched RAM stands for the weights on the device, so swapper's
host probe measures it. Like vLLM, it binds an IPC socket file in `VLLM_RPC_BASE_PATH` and never
removes it. Events (start, ready, sleep, wake, request, ...) go as JSON lines to FAKE_VLLM_EVENTS.
`GET /fake/state` reports argv, environment and counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

ENV_KEYS = ("TMPDIR", "VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT", "HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS",
            "VLLM_SERVER_DEV_MODE", "CUDA_VISIBLE_DEVICES")


class Engine:
    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.name = ns.served_model_name or ns.model
        self.sleeping = False
        self.level = 0
        self.weights: bytearray | None = None
        self.mib = int(os.environ.get("FAKE_VLLM_WEIGHTS_MIB", "32"))
        self.wake_seconds = float(os.environ.get("FAKE_VLLM_WAKE_SECONDS", "0.05"))
        self.token_seconds = float(os.environ.get("FAKE_VLLM_TOKEN_SECONDS", "0.01"))
        self.requests = 0
        self.asleep_requests = 0
        self.inflight = 0

    def event(self, kind: str, **kw: object) -> None:
        path = os.environ.get("FAKE_VLLM_EVENTS")
        if not path:
            return
        rec = {"event": kind, "model": self.name, "pid": os.getpid(), "time": time.time(), **kw}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def allocate(self) -> None:
        n = self.mib << 20
        buf = bytearray(n)
        buf[::4096] = b"\x01" * len(range(0, n, 4096))  # touch every page: resident, measurable
        self.weights = buf

    def release(self) -> None:
        self.weights = None


# ------------------------------------------------------------------ a model folder for it


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A real .safetensors file (JSON header + zeroed data); returns the data bytes."""
    size = {"BF16": 2, "F32": 4, "F16": 2, "I8": 1}
    header: dict[str, object] = {}
    off = 0
    for name, (dtype, shape) in tensors.items():
        n = size[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(b"\0" * off)
    return off


def hf_folder(root: Path, name: str = "tiny", layers: int = 4, kv_heads: int = 2, head_dim: int = 64,
              max_pos: int = 2048, dtype: str = "bfloat16", **extra: object) -> Path:
    """A Hugging Face model folder (config.json + two safetensors shards) swapper sees as vLLM's."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": kv_heads, "head_dim": head_dim,
           "num_hidden_layers": layers, "max_position_embeddings": max_pos, "torch_dtype": dtype, **extra}
    (d / "config.json").write_text(json.dumps(cfg))
    write_safetensors(d / "model-00001-of-00002.safetensors", {"a": ("BF16", [256, 1024])})
    write_safetensors(d / "model-00002-of-00002.safetensors", {"b": ("BF16", [1024, 256]), "c": ("F32", [256])})
    (d / "tokenizer.json").write_text("{}")
    return d


# ---------------------------------------------------------------------------------- server


def error(message: str, status: int, type_: str = "BadRequestError") -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": status}},
                             status=status)


def make_app(eng: Engine) -> web.Application:
    app = web.Application()
    dev = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": eng.name, "object": "model", "owned_by": "vllm", "root": eng.ns.model,
             "max_model_len": eng.ns.max_model_len}]})

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if eng.sleeping:
            eng.asleep_requests += 1
            eng.event("request_while_asleep")
            return error("engine is sleeping: the weights are not on the device", 500, "InternalServerError")
        if body.get("model") != eng.name:
            return error(f"The model `{body.get('model')}` does not exist.", 404, "NotFoundError")
        eng.requests += 1
        eng.event("request", path=request.path)
        n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 8)
        chat = request.path.endswith("chat/completions")
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"
        eng.inflight += 1
        try:
            if not body.get("stream"):
                await asyncio.sleep(eng.token_seconds * n)
                text = " ".join(f"t{i}" for i in range(n))
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length"})
                return web.json_response({
                    "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": eng.name, "choices": [choice],
                    "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(n):
                await asyncio.sleep(eng.token_seconds)
                delta = {"index": 0, "delta": {"content": f" t{i}"}} if chat else {"index": 0, "text": f" t{i}"}
                chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": int(time.time()), "model": eng.name, "choices": [delta]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            eng.inflight -= 1

    async def sleep(request: web.Request) -> web.Response:
        level = int(request.query.get("level", "1"))
        if not 0 <= level <= 2:
            return error("level must be 0..2", 422)
        if not eng.ns.enable_sleep_mode:
            return error("Sleep mode is not enabled: start the server with --enable-sleep-mode", 500,
                         "InternalServerError")
        if level >= 1:
            eng.release()
        eng.sleeping, eng.level = True, level
        eng.event("sleep", level=level, inflight=eng.inflight)
        return web.json_response({"status": "sleeping", "level": level})

    async def wake_up(request: web.Request) -> web.Response:
        tags = request.query.getall("tags", []) or None
        await asyncio.sleep(eng.wake_seconds)
        if eng.weights is None:
            eng.allocate()
        eng.sleeping, eng.level = False, 0
        eng.event("wake")
        return web.json_response({"status": "awake", "tags": tags})

    async def is_sleeping(_: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": eng.sleeping})

    async def state(_: web.Request) -> web.Response:
        return web.json_response({
            "argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in ENV_KEYS}, "pid": os.getpid(),
            "sleeping": eng.sleeping, "level": eng.level,
            "allocated": len(eng.weights) if eng.weights is not None else 0,
            "requests": eng.requests, "asleep_requests": eng.asleep_requests})

    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_get("/fake/state", state)
    if dev:
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_get("/is_sleeping", is_sleeping)
    return app


def parse(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] == "serve":
        argv = argv[1:]
    p = argparse.ArgumentParser()
    p.add_argument("model_tag", nargs="?")
    p.add_argument("--model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name")
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--max-model-len", type=int)
    ns, _unknown = p.parse_known_args(argv)
    ns.model = ns.model or ns.model_tag
    if not ns.model:
        p.error("a model is required (positional with 'serve', else --model)")
    return ns


async def main(argv: list[str]) -> None:
    ns = parse(argv)
    eng = Engine(ns)
    eng.event("start", argv=argv, env={k: os.environ.get(k) for k in ENV_KEYS})
    if os.environ.get("FAKE_VLLM_FAIL"):
        print(os.environ["FAKE_VLLM_FAIL"], file=sys.stderr, flush=True)
        sys.exit(1)
    ipc_dir = os.environ.get("VLLM_RPC_BASE_PATH")
    if ipc_dir:  # like vLLM's ZMQ IPC sockets: bound, never unlinked
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.join(ipc_dir, str(uuid.uuid4())))
        eng._ipc = s  # type: ignore[attr-defined]
    await asyncio.sleep(float(os.environ.get("FAKE_VLLM_START_SECONDS", "0.5")))
    eng.allocate()
    runner = web.AppRunner(make_app(eng), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, ns.host, ns.port).start()
    eng.event("ready")
    print(f"fake vLLM serving {eng.name} on {ns.host}:{ns.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    eng.event("exit")
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
