"""Page-cache warm tier for model files.

Starting llama-server on a file that is in the page cache is several times faster than from
disk (H100, 5.4 GiB GGUF: 1.07 s warm vs 5.0 s cold). So while a swap waits for its victims to
drain and stop, the incoming model's files are read ahead (`POSIX_FADV_WILLNEED`, in a thread),
and the files of recently evicted models are kept warm within a host-RAM allowance, most
recently evicted first.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .catalog import ModelEntry

log = logging.getLogger("swapper.prefetch")


def willneed(path: Path) -> int:
    """Ask the kernel to read a whole file into the page cache; returns its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return size
    finally:
        os.close(fd)


def dontneed(path: Path) -> None:
    """Drop a file's clean pages from the page cache (benchmarks' cold runs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Prefetcher:
    """Reads incoming models ahead and keeps recently evicted ones warm."""

    def __init__(self, warm_budget: int, enabled: bool = True):
        self.warm_budget = warm_budget
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._lock = threading.Lock()
        self.warm: OrderedDict[str, int] = OrderedDict()  # model id -> bytes, newest last
        self.prefetched: list[str] = []  # model ids, for tests and the status page

    def prefetch(self, entry: ModelEntry) -> None:
        if not self.enabled or not entry.files:
            return
        self.prefetched.append(entry.id)
        del self.prefetched[:-100]
        self._pool.submit(self._read, entry)

    def _read(self, entry: ModelEntry) -> None:
        total = 0
        for f in entry.files:
            try:
                total += willneed(f)
            except OSError as e:
                log.debug("prefetch %s: %s", f, e)
        log.debug("prefetch %s: %d bytes advised", entry.id, total)

    def evicted(self, entry: ModelEntry) -> None:
        """Remember an evicted model's files as warm; forget the oldest past the allowance."""
        if not self.enabled or not entry.files:
            return
        with self._lock:
            self.warm.pop(entry.id, None)
            self.warm[entry.id] = entry.size
            while self.warm and sum(self.warm.values()) > self.warm_budget:
                self.warm.popitem(last=False)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
