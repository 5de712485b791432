"""Model files for the benchmarks: synthetic GGUFs written once per machine and cached.

Files are fsync'ed after writing: only clean pages can be dropped from the page cache, and the
cold-start runs depend on dropping them. Header-only GGUFs (a few KB: full llama metadata and
vocabulary, tensors of a few elements) stand in for a big models directory when only listing
is measured.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("SWAPPER_BENCH_CACHE", Path.home() / ".cache" / "swapper" / "bench-models"))
MiB = 1 << 20


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def synth(size_mib: int, seed: int, tag: str = "") -> Path:
    """A cached synthetic llama GGUF of about `size_mib` MiB (distinct seeds = distinct models)."""
    from swapper.synth import write_model

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"synth-{size_mib}m-s{seed}{tag}.gguf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        write_model(tmp, size_mib * MiB, seed=seed, ctx=4096, name=path.stem)
        fsync(tmp)
        tmp.rename(path)
    return path


def header_only(path: Path, seed: int = 0) -> Path:
    """A valid llama GGUF of a few KB: real metadata and vocabulary, 8-wide tensors."""
    from swapper.synth import Shape, write_model

    write_model(path, seed=seed, ctx=256, shape=Shape(n_embd=8, n_layer=1, n_ff=16, n_head=1, n_head_kv=1))
    return path


def many_headers(folder: Path, count: int) -> Path:
    """`count` distinct header-only GGUFs (copies of one) named model-0000.gguf, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    proto = CACHE / "header-only.gguf"  # outside the folder: router mode lists hidden files too
    if not proto.exists():
        header_only(proto)
    for i in range(count):
        p = folder / f"model-{i:04d}.gguf"
        if not p.exists():
            shutil.copyfile(proto, p)
    return folder


def resident_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache according to util-linux fincore (None if unavailable)."""
    exe = shutil.which("fincore")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def evict_from_page_cache(path: Path) -> int | None:
    """Drop a file's pages (fadvise DONTNEED) and return what fincore still sees resident."""
    from swapper.prefetch import dontneed

    fsync(path)
    dontneed(path)
    return resident_bytes(path)


def link_dir(folder: Path, files: dict[str, Path]) -> Path:
    """A models folder of symlinks, name.gguf -> file (llama.cpp router naming rules)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        dst = folder / f"{name}.gguf"
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
    return folder
