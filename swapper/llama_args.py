"""llama-server's command-line options as data: which flags take a value, their negations, envs.

llama.cpp declares its options in C++ (`common/arg.cpp`, `common_arg(...)` calls) and ships no
machine-readable list, so swapper keeps one: `llama_args.json`, extracted from the `arg.cpp` of
the llama.cpp swapper builds (`python -m swapper.llama_args PATH/TO/arg.cpp > llama_args.json`;
the router-suite test re-extracts it from the sdist and checks the file is current). The router
command line (`swapper serve --ctx-size 8192 --jinja ...`) and INI presets (`ctx-size = 8192`,
`no-mmap = true`) are read with it, the way llama.cpp's `common/preset.cpp` reads them.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("llama_args.json")


@dataclass(frozen=True)
class LlamaArg:
    args: tuple[str, ...]  # e.g. ("-c", "--ctx-size"); the last is the long form llama.cpp prints
    neg: tuple[str, ...] = ()  # e.g. ("--no-mmap",)
    value: bool = False  # takes a value
    env: str | None = None
    preset_only: bool = False  # load-on-startup, stop-timeout, dedup-cache-models

    @property
    def long(self) -> str:
        return self.args[-1]

    @property
    def key(self) -> str:
        """The INI key llama.cpp writes for it (its long form without dashes)."""
        return self.long.lstrip("-")


class ArgTable:
    """Lookup of options by flag (`--ctx-size`, `-c`), INI key (`ctx-size`, `no-mmap`) or env."""

    def __init__(self, opts: list[LlamaArg]):
        self.opts = opts
        self.by_flag: dict[str, LlamaArg] = {}
        self.by_key: dict[str, LlamaArg] = {}
        for o in opts:
            for a in (*o.args, *o.neg):
                self.by_flag.setdefault(a, o)
                self.by_key.setdefault(a.lstrip("-"), o)
            if o.env:
                self.by_key.setdefault(o.env, o)

    def flag(self, name: str) -> LlamaArg | None:
        return self.by_flag.get(name)

    def key(self, name: str) -> LlamaArg | None:
        return self.by_key.get(name)

    def env(self, env: str) -> LlamaArg | None:
        o = self.by_key.get(env)
        return o if o is not None and o.env == env else None

    def is_negation(self, o: LlamaArg, key: str) -> bool:
        return any(n.lstrip("-") == key.lstrip("-") for n in o.neg)


@lru_cache(maxsize=1)
def table() -> ArgTable:
    data = json.loads(TABLE.read_text())
    return ArgTable([LlamaArg(tuple(d["args"]), tuple(d.get("neg", ())), d.get("value", False),
                              d.get("env"), d.get("preset_only", False)) for d in data["options"]])


# ---------------------------------------------------------------------------- extraction

_STR = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _skip_ws(s: str, i: int) -> int:
    while i < len(s):
        if s[i].isspace():
            i += 1
        elif s.startswith("//", i):
            i = s.index("\n", i)
        else:
            break
    return i


def _str_list(s: str, i: int) -> tuple[list[str], int]:
    """`{"-a", "--bb"}` at i -> (["-a", "--bb"], index after the brace)."""
    end = s.index("}", i)
    return _STR.findall(s[i:end]), end + 1


def _literal(s: str, i: int) -> tuple[str, int]:
    """Adjacent string literals at i ("a" "b") -> ("ab", index after them)."""
    out = ""
    while True:
        i = _skip_ws(s, i)
        m = _STR.match(s, i)
        if not m:
            return out, i
        out += m.group(1)
        i = m.end()


def extract(source: str) -> list[dict]:
    """Every `common_arg(...)` declaration in arg.cpp: flags, negations, value, env."""
    out: list[dict] = []
    starts = [m.end() for m in re.finditer(r"\bcommon_arg\(\s*(?=\{)", source)]
    for n, i in enumerate(starts):
        nxt = starts[n + 1] if n + 1 < len(starts) else len(source)
        args, i = _str_list(source, i)
        neg: list[str] = []
        i = _skip_ws(source, i)
        if source[i] == ",":
            j = _skip_ws(source, i + 1)
            if source[j] == "{":
                neg, i = _str_list(source, j)
        i = _skip_ws(source, i)
        assert source[i] == ",", source[i - 80:i + 80]
        first, j = _literal(source, i + 1)
        j = _skip_ws(source, j)
        # a value hint is a literal followed by more text (the help); a flag has only its help
        value = False
        if j < len(source) and source[j] == ",":
            k = _skip_ws(source, j + 1)
            value = not source.startswith("[", k)
        tail = source[i:nxt]
        env = re.search(r'\.set_env\(\s*"?([A-Z0-9_]+)"?\s*\)', tail)
        if not args or not all(a.startswith("-") or "-" in a or a.isalpha() for a in args):
            continue
        d: dict = {"args": args}
        if neg:
            d["neg"] = neg
        if value:
            d["value"] = True
        if env:  # COMMON_ARG_PRESET_X is a macro for "__PRESET_X" (common/arg.h)
            d["env"] = re.sub(r"^COMMON_ARG_PRESET_", "__PRESET_", env.group(1))
        if ".set_preset_only()" in tail:
            d["preset_only"] = True
        out.append(d)
    return out


def main(argv: list[str]) -> int:
    src = Path(argv[0]).read_text()
    opts = extract(src)
    print(json.dumps({"source": "llama.cpp common/arg.cpp", "options": opts}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
