"""llama.cpp router command lines on `swapper serve`: router flags, flags for every child."""

from __future__ import annotations

import argparse

import pytest

from swapper.cli import _parser
from swapper.config import ConfigError
from swapper.settings_load import load_settings
from swapper.router_cli import parse_router_args


def settings_for(*argv: str, env: dict[str, str] | None = None):
    ns, extra = _parser().parse_known_args(["serve", *argv])
    ns.router = parse_router_args(extra)
    return load_settings(ns, env=env or {})


def test_llama_cpp_test_harness_command_line_maps_onto_settings():
    st = settings_for("--port", "8123", "--temp", "0.8", "--seed", "42", "--host", "127.0.0.1", "--offline",
                      "--batch-size", "16", "--no-slots", "--ctx-size", "1024", "--parallel", "1",
                      "--n-predict", "16", "--models-max", "2", "--no-models-autoload", "--no-jinja",
                      "--api-key", "sk-x")
    assert st.listen.port == 8123 and st.listen.host == "127.0.0.1"
    assert st.max_models == 2, "--models-max is --max-models"
    assert st.models_autoload is False
    assert st.api_keys == ["sk-x"]
    assert st.defaults.ctx_size == 1024 and st.defaults.parallel == 1
    assert st.defaults.args == ["--temp", "0.8", "--seed", "42", "--offline", "--batch-size", "16", "--no-slots",
                                "--n-predict", "16", "--no-jinja"], "every other flag goes to the children, in order"


def test_ctx_size_is_the_childs_total_as_in_llama_cpp():
    st = settings_for("-c", "8192", "-np", "4")
    assert st.defaults.ctx_size == 2048 and st.defaults.parallel == 4


def test_router_flags_win_over_config_defaults_and_model_args_come_last(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("defaults: {args: [--temp, '0.1'], ctx_size: 512}\n"
                   "models: {m: {path: /x.gguf, args: [--temp, '0.3']}}\n")
    st = settings_for("--config", str(cfg), "--temp", "0.2", "-c", "4096")
    assert st.defaults.args == ["--temp", "0.1", "--temp", "0.2"], "llama-server takes the last value"
    assert st.defaults.ctx_size == 4096
    from swapper.catalog import build_catalog

    e = build_catalog(st).get("m")
    assert e is not None and list(e.args)[-2:] == ["--temp", "0.3"], "the model's own args come last and win"


def test_metrics_and_equals_forms():
    r = parse_router_args(["--metrics", "--flash-attn=on", "-ngl", "99"])
    assert r.child_args == ["--flash-attn", "on", "-ngl", "99"], "--metrics: swapper always has it"


@pytest.mark.parametrize("argv,said", [
    (["--no-such-flag"], "unknown flag"),
    (["-m", "x.gguf"], "names a single model"),
    (["--alias", "x"], "names a single model"),
    (["--ctx-size"], "needs a value"),
    (["--models-max", "two"], "expected an integer"),
])
def test_bad_router_flags_are_refused_with_a_reason(argv, said):
    with pytest.raises(ConfigError, match=said):
        parse_router_args(argv)


def test_autoload_switch_and_environment():
    assert settings_for().models_autoload is True
    assert settings_for("--models-autoload").models_autoload is True
    assert settings_for(env={"SWAPPER_MODELS_AUTOLOAD": "false"}).models_autoload is False


def test_swapper_flags_are_not_abbreviated_into_llama_flags():
    # "--pre" would prefix-match --preset/--preload/--prefetch; llama-server flags must pass as written
    ns, extra = _parser().parse_known_args(["serve", "--pre", "--max"])
    assert extra == ["--pre", "--max"]
    assert isinstance(ns, argparse.Namespace)
