"""llama.cpp router's INI presets (`--models-preset FILE.ini`), read by `common/preset.cpp`'s rules.

    version = 1                ; keys before any section form a model named "default" (llama.cpp's quirk)
    [*]                        ; defaults for every model (cache and --models-dir ones too)
    ctx-size = 8192
    [coder]                    ; one section per model; keys are llama-server's flags without dashes,
    hf-repo = org/repo:Q4_K_M  ; their short forms (c = 8192) or their LLAMA_ARG_* names
    no-mmap = true             ; a negated switch is stored as its positive with the value reversed
    load-on-startup = true     ; preset-only keys: load-on-startup, stop-timeout, dedup-cache-models

The grammar is preset.cpp's PEG, quirks included: a key must start its line (indentation is a
parse error for the whole file), a value ends at the first `;` or `#` (no quoting), trailing
blanks are dropped, a repeated `[section]` header starts that section afresh (earlier keys are
lost), the key `version` is ignored, an unknown key is an error naming the key and section, and a
section `[org/repo:tag]` has its tag canonicalised (`:q4_k_m` -> `:Q4_K_M`, `:model-q8_0` ->
`:Q8_0`). Options keep llama.cpp's order (by each option's first flag) in `to_ini` and `to_args`.
Hand-written because llama.cpp's INI dialect is not Python's configparser's (different comment,
continuation, duplicate and case rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .llama_args import LlamaArg, table

DEFAULT_NAME = "default"
GLOBAL_NAME = "*"
TRUTHY = ("on", "enabled", "true", "1")
FALSEY = ("off", "disabled", "false", "0")

_HEADER = re.compile(r"^\[[ \t]*([^\]]+)\][ \t]*(?:[;#].*)?$")
_KV = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*=[ \t]*(.*?)[ \t]*(?:[;#].*)?$")
_BLANK_OR_COMMENT = re.compile(r"^[ \t]*(?:[;#].*)?$")
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.I)


class PresetError(ValueError):
    pass


def is_truthy(v: str) -> bool:
    return v in TRUTHY


@dataclass
class Preset:
    """One section: options keyed by their llama-server option, values as written."""

    name: str
    options: dict[LlamaArg, str] = field(default_factory=dict)

    def get(self, env: str) -> str | None:
        return next((v for o, v in self.options.items() if o.env == env), None)

    def unset(self, *envs: str) -> None:
        for o in [o for o in self.options if o.env in envs]:
            del self.options[o]

    def merge(self, other: Preset) -> None:
        self.options.update(other.options)

    def ordered(self) -> list[tuple[LlamaArg, str]]:
        return sorted(self.options.items(), key=lambda kv: kv[0].args[0])

    def to_ini(self) -> str:
        lines = [f"[{self.name}]"]
        lines += [f"{o.key} = {v.replace(chr(10), chr(92) + chr(10))}" for o, v in self.ordered()]
        return "\n".join(lines) + "\n\n"

    def to_args(self) -> list[str]:
        """preset.cpp's `to_args`: long forms; a false switch becomes its negation, or is dropped."""
        out: list[str] = []
        for o, v in self.ordered():
            if o.preset_only:
                continue
            if o.value:
                out += [o.long, v]
            elif not (v in FALSEY):
                out.append(o.long)
            elif o.neg:
                out.append(o.neg[-1])
        return out


def canonical_tag(tag: str) -> str:
    m = _TAG.search(tag)
    return (m.group(1) if m else tag).upper()


def parse_ini(text: str, source: str = "preset") -> dict[str, dict[str, str]]:
    """Sections (in file order) of key -> raw value; raises `PresetError` on any bad line."""
    parsed: dict[str, dict[str, str]] = {}
    section = DEFAULT_NAME
    for n, line in enumerate(re.split(r"\r\n|\n|\r", text), 1):
        h = _HEADER.match(line)
        if h:
            section = h.group(1)
            parsed[section] = {}  # a repeated header starts the section afresh, as in preset.cpp
            continue
        kv = _KV.match(line)
        if kv:
            parsed.setdefault(section, {})[kv.group(1)] = kv.group(2)
            continue
        if _BLANK_OR_COMMENT.match(line):
            continue
        raise PresetError(f"{source}: line {n}: not a [section], key = value, comment or blank line: {line!r}")
    return parsed


def load_presets(text: str, source: str = "preset") -> tuple[Preset, dict[str, Preset]]:
    """(the `[*]` defaults, the model presets by name) from an INI file's text."""
    t = table()
    glob = Preset(GLOBAL_NAME)
    out: dict[str, Preset] = {}
    for raw_name, keys in parse_ini(text, source).items():
        name = raw_name or DEFAULT_NAME
        if name not in (GLOBAL_NAME, DEFAULT_NAME) and ":" in name:
            head, _, tag = name.rpartition(":")
            name = f"{head}:{canonical_tag(tag)}"
        p = Preset(name)
        for key, value in keys.items():
            if key == "version":
                continue
            o = t.key(key)
            if o is None:
                raise PresetError(f"{source}: option '{key}' not recognized in preset '{name}'")
            if o.neg and t.is_negation(o, key):
                value = "false" if is_truthy(value) else "true"
            p.options[o] = value
        if name == DEFAULT_NAME and not p.options:
            continue
        if name == GLOBAL_NAME:
            glob = p
        else:
            out[name] = p
    return glob, out


def read_presets(path: str | Path) -> tuple[Preset, dict[str, Preset]]:
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise PresetError(f"{p}: cannot read: {e.strerror or e}") from None
    return load_presets(text, str(p))


def preset_for_args(name: str, args: list[str] | tuple[str, ...], **envs: str) -> Preset:
    """A preset describing a model swapper found elsewhere (its path and extra args), so that every
    model shows `status.preset` as llama.cpp's router shows it."""
    t = table()
    p = Preset(name)
    for env, v in envs.items():
        o = t.env(env)
        if o is not None and v:
            p.options[o] = v
    i = 0
    while i < len(args):
        o = t.flag(args[i])
        if o is None:
            i += 1
            continue
        if o.value and i + 1 < len(args):
            p.options[o] = args[i + 1]
            i += 2
        else:
            p.options[o] = "false" if args[i] in o.neg else "true"
            i += 1
    return p
