"""Where settings come from and how they merge: defaults < preset < config file < SWAPPER_* < flags.

The layers (flags given, `SWAPPER_*` variables, YAML files and presets) are flattened to dotted
keys and applied in precedence order onto the schema of config.py; the result is checked once,
and can be rendered back to YAML (`swapper config`).
"""

from __future__ import annotations

import argparse
import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .config import (ENGINES, OPTIONS, _BY_KEY, _DEFAULT_KEYS, _ENGINE_KEYS, _LISTEN_KEYS, _MODEL_KEYS,
                     _QUEUE_KEYS, _TOP_EXTRA, ConfigError, DeviceSpec, ModelSpec, Option, Settings, _args,
                     _bool, _device_id, _env, _int, _str, _str_list)
from .units import SizeSpec, parse_duration, parse_size, parse_size_spec


# ------------------------------------------------------------------------------- layers


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add every top-level setting as a flag (default None, so unset flags override nothing)."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file (every key optional; see README)")
    parser.add_argument("--preset", metavar="NAME", help="preset name (see presets/) or a YAML path")
    g = parser.add_argument_group("settings (each also SWAPPER_<FLAG> and a config key)")
    for o in OPTIONS:
        dest = "opt_" + o.key.replace(".", "__")
        text = o.help.replace("%", "%%") + f" [{o.env}]"
        if o.is_flag:
            g.add_argument(o.flag, dest=dest, action="store_const", const=True, default=None, help=text)
        elif o.repeatable:
            g.add_argument(o.flag, dest=dest, action="append", default=None, metavar=o.metavar, help=text)
        else:
            g.add_argument(o.flag, dest=dest, default=None, metavar=o.metavar, help=text)


def cli_layer(ns: argparse.Namespace) -> dict[str, Any]:
    """Flat {dotted key: raw value} of the flags actually given."""
    out: dict[str, Any] = {}
    for o in OPTIONS:
        v = getattr(ns, "opt_" + o.key.replace(".", "__"), None)
        if v is not None:
            out[o.key] = v
    return out


def env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in OPTIONS:
        if o.env in env:
            raw = env[o.env]
            out[o.key] = _str_list(raw) if o.repeatable else raw
    return out


def presets_dir() -> Path:
    """Presets ship inside the package (`swapper.presets`, mapped from the repo's presets/)."""
    return Path(str(resources.files("swapper.presets")))


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(source, "", f"{where}invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", "expected a mapping of settings at the top level")
    return data


def preset_path(name: str) -> Path:
    p = Path(os.path.expanduser(name))
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        if not p.exists():
            raise ConfigError(f"preset {name}", "", "file not found")
        return p
    p = presets_dir() / f"{name}.yaml"
    if not p.exists():
        raise ConfigError(f"preset {name}", "", f"unknown preset; known: {', '.join(list_presets())}")
    return p


def _flatten(tree: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config tree into flat top-level options and the structured sections."""
    flat: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for k, v in tree.items():
        k = str(k)
        if v is None:  # `key:` with no value (or ~) means "not set here"
            continue
        if k in ("listen", "queue"):
            allowed = _LISTEN_KEYS if k == "listen" else _QUEUE_KEYS
            if not isinstance(v, Mapping):
                raise ConfigError(source, k, "expected a mapping")
            for sk, sv in v.items():
                if sk not in allowed:
                    raise ConfigError(source, f"{k}.{sk}", f"unknown key; expected one of {', '.join(sorted(allowed))}")
                flat[f"{k}.{sk}"] = sv
        elif k == "api_key":  # singular spelling, as the flag
            flat["api_keys"] = v
        elif k in ("admin_key", "cors_origin"):
            flat[k + "s"] = v
        elif k in _BY_KEY:
            flat[k] = v
        elif k in _TOP_EXTRA:
            sections[k] = v
        else:
            known = sorted({o.key.split(".")[0] for o in OPTIONS} | _TOP_EXTRA)
            raise ConfigError(source, k, f"unknown key; known keys: {', '.join(known)}")
    return flat, sections


# ------------------------------------------------------------------------------- merging


def load_settings(ns: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
                  config_file: str | None = None, preset: str | None = None) -> Settings:
    """Merge every source into validated `Settings` (raises `ConfigError`)."""
    env = os.environ if env is None else env
    if ns is not None:
        config_file = config_file or getattr(ns, "config", None)
        preset = preset or getattr(ns, "preset", None)
    config_file = config_file or env.get("SWAPPER_CONFIG")
    preset = preset or env.get("SWAPPER_PRESET")

    flat: dict[str, tuple[Any, str]] = {}
    sections: dict[str, list[tuple[Any, str]]] = {}
    for tree, source in _file_layers(preset, config_file):
        f, s = _flatten(tree, source)
        flat.update({k: (v, source) for k, v in f.items()})
        for k, v in s.items():
            sections.setdefault(k, []).append((v, source))
    flat.update({k: (v, f"environment {_BY_KEY[k].env}") for k, v in env_layer(env).items()})
    if ns is not None:
        flat.update({k: (v, f"flag {_BY_KEY[k].flag}") for k, v in cli_layer(ns).items()})

    st = Settings(config_file=config_file, preset=preset)
    for key, (raw, source) in flat.items():
        _apply_option(st, _BY_KEY[key], raw, source)
    for raw, source in sections.get("engines", []):
        _apply_engines(st, raw, source)
    for raw, source in sections.get("defaults", []):
        _apply_defaults(st, raw, source)
    for raw, source in sections.get("models", []):
        _apply_models(st, raw, source)
    for raw, source in sections.get("devices", []):
        _apply_devices(st, raw, source)
    router = getattr(ns, "router", None) if ns is not None else None
    if router is not None:  # llama-server flags of a router command line (router_cli.py)
        router.apply(st)
    _check(st)
    return st


def _file_layers(preset: str | None, config_file: str | None) -> list[tuple[dict[str, Any], str]]:
    layers = []
    if preset:
        p = preset_path(preset)
        layers.append((_read_yaml(p, f"preset {p}"), f"preset {p}"))
    if config_file:
        p = Path(os.path.expanduser(config_file))
        layers.append((_read_yaml(p, str(p)), str(p)))
    return layers


def _apply_option(st: Settings, o: Option, raw: Any, source: str) -> None:
    try:
        if o.repeatable:
            items = raw if isinstance(raw, list) else _str_list(raw)
            value: Any = [o.parse(x) for x in items]
        else:
            value = o.parse(raw)
    except ValueError as e:
        raise ConfigError(source, o.key, str(e)) from None
    obj: Any = st
    *parents, last = o.key.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def _mapping(raw: Any, source: str, key: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(source, key, f"expected a mapping, got {raw!r}")
    return raw


def _field(source: str, key: str, parse: Callable[[Any], Any], raw: Any) -> Any:
    try:
        return parse(raw)
    except ValueError as e:
        raise ConfigError(source, key, str(e)) from None


def _apply_engines(st: Settings, raw: Any, source: str) -> None:
    for name, spec in _mapping(raw, source, "engines").items():
        if name not in ENGINES:
            raise ConfigError(source, f"engines.{name}", f"unknown engine; expected one of {', '.join(ENGINES)}")
        eng = copy.deepcopy(st.engines[name])
        for k, v in _mapping(spec, source, f"engines.{name}").items():
            key = f"engines.{name}.{k}"
            if k not in _ENGINE_KEYS:
                raise ConfigError(source, key, f"unknown key; expected one of {', '.join(sorted(_ENGINE_KEYS))}")
            if k == "env":
                eng.env = _field(source, key, _env, v)
            else:
                val = _field(source, key, _args, v)
                if k == "command" and not val:
                    raise ConfigError(source, key, "must not be empty")
                setattr(eng, k, val)
        st.engines[name] = eng


def _engine_name(v: Any) -> str:
    s = _str(v)
    if s not in ENGINES:
        raise ValueError(f"expected one of {', '.join(ENGINES)}, got {v!r}")
    return s


def _positive(v: Any) -> int:
    n = _int(v)
    if n < 1:
        raise ValueError(f"must be at least 1, got {v!r}")
    return n


def _apply_defaults(st: Settings, raw: Any, source: str) -> None:
    parsers: dict[str, Callable[[Any], Any]] = {
        "engine": _engine_name, "ctx_size": _int, "parallel": _positive, "args": _args, "env": _env,
        "chat_template": _str,
    }
    for k, v in _mapping(raw, source, "defaults").items():
        if k not in _DEFAULT_KEYS:
            raise ConfigError(source, f"defaults.{k}", f"unknown key; expected one of {', '.join(sorted(_DEFAULT_KEYS))}")
        setattr(st.defaults, k, _field(source, f"defaults.{k}", parsers[k], v))


def _adapters(v: Any) -> dict[str, str]:
    if not isinstance(v, Mapping):
        raise ValueError(f"expected a mapping of adapter name: file, got {v!r}")
    return {str(k): _str(x) for k, x in v.items()}


def _optional_size(v: Any) -> int | None:
    return None if v is None else parse_size(v)


_MODEL_PARSERS: dict[str, Callable[[Any], Any]] = {
    "path": _str, "source": _str, "engine": _engine_name, "aliases": _str_list, "ctx_size": _int,
    "parallel": _positive, "args": _args, "env": _env, "pinned": _bool, "idle_ttl": parse_duration,
    "adapters": _adapters, "sleep": _bool, "mmproj": _str, "footprint": _optional_size,
    "chat_template": _str, "device": _device_id,
}


def _apply_devices(st: Settings, raw: Any, source: str) -> None:
    for name, spec in _mapping(raw, source, "devices").items():
        did = _field(source, f"devices.{name}", _device_id, name)
        d = st.devices.setdefault(did, DeviceSpec())
        for k, v in _mapping(spec, source, f"devices.{name}").items():
            parse = {"budget": parse_size_spec, "reserve": parse_size}.get(k)
            if parse is None:
                raise ConfigError(source, f"devices.{name}.{k}", "unknown key; expected budget or reserve")
            setattr(d, k, _field(source, f"devices.{name}.{k}", parse, v))


def _apply_models(st: Settings, raw: Any, source: str) -> None:
    for name, spec in _mapping(raw, source, "models").items():
        name = str(name)
        check_model_name(name, source)
        m = ModelSpec(name=name)
        for k, v in _mapping(spec, source, f"models.{name}").items():
            key = f"models.{name}.{k}"
            if k not in _MODEL_KEYS:
                raise ConfigError(source, key, f"unknown key; expected one of {', '.join(sorted(_MODEL_KEYS))}")
            setattr(m, k, _field(source, key, _MODEL_PARSERS[k], v))
        if m.path is None and m.source is None:
            raise ConfigError(source, f"models.{name}", "needs a path (or a source repo for vLLM)")
        st.models[name] = m


def check_model_name(name: str, source: str = "config") -> None:
    """Model names are lookup keys (never turned into paths): printable, one line, not empty."""
    if not name or len(name) > 256 or not name.isprintable() or name != name.strip():
        raise ConfigError(source, f"models.{name}", "not a valid model name")


def _check(st: Settings) -> None:
    """Cross-field checks that a single parser cannot make."""
    for name in st.pin + st.preload:
        check_model_name(name, "flags")
    for name, m in st.models.items():
        for a in m.aliases:
            if a in st.models and a != name:
                raise ConfigError(st.config_file or "config", f"models.{name}.aliases",
                                  f"alias '{a}' is also a model name")


def render_yaml(st: Settings) -> str:
    """The effective settings as YAML in the config file's schema (for `swapper config`)."""
    def size(s: SizeSpec) -> Any:
        return str(s).replace(" ", "")

    out: dict[str, Any] = {
        "listen": {"host": st.listen.host, "port": st.listen.port},
        "models_dir": st.models_dir, "state_dir": st.state_dir, "device": st.device,
        "budget": size(st.budget), "reserve": st.reserve, "host_budget": size(st.host_budget),
        **({"devices": {k: {**({"budget": size(d.budget)} if d.budget else {}),
                            **({"reserve": d.reserve} if d.reserve is not None else {})}
                        for k, d in st.devices.items()}} if st.devices else {}),
        "max_models": st.max_models, "models_preset": st.models_preset, "models_autoload": st.models_autoload,
        "queue": {"size": st.queue.size, "timeout": st.queue.timeout, "max_wait": st.queue.max_wait},
        "load_timeout": st.load_timeout, "drain_timeout": st.drain_timeout, "idle_ttl": st.idle_ttl,
        "max_body": st.max_body, "pin": st.pin, "preload": st.preload,
        "engines": {k: {"command": e.command, "args": e.args, "env": e.env} for k, e in st.engines.items()},
        "defaults": {"engine": st.defaults.engine, "ctx_size": st.defaults.ctx_size,
                     "parallel": st.defaults.parallel, "args": st.defaults.args, "env": st.defaults.env,
                     **({"chat_template": st.defaults.chat_template} if st.defaults.chat_template else {})},
    }
    return yaml.safe_dump(out, sort_keys=False)
