"""Typed settings: the schema, its value parsers and the table of top-level settings.

Every top-level setting has a flag named after it and an environment variable named after the
flag (`--queue-size` <-> `SWAPPER_QUEUE_SIZE`); repeatable flags take comma-separated values in
the environment. A bad value anywhere becomes a `ConfigError` naming its source, key and reason,
which the CLI prints on one line before exiting with status 2. Where the values come from and
how they are merged (defaults < preset < config file < SWAPPER_* < flags) is settings_load.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

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
