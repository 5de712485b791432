"""Typed settings: one schema, merged from defaults < preset < config file < SWAPPER_* < flags.

Every top-level setting has a flag named after it and an environment variable named after the
flag (`--queue-size` <-> `SWAPPER_QUEUE_SIZE`); repeatable flags take comma-separated values in
the environment. A bad value anywhere becomes a `ConfigError` naming its source, key and reason,
which the CLI prints on one line before exiting with status 2.
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .units import SizeSpec, parse_duration, parse_size, parse_size_spec

ENGINES = ("llamacpp", "vllm")


class ConfigError(Exception):
    """A setting that cannot be used, with where it came from."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: key '{key}': {reason}" if key else f"{source}: {reason}")


# ---------------------------------------------------------------------------------- schema


@dataclass
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass
class QueueSettings:
    size: int = 64
    timeout: float = 300.0
    max_wait: float = 60.0


@dataclass
class EngineSettings:
    command: list[str]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelDefaults:
    engine: str = "llamacpp"
    ctx_size: int = 4096
    parallel: int = 1
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None  # llama.cpp built-in name or a Jinja file


@dataclass
class ModelSpec:
    """A model declared in the config file (discovered ones get a spec built from defaults)."""

    name: str
    path: str | None = None
    source: str | None = None  # Hugging Face repo id, for vLLM
    engine: str | None = None
    aliases: list[str] = field(default_factory=list)
    ctx_size: int | None = None
    parallel: int | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    idle_ttl: float | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    sleep: bool = False
    mmproj: str | None = None
    footprint: int | None = None  # bytes; overrides estimate and learned footprint
    chat_template: str | None = None  # llama.cpp built-in name (`gemma`) or a Jinja file
    device: str | None = None  # the one device it runs on (`nvidia:1`); None: placed by the scheduler


@dataclass
class DeviceSpec:
    """One device's own budget and reserve (`devices: {nvidia:1: {budget: 60GiB}}`)."""

    budget: SizeSpec | None = None
    reserve: int | None = None


@dataclass
class Settings:
    listen: Listen = field(default_factory=Listen)
    models_dir: str | None = None
    state_dir: str = "~/.cache/swapper"
    device: str = "auto"
    devices: dict[str, DeviceSpec] = field(default_factory=dict)  # per-device budget and reserve
    budget: SizeSpec = field(default_factory=lambda: SizeSpec(fraction=0.9))
    reserve: int = 512 << 20
    host_budget: SizeSpec = field(default_factory=lambda: SizeSpec(bytes=16 << 30))
    max_models: int = 0
    models_preset: str | None = None  # llama.cpp router INI presets (`--models-preset`)
    models_autoload: bool = True  # a request for an unloaded model loads it (`--no-models-autoload`)
    queue: QueueSettings = field(default_factory=QueueSettings)
    load_timeout: float = 300.0
    drain_timeout: float = 30.0
    idle_ttl: float = 0.0
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = None
    admin_keys: list[str] = field(default_factory=list)
    protect_metrics: bool = False
    cors_origins: list[str] = field(default_factory=list)
    max_body: int = 32 << 20
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    llama_server: str | None = None
    prefetch: bool = True
    pin: list[str] = field(default_factory=list)
    preload: list[str] = field(default_factory=list)
    log_level: str = "info"
    log_format: str = "text"
    engines: dict[str, EngineSettings] = field(default_factory=lambda: {
        "llamacpp": EngineSettings(command=["llama-server"], args=["--metrics"]),
        "vllm": EngineSettings(command=["vllm", "serve"]),
    })
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    # where settings came from, for messages and `reload`
    config_file: str | None = None
    preset: str | None = None

    @property
    def state_path(self) -> Path:
        return Path(os.path.expanduser(self.state_dir)).absolute()

    @property
    def models_path(self) -> Path | None:
        # absolute: children run in their own working directories
        return Path(os.path.expanduser(self.models_dir)).absolute() if self.models_dir else None

    def all_api_keys(self) -> list[str]:
        """Keys from --api-key plus those read from --api-key-file (one per line)."""
        keys = list(self.api_keys)
        if self.api_key_file:
            try:
                text = Path(os.path.expanduser(self.api_key_file)).read_text()
            except OSError as e:
                raise ConfigError(f"api_key_file {self.api_key_file}", "", f"cannot read: {e.strerror or e}") from None
            keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return keys


# ------------------------------------------------------------------------------- parsers


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, got {v!r}")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {v!r}") from None
    if isinstance(v, float) and v != n:
        raise ValueError(f"expected an integer, got {v!r}")
    if n < 0:
        raise ValueError(f"must not be negative, got {v!r}")
    return n


def _port(v: Any) -> int:
    n = _int(v)
    if not 0 <= n <= 65535:
        raise ValueError(f"expected a port 0-65535, got {v!r}")
    return n


def _str(v: Any) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise ValueError(f"expected a string, got {v!r}")
    return str(v)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, (list, tuple)):
        return [_str(x) for x in v]
    raise ValueError(f"expected a list of strings, got {v!r}")


def _args(v: Any) -> list[str]:
    """Engine arguments: a YAML list (numbers and booleans become strings), or a shell line."""
    if isinstance(v, str):
        import shlex

        return shlex.split(v)
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            if isinstance(x, bool):
                out.append("true" if x else "false")
            elif isinstance(x, (str, int, float)):
                out.append(str(x))
            else:
                raise ValueError(f"expected strings in the argument list, got {x!r}")
        return out
    raise ValueError(f"expected a list of arguments, got {v!r}")


def _env(v: Any) -> dict[str, str]:
    if not isinstance(v, Mapping):
        raise ValueError(f"expected a mapping of NAME: value, got {v!r}")
    return {str(k): _str(x) for k, x in v.items()}


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = _str(v).lower()
        if s not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return s

    return parse


def _device(v: Any) -> str:
    s = _str(v).lower().replace(" ", "")
    if s in ("auto", "cpu"):
        return s
    kind, _, idx = s.partition(":")
    if kind in ("nvidia", "amd") and (idx == "" or idx == "all" or all(x.isdigit() for x in idx.split(","))):
        return f"{kind}:{idx or 0}"
    raise ValueError(f"expected auto, cpu, nvidia:N, nvidia:all, nvidia:0,2 (or amd:...), got {v!r}")


def _device_id(v: Any) -> str:
    """One device as metrics and status name it: nvidia:1, amd:0, nvidia:0/mig1."""
    s = _str(v).lower()
    kind, _, rest = s.partition(":")
    idx, _, mig = rest.partition("/mig")
    if kind in ("nvidia", "amd", "host", "fake") and idx.isdigit() and (not mig or mig.isdigit() and kind == "nvidia"):
        return s
    raise ValueError(f"expected one device such as nvidia:1, amd:0 or nvidia:0/mig1, got {v!r}")


@dataclass(frozen=True)
class Option:
    """One top-level setting: its key path, its flag and how to parse it."""

    key: str  # dotted path in the config tree
    flag: str
    parse: Callable[[Any], Any]
    help: str
    repeatable: bool = False
    metavar: str | None = None
    is_flag: bool = False  # a switch without a value

    @property
    def env(self) -> str:
        return "SWAPPER_" + self.flag.lstrip("-").replace("-", "_").upper()


OPTIONS: list[Option] = [
    Option("models_dir", "--models-dir", _str, "folder of GGUF models (llama.cpp router rules)", metavar="DIR"),
    Option("listen.host", "--host", _str, "address to listen on (default 127.0.0.1)", metavar="ADDR"),
    Option("listen.port", "--port", _port, "port to listen on (default 8080)", metavar="N"),
    Option("state_dir", "--state-dir", _str, "learned footprints, built engines, child temp dirs", metavar="DIR"),
    Option("device", "--device", _device, "auto | cpu | nvidia:N | nvidia:all | nvidia:0,2 | amd:...", metavar="D"),
    Option("budget", "--budget", parse_size_spec, "memory for models: 20GiB or a share such as 90%", metavar="SIZE|PCT"),
    Option("reserve", "--reserve", parse_size, "memory never planned for (default 512MiB)", metavar="SIZE"),
    Option("host_budget", "--host-budget", parse_size_spec, "host RAM for the warm tier (sleeping models, page cache)", metavar="SIZE|PCT"),
    Option("max_models", "--max-models", _int, "extra cap on resident models; 0 = no cap", metavar="N"),
    Option("models_preset", "--models-preset", _str, "llama.cpp router INI presets ([*] defaults, one section per model)", metavar="FILE"),
    Option("models_autoload", "--models-autoload", _bool, "load unloaded models on request (default; --no-models-autoload turns it off)", is_flag=True),
    Option("queue.size", "--queue-size", _int, "waiting requests per model before 503 (default 64)", metavar="N"),
    Option("queue.timeout", "--queue-timeout", parse_duration, "longest wait in a queue before 504 (default 300s)", metavar="D"),
    Option("queue.max_wait", "--max-wait", parse_duration, "wait after which a busy model is drained for a waiting one (60s)", metavar="D"),
    Option("load_timeout", "--load-timeout", parse_duration, "longest child start before the load fails (300s)", metavar="D"),
    Option("drain_timeout", "--drain-timeout", parse_duration, "longest wait for in-flight requests on unload and shutdown (30s)", metavar="D"),
    Option("idle_ttl", "--idle-ttl", parse_duration, "unload models idle this long; 0 = never", metavar="D"),
    Option("api_keys", "--api-key", _str, "key required as Authorization: Bearer (repeatable)", repeatable=True, metavar="KEY"),
    Option("api_key_file", "--api-key-file", _str, "file with one API key per line", metavar="FILE"),
    Option("admin_keys", "--admin-key", _str, "key required for admin routes (repeatable)", repeatable=True, metavar="KEY"),
    Option("protect_metrics", "--protect-metrics", _bool, "require a key on /metrics", is_flag=True),
    Option("cors_origins", "--cors-origin", _str, "allowed CORS origin, or * (repeatable)", repeatable=True, metavar="ORIGIN"),
    Option("max_body", "--max-body", parse_size, "largest request body (default 32MiB)", metavar="SIZE"),
    Option("upstream_connect_timeout", "--upstream-connect-timeout", parse_duration, "connect timeout to children (10s)", metavar="D"),
    Option("upstream_read_timeout", "--upstream-read-timeout", parse_duration, "longest silence from a child mid-response (600s)", metavar="D"),
    Option("llama_server", "--llama-server", _str, "llama-server binary to run", metavar="PATH"),
    Option("prefetch", "--prefetch", _bool, "read an incoming model's file into the page cache during swaps (true)", metavar="BOOL"),
    Option("pin", "--pin", _str, "load at start and never evict (repeatable)", repeatable=True, metavar="NAME"),
    Option("preload", "--preload", _str, "load at start (repeatable)", repeatable=True, metavar="NAME"),
    Option("log_level", "--log-level", _choice("debug", "info", "warning", "error"), "debug | info | warning | error", metavar="L"),
    Option("log_format", "--log-format", _choice("text", "json"), "text | json", metavar="F"),
]
_BY_KEY = {o.key: o for o in OPTIONS}

_QUEUE_KEYS = {"size", "timeout", "max_wait"}
_LISTEN_KEYS = {"host", "port"}
_ENGINE_KEYS = {"command", "args", "env"}
_DEFAULT_KEYS = {"engine", "ctx_size", "parallel", "args", "env", "chat_template"}
_MODEL_KEYS = {"path", "source", "engine", "aliases", "ctx_size", "parallel", "args", "env", "pinned",
               "idle_ttl", "adapters", "sleep", "mmproj", "footprint", "chat_template", "device"}
_TOP_EXTRA = {"engines", "defaults", "models", "devices"}


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
