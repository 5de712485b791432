"""`swapper pull REPO[:QUANT|FILE]`: fetch a model from the Hugging Face Hub into the models dir.

- `org/repo:Q4_K_M` picks the GGUF whose name carries that quant, as llama.cpp's `-hf` does
  (case-insensitive; no tag: Q4_K_M, else Q4_0, else Q8_0, else the only or first GGUF); a split
  GGUF brings all its shards, and an `mmproj*.gguf` in the repo comes along (the one naming the
  same quant, else F16, else the first).
- `org/repo:path/in/repo.gguf` takes that file.
- `--snapshot`, or a repo without GGUF files but with config.json, downloads the whole repo for
  vLLM (skipping `original/` and non-safetensors weight formats when safetensors are there).
Files land in `MODELS_DIR/NAME/`, laid out the way the catalog reads folders: NAME is the GGUF's
stem (without a shard suffix) or the repo's name. Shards kept in a sub-folder of the repo get
a link at the top of the model folder. A manifest (`.swapper-pull.json`) records what came from
where, so `--offline` can tell a finished pull from a missing one.

huggingface-hub does the transfer: progress bars, `HF_TOKEN` for gated or private repos,
`HF_ENDPOINT` for mirrors, retries that resume a broken download with a Range request. Files
are fetched one by one against the resolved commit, so an interrupted pull keeps the files it
finished and a repeated pull only fetches what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MANIFEST = ".swapper-pull.json"
DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q8_0")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)
_SKIP_WITH_SAFETENSORS = ["original/*", "*.bin", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf"]


class PullError(Exception):
    """A pull that cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Spec:
    repo: str
    tag: str | None = None  # quant name
    file: str | None = None  # path in the repo


@dataclass(frozen=True)
class Plan:
    name: str
    files: list[str]  # paths in the repo
    snapshot: bool = False


def parse_spec(text: str) -> Spec:
    s = text.strip()
    for prefix in ("https://huggingface.co/", "http://huggingface.co/", "hf.co/", "huggingface.co/"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    repo, _, rest = s.partition(":")
    repo = repo.strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise PullError(f"'{text}': expected REPO as owner/name, e.g. ggml-org/gemma-3-270m-it-GGUF:Q8_0")
    if not rest:
        return Spec(repo)
    if rest.lower().endswith(".gguf") or "/" in rest:
        return Spec(repo, file=rest)
    return Spec(repo, tag=rest)


# ----------------------------------------------------------------------------- choosing


def _has_tag(path: str, tag: str) -> bool:
    return re.search(rf"(^|[-_./]){re.escape(tag.upper())}([-./]|$)", path.upper()) is not None


def _is_mmproj(path: str) -> bool:
    return "mmproj" in Path(path).name.lower()


def shards_of(first: str, files: list[str]) -> list[str]:
    """Every shard of a split GGUF (same folder, same stem), in order; the file itself otherwise."""
    m = _SHARD.search(first)
    if not m:
        return [first]
    stem, total = first[: m.start()], int(m.group(2))
    want = [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]
    have = {f.lower(): f for f in files}
    missing = [w for w in want if w.lower() not in have]
    if missing:
        raise PullError(f"split GGUF {first} is incomplete in the repo: missing {', '.join(missing)}")
    return [have[w.lower()] for w in want]


def model_stem(path: str) -> str:
    name = Path(path).name
    m = _SHARD.search(name)
    return name[: m.start()] if m else name[: -len(".gguf")]


def choose_gguf(files: list[str], tag: str | None) -> Plan:
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    models = [f for f in ggufs if not _is_mmproj(f)]
    firsts = [f for f in models if not _SHARD.search(f) or _SHARD.search(f).group(1) == "00001"]  # type: ignore[union-attr]
    if not firsts:
        raise PullError("the repo holds no GGUF model file")
    if tag:
        hits = [f for f in firsts if _has_tag(f, tag)]
        if not hits:
            quants = sorted({_quant_of(f) for f in firsts} - {""})
            raise PullError(f"no GGUF for quant '{tag}' in the repo; it has: {', '.join(quants) or ', '.join(firsts)}")
        chosen = hits[0]
    elif len(firsts) == 1:
        chosen = firsts[0]
    else:
        chosen = next((f for q in DEFAULT_QUANTS for f in firsts if _has_tag(f, q)), firsts[0])
    picked = shards_of(chosen, files)
    mmprojs = [f for f in ggufs if _is_mmproj(f)]
    if mmprojs:
        quant = tag or _quant_of(chosen)
        mm = (next((f for f in mmprojs if quant and _has_tag(f, quant)), None)
              or next((f for f in mmprojs if _has_tag(f, "F16")), None) or mmprojs[0])
        picked.append(mm)
    return Plan(name=model_stem(chosen), files=picked)


def _quant_of(path: str) -> str:
    m = re.search(r"(?:^|[-_.])((?:UD-)?I?Q\d[\w]*?|F16|BF16|F32)(?:-\d{5}-of-\d{5})?\.gguf$", Path(path).name, re.I)
    return m.group(1).upper() if m else ""


def plan(spec: Spec, files: list[str], snapshot: bool) -> Plan:
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if spec.file:
        if spec.file not in files:
            raise PullError(f"'{spec.file}' is not in {spec.repo}")
        picked = shards_of(spec.file, files) if spec.file.lower().endswith(".gguf") else [spec.file]
        return Plan(name=model_stem(spec.file) if spec.file.lower().endswith(".gguf") else Path(spec.file).stem,
                    files=picked)
    if snapshot or (not ggufs and "config.json" in files):
        if spec.tag:
            raise PullError(f"a quant ('{spec.tag}') selects a GGUF file; a snapshot takes the whole repo")
        return Plan(name=spec.repo.split("/")[1], files=sorted(files), snapshot=True)
    if not ggufs:
        raise PullError(f"{spec.repo} has neither GGUF files nor a config.json: nothing swapper can serve")
    return choose_gguf(files, spec.tag)


# ------------------------------------------------------------------------------ fetching


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _explain(e: Exception, spec: Spec) -> PullError:
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    url = f"{_endpoint()}/{spec.repo}"
    if isinstance(e, GatedRepoError):
        return PullError(f"{spec.repo} is gated: accept its terms at {url} and set HF_TOKEN to a token of that "
                         "account (huggingface.co/settings/tokens)")
    if isinstance(e, RepositoryNotFoundError):
        hint = "check the name" + ("" if os.environ.get("HF_TOKEN") else ", or set HF_TOKEN if it is private")
        return PullError(f"{spec.repo} was not found at {_endpoint()}: {hint}")
    if isinstance(e, RevisionNotFoundError):
        return PullError(f"{spec.repo} has no revision by that name: {e}")
    if isinstance(e, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return PullError(f"cannot reach {_endpoint()} (offline: HF_HUB_OFFLINE is set or the network is down); "
                         "unset HF_HUB_OFFLINE, or set HF_ENDPOINT to a mirror")
    if isinstance(e, HfHubHTTPError):
        return PullError(f"{_endpoint()} answered an error for {spec.repo}: {str(e).splitlines()[0]}")
    return PullError(f"cannot reach {_endpoint()}: {e.__class__.__name__}: {e}; check the network, or set "
                     "HF_ENDPOINT to a mirror")


def _link_to_top(dest: Path, rel: str) -> Path:
    """Catalog folders are flat: a file kept in a sub-folder of the repo gets a link at the top."""
    target = dest / rel
    if "/" not in rel:
        return target
    link = dest / Path(rel).name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, dest))
    return link


def fetch(spec: Spec, models_dir: Path, revision: str | None, snapshot: bool) -> tuple[Plan, Path]:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi()
    try:
        info = api.model_info(spec.repo, revision=revision)
    except Exception as e:
        raise _explain(e, spec) from None
    commit = info.sha or revision or "main"
    files = [s.rfilename for s in (info.siblings or [])]
    p = plan(spec, files, snapshot)
    dest = models_dir / p.name
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if p.snapshot:
            ignore = _SKIP_WITH_SAFETENSORS if any(f.endswith(".safetensors") for f in files) else ["original/*"]
            snapshot_download(spec.repo, revision=commit, local_dir=dest, ignore_patterns=ignore)
        else:
            for i, f in enumerate(p.files, 1):
                print(f"[{i}/{len(p.files)}] {f}", file=sys.stderr, flush=True)
                hf_hub_download(spec.repo, f, revision=commit, local_dir=dest)
                _link_to_top(dest, f)
    except Exception as e:
        raise _explain(e, spec) from None
    (dest / MANIFEST).write_text(json.dumps({"repo": spec.repo, "tag": spec.tag, "file": spec.file,
                                             "revision": revision, "commit": commit, "files": p.files,
                                             "snapshot": p.snapshot}, indent=1))
    return p, dest


# ------------------------------------------------------------------------------- offline


def find_pulled(spec: Spec, models_dir: Path) -> Path | None:
    """A folder an earlier pull of the same spec completed."""
    if not models_dir.is_dir():
        return None
    for d in sorted(models_dir.iterdir()):
        try:
            m = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if (m.get("repo"), m.get("tag"), m.get("file")) == (spec.repo, spec.tag, spec.file):
            if all((d / f).exists() for f in m.get("files", [])):
                return d
    return None


def in_hf_cache(spec: Spec) -> Path | None:
    from .hfcache import scan_hf_cache

    for f in scan_hf_cache():
        if f.name == spec.repo or f.name.startswith(spec.repo + ":"):
            return f.path
    return None


def offline_answer(spec: Spec, models_dir: Path) -> int:
    done = find_pulled(spec, models_dir)
    if done is not None:
        print(f"{spec.repo}: already pulled into {done} (offline: nothing fetched)")
        return 0
    cached = in_hf_cache(spec)
    if cached is not None:
        print(f"{spec.repo}: not pulled, but the Hugging Face cache holds it at {cached}; "
              "'swapper serve' finds models there by itself")
        return 0
    print(f"swapper pull: --offline: {spec.repo} is not in {models_dir} nor in the Hugging Face cache, and "
          "offline mode may not download it. Run the same command without --offline (and without "
          "HF_HUB_OFFLINE=1) on a machine that reaches the Hub or a mirror (HF_ENDPOINT), then copy "
          f"{models_dir} here; or put the model files into {models_dir}/NAME/ yourself.", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------------- main


def _models_dir(ns: argparse.Namespace) -> Path:
    if getattr(ns, "models_dir", None):
        return Path(os.path.expanduser(ns.models_dir))
    from .settings_load import load_settings

    st = load_settings(None, config_file=getattr(ns, "config", None), preset=getattr(ns, "preset", None))
    return st.models_path or Path("models")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in ("1", "true", "yes", "on")


def pull_main(ns: argparse.Namespace) -> int:
    try:
        spec = parse_spec(ns.spec)
        models_dir = _models_dir(ns)
        if getattr(ns, "offline", False) or _truthy(os.environ.get("HF_HUB_OFFLINE")):
            return offline_answer(spec, models_dir)
        p, dest = fetch(spec, models_dir, getattr(ns, "revision", None), getattr(ns, "snapshot", False))
    except PullError as e:
        print(f"swapper pull: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file() and ".cache" not in f.parts)
    kind = "vLLM snapshot" if p.snapshot else "GGUF"
    print(f"pulled {spec.repo} ({kind}, {len(p.files)} files, {size / 2**20:.1f} MiB) into {dest}")
    print(f"model name: {p.name}    serve it with: swapper serve --models-dir {models_dir}")
    return 0

