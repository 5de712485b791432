"""What every engine backend provides: how to start it, when it is healthy, how to talk to it.

The scheduler never sees these; the launcher (process edge) and the proxy (request rewrite
hook) do. One file per engine beside this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from ..catalog import Adapter, ModelEntry
from ..gpu import MemoryProbe


def arg_value(args: tuple[str, ...] | list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` (the last one wins, as in argparse)."""
    found = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(name + "="):
            found = a.split("=", 1)[1]
    return found


def has_flag(args: tuple[str, ...] | list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


@dataclass
class StartSpec:
    argv: list[str]
    env: dict[str, str]
    health_path: str = "/health"


class Backend:
    """Base class: an OpenAI-compatible server on 127.0.0.1:port with a /health route."""

    name = "base"
    supports_sleep = False
    serial_start = False  # cold starts one at a time per device (vLLM sizes itself from free memory)

    def start_spec(self, entry: ModelEntry, port: int, probe: MemoryProbe, reserved: int,
                   workdir: str) -> StartSpec:
        raise NotImplementedError

    def connections(self, entry: ModelEntry) -> int:
        """How many connections the proxy may hold to one child at once (an asynchronous
        server takes many; a server with a thread per connection takes fewer)."""
        return 256

    def rewrite(self, path: str, body: dict[str, Any], entry: ModelEntry,
                adapter: Adapter | None) -> dict[str, Any] | None:
        """The body to send instead (None: forward the bytes exactly as received)."""
        return None

    async def sleep(self, session: aiohttp.ClientSession, base_url: str) -> None:
        raise NotImplementedError

    async def wake(self, session: aiohttp.ClientSession, base_url: str) -> None:
        raise NotImplementedError
