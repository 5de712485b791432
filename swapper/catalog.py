"""Discovery: which models exist, under which names, and which files each one needs.

Folder rules are llama.cpp router's (`common/preset.cpp: load_from_models_dir`), so a folder
prepared for `llama-server --models-dir` works unchanged:
- a top-level `NAME.gguf` is model `NAME` (files naming `mmproj`, or starting with a draft
  prefix, are companions, never models);
- a subfolder is one model named after the folder: its GGUF is the first shard of a split set
  (`*-00001-of-0000N.gguf`) or its non-mmproj GGUF; an `mmproj*.gguf` beside it is passed as
  `--mmproj`; a draft-model companion (`mtp-`, `dspark-`, `dflash-`) as `--model-draft`;
- a subfolder holding a Hugging Face model (config.json + *.safetensors) is a vLLM model;
- folders without a model are skipped; hidden files and folders are ignored;
- config entries override discovered ones of the same name.
Listing only walks directories and stats files: nothing here reads tensor data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import ModelSpec, Settings

DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path


@dataclass(frozen=True)
class ModelEntry:
    """One servable model: identity, files and the settings its child starts with."""

    id: str  # unique; `name@engine` when one name is declared on two engines
    name: str
    engine: str
    path: Path | None  # GGUF (first shard) or model folder; None for a hub repo id
    source: str  # models_dir | config | cache (Hugging Face cache) | preset (INI)
    size: int = 0  # bytes of every file the model loads
    files: tuple[Path, ...] = ()
    mmproj: Path | None = None
    draft: Path | None = None
    repo: str | None = None  # Hugging Face repo id (vLLM)
    aliases: tuple[str, ...] = ()
    ctx_size: int = 4096
    parallel: int = 1
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    pinned: bool = False
    idle_ttl: float | None = None
    adapters: tuple[Adapter, ...] = ()
    sleep: bool = False
    footprint: int | None = None  # declared bytes, beats estimates
    chat_template: str | None = None  # llama.cpp built-in name or an absolute Jinja file path
    preset_ini: str | None = None  # llama.cpp INI preset text (`status.preset`)
    hidden: bool = False  # left out of listings (dedup-cache-models), still served by name
    startup: bool = False  # load-on-startup (INI presets)
    device: str | None = None  # the one device it must run on ("nvidia:1"); None: placed

    def adapter(self, name: str) -> Adapter | None:
        return next((a for a in self.adapters if a.name == name), None)


@dataclass
class Resolution:
    entry: ModelEntry
    adapter: Adapter | None = None


@dataclass
class Catalog:
    """Every known model, with name, alias and adapter lookup."""

    entries: list[ModelEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_id = {e.id: e for e in self.entries}

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, model_id: str) -> ModelEntry | None:
        return self._by_id.get(model_id)

    def names(self) -> list[str]:
        return [e.id for e in self.entries]

    def resolve(self, name: str, owned_by: str | None = None) -> Resolution | None:
        """A request's `model` (id, name, alias or adapter) to the entry that serves it."""
        if not isinstance(name, str) or not name:
            return None
        if owned_by:
            e = self._by_id.get(f"{name}@{owned_by}")
            if e is not None:
                return Resolution(e)
        e = self._by_id.get(name)
        if e is not None and (not owned_by or e.engine == owned_by):
            return Resolution(e)
        candidates = [e for e in self.entries if e.name == name or name in e.aliases]
        if owned_by:
            candidates = [e for e in candidates if e.engine == owned_by]
        if candidates:
            return Resolution(candidates[0])
        for e in self.entries:
            a = e.adapter(name)
            if a is not None and (not owned_by or e.engine == owned_by):
                return Resolution(e, a)
        return None


# ---------------------------------------------------------------------------------- scanning


def _is_mmproj(name: str) -> bool:
    return "mmproj" in name


def _is_draft(name: str) -> bool:
    return name.startswith(DRAFT_PREFIXES)


def _visible(entries: Iterable[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


@dataclass
class Found:
    """A model found on disk, before settings are applied."""

    name: str
    engine: str
    path: Path
    files: list[Path]
    mmproj: Path | None = None
    draft: Path | None = None
    aliases: tuple[str, ...] = ()  # other names it answers to (swapper's earlier cache names)
    repo: str | None = None  # Hugging Face repo id, for models found in the cache


def shard_files(first: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard (or the file itself)."""
    m = _SHARD_RE.search(first.name)
    if not m:
        return [first]
    total = int(m.group(2))
    stem = first.name[: m.start()]
    return [first.with_name(f"{stem}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def _scan_subdir(path: Path, name: str) -> Found | None:
    try:
        items = _visible(os.scandir(path))
    except OSError:
        return None
    model = first_shard = mmproj = draft = None
    has_config = has_safetensors = False
    for it in items:
        if not it.is_file():
            continue
        n = it.name
        if n.endswith(".gguf"):
            if _is_mmproj(n):
                mmproj = Path(it.path)
            elif _is_draft(n):
                draft = draft or Path(it.path)
            elif "-00001-of-" in n:
                first_shard = Path(it.path)
            else:
                model = Path(it.path)
        elif n == "config.json":
            has_config = True
        elif n.endswith(".safetensors"):
            has_safetensors = True
    gguf = first_shard or model
    if gguf is not None:
        files = shard_files(gguf) + ([mmproj] if mmproj else [])
        return Found(name, "llamacpp", gguf, files, mmproj, draft)
    if has_config and has_safetensors:
        files = [Path(it.path) for it in items if it.is_file()]
        return Found(name, "vllm", path, files)
    return None


def scan_models_dir(models_dir: Path) -> list[Found]:
    """Apply llama.cpp router's folder rules to one directory."""
    found: list[Found] = []
    for it in _visible(os.scandir(models_dir)):
        if it.is_dir():
            f = _scan_subdir(Path(it.path), it.name)
            if f:
                found.append(f)
        elif it.name.endswith(".gguf") and it.is_file():
            if _is_mmproj(it.name) or _is_draft(it.name):
                continue
            p = Path(it.path)
            found.append(Found(it.name[: -len(".gguf")], "llamacpp", p, shard_files(p)))
    return found


def _size(files: Iterable[Path]) -> int:
    total = 0
    for f in files:
        try:
            total += f.stat().st_size
        except OSError:
            pass
    return total


def _entry(st: Settings, name: str, engine: str, path: Path | None, source: str,
           files: list[Path], spec: ModelSpec | None, mmproj: Path | None = None,
           draft: Path | None = None, repo: str | None = None, aliases: tuple[str, ...] = ()) -> ModelEntry:
    d = st.defaults
    spec = spec or ModelSpec(name=name)
    base = path.parent if path is not None and path.is_file() else (path or Path("."))
    adapters = tuple(Adapter(a, _model_path(st, f, base)) for a, f in spec.adapters.items())
    env = {**d.env, **spec.env}
    return ModelEntry(
        id=name, name=name, engine=engine, path=path, source=source, size=_size(files),
        files=tuple(files), mmproj=mmproj, draft=draft, repo=repo,
        aliases=tuple(dict.fromkeys((*spec.aliases, *aliases))),
        ctx_size=spec.ctx_size if spec.ctx_size is not None else d.ctx_size,
        parallel=spec.parallel if spec.parallel is not None else d.parallel,
        args=tuple(d.args) + tuple(spec.args), env=tuple(sorted(env.items())),
        pinned=spec.pinned or name in st.pin, idle_ttl=spec.idle_ttl, adapters=adapters,
        sleep=spec.sleep, footprint=spec.footprint, chat_template=_chat_template(st, engine, spec),
        device=spec.device,
    )


def _chat_template(st: Settings, engine: str, spec: ModelSpec) -> str | None:
    """The entry's template: its own, else the defaults' (a built-in name only for llama.cpp)."""
    from .chat_template import is_builtin

    value = spec.chat_template
    if value is None:
        value = st.defaults.chat_template
        if value is not None and engine != "llamacpp" and is_builtin(value):
            return None
    if value is None or is_builtin(value):
        return value
    return str(_model_path(st, value))


def _model_path(st: Settings, p: str, base: Path | None = None) -> Path:
    """A config path: absolute, or relative to the models directory."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute():
        return path
    root = st.models_path or base or Path(".")
    return root.absolute() / path


def build_catalog(st: Settings, hf_cache: Iterable[Found] = (), presets: Any = None) -> Catalog:
    """Discovered models, INI presets (`(global, sections)` of ini_preset), then config entries
    overriding them; ids disambiguated by engine."""
    hf_cache = list(hf_cache)
    found: dict[tuple[str, str], ModelEntry] = {}
    order: list[tuple[str, str]] = []

    def put(e: ModelEntry) -> None:
        key = (e.name, e.engine)
        if key not in found:
            order.append(key)
        found[key] = e

    if st.models_path is not None and st.models_path.is_dir():
        for f in scan_models_dir(st.models_path):
            if f.name in st.models:
                continue  # the config entry wins; applied below
            put(_entry(st, f.name, f.engine, f.path, "models_dir", f.files, None, f.mmproj, f.draft))
    for f in hf_cache:
        if (f.name, f.engine) not in found and not {f.name, *f.aliases} & set(st.models):
            put(_entry(st, f.name, f.engine, f.path, "cache", f.files, None, f.mmproj, f.draft, aliases=f.aliases))
    if presets is not None:
        from .preset_catalog import apply_presets

        cache = list(hf_cache)
        glob, sections = presets
        sections = {n: p for n, p in sections.items() if n not in st.models}  # YAML wins

        def make(name: str, path: Path, files: list[Path], mmproj: Path | None) -> ModelEntry:
            return _entry(st, name, "llamacpp", path, "preset", files, None, mmproj)

        merged = apply_presets([found[k] for k in order], cache, glob, sections, make)
        found, order = {}, []
        for e in merged:
            put(e)
    for key, spec in st.models.items():
        name, _, eng = key.partition("@")
        engine = eng or spec.engine or st.defaults.engine
        put(_config_entry(st, name, engine, spec))

    by_name: dict[str, int] = {}
    for name, _ in order:
        by_name[name] = by_name.get(name, 0) + 1
    entries = []
    for name, engine in order:
        e = found[(name, engine)]
        if by_name[name] > 1:
            e = _replace_id(e, f"{name}@{engine}")
        entries.append(e)
    return Catalog(entries)


def _replace_id(e: ModelEntry, new_id: str) -> ModelEntry:
    from dataclasses import replace

    return replace(e, id=new_id)


def _config_entry(st: Settings, name: str, engine: str, spec: ModelSpec) -> ModelEntry:
    if spec.path is None:  # a hub repo id, resolved by the engine (vLLM)
        return _entry(st, name, engine, None, "config", [], spec, repo=spec.source)
    path = _model_path(st, spec.path)
    if path.is_dir():
        found = _scan_subdir(path, name)
        if found is not None:
            mmproj = _model_path(st, spec.mmproj) if spec.mmproj else found.mmproj
            return _entry(st, name, engine, found.path, "config", found.files, spec, mmproj, found.draft)
        files = [path]
    else:
        files = shard_files(path) if path.suffix == ".gguf" else [path]
    mmproj = _model_path(st, spec.mmproj) if spec.mmproj else None
    if mmproj:
        files.append(mmproj)
    return _entry(st, name, engine, path, "config", files, spec, mmproj, repo=spec.source)
