"""The vLLM backend's pure parts: argv and env, memory sizing, estimates, the request rewrite."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from fake_vllm import hf_folder
from swapper.backends import get
from swapper.backends.vllm import VllmBackend, estimate_parts, facts, safetensors_bytes
from swapper.catalog import Adapter, build_catalog
from swapper.config import EngineSettings, Settings
from swapper.estimate import Estimator, FootprintStore
from swapper.gpu import FakeProbe, HostProbe

GiB, MiB = 1 << 30, 1 << 20


def settings(models_dir: Path, command: list[str] | None = None, **models: dict) -> Settings:
    from swapper.config import ModelSpec

    st = Settings(models_dir=str(models_dir))
    st.engines["vllm"] = EngineSettings(command=command or [sys.executable, "-m", "vllm.entrypoints.openai.api_server"],
                                        args=["--enforce-eager"])
    for name, spec in models.items():
        st.models[name] = ModelSpec(name=name, **spec)
    return st


@pytest.fixture
def work():  # noqa: ANN201
    """A short per-child directory, as the launcher makes under a short state dir."""
    d = tempfile.mkdtemp(prefix="sw-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def entry_of(st: Settings, name: str = "tiny"):  # noqa: ANN201
    e = build_catalog(st).get(name)
    assert e is not None and e.engine == "vllm"
    return e


def test_catalog_folder_is_a_vllm_entry_and_weights_come_from_safetensors_headers(tmp_path):
    d = hf_folder(tmp_path / "models")
    assert safetensors_bytes(d / "model-00002-of-00002.safetensors") == 1024 * 256 * 2 + 256 * 4
    e = entry_of(settings(tmp_path / "models"))
    f = facts(e)
    assert f.weights == 256 * 1024 * 2 + 1024 * 256 * 2 + 256 * 4
    # K and V: layers x 2 x kv heads x head dim x 2 bytes (bf16), per token
    assert f.kv_per_token == 4 * 2 * 2 * 64 * 2
    assert f.max_len == 2048, "ctx_size 4096 is capped by the model's max_position_embeddings"


def test_estimate_is_weights_plus_requested_kv_plus_runtime(tmp_path):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models", tiny={"path": "tiny", "ctx_size": 1024, "parallel": 3, "engine": "vllm"})
    e = entry_of(st)
    weights, kv, overhead = estimate_parts(e, "nvidia")
    assert kv == 4 * 2 * 2 * 64 * 2 * 1024 * 3
    est = Estimator(FootprintStore(None), "nvidia").estimate(e)
    assert est.source == "estimate", "the estimator uses config.json, not the file-size fallback"
    assert (est.weights, est.kv, est.overhead) == (weights, kv, overhead)
    assert est.bytes == weights + kv + overhead
    # an explicit KV size wins over the formula
    e2 = replace(e, args=(*e.args, "--kv-cache-memory-bytes", "64MiB"))
    assert estimate_parts(e2, "host")[1] == 64 * MiB
    e3 = replace(e, env=(("VLLM_CPU_KVCACHE_SPACE", "2"),))
    assert estimate_parts(e3, "host")[1] == 2 * GiB


def test_fp8_kv_cache_halves_the_kv_estimate(tmp_path):
    hf_folder(tmp_path / "models")
    e = entry_of(settings(tmp_path / "models"))
    full = estimate_parts(e, "nvidia")[1]
    fp8 = estimate_parts(replace(e, args=(*e.args, "--kv-cache-dtype", "fp8")), "nvidia")[1]
    assert fp8 * 2 == full


def test_gpu_start_sizes_memory_utilization_from_the_reservation(tmp_path, work):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models")
    e = entry_of(st)
    probe = FakeProbe(total=80 * GiB, kind="nvidia", offload=True)
    spec = VllmBackend(st).start_spec(e, 4321, probe, 20 * GiB, work)
    argv = spec.argv
    i = argv.index("--gpu-memory-utilization")
    assert argv[i + 1] == "0.2500", "a quarter of the budget-holding device, not vLLM's default 0.9"
    assert "--kv-cache-memory-bytes" not in argv, "on a GPU vLLM sizes its KV cache inside the share"
    # odd sizes round up (never under-allocate the reservation) and stay within (0, 1]
    spec = VllmBackend(st).start_spec(e, 4321, probe, 20 * GiB + 1, work)
    assert spec.argv[spec.argv.index("--gpu-memory-utilization") + 1] == "0.2501"
    # the user's own value is respected
    e2 = replace(e, args=("--gpu-memory-utilization", "0.5"))
    spec = VllmBackend(st).start_spec(e2, 4321, probe, 20 * GiB, work)
    assert spec.argv.count("--gpu-memory-utilization") == 1 and spec.argv[-1] == "0.5"


def test_cpu_start_passes_no_utilization_but_the_kv_space(tmp_path, work):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models")
    e = entry_of(st)
    spec = VllmBackend(st).start_spec(e, 4321, HostProbe(), 3 * GiB, work)
    assert "--gpu-memory-utilization" not in spec.argv
    kv = int(spec.argv[spec.argv.index("--kv-cache-memory-bytes") + 1])
    assert kv == estimate_parts(e, "host")[1], "vLLM's CPU default would take most of the host"


def test_argv_for_both_command_forms_and_the_child_environment(tmp_path, work):
    d = hf_folder(tmp_path / "models")
    module = settings(tmp_path / "models")
    spec = VllmBackend(module).start_spec(entry_of(module), 4321, HostProbe(), GiB, work)
    guard = [sys.executable, "-m", "swapper.backends.vllm", "--remove", work, "--"]
    assert spec.argv[:len(guard)] == guard, "the engine runs under the inner keeper that removes its files"
    argv = spec.argv[len(guard):]
    assert argv[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(d)]
    for flag, value in (("--host", "127.0.0.1"), ("--port", "4321"), ("--served-model-name", "tiny"),
                        ("--max-model-len", "2048")):
        assert argv[argv.index(flag) + 1] == value
    assert argv[-1] == "--enforce-eager", "engine args come after swapper's"
    assert spec.health_path == "/health"
    assert spec.env["TMPDIR"] == work and spec.env["VLLM_RPC_BASE_PATH"] == work
    assert spec.env["VLLM_CACHE_ROOT"].startswith(work)
    assert spec.env["HF_HUB_OFFLINE"] == "1" and spec.env["VLLM_NO_USAGE_STATS"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in spec.env and "--enable-sleep-mode" not in argv

    cli = settings(tmp_path / "models", command=["/usr/bin/env", "serve"])
    argv = VllmBackend(cli).start_spec(entry_of(cli), 4321, HostProbe(), GiB, work).argv[len(guard):]
    assert argv[:3] == ["/usr/bin/env", "serve", str(d)], "`vllm serve` takes the model positionally"
    assert "--model" not in argv


def test_sleep_true_enables_sleep_mode_and_dev_routes(tmp_path, work):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models", tiny={"path": "tiny", "engine": "vllm", "sleep": True})
    spec = VllmBackend(st).start_spec(entry_of(st), 4321, HostProbe(), GiB, work)
    assert "--enable-sleep-mode" in spec.argv
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"


def test_adapters_become_lora_modules(tmp_path, work):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models", tiny={"path": "tiny", "engine": "vllm", "adapters": {"sql": "sql-lora"}})
    e = entry_of(st)
    argv = VllmBackend(st).start_spec(e, 4321, HostProbe(), GiB, work).argv
    i = argv.index("--lora-modules")
    assert "--enable-lora" in argv and argv[i + 1] == f"sql={tmp_path / 'models' / 'sql-lora'}"


def test_missing_command_is_a_clear_error(tmp_path, work):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models", command=["vllm-that-is-not-installed", "serve"])
    with pytest.raises(FileNotFoundError, match="engines.vllm.command"):
        VllmBackend(st).start_spec(entry_of(st), 4321, HostProbe(), GiB, work)


def test_rewrite_sets_the_served_name(tmp_path):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models", tiny={"path": "tiny", "engine": "vllm", "aliases": ["small"],
                                            "adapters": {"sql": "sql-lora"}})
    e = entry_of(st)
    b = get("vllm", st)
    body = {"model": "small", "messages": [], "stream": True}
    assert b.rewrite("/v1/chat/completions", body, e, None) == {**body, "model": "tiny"}
    assert body["model"] == "small", "the caller's dict is not modified"
    assert b.rewrite("/v1/completions", {"model": "tiny"}, e, None) is None, "already right: bytes as sent"
    sql = Adapter("sql", tmp_path / "models" / "sql-lora")
    assert b.rewrite("/v1/completions", {"model": "sql"}, e, sql) is None
    assert b.rewrite("/v1/completions", {"model": "small"}, e, sql) == {"model": "sql"}


def test_a_long_workdir_gets_a_short_alias_for_socket_paths(tmp_path):
    hf_folder(tmp_path / "models")
    st = settings(tmp_path / "models")
    long = tmp_path / ("w" * 80)
    long.mkdir()
    spec = VllmBackend(st).start_spec(entry_of(st), 4321, HostProbe(), GiB, str(long))
    alias = spec.env["TMPDIR"]
    try:
        assert len(alias) <= 60 and os.path.islink(alias) and os.path.realpath(alias) == str(long.resolve())
        assert spec.env["VLLM_RPC_BASE_PATH"] == alias
        i = spec.argv.index("--")
        assert spec.argv[:i].count("--remove") == 2 and alias in spec.argv[:i], "the inner keeper removes both"
    finally:
        os.unlink(alias)
