"""systemd integration: readiness notifications for `Type=notify` units.

`notify("READY=1")` sends a datagram to `$NOTIFY_SOCKET` (a path, or an abstract socket when it
starts with `@`); without the variable it does nothing, so the same binary runs anywhere.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send `KEY=VALUE` lines to systemd; True if a socket was there to take them."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall("\n".join(lines).encode())
        return True
    except OSError:
        return False
