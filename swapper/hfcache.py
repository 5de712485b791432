"""Models in the local Hugging Face cache, found offline with huggingface-hub's cache scanner.

A cached model repo whose newest snapshot (the revision `main` points at, else the newest) holds
`config.json` and `*.safetensors` is a vLLM model named after the repo (`org/name`). One holding
GGUF files is a llama.cpp model: named `org/name` when it has one GGUF model, and
`org/name:QUANT` (the quant in the file name, as `llama-server -hf org/name:QUANT` and `swapper
pull` spell it) when it has several; a split set counts once (its first shard), and an `mmproj`
companion of the same quant (else F16, else the first) is passed along. Nothing is downloaded
here and the scan only stats files. `SWAPPER_HF_CACHE=0` turns the scan off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .catalog import Found, _is_draft, _is_mmproj, shard_files

log = logging.getLogger("swapper.hfcache")


def _newest(repo: Any) -> Any:
    main = next((r for r in repo.revisions if "main" in r.refs), None)
    return main or max(repo.revisions, key=lambda r: r.last_modified)


def _is_first(rel: str) -> bool:
    return "-of-" not in rel or "-00001-of-" in rel


def _mmproj_for(files: dict[str, Path], quant: str) -> Path | None:
    from .pull import _has_tag

    mm = sorted(n for n in files if n.endswith(".gguf") and _is_mmproj(Path(n).name))
    if not mm:
        return None
    pick = (next((n for n in mm if quant and _has_tag(n, quant)), None)
            or next((n for n in mm if _has_tag(n, "F16")), None) or mm[0])
    return files[pick]


def found_in_revision(repo_id: str, snapshot: Path, files: dict[str, Path]) -> list[Found]:
    """What one snapshot (files keyed by their path in the repo) offers."""
    from .pull import _quant_of, model_stem

    ggufs = sorted(n for n in files if n.endswith(".gguf") and not _is_mmproj(Path(n).name)
                   and not _is_draft(Path(n).name) and _is_first(n))
    if ggufs:
        quants = [_quant_of(n) for n in ggufs]
        by_quant = len(set(quants)) == len(quants) and all(quants)
        out = []
        for n, q in zip(ggufs, quants):
            if len(ggufs) == 1:
                name = repo_id
            else:
                name = f"{repo_id}:{q if by_quant else model_stem(n)}"
            first = files[n]
            mmproj = _mmproj_for(files, q)
            out.append(Found(name, "llamacpp", first, shard_files(first) + ([mmproj] if mmproj else []), mmproj))
        return out
    if "config.json" in files and any(n.endswith(".safetensors") for n in files):
        return [Found(repo_id, "vllm", snapshot, sorted(files.values()))]
    return []


def scan_hf_cache(cache_dir: str | Path | None = None) -> list[Found]:
    if os.environ.get("SWAPPER_HF_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return []
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    except Exception as e:  # a corrupt cache must not stop the router
        log.warning("cannot scan the Hugging Face cache: %s", e)
        return []
    found: list[Found] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = _newest(repo)
        snapshot = Path(rev.snapshot_path)
        files = {f.file_path.relative_to(snapshot).as_posix(): Path(f.file_path) for f in rev.files}
        found += found_in_revision(repo.repo_id, snapshot, files)
    return found
