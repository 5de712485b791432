"""Which chat template a llama.cpp child uses, and the engine flags that select it.

A GGUF without `tokenizer.chat_template` makes llama-server fall back to ChatML; a model trained
on another format (Gemma from some GGUF packagers) then never emits its end-of-turn token and
answers run to the end of the context. So, unless the model's entry names a template or its
args already choose one, swapper picks llama.cpp's built-in template named after the GGUF's
`general.architecture`: the longest built-in name that the architecture starts with (`gemma3`
-> `gemma`, `phi3` -> `phi3`, `granitemoe` -> `granite`, `minicpm3` -> `minicpm`); none (`qwen2`,
`llama`) leaves llama-server's own fallback.

Built-in names are applied by llama.cpp's non-Jinja path only: with Jinja on (its default) a
name would be rendered as literal template text, so a built-in name is passed as
`--no-jinja --chat-template NAME`; a file is passed as `--chat-template-file FILE` (Jinja).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("swapper.chat_template")

# llama.cpp's built-in templates (LLM_CHAT_TEMPLATES in src/llama-chat.cpp of the llama.cpp that
# llama-cpp-python 0.3.36 vendors, which is what `swapper install-engine` builds).
LLAMACPP_BUILTIN = frozenset({
    "chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1",
    "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4",
    "falcon3", "zephyr", "monarch", "gemma", "orion", "openchat", "vicuna", "vicuna-orca",
    "deepseek", "deepseek2", "deepseek3", "deepseek-ocr", "command-r", "llama3", "chatglm3",
    "chatglm4", "glmedge", "minicpm", "exaone3", "exaone4", "exaone-moe", "rwkv-world", "granite",
    "granite-4.0", "granite-4.1", "gigachat", "megrez", "yandex", "bailing", "bailing-think",
    "bailing2", "llama4", "smolvlm", "hunyuan-moe", "gpt-oss", "hunyuan-dense", "hunyuan-vl",
    "kimi-k2", "seed_oss", "grok-2", "pangu-embedded", "solar-open",
})

# flags with which a model's own args already choose a template (then swapper adds none)
_TEMPLATE_FLAGS = ("--chat-template", "--chat-template-file", "--jinja", "--no-jinja")


def is_builtin(value: str) -> bool:
    return value in LLAMACPP_BUILTIN


def builtin_for_architecture(arch: str) -> str | None:
    """The longest built-in template name that `general.architecture` starts with."""
    arch = arch.lower()
    best = None
    for name in LLAMACPP_BUILTIN:
        if arch.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return best


@functools.lru_cache(maxsize=1024)
def _gguf_default(path: str, size: int, mtime: int) -> str | None:
    from .estimate import gguf_metadata

    meta = gguf_metadata(Path(path))
    if meta.get("tokenizer.chat_template"):
        return None
    arch = meta.get("general.architecture")
    return builtin_for_architecture(arch) if isinstance(arch, str) else None


def default_for_gguf(path: Path) -> str | None:
    """The built-in template for a GGUF that carries none (None: it has one, or no rule fits)."""
    try:
        st = path.stat()
        return _gguf_default(str(path), st.st_size, int(st.st_mtime))
    except Exception as e:  # unreadable header: leave llama-server's own choice
        log.warning("%s: cannot read the GGUF header for its chat template (%s)", path, e)
        return None


def llamacpp_args(configured: str | None, model: Path, user_args: list[str]) -> list[str]:
    """The llama-server flags that select the template (empty when args already choose one)."""
    if any(a == f or a.startswith(f + "=") for a in user_args for f in _TEMPLATE_FLAGS):
        return []
    value = configured if configured is not None else default_for_gguf(model)
    if not value:
        return []
    if is_builtin(value):
        return ["--no-jinja", "--chat-template", value]
    if not Path(value).is_file():
        raise ValueError(f"chat_template {value!r} is neither a llama.cpp built-in template "
                         f"({', '.join(sorted(LLAMACPP_BUILTIN))}) nor a readable file")
    return ["--chat-template-file", value]


def vllm_args(configured: str | None, user_args: list[str]) -> list[str]:
    """vLLM takes a Jinja file (its models carry their template in tokenizer_config.json)."""
    if configured is None or any(a == "--chat-template" or a.startswith("--chat-template=") for a in user_args):
        return []
    if is_builtin(configured) or not Path(configured).is_file():
        raise ValueError(f"chat_template {configured!r}: vLLM needs a Jinja template file "
                         "(llama.cpp's built-in names apply to llama.cpp models only)")
    return ["--chat-template", configured]
