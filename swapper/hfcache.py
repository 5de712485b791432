"""Models in the local Hugging Face cache, found offline with huggingface-hub's cache scanner.

A cached model repo whose newest snapshot holds `config.json` and `*.safetensors` is a vLLM
model named after the repo (`org/name`); one holding GGUF files is a llama.cpp model (the first
shard of a split set, mmproj companions passed along). Nothing is downloaded here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .catalog import Found, _is_draft, _is_mmproj, shard_files

log = logging.getLogger("swapper.hfcache")


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
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        files = {f.file_name: Path(f.file_path) for f in rev.files}
        snapshot = Path(rev.snapshot_path)
        ggufs = sorted(n for n in files if n.endswith(".gguf") and not _is_mmproj(n) and not _is_draft(n)
                       and ("-of-" not in n or "-00001-of-" in n))
        if ggufs:
            mmproj = next((files[n] for n in sorted(files) if n.endswith(".gguf") and _is_mmproj(n)), None)
            for n in ggufs:
                name = repo.repo_id if len(ggufs) == 1 else f"{repo.repo_id}:{Path(n).stem}"
                first = files[n]
                found.append(Found(name, "llamacpp", first, shard_files(first) + ([mmproj] if mmproj else []), mmproj))
        elif "config.json" in files and any(n.endswith(".safetensors") for n in files):
            found.append(Found(repo.repo_id, "vllm", snapshot, list(files.values())))
    return found
