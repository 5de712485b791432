"""llama.cpp router command lines for `swapper serve`: the router's flags, and every other
llama-server flag passed down to each llama.cpp child, as the router does.

`llama-server --models-dir /models --models-max 2 -c 8192 -np 2 --jinja --metrics` becomes
`swapper serve` with the same words: `--models-dir`, `--host`, `--port`, `--api-key` are swapper's
own settings; `--models-max N` is `--max-models N`; `--no-models-autoload` turns autoload off;
`--models-preset FILE` reads llama.cpp's INI presets; `-c/--ctx-size` and `-np/--parallel` become
the default context and slots (llama.cpp's `-c` is the child's total: ctx_size = c / np); every
other flag llama-server knows (`llama_args.json`) is appended to each llama.cpp child's argv after
swapper's defaults and before per-model args (YAML `args`, preset sections), so per-model
settings win. Flags that name one model or one server (`-m`, `--alias`, `-hf`, `--mmproj`,
`--log-file`, `--ssl-*`) are the router's to set per child and are refused here with a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError, Settings
from .llama_args import table

# llama-server flags that name a single model or server: meaningless for the router as a whole
REFUSED = {"LLAMA_ARG_MODEL", "LLAMA_ARG_ALIAS", "LLAMA_ARG_HF_REPO", "LLAMA_ARG_HF_FILE", "LLAMA_ARG_MMPROJ",
           "LLAMA_ARG_SSL_KEY_FILE", "LLAMA_ARG_SSL_CERT_FILE", "LLAMA_ARG_LOG_FILE", "LLAMA_ARG_MODEL_URL"}


@dataclass
class RouterArgs:
    """What a router command line adds on top of swapper's own flags."""

    child_args: list[str] = field(default_factory=list)
    ctx_total: int | None = None
    parallel: int | None = None
    models_max: int | None = None
    autoload: bool | None = None

    def apply(self, st: Settings) -> None:
        """Flags outrank config files: applied after every other source."""
        if self.models_max is not None:
            st.max_models = self.models_max
        if self.autoload is not None:
            st.models_autoload = self.autoload
        if self.parallel is not None:
            st.defaults.parallel = self.parallel
        if self.ctx_total is not None:
            st.defaults.ctx_size = self.ctx_total // max(1, st.defaults.parallel)
        st.defaults.args = [*st.defaults.args, *self.child_args]


def _int(flag: str, v: str, minimum: int = 0) -> int:
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"flag {flag}", "", f"expected an integer, got {v!r}") from None
    if n < minimum:
        raise ConfigError(f"flag {flag}", "", f"must be at least {minimum}, got {v!r}")
    return n


def parse_router_args(extra: list[str]) -> RouterArgs:
    """The words of a command line that swapper's own flags did not take (in their order)."""
    t = table()
    out = RouterArgs()
    i = 0
    while i < len(extra):
        word = extra[i]
        i += 1
        flag, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        opt = t.flag(flag)
        if opt is None or opt.preset_only:
            raise ConfigError(f"flag {word}", "", "unknown flag (neither swapper's nor llama-server's; "
                                                  "see `swapper serve --help`)")
        value: str | None = None
        if opt.value:
            if eq:
                value = inline
            elif i < len(extra):
                value, i = extra[i], i + 1
            else:
                raise ConfigError(f"flag {flag}", "", "needs a value")
        if opt.env in REFUSED:
            raise ConfigError(f"flag {flag}", "", "names a single model; the router sets it per child "
                                                  "(declare models in --models-dir, --models-preset or --config)")
        if opt.env == "LLAMA_ARG_MODELS_MAX":
            out.models_max = _int(flag, value or "")
        elif opt.env == "LLAMA_ARG_MODELS_AUTOLOAD":
            out.autoload = flag not in opt.neg
        elif opt.env == "LLAMA_ARG_CTX_SIZE":
            out.ctx_total = _int(flag, value or "")
        elif opt.env == "LLAMA_ARG_N_PARALLEL":
            out.parallel = _int(flag, value or "", 1)
        elif opt.env == "LLAMA_ARG_ENDPOINT_METRICS":
            pass  # swapper always serves /metrics, and its children always run with --metrics
        else:
            out.child_args += [flag] if value is None else [flag, value]
    return out
