"""Waiting on a condition in an async test: a bounded poll, never a bare sleep."""

from __future__ import annotations

import asyncio
from typing import Callable


async def eventually(pred: Callable[[], object], timeout: float = 5.0, every: float = 0.01) -> bool:
    """Whether `pred` came to hold within `timeout` seconds (the caller asserts, with its reason)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() >= end:
            return False
        await asyncio.sleep(every)
    return True
