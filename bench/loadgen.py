"""The load generator: an asyncio/aiohttp client in a process of its own.

It runs apart from the orchestrator and the servers (pinned to its own CPUs when asked), so
that what it spends on parsing and bookkeeping is never charged to the thing measured. It reads
one JSON command per line on stdin and answers one JSON line on stdout:

    {"op": "run", "url": U, "path": P, "body": B, "n": N, "concurrency": C, "pooled": false}
        N copies of body B, at most C in flight at once; `pooled` streams keep their connections
    {"op": "groups", "url": U, "path": P, "groups": [[B, ...], ...]}
        each group's bodies sent together; the next group starts when all have answered
    {"op": "quit"}

Every request is recorded as [status, t_send, ttft, latency, tokens, error]: t_send on the
kernel's boot clock (CLOCK_BOOTTIME, comparable with /proc start times and other processes),
ttft = first streamed token (the whole response for non-streaming requests), tokens = completion
tokens (streamed events with text, or `usage.completion_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from typing import Any

import aiohttp

Record = list[Any]  # [status, t_send, ttft, latency, tokens, error]


def boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Client:
    """Sessions per base URL, reused across commands.

    Non-streaming requests reuse keep-alive connections (idle ones are dropped before
    llama-server's own 5 s timeout). Streamed requests get a connection each: llama-server
    closes the connection after a stream without saying so, and a client reusing it fails its
    next request; every target is treated alike. Unless `pooled`: then streams reuse
    connections too, as OpenAI's SDK does (httpx's pool), wherever the server keeps them
    (llama.cpp's router says `Connection: close` after a stream, which aiohttp honours), and a
    request whose kept connection turns out closed under it is sent again on a new one, once,
    as that SDK's retries do.
    """

    def __init__(self, timeout: float):
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.sessions: dict[tuple[str, bool], aiohttp.ClientSession] = {}

    def session(self, url: str, fresh: bool) -> aiohttp.ClientSession:
        s = self.sessions.get((url, fresh))
        if s is None or s.closed:
            conn = (aiohttp.TCPConnector(limit=0, force_close=True) if fresh
                    else aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0))
            s = self.sessions[(url, fresh)] = aiohttp.ClientSession(connector=conn, timeout=self.timeout)
        return s

    async def close(self) -> None:
        for s in self.sessions.values():
            await s.close()

    async def one(self, url: str, path: str, body: dict[str, Any], pooled: bool = False) -> Record:
        stream = bool(body.get("stream"))
        t0 = time.perf_counter()
        t_send = boot_clock()
        rec = await self._try(url, path, body, stream, stream and not pooled, t0, t_send)
        if pooled and rec[0] == 0 and rec[5].startswith("ServerDisconnectedError"):
            rec = await self._try(url, path, body, stream, True, t0, t_send)  # on a new connection
        return rec

    async def _try(self, url: str, path: str, body: dict[str, Any], stream: bool, fresh: bool,
                   t0: float, t_send: float) -> Record:
        ttft = None
        tokens = 0
        try:
            async with self.session(url, fresh).post(url + path, json=body) as r:
                if r.status != 200:
                    text = await r.text()
                    return [r.status, t_send, None, time.perf_counter() - t0, 0, text[:300]]
                if stream:
                    async for line in r.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        n = _event_tokens(line[6:])
                        if n and ttft is None:
                            ttft = time.perf_counter() - t0
                        tokens += n
                else:
                    doc = json.loads(await r.read())
                    tokens = int((doc.get("usage") or {}).get("completion_tokens") or 0)
                lat = time.perf_counter() - t0
                return [200, t_send, ttft if stream else lat, lat, tokens, None]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            return [0, t_send, None, time.perf_counter() - t0, 0, f"{e.__class__.__name__}: {e}"[:300]]

    async def run(self, url: str, path: str, body: dict[str, Any], n: int, concurrency: int,
                  pooled: bool = False) -> list[Record]:
        out: list[Record] = []
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                out.append(await self.one(url, path, body, pooled))

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
        return out

    async def groups(self, url: str, path: str, groups: list[list[dict[str, Any]]]) -> list[Record]:
        out: list[Record] = []
        for g in groups:
            out += await asyncio.gather(*(self.one(url, path, b) for b in g))
        return out


def _event_tokens(payload: bytes) -> int:
    """1 if a streamed event carries generated text (completions or chat), else 0."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return 0
    for c in doc.get("choices") or ():
        if c.get("text") or (c.get("delta") or {}).get("content"):
            return 1
    return 0


async def serve(client: Client) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "quit":
            break
        t0 = time.perf_counter()
        if op == "run":
            recs = await client.run(cmd["url"], cmd["path"], cmd["body"], int(cmd["n"]), int(cmd["concurrency"]),
                                    bool(cmd.get("pooled")))
        elif op == "groups":
            recs = await client.groups(cmd["url"], cmd["path"], cmd["groups"])
        else:
            recs = []
        wall = time.perf_counter() - t0
        sys.stdout.write(json.dumps({"wall": wall, "records": recs}) + "\n")
        sys.stdout.flush()
    await client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", default="", help="comma-separated CPUs to pin this process to")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds")
    a = ap.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(Client(a.timeout)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
