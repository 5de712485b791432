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
    import gguf
    import numpy as np

    from swapper.synth import _vocab

    d, n_ff, n_layer = 8, 16, 1
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    w.add_tensor("token_embd.weight", t(4, d))
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", t(d, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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
