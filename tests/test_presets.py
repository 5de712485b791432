"""Presets: each loads in the config schema, says why at its top, is overridden by every later
source, hands llama-server arguments it accepts, and `--preset cpu` serves a real request."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import pytest
import requests_shim as rq
import yaml

from conftest import REPO, free_port, synth_file
from swapper.cli import _parser
from swapper.config import ConfigError
from swapper.settings_load import list_presets, load_settings, preset_path, presets_dir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

PRESETS = {"cpu", "l4-24g", "a10-24g", "rtx4090-24g", "h100-80g", "mi300x-192g", "jetson-orin"}
GPU = {"l4-24g": "nvidia:0", "a10-24g": "nvidia:0", "rtx4090-24g": "nvidia:0", "h100-80g": "nvidia:0",
       "mi300x-192g": "amd:0"}


def serve_ns(*flags: str) -> argparse.Namespace:
    return _parser().parse_args(["serve", *flags])


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def test_every_preset_ships_inside_the_package():
    assert set(list_presets()) == PRESETS
    assert presets_dir().resolve() == (REPO / "swapper" / "presets").resolve()
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "*.yaml" in meta["package-data"]["swapper.presets"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_and_explains_itself(name):
    path = preset_path(name)
    text = path.read_text()
    head = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    assert head and head[0].startswith(f"# {name}:"), "the first line names the preset"
    assert len(head) >= 3 and any("Why" in ln for ln in head), "the top comment says why"
    raw = yaml.safe_load(text)
    for key in ("device", "budget", "reserve", "queue", "idle_ttl", "engines", "defaults"):
        assert key in raw, f"{name} sets {key}"

    st = load_settings(None, env={}, preset=name)
    assert st.preset == name
    args = st.engines["llamacpp"].args
    assert "--metrics" in args, "replacing the engine args must keep the metrics swapper reads"
    assert arg_after(args, "--flash-attn") == "on"
    assert st.defaults.ctx_size >= 4096 and st.defaults.parallel >= 1
    assert st.queue.size > 0 and st.queue.timeout > 0
    assert 0 < st.budget.fraction <= 0.95 and st.reserve >= 512 << 20
    if name == "cpu":
        assert st.device == "cpu" and arg_after(args, "-ngl") == "0"
        assert "--cache-type-k" not in args, "quantised KV costs CPU time on every token"
    else:
        assert arg_after(args, "-ngl") == "999"
        assert st.device == GPU.get(name, "auto"), "Jetson: auto picks the unified-memory probe"


def test_gpu_budgets_leave_room_the_card_really_has():
    """Budget share minus reserve stays within the card's memory and leaves most of it usable."""
    for name, device in GPU.items():
        gb = int(name.rsplit("-", 1)[1].rstrip("g"))
        total = gb * 10**9
        st = load_settings(None, env={}, preset=name)
        usable = st.budget.fraction * total - st.reserve
        assert 0.8 * total < usable < total, name


def test_config_file_environment_and_flags_override_a_preset(tmp_path):
    cfg = tmp_path / "swapper.yaml"
    cfg.write_text(yaml.safe_dump({"idle_ttl": "1h", "queue": {"size": 5}, "defaults": {"ctx_size": 2048},
                                   "engines": {"llamacpp": {"args": ["--metrics", "-ngl", "20"]}}}))
    base = load_settings(None, env={}, preset="l4-24g")
    st = load_settings(serve_ns("--preset", "l4-24g", "--config", str(cfg), "--budget", "50%"),
                       env={"SWAPPER_QUEUE_SIZE": "9", "SWAPPER_RESERVE": "2GiB"})
    assert st.idle_ttl == 3600, "config file over preset"
    assert st.defaults.ctx_size == 2048 and st.defaults.parallel == base.defaults.parallel, \
        "a section merges key by key: the preset's parallel stays"
    assert st.engines["llamacpp"].args == ["--metrics", "-ngl", "20"]
    assert st.queue.size == 9 and st.reserve == 2 << 30, "environment over config file and preset"
    assert st.budget.fraction == 0.5, "flag over everything"
    assert st.queue.timeout == base.queue.timeout and st.device == base.device, "the rest is the preset's"

    st = load_settings(serve_ns("--config", str(cfg), "--queue-size", "3"),
                       env={"SWAPPER_PRESET": "h100-80g", "SWAPPER_QUEUE_SIZE": "9"})
    assert st.preset == "h100-80g" and st.defaults.parallel == 8 and st.queue.size == 3


def test_preset_by_path_and_unknown_names(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("# mine: tests\nbudget: 10GiB\n")
    assert load_settings(None, env={}, preset=str(own)).budget.bytes == 10 << 30
    with pytest.raises(ConfigError) as e:
        load_settings(None, env={}, preset="a100-40g")
    assert all(p in str(e.value) for p in PRESETS), "the error lists the presets that exist"


def test_llama_server_accepts_every_presets_arguments(llama_server_bin):
    """Start llama-server with each distinct argument set on a tiny model: bad flags or values fail."""
    model = synth_file(8, 1)
    seen: set[tuple[str, ...]] = set()
    for name in sorted(PRESETS):
        st = load_settings(None, env={}, preset=name)
        args = tuple(st.engines["llamacpp"].args)
        if args in seen:
            continue
        seen.add(args)
        port = free_port()
        proc = subprocess.Popen([llama_server_bin, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                 "-c", "512", "-np", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if rq.get(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            assert proc.poll() is None, f"{name}: llama-server refused {args}:\n" + proc.stdout.read().decode()[-2000:]
            assert rq.get(f"http://127.0.0.1:{port}/health", timeout=1).status == 200, name
        finally:
            proc.terminate()
            proc.wait(15)
    assert len(seen) >= 4


@pytest.mark.real
def test_serve_with_the_cpu_preset_answers_a_request(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir), "--preset", "cpu")
    chat = openai_client(s).chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.content.strip()
    (pid,) = s.engine_pids()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert arg_after(argv, "--flash-attn") == "on" and "--metrics" in argv
    assert arg_after(argv, "-c") == "4096", "ctx_size from the preset's defaults"
