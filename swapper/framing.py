"""An answer from a child, read as bytes: its status line and headers, and its chunk framing.

The parsing half of relay.py, which relays the bytes as they come; kept apart so that each
reads on its own. Only the plain HTTP/1.1 the children speak: see relay.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from itertools import repeat

# ends of the answer's body
LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2


class UpstreamError(Exception):
    """The child's answer could not be had."""


class NoAnswer(UpstreamError):
    """The connection was refused, reset or closed before the status line: nothing was answered."""


class BrokenAnswer(UpstreamError):
    """The connection ended inside an answer's body."""


class SilentUpstream(UpstreamError, asyncio.TimeoutError):
    """No byte from the child for longer than the read timeout."""


@dataclass
class Head:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes, bytes]]  # (lower-case name, name, value) as sent
    framing: int  # LENGTH, CHUNKED or UNTIL_CLOSE
    length: int  # the body's size when framing is LENGTH
    close: bool  # the child closes the connection after this answer


def parse_head(raw: bytes, method: str) -> Head:
    """The status line and headers of an answer (without the blank line that ends them), kept
    as bytes: they go on to the client as they came."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    headers: list[tuple[bytes, bytes, bytes]] = []
    length: int | None = None
    chunked = False
    close = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise UpstreamError(f"malformed header line: {line[:80]!r}")
        name, value = name.strip(), value.strip()
        low = name.lower()
        if low == b"content-length":
            if not value.isdigit():
                raise UpstreamError(f"bad Content-Length: {value[:40]!r}")
            length = int(value)
        elif low == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif low == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            close = b"close" in tokens or (close and b"keep-alive" not in tokens)
        headers.append((low, name, value))
    if method == "HEAD" or status in (204, 304):
        framing, length = LENGTH, 0
    elif chunked:
        framing, length = CHUNKED, 0
    elif length is not None:
        framing = LENGTH
    else:
        framing, length, close = UNTIL_CLOSE, 0, True
    return Head(status, parts[2].decode("latin-1") if len(parts) > 2 else "", headers, framing, length, close)


def whole_chunks(data: bytes) -> tuple[list[bytes], bool] | None:
    """The payloads of `data`, and whether it ends the body, if `data` is whole chunks (from a
    chunk's start to the end of a chunk, or of the body) with no CR LF inside a payload: how
    llama-server and vLLM frame a stream's events. None for anything else, which the caller walks
    chunk by chunk (`Exchange._chunks`): trailers, extensions, a chunk cut off, CR LF in a payload.

    Exact, not a guess: split at every CR LF, the parts alternate size, payload, size, ...; when
    every payload is as long as the size before it says, a walk from the start reads the same
    chunks. Costs a `split` and a few `map`s in C, not a Python loop a chunk: a stream's tokens
    are pieces of a few hundred bytes, and walking each cost about as much as relaying it.
    """
    last = data.endswith(b"0\r\n\r\n")  # (after a chunk's CR LF, or nothing: the split checks)
    if last:
        data = data[:-5]
        if not data:
            return [], True
    parts = data.split(b"\r\n")
    if parts[-1] or not len(parts) & 1:  # not ending with a chunk's CR LF
        return None
    payloads = parts[1::2]
    try:
        if list(map(len, payloads)) != list(map(int, parts[0:-1:2], repeat(16))):
            return None
    except ValueError:  # a size line that is not bare hex (an extension, or garbage)
        return None
    if b"" in payloads:  # a last chunk (size 0) before the end of `data`
        return None
    return payloads, last
