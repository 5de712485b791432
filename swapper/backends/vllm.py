"""vLLM as a child engine, with sleep mode as a warm tier.

Start: `COMMAND MODEL --host 127.0.0.1 --port P --served-model-name NAME [--max-model-len N]
[--gpu-memory-utilization F | --kv-cache-memory-bytes B] [--enable-sleep-mode]` plus the engine's
and the model's args. COMMAND is `engines.vllm.command`: `vllm serve` takes the model as its
first argument, the module form (`python -m vllm.entrypoints.openai.api_server`) as `--model`;
vLLM usually lives in a virtualenv of its own, so the command is typically a path into it.

Memory: `--gpu-memory-utilization` is the share of the *whole* device vLLM pre-allocates, so it
is the model's reservation in swapper's ledger divided by the device total (never vLLM's 0.9,
which would take the budget of every other model). On CPU vLLM sizes its KV cache from
`--kv-cache-memory-bytes` (default: most of the host), so swapper passes the KV part of the
estimate. Two vLLM cold starts on one device mis-size each other's KV cache (each profiles free
memory while the other allocates), so `serial_start` makes the launcher start them one at a time.

Files: vLLM leaves IPC socket files and a distributed-init file in its temp directory even after
a clean SIGTERM. Its temp, RPC and cache paths point into the per-child directory the launcher
creates, and the engine runs under an inner keeper (`python -m swapper.backends.vllm --remove
DIR -- ...`) that removes that directory once the engine's process tree is gone: on stop, on a
crash of the engine and when swapper itself is SIGKILLed (the outer keeper's death signal).
Socket paths are limited to 107 bytes, so when the workdir's path is long the temp and RPC
paths are a short symlink to it in the system temp directory, removed along with it.

Sleep (`sleep: true`): `VLLM_SERVER_DEV_MODE=1` and `--enable-sleep-mode` expose `POST
/sleep?level=1` (weights to host RAM, KV cache dropped, device memory freed) and `POST /wake_up`
(answers `{"status": "awake"}` once every tag is back). vLLM must never see a request while it
sleeps; the scheduler only leases ready models, and wakes a sleeping one first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .. import chat_template
from ..catalog import Adapter, ModelEntry
from ..gpu import MemoryProbe
from .base import Backend, StartSpec, arg_value, has_flag

GiB = 1 << 30
MiB = 1 << 20

# Per-process runtime beyond weights and KV cache. CUDA: context, activation peak during
# profiling, CUDA graphs, NCCL buffers. CPU: the measured tree of a tiny model (API server,
# engine core, worker, keepers; mostly the Python and torch runtime) is 1.5 GiB PSS, 1.9 GiB RSS.
OVERHEAD = {
    "nvidia": (1536 * MiB, 0.05),
    "amd": (1792 * MiB, 0.05),
    "host": (1600 * MiB, 0.02),
    "fake": (0, 0.0),
}
_DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2,
                "bf16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8": 1, "int8": 1}
_SAFETENSORS_DTYPE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_GPU_KINDS = ("nvidia", "amd")


# ------------------------------------------------------------------------------- helpers


def _size_arg(text: str | None) -> int | None:
    if text is None:
        return None
    from ..units import parse_size

    try:
        return parse_size(text)
    except ValueError:
        return None


def model_dir(entry: ModelEntry) -> Path | None:
    """The folder holding config.json: the entry's path, or the repo's snapshot in the HF cache."""
    if entry.path is not None:
        return entry.path if entry.path.is_dir() else entry.path.parent
    if entry.repo:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(entry.repo, "config.json")
        except Exception:
            return None
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def read_config(folder: Path | None) -> dict[str, Any]:
    if folder is None:
        return {}
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def safetensors_bytes(path: Path) -> int:
    """Bytes of tensor data in a .safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name == "__metadata__" or not isinstance(t, dict):
            continue
        start, end = t.get("data_offsets", (0, 0))
        total += int(end) - int(start)
    return total


# ------------------------------------------------------------------------------ estimate


@dataclass(frozen=True)
class VllmFacts:
    weights: int
    kv_per_token: int  # bytes per token across all layers
    max_len: int  # the context the child is started with


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model's numbers under `text_config`."""
    inner = cfg.get("text_config") or cfg.get("llm_config")
    return {**cfg, **inner} if isinstance(inner, dict) else cfg


def max_model_len(entry: ModelEntry, cfg: dict[str, Any]) -> int:
    """The context the child runs with: the user's `--max-model-len`, else ctx_size capped by the model."""
    given = arg_value(entry.args, "--max-model-len")
    if given is not None:
        n = _size_arg(given)
        if n:
            return n
    limit = int(text_config(cfg).get("max_position_embeddings") or 0)
    return min(entry.ctx_size, limit) if limit else entry.ctx_size


def facts(entry: ModelEntry) -> VllmFacts:
    folder = model_dir(entry)
    cfg = read_config(folder)
    tc = text_config(cfg)
    weights = 0
    shards = sorted(folder.glob("*.safetensors")) if folder is not None else []
    for p in shards:
        try:
            weights += safetensors_bytes(p)
        except (OSError, ValueError, struct.error):
            weights += p.stat().st_size
    if not shards:
        weights = entry.size
    dtype = arg_value(entry.args, "--dtype") or str(tc.get("torch_dtype") or tc.get("dtype") or "bfloat16")
    kv_dtype = arg_value(entry.args, "--kv-cache-dtype") or "auto"
    elem = _DTYPE_BYTES.get(kv_dtype.lower()) if kv_dtype != "auto" else None
    if elem is None:
        elem = _DTYPE_BYTES.get(dtype.lower().removeprefix("torch."), 2)
        elem = 2 if elem == 4 and dtype.lower() == "auto" else elem
    layers = int(tc.get("num_hidden_layers") or tc.get("n_layer") or 0)
    heads = int(tc.get("num_attention_heads") or tc.get("n_head") or 0)
    kv_heads = int(tc.get("num_key_value_heads") or heads)
    hidden = int(tc.get("hidden_size") or tc.get("n_embd") or 0)
    head_dim = int(tc.get("head_dim") or (hidden // heads if heads else 0))
    if tc.get("kv_lora_rank"):  # multi-head latent attention caches one compressed vector
        per_layer = int(tc["kv_lora_rank"]) + int(tc.get("qk_rope_head_dim") or 0)
    else:
        per_layer = 2 * kv_heads * head_dim
    return VllmFacts(weights=weights, kv_per_token=layers * per_layer * elem, max_len=max_model_len(entry, cfg))


def user_kv_bytes(entry: ModelEntry, device_kind: str) -> int | None:
    """KV space the user asked for explicitly (flag, or the CPU backend's variable in GiB)."""
    given = _size_arg(arg_value(entry.args, "--kv-cache-memory-bytes"))
    if given:
        return given
    env = dict(entry.env)
    if device_kind not in _GPU_KINDS and env.get("VLLM_CPU_KVCACHE_SPACE"):
        try:
            return int(float(env["VLLM_CPU_KVCACHE_SPACE"]) * GiB)
        except ValueError:
            return None
    return None


def estimate_parts(entry: ModelEntry, device_kind: str) -> tuple[int, int, int]:
    """(weights, kv, overhead) bytes: safetensors headers + the KV space asked for + runtime."""
    f = facts(entry)
    kv = user_kv_bytes(entry, device_kind)
    if kv is None:
        kv = f.kv_per_token * f.max_len * max(1, entry.parallel)
    base, share = OVERHEAD.get(device_kind, OVERHEAD["host"])
    return f.weights, kv, int(base + share * f.weights)


# ------------------------------------------------------------------------------- backend


class VllmBackend(Backend):
    name = "vllm"
    supports_sleep = True
    serial_start = True  # cold starts on one device are serialised by the launcher

    def __init__(self, settings: Any):
        self.settings = settings

    def command(self) -> list[str]:
        cmd = list(self.settings.engines["vllm"].command) if "vllm" in self.settings.engines else ["vllm", "serve"]
        exe = cmd[0] if cmd else ""
        if not exe or (os.sep not in exe and shutil.which(exe) is None) or (os.sep in exe and not os.path.exists(exe)):
            raise FileNotFoundError(
                f"vLLM command {exe or '(empty)'!r} not found: install vLLM in a virtualenv of its own and set "
                "engines.vllm.command to [VENV/bin/vllm, serve] or [VENV/bin/python, -m, "
                "vllm.entrypoints.openai.api_server]")
        return cmd

    @staticmethod
    def model_argument(cmd: list[str], model: str) -> list[str]:
        """`vllm serve MODEL` takes it positionally; the module form as `--model MODEL`."""
        if cmd and cmd[-1] == "serve":
            return [model]
        return ["--model", model]

    def start_spec(self, entry: ModelEntry, port: int, probe: MemoryProbe, reserved: int,
                   workdir: str) -> StartSpec:
        eng = self.settings.engines.get("vllm")
        eng_args = list(eng.args) if eng else []
        user = [*eng_args, *entry.args]
        model = str(entry.path) if entry.path is not None else entry.repo
        if not model:
            raise ValueError(f"{entry.id}: a vLLM model needs a path or a Hugging Face repo id (source)")
        cmd = self.command()
        argv = [*cmd, *self.model_argument(cmd, model), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", entry.id]
        cfg = read_config(model_dir(entry))
        if not has_flag(user, "--max-model-len"):
            argv += ["--max-model-len", str(max_model_len(entry, cfg))]
        gpu = probe.kind in _GPU_KINDS
        if gpu and not has_flag(user, "--gpu-memory-utilization"):
            argv += ["--gpu-memory-utilization", f"{gpu_utilization(reserved, probe):.4f}"]
        env_kv = "VLLM_CPU_KVCACHE_SPACE" in {**(eng.env if eng else {}), **dict(entry.env)}
        if not gpu and not has_flag(user, "--kv-cache-memory-bytes") and not env_kv:
            _, kv, _ = estimate_parts(entry, probe.kind)
            argv += ["--kv-cache-memory-bytes", str(kv)]
        if entry.sleep and not has_flag(user, "--enable-sleep-mode"):
            argv.append("--enable-sleep-mode")
        if entry.adapters:
            argv += ["--enable-lora", "--lora-modules", *[f"{a.name}={a.path}" for a in entry.adapters]]
        argv += chat_template.vllm_args(entry.chat_template, user)
        devices = len(getattr(probe, "split", ()))
        if devices > 1 and not has_flag(user, "--tensor-parallel-size"):  # equal shares, one per device
            argv += ["--tensor-parallel-size", str(devices)]
        argv += user
        tmp = short_alias(workdir)
        env = {
            "TMPDIR": tmp, "VLLM_RPC_BASE_PATH": tmp, "VLLM_CACHE_ROOT": os.path.join(workdir, "cache"),
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            **({"VLLM_SERVER_DEV_MODE": "1"} if entry.sleep else {}),
            **(eng.env if eng else {}), **dict(entry.env), **probe.child_env(),
        }
        guard = [sys.executable, "-m", "swapper.backends.vllm", "--remove", workdir,
                 *(["--remove", tmp] if tmp != workdir else []), "--"]
        return StartSpec(argv=[*guard, *argv], env=env, health_path="/health")

    def rewrite(self, path: str, body: dict[str, Any], entry: ModelEntry,
                adapter: Adapter | None) -> dict[str, Any] | None:
        """vLLM answers only to its served name (or a LoRA module's name)."""
        want = adapter.name if adapter is not None else entry.id
        if body.get("model") == want:
            return None
        return {**body, "model": want}

    async def sleep(self, session: aiohttp.ClientSession, base_url: str) -> None:
        async with session.post(base_url + "/sleep", params={"level": "1"},
                                timeout=aiohttp.ClientTimeout(total=120)) as r:
            if r.status != 200:
                raise RuntimeError(f"POST /sleep answered {r.status}: {(await r.text())[:300]}")
        if not await self.is_sleeping(session, base_url):
            raise RuntimeError("POST /sleep returned but the engine says it is not sleeping")

    async def wake(self, session: aiohttp.ClientSession, base_url: str) -> None:
        async with session.post(base_url + "/wake_up", timeout=aiohttp.ClientTimeout(total=300)) as r:
            text = await r.text()
            if r.status != 200:
                raise RuntimeError(f"POST /wake_up answered {r.status}: {text[:300]}")
        try:
            status = json.loads(text).get("status") if text else None
        except ValueError:
            status = None
        if status not in (None, "awake") or await self.is_sleeping(session, base_url):
            raise RuntimeError(f"POST /wake_up left the engine asleep ({text[:200]})")

    async def is_sleeping(self, session: aiohttp.ClientSession, base_url: str) -> bool:
        async with session.get(base_url + "/is_sleeping", timeout=aiohttp.ClientTimeout(total=30)) as r:
            if r.status != 200:
                raise RuntimeError(f"GET /is_sleeping answered {r.status}")
            return bool((await r.json(content_type=None)).get("is_sleeping"))


def gpu_utilization(reserved: int, probe: MemoryProbe) -> float:
    """The model's share of the whole device, rounded up (vLLM's unit for its pre-allocation)."""
    total = probe.memory().total
    if total <= 0:
        raise ValueError("the device reports no memory: cannot size --gpu-memory-utilization")
    share = math.ceil(reserved / total * 10000) / 10000
    return min(1.0, max(0.01, share))


# --------------------------------------------------------------------------- inner keeper


SOCKET_ROOM = 60  # longest temp dir for vLLM's `ipc://DIR/<uuid4>` sockets (sun_path holds 107)


def short_alias(workdir: str) -> str:
    """The workdir, or a short symlink to it when socket paths inside it would be too long."""
    if len(workdir) <= SOCKET_ROOM:
        return workdir
    import secrets
    import tempfile

    for _ in range(100):
        link = os.path.join(tempfile.gettempdir(), f"swapper-{secrets.token_hex(4)}")
        try:
            os.symlink(workdir, link)
        except FileExistsError:
            continue
        if len(link) <= SOCKET_ROOM:
            return link
        os.unlink(link)
        break
    raise OSError(f"no short path for vLLM's IPC sockets: {workdir} is too long and so is the temp directory")


def _remove(path: str) -> None:
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def guard_main(argv: list[str]) -> int:
    """Run the engine under a keeper, then remove its temp directories (sockets included)."""
    from .. import keeper

    remove: list[str] = []
    while len(argv) >= 2 and argv[0] == "--remove":
        remove.append(argv[1])
        argv = argv[2:]
    if not remove or len(argv) < 2 or argv[0] != "--":
        print("usage: python -m swapper.backends.vllm --remove PATH [--remove PATH] -- COMMAND ...", file=sys.stderr)
        return 2
    try:
        return keeper.main(["--grace", "6", "--parent", str(os.getppid()), *argv])
    finally:
        for path in remove:
            with contextlib.suppress(OSError):
                _remove(path)


if __name__ == "__main__":
    sys.exit(guard_main(sys.argv[1:]))
