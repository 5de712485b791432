"""Settings: one schema, four sources, units with their real meaning, errors that name the key."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from swapper.config import ConfigError

from swapper.settings_load import add_setting_flags, load_settings
from swapper.units import SizeSpec, parse_duration, parse_size, parse_size_spec


def ns(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_setting_flags(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("text,expected", [
    ("450MiB", 450 * 2**20), ("20GB", 20 * 10**9), ("1GiB", 2**30), ("512", 512), ("1.5KiB", 1536),
    ("2 G", 2 * 10**9), (1024, 1024),
])
def test_sizes_keep_their_real_units(text, expected):
    assert parse_size(text) == expected


def test_a_percentage_is_a_share_of_the_device():
    spec = parse_size_spec("90%")
    assert spec == SizeSpec(fraction=0.9)
    assert spec.resolve(80 * 10**9) == 72 * 10**9


@pytest.mark.parametrize("bad", ["lots", "12XB", "-5MiB", "150%", "0%", True, None, [1]])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_size_spec(bad)


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("45", 45), (2.5, 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_defaults_match_the_documented_schema():
    st = load_settings(ns(), env={})
    assert (st.listen.host, st.listen.port) == ("127.0.0.1", 8080)
    assert st.budget == SizeSpec(fraction=0.9) and st.reserve == 512 * 2**20
    assert (st.queue.size, st.queue.timeout, st.queue.max_wait) == (64, 300, 60)
    assert (st.load_timeout, st.drain_timeout, st.idle_ttl, st.max_models) == (300, 30, 0, 0)
    assert st.engines["llamacpp"].command == ["llama-server"] and st.engines["vllm"].command == ["vllm", "serve"]
    assert (st.defaults.engine, st.defaults.ctx_size, st.defaults.parallel) == ("llamacpp", 4096, 1)


def test_precedence_is_defaults_preset_file_env_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("queue: {size: 10, timeout: 10s}\nbudget: 50%\nreserve: 1GiB\nidle_ttl: 1m\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("queue: {size: 20}\nbudget: 8GiB\nidle_ttl: 2m\n")
    env = {"SWAPPER_QUEUE_SIZE": "30", "SWAPPER_IDLE_TTL": "3m"}
    st = load_settings(ns("--preset", str(preset), "--config", str(cfg), "--idle-ttl", "4m"), env=env)
    assert st.reserve == 2**30  # preset only
    assert st.queue.timeout == 10  # preset only
    assert st.budget == SizeSpec(bytes=8 * 2**30)  # file beats preset
    assert st.queue.size == 30  # env beats file
    assert st.idle_ttl == 240  # flag beats env


def test_repeatable_settings_are_comma_separated_in_the_environment():
    st = load_settings(ns(), env={"SWAPPER_PRELOAD": "a,b", "SWAPPER_PIN": "c", "SWAPPER_API_KEY": "k1, k2"})
    assert st.preload == ["a", "b"] and st.pin == ["c"] and st.api_keys == ["k1", "k2"]
    st = load_settings(ns("--preload", "x", "--preload", "y"), env={"SWAPPER_PRELOAD": "a"})
    assert st.preload == ["x", "y"]


def test_every_top_level_flag_sets_its_key():
    st = load_settings(ns("--budget", "20GiB", "--reserve", "1GB", "--host-budget", "50%", "--device", "nvidia:1",
                          "--max-models", "3", "--queue-size", "5", "--queue-timeout", "1m", "--max-wait", "500ms",
                          "--load-timeout", "2m", "--drain-timeout", "10s", "--idle-ttl", "1h", "--state-dir", "/s",
                          "--api-key", "k", "--admin-key", "a", "--max-body", "1MiB", "--host", "0.0.0.0",
                          "--port", "9000", "--log-level", "debug", "--log-format", "json", "--protect-metrics"),
                       env={})
    assert st.budget.bytes == 20 * 2**30 and st.reserve == 10**9 and st.host_budget.fraction == 0.5
    assert st.device == "nvidia:1" and st.max_models == 3
    assert (st.queue.size, st.queue.timeout, st.queue.max_wait) == (5, 60, 0.5)
    assert (st.load_timeout, st.drain_timeout, st.idle_ttl) == (120, 10, 3600)
    assert st.api_keys == ["k"] and st.admin_keys == ["a"] and st.max_body == 2**20
    assert (st.listen.host, st.listen.port, st.log_level, st.log_format) == ("0.0.0.0", 9000, "debug", "json")
    assert st.protect_metrics is True and st.state_dir == "/s"


def test_the_complete_documented_config_file_loads(tmp_path):
    cfg = tmp_path / "full.yaml"
    cfg.write_text("""
listen: {host: 0.0.0.0, port: 8080}
models_dir: /models
state_dir: ~/.cache/swapper
device: auto
budget: 90%
reserve: 512MiB
host_budget: 16GiB
max_models: 0
queue: {size: 64, timeout: 300s, max_wait: 60s}
load_timeout: 300s
drain_timeout: 30s
idle_ttl: 0
api_keys: []
admin_keys: []
engines:
  llamacpp: {command: [llama-server], args: [--metrics]}
  vllm: {command: [vllm, serve], args: []}
defaults: {engine: llamacpp, ctx_size: 4096, parallel: 1, args: [], env: {}}
models:
  qwen-coder:
    path: qwen2.5-coder-7b-q4_k_m.gguf
    aliases: [coder]
    ctx_size: 8192
    args: [--flash-attn, "on"]
    pinned: false
    idle_ttl: 10m
    adapters: {sql-lora: sql-lora.gguf}
  llama-3.2-1b:
    engine: vllm
    path: hf/meta-llama--Llama-3.2-1B-Instruct
    sleep: true
""")
    st = load_settings(ns("--config", str(cfg)), env={})
    q = st.models["qwen-coder"]
    assert q.aliases == ["coder"] and q.ctx_size == 8192 and q.args == ["--flash-attn", "on"]
    assert q.idle_ttl == 600 and q.adapters == {"sql-lora": "sql-lora.gguf"}
    assert st.models["llama-3.2-1b"].engine == "vllm" and st.models["llama-3.2-1b"].sleep is True
    assert st.host_budget.bytes == 16 * 2**30


@pytest.mark.parametrize("yaml_text,key", [
    ("queue: {size: lots}", "queue.size"),
    ("budget: huge", "budget"),
    ("reserve: 10%", "reserve"),
    ("queue: {sise: 3}", "queue.sise"),
    ("bogus: 1", "bogus"),
    ("models: {m: {path: a.gguf, ctx_size: -1}}", "models.m.ctx_size"),
    ("models: {m: {ctx_size: 10}}", "models.m"),
    ("models: {m: {path: a.gguf, engine: tgi}}", "models.m.engine"),
    ("engines: {llamacpp: {command: []}}", "engines.llamacpp.command"),
    ("device: tpu:0", "device"),
    ("drain_timeout: soon", "drain_timeout"),
])
def test_bad_config_errors_name_the_file_and_the_key(tmp_path, yaml_text, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_settings(ns("--config", str(cfg)), env={})
    assert e.value.key == key
    assert str(cfg) in str(e.value) and f"'{key}'" in str(e.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError) as e:
        load_settings(ns(), env={"SWAPPER_QUEUE_SIZE": "many"})
    assert "SWAPPER_QUEUE_SIZE" in str(e.value)


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("queue:\n  size: [1\n")
    with pytest.raises(ConfigError) as e:
        load_settings(ns("--config", str(cfg)), env={})
    assert "line" in str(e.value)


def test_cli_prints_one_line_and_exits_2_on_a_bad_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("queue: {size: lots}\n")
    r = subprocess.run([sys.executable, "-m", "swapper", "serve", "--models-dir", str(tmp_path), "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and "queue.size" in lines[0]


def test_cli_bad_flag_value_exits_2():
    r = subprocess.run([sys.executable, "-m", "swapper", "serve", "--models-dir", "/tmp", "--budget", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--budget" in r.stderr


def test_help_and_version():
    r = subprocess.run([sys.executable, "-m", "swapper", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("swapper ")
    r = subprocess.run([sys.executable, "-m", "swapper", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--models-dir", "--budget", "--reserve", "--pin", "--preload", "--queue-size", "--idle-ttl",
                 "--llama-server", "--max-body", "--config", "--preset"):
        assert flag in r.stdout


def test_config_command_prints_effective_settings_that_load_back(tmp_path):
    r = subprocess.run([sys.executable, "-m", "swapper", "config", "--budget", "20GiB", "--queue-size", "7",
                        "--idle-ttl", "5m"], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    f = tmp_path / "effective.yaml"
    f.write_text(r.stdout)
    st = load_settings(ns("--config", str(f)), env={})
    assert st.budget.bytes == 20 * 2**30 and st.queue.size == 7 and st.idle_ttl == 300
