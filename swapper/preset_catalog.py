"""INI presets applied to the catalog, the way llama.cpp's router merges its model sources
(`server_models::load_models`): cache models, then `--models-dir` ones, then preset sections, with
the `[*]` section under each; a section named like a found model adds its options to that model
(and makes its source `preset`); `dedup-cache-models` hides the cache entry a preset already
serves (from the listing only: the name still answers).

What a section's options become: `model` / `hf-repo` (+ `hf-file`) the GGUF (an `hf-repo` is
looked up in the Hugging Face cache offline, as `llama-server --offline` would), `mmproj`,
`spec-draft-model` / `spec-draft-hf` the draft, `alias` the aliases, `ctx-size` / `parallel`
swapper's context per slot and slots (llama.cpp's `-c` is the child's total), `load-on-startup`
a start-up load; every other option is passed to the child as a llama-server flag, after the
router-wide flags, so the section wins.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from .catalog import Found, ModelEntry, shard_files
from .ini_preset import Preset, is_truthy, preset_for_args

log = logging.getLogger("swapper.presets")

# options that become entry fields instead of child flags
FIELDS = ("LLAMA_ARG_MODEL", "LLAMA_ARG_HF_REPO", "LLAMA_ARG_HF_FILE", "LLAMA_ARG_MMPROJ", "LLAMA_ARG_ALIAS",
          "LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_N_PARALLEL", "LLAMA_ARG_SPEC_DRAFT_MODEL",
          "LLAMA_ARG_SPEC_DRAFT_HF_REPO", "LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_TAGS")


def resolve_hf(cache: Iterable[Found], repo_tag: str, hf_file: str | None = None) -> Found | None:
    """`org/repo[:TAG]` (+ a file in the repo) to a cached model, offline."""
    repo, _, tag = repo_tag.partition(":")
    cands = [f for f in cache if f.repo == repo and f.engine == "llamacpp"]
    if hf_file:
        return next((f for f in cands if f.path.as_posix().endswith("/" + hf_file.lstrip("/"))), None)
    if tag:
        return next((f for f in cands if f.name == f"{repo}:{tag.upper()}"), None)
    # no tag: llama.cpp's default preference (Q4_K_M), else the first
    return next((f for f in cands if f.name.endswith(":Q4_K_M")), cands[0] if cands else None)


def apply_presets(entries: list[ModelEntry], cache: list[Found], glob: Preset,
                  presets: dict[str, Preset], make_entry) -> list[ModelEntry]:
    """The catalog's discovered entries with the presets applied, plus one entry per new section.

    `make_entry(name, path, files, mmproj, draft, preset)` builds a new entry with the settings'
    defaults (catalog's `_entry`)."""
    by_name = {e.id: i for i, e in enumerate(entries)}
    out = list(entries)
    for i, e in enumerate(out):  # [*] under every discovered llama.cpp model
        if e.engine == "llamacpp" and e.source in ("cache", "models_dir") and glob.options:
            p = _described(e)
            p = _cascade(glob, p)
            out[i] = _with_preset(e, p, cache)
    hidden: set[Path] = set()
    for name, section in presets.items():
        p = _cascade(glob, section)
        if name in by_name:
            base = out[by_name[name]]
            merged = _described(base)
            merged = _cascade(glob, merged)
            merged.merge(section)
            out[by_name[name]] = replace(_with_preset(base, merged, cache), source="preset")
        else:
            e = _new_entry(name, p, cache, make_entry)
            if e is None:
                continue
            by_name[name] = len(out)
            out.append(e)
        if is_truthy(p.get("__PRESET_DEDUP_CACHE_MODELS") or ""):
            for repo_env, file_env in (("LLAMA_ARG_HF_REPO", "LLAMA_ARG_HF_FILE"),
                                       ("LLAMA_ARG_SPEC_DRAFT_HF_REPO", "LLAMA_ARG_SPEC_DRAFT_MODEL")):
                repo = p.get(repo_env)
                f = resolve_hf(cache, repo, p.get(file_env)) if repo else None
                if f is not None:
                    hidden.add(f.path)
    return [replace(e, hidden=True) if e.source == "cache" and e.path in hidden else e for e in out]


def _cascade(base: Preset, p: Preset) -> Preset:
    out = Preset(p.name, dict(base.options))
    out.merge(p)
    return out


def _described(e: ModelEntry) -> Preset:
    """The preset llama.cpp would hold for a model found in the cache or the models folder."""
    if e.source == "cache":
        return preset_for_args(e.id, e.args, LLAMA_ARG_HF_REPO=e.id)
    return preset_for_args(e.id, e.args, LLAMA_ARG_MODEL=str(e.path or ""),
                           LLAMA_ARG_MMPROJ=str(e.mmproj or ""))


def _fields(p: Preset, cache: list[Found]) -> dict:
    """Entry fields a preset sets (only those it names)."""
    out: dict = {}
    if p.get("LLAMA_ARG_ALIAS"):
        out["aliases"] = tuple(a.strip() for a in (p.get("LLAMA_ARG_ALIAS") or "").split(",") if a.strip())
    parallel = p.get("LLAMA_ARG_N_PARALLEL")
    if parallel:
        out["parallel"] = max(1, int(parallel))
    ctx = p.get("LLAMA_ARG_CTX_SIZE")
    if ctx:
        out["ctx_size"] = int(ctx) // out.get("parallel", 1)
    if p.get("LLAMA_ARG_MMPROJ"):
        out["mmproj"] = Path(p.get("LLAMA_ARG_MMPROJ") or "").expanduser().absolute()
    draft = p.get("LLAMA_ARG_SPEC_DRAFT_MODEL")
    draft_repo = p.get("LLAMA_ARG_SPEC_DRAFT_HF_REPO")
    if draft_repo:
        f = resolve_hf(cache, draft_repo, draft)
        out["draft"] = f.path if f else None
    elif draft:
        out["draft"] = Path(draft).expanduser().absolute()
    out["startup"] = is_truthy(p.get("__PRESET_LOAD_ON_STARTUP") or "")
    child = Preset(p.name, {o: v for o, v in p.options.items() if o.env not in FIELDS})
    out["args"] = tuple(child.to_args())
    out["preset"] = p
    return out


def _with_preset(e: ModelEntry, p: Preset, cache: list[Found]) -> ModelEntry:
    f = _fields(p, cache)
    preset = f.pop("preset")
    f["args"] = tuple(f["args"])
    return replace(e, **f, preset_ini=_shown(preset))


def _new_entry(name: str, p: Preset, cache: list[Found], make_entry) -> ModelEntry | None:
    model, repo = p.get("LLAMA_ARG_MODEL"), p.get("LLAMA_ARG_HF_REPO")
    mmproj = None
    if model:
        path = Path(model).expanduser().absolute()
        files = shard_files(path)
    elif repo:
        found = resolve_hf(cache, repo, p.get("LLAMA_ARG_HF_FILE"))
        if found is None:
            log.warning("preset [%s]: %s is not in the Hugging Face cache (download it with "
                        "POST /models or swapper pull); skipped", name, repo)
            return None
        path, files, mmproj = found.path, list(found.files), found.mmproj
    else:
        log.warning("preset [%s]: names no model (model = PATH or hf-repo = org/repo:TAG); skipped", name)
        return None
    e = make_entry(name, path, files, mmproj)
    new = _with_preset(e, p, cache)
    return replace(new, source="preset", args=e.args + new.args)  # router-wide flags, then the section's


def _shown(p: Preset) -> str:
    """`status.preset`: the INI text without what the router sets per child."""
    shown = Preset(p.name, dict(p.options))
    shown.unset("LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_ALIAS", "LLAMA_ARG_TAGS", "LLAMA_API_KEY")
    return shown.to_ini()



def preset_text(e: ModelEntry) -> str | None:
    """`status.preset` of any llama.cpp model: its INI section, or the one the router would hold
    for a model found in the cache or a folder (`[id]` with `hf-repo` or `model`, and its flags)."""
    if e.preset_ini is not None:
        return e.preset_ini
    if e.engine != "llamacpp":
        return None
    return _shown(_described(e))
