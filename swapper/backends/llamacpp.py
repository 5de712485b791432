"""llama.cpp's llama-server as a child engine.

Start: `llama-server -m FILE --host 127.0.0.1 --port P --alias NAME -c CTX*SLOTS -np SLOTS
-ngl 999|0 [--mmproj F] [--model-draft F] [--lora F... --lora-init-without-apply]
[--no-jinja --chat-template NAME | --chat-template-file F]` plus the engine's and the model's
args (the template rule is in chat_template.py). `ctx_size` is the context each request gets, so the child's total
is ctx x slots (what the estimate's KV formula assumes). Ready when `/health` answers 200 (503
means still loading).

Adapters: every request to a model that has adapters carries an explicit `lora` list — the
chosen adapter at scale 1, all others at 0 — because llama-server applies loaded adapters to
requests that name none, even after `--lora-init-without-apply`.
"""

from __future__ import annotations

from typing import Any

from .. import chat_template
from ..catalog import Adapter, ModelEntry
from ..config import Settings
from ..engines import find_llama_server
from ..gpu import MemoryProbe
from .base import Backend, StartSpec, arg_value, has_flag

# HTTP threads each child gets (llama-server's default is about slots + 2): swapper's pool keeps
# connections alive, and each open connection holds a thread, so it keeps fewer than this
LLAMA_HTTP_THREADS = 16


def http_threads(parallel: int) -> int:
    """llama-server's HTTP threads: enough for every slot, with room for probes and scrapes."""
    return max(LLAMA_HTTP_THREADS, parallel + 4)

_ADAPTER_ROUTES = ("/v1/chat/completions", "/v1/completions", "/completion", "/completions",
                   "/chat/completions", "/infill", "/v1/responses", "/v1/messages")


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._command: list[str] | None = None

    def command(self, probe: MemoryProbe | None = None) -> list[str]:
        if self._command is None:
            st = self.settings
            prefer = {"nvidia": "cuda", "amd": "hip"}.get(probe.kind if probe else "", "cpu")
            self._command = find_llama_server(st.llama_server, st.engines["llamacpp"].command,
                                              st.state_path, prefer)
        return self._command

    def start_spec(self, entry: ModelEntry, port: int, probe: MemoryProbe, reserved: int,
                   workdir: str) -> StartSpec:
        eng = self.settings.engines["llamacpp"]
        assert entry.path is not None, f"{entry.id}: a llama.cpp model needs a GGUF path"
        argv = [*self.command(probe), "-m", str(entry.path), "--host", "127.0.0.1", "--port", str(port),
                "--alias", entry.id, "-c", str(entry.ctx_size * entry.parallel),
                "-np", str(entry.parallel), "-ngl", "999" if probe.offload else "0"]
        if entry.mmproj:
            argv += ["--mmproj", str(entry.mmproj)]
        if entry.draft:
            argv += ["--model-draft", str(entry.draft)]
        for a in entry.adapters:
            argv += ["--lora", str(a.path)]
        if entry.adapters:
            argv.append("--lora-init-without-apply")
        extra = [*eng.args, *entry.args]
        argv += chat_template.llamacpp_args(entry.chat_template, entry.path, extra)
        if not has_flag(extra, "--threads-http"):
            argv += ["--threads-http", str(http_threads(entry.parallel))]
        split = getattr(probe, "split", ())
        if len(split) > 1 and probe.offload:  # split by layers, in proportion to each device's room
            argv += ["--split-mode", "layer", "--tensor-split", ",".join(f"{f:.4f}" for f in split)]
        argv += extra
        env = {**eng.env, **dict(entry.env), **probe.child_env()}
        return StartSpec(argv=argv, env=env, health_path="/health")

    def connections(self, entry: ModelEntry) -> int:
        """Two fewer than the child's HTTP threads: each connection, idle kept-alive ones
        included, holds one of them, and a request beyond them would wait unseen."""
        eng = self.settings.engines["llamacpp"]
        given = arg_value([*eng.args, *entry.args], "--threads-http")
        threads = int(given) if given and given.isdigit() else http_threads(entry.parallel)
        return max(1, threads - 2)

    def rewrite(self, path: str, body: dict[str, Any], entry: ModelEntry,
                adapter: Adapter | None) -> dict[str, Any] | None:
        if not entry.adapters or path not in _ADAPTER_ROUTES:
            return None
        body = dict(body)
        body["lora"] = [{"id": i, "scale": 1.0 if adapter is not None and a.name == adapter.name else 0.0}
                        for i, a in enumerate(entry.adapters)]
        if adapter is not None:
            body["model"] = entry.id
        return body
