"""Models in the local Hugging Face cache, found offline with huggingface-hub's cache scanner.

The cache is the one llama.cpp reads (`common/hf-cache.cpp`): `LLAMA_CACHE`, else `HF_HUB_CACHE`
(or `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else
`~/.cache/huggingface/hub` -- so a cache filled by `llama-server -hf` or huggingface-hub is seen.

A cached model repo whose newest snapshot (the revision `main` points at, else the newest) holds
`config.json` and `*.safetensors` is a vLLM model named after the repo (`org/name`). GGUF files
are named as llama.cpp's router names them (`common_list_cached_models`): `org/name:TAG` -- always
with the tag, even for a one-file repo -- where TAG is the upper-cased `[-.]TAG` ending of the
file's path (`model-q8_0.gguf` -> `Q8_0`); a split set counts once (its first shard); files whose
name has no such ending, or that are `mmproj`, `mtp-`, `eagle3-`, `dflash-`, `dspark-`
companions, are not models; two files with one tag are one model (the first path wins). Earlier
swapper names stay as aliases: `org/name` for a repo with one GGUF model, `org/name:QUANT` or
`org/name:STEM` otherwise. An `mmproj` companion of the same quant (else F16, else the first) is
passed along. Nothing is downloaded here and the scan only stats files. `SWAPPER_HF_CACHE=0`
turns the scan off.
"""

from __future__ import annotations

import logging
import os
import re
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


_SPLIT_RE = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.I)
_TAG_RE = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)
_NOT_MODELS = ("mmproj", "mtp-", "eagle3-", "dflash-", "dspark-")


def gguf_tag(rel: str) -> tuple[str, int]:
    """llama.cpp's `get_gguf_split_info`: (TAG, shard index) of a GGUF path in a repo; TAG is ""
    for a file llama.cpp does not list (no `[-.]TAG` ending, or a companion file)."""
    prefix = rel[: -len(".gguf")] if rel.endswith(".gguf") else None
    if prefix is None:
        return "", 0
    index = 1
    m = _SPLIT_RE.match(prefix)
    if m:
        prefix, index = m.group(1), int(m.group(2))
    t = _TAG_RE.search(prefix)
    if not t or any(x in prefix for x in _NOT_MODELS):
        return "", index
    return t.group(1).upper(), index


def found_in_revision(repo_id: str, snapshot: Path, files: dict[str, Path]) -> list[Found]:
    """What one snapshot (files keyed by their path in the repo) offers."""
    from .pull import _quant_of, model_stem

    ggufs = sorted(n for n in files if n.endswith(".gguf") and not _is_mmproj(Path(n).name)
                   and not _is_draft(Path(n).name) and _is_first(n))
    if ggufs:
        quants = [_quant_of(n) for n in ggufs]
        by_quant = len(set(quants)) == len(quants) and all(quants)
        out = []
        seen: set[str] = set()
        for n, q in zip(ggufs, quants):
            old = repo_id if len(ggufs) == 1 else f"{repo_id}:{q if by_quant else model_stem(n)}"
            tag, index = gguf_tag(n)
            if not tag or index != 1 or tag in seen:
                continue  # llama.cpp lists no such model
            seen.add(tag)
            name = f"{repo_id}:{tag}"
            first = files[n]
            mmproj = _mmproj_for(files, q or tag)
            out.append(Found(name, "llamacpp", first, shard_files(first) + ([mmproj] if mmproj else []), mmproj,
                             aliases=(old,) if old != name else (), repo=repo_id))
        return out
    if "config.json" in files and any(n.endswith(".safetensors") for n in files):
        return [Found(repo_id, "vllm", snapshot, sorted(files.values()))]
    return []


def llama_cache_dir(env: dict[str, str] | None = None) -> Path:
    """The cache llama.cpp reads and writes (common/hf-cache.cpp's order of variables)."""
    env = dict(os.environ) if env is None else env
    for var, sub in (("LLAMA_CACHE", ""), ("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""),
                     ("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")):
        if env.get(var):
            base = Path(os.path.expanduser(env[var])).absolute()
            return base / sub if sub else base
    return Path.home() / ".cache" / "huggingface" / "hub"


def scan_hf_cache(cache_dir: str | Path | None = None) -> list[Found]:
    if os.environ.get("SWAPPER_HF_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return []
    try:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound
    except ImportError:
        return []
    try:
        info = scan_cache_dir(cache_dir if cache_dir is not None else llama_cache_dir())
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
        for f in found_in_revision(repo.repo_id, snapshot, files):
            f.repo = f.repo or repo.repo_id
            found.append(f)
    return found
