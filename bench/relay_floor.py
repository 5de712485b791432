#!/usr/bin/env python3
"""The floor of a Python front: a relay with no HTTP library on its hot path (not a product).

What it does per request is what any router must do, and nothing more: read the client's
request (keep-alive HTTP/1.1 with a Content-Length body), parse the JSON body once (the model
name), open a connection to the engine (`Connection: close`, as swapper does for streams) and
pipe the engine's bytes back untouched, chunked framing included, until the engine closes. Two
asyncio protocols on uvloop; one `transport.write` per chunk the engine sends.

It answers a question the benchmark cannot answer by itself: is the CPU a Python front costs
per request (and per streamed token) above llama.cpp's C++ router because of Python, or
because of the HTTP machinery around the relay? Run it in front of a llama-server and measure
its CPU per request the way bench/cpu.py measures the fronts:

    python bench/relay_floor.py --port 8090 --upstream-port 8080
"""

from __future__ import annotations

import argparse
import asyncio
import json

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


class Upstream(asyncio.Protocol):
    """The engine side: the status line and headers once, then every byte as it comes."""

    def __init__(self, client: Front):
        self.client = client
        self.head = b""
        self.in_head = True

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            # the client's connection stays open: the engine's "close" is for this hop only
            data = self.head[:end].replace(b"\r\nConnection: close", b"") + self.head[end:]
            self.in_head = False
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.busy = False
        self.client.next_request()


class Front(asyncio.Protocol):
    """The client side: one request at a time per connection, as HTTP/1.1 without pipelining."""

    upstream_port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.busy = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next_request()

    def next_request(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.buf[:end].split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        body = self.buf[end + 4:end + 4 + length]
        self.buf = self.buf[end + 4 + length:]
        if body:
            json.loads(body).get("model")  # the one parse a router needs
        self.busy = True
        req = (lines[0] + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
        asyncio.get_running_loop().create_task(self._send(req))

    async def _send(self, req: bytes) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.upstream_port)
        transport.write(req)


async def serve(port: int, upstream_port: int) -> None:
    Front.upstream_port = upstream_port
    server = await asyncio.get_running_loop().create_server(Front, "127.0.0.1", port)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream-port", type=int, required=True)
    a = ap.parse_args()
    (uvloop.run if uvloop is not None else asyncio.run)(serve(a.port, a.upstream_port))


if __name__ == "__main__":
    main()
