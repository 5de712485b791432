"""A Hugging Face cache written the way huggingface-hub lays it out, from local files:
`models--org--name/{blobs/<id>, refs/main, snapshots/<commit>/<path> -> ../../blobs/<id>}`.

Blobs are links to the (large, cached) source files instead of copies, so that writing a cache
costs nothing; deleting a model from it removes links, never the sources."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_repo(cache: Path, repo: str, files: dict[str, Path], commit: str | None = None) -> Path:
    """One revision of `repo` holding `files` (path in the repo -> local file); its snapshot."""
    commit = commit or hashlib.sha1(repo.encode()).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    for rel, src in files.items():
        blob = root / "blobs" / hashlib.sha256(f"{repo}/{rel}".encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.symlink_to(Path(src).resolve())
        entry = snap / rel
        entry.parent.mkdir(parents=True, exist_ok=True)
        if not entry.is_symlink():
            entry.symlink_to(os.path.relpath(blob, entry.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap
