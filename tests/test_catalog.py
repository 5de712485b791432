"""Discovery follows llama.cpp router's folder rules; names resolve to entries, never to paths."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from swapper.catalog import build_catalog, scan_models_dir, shard_files
from swapper.settings_load import add_setting_flags, load_settings


def touch(p: Path, size: int = 16) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\0" * size)
    return p


def settings(models_dir: Path, cfg: str | None = None, tmp: Path | None = None):
    p = argparse.ArgumentParser()
    add_setting_flags(p)
    argv = ["--models-dir", str(models_dir)]
    if cfg is not None:
        assert tmp is not None
        f = tmp / "cfg.yaml"
        f.write_text(cfg)
        argv += ["--config", str(f)]
    return load_settings(p.parse_args(argv), env={})


def test_top_level_gguf_is_a_model_named_after_the_file(tmp_path):
    touch(tmp_path / "qwen.gguf")
    touch(tmp_path / "mmproj-qwen.gguf")
    touch(tmp_path / "mtp-qwen.gguf")
    touch(tmp_path / "notes.txt")
    found = scan_models_dir(tmp_path)
    assert [(f.name, f.path.name) for f in found] == [("qwen", "qwen.gguf")]


def test_subfolder_is_one_model_with_first_shard_and_mmproj(tmp_path):
    d = tmp_path / "gemma-vision"
    for i in (1, 2, 3):
        touch(d / f"gemma-q4-0000{i}-of-00003.gguf", 100)
    touch(d / "mmproj-gemma-f16.gguf", 7)
    touch(d / "dflash-gemma.gguf", 5)
    (f,) = scan_models_dir(tmp_path)
    assert f.name == "gemma-vision" and f.path.name == "gemma-q4-00001-of-00003.gguf"
    assert f.mmproj and f.mmproj.name == "mmproj-gemma-f16.gguf"
    assert f.draft and f.draft.name == "dflash-gemma.gguf"
    assert len(f.files) == 4  # three shards and the projector
    cat = build_catalog(settings(tmp_path))
    assert cat.get("gemma-vision").size == 307


def test_single_non_mmproj_gguf_in_a_folder(tmp_path):
    touch(tmp_path / "llama" / "llama-3.2-1b-q8.gguf")
    (f,) = scan_models_dir(tmp_path)
    assert (f.name, f.path.name, f.mmproj) == ("llama", "llama-3.2-1b-q8.gguf", None)


def test_folders_without_a_model_and_hidden_entries_are_skipped(tmp_path):
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "only-mmproj" / "mmproj.gguf")
    touch(tmp_path / ".hidden.gguf")
    touch(tmp_path / ".cache" / "x.gguf")
    touch(tmp_path / "real" / ".partial.gguf")
    assert scan_models_dir(tmp_path) == []


def test_hugging_face_model_folder_is_a_vllm_model(tmp_path):
    touch(tmp_path / "tiny-llama" / "config.json")
    touch(tmp_path / "tiny-llama" / "model.safetensors", 1000)
    (f,) = scan_models_dir(tmp_path)
    assert (f.name, f.engine) == ("tiny-llama", "vllm")


def test_shard_files_lists_every_shard():
    first = Path("/m/x-00001-of-00002.gguf")
    assert [p.name for p in shard_files(first)] == ["x-00001-of-00002.gguf", "x-00002-of-00002.gguf"]
    assert shard_files(Path("/m/plain.gguf")) == [Path("/m/plain.gguf")]


def test_config_entries_override_discovered_ones(tmp_path):
    touch(tmp_path / "qwen.gguf", 10)
    touch(tmp_path / "other" / "qwen-big.gguf", 20)
    cat = build_catalog(settings(tmp_path, "models:\n  qwen: {path: other/qwen-big.gguf, ctx_size: 8192, aliases: [coder]}\n", tmp_path))
    e = cat.get("qwen")
    assert e.source == "config" and e.path.name == "qwen-big.gguf" and e.ctx_size == 8192
    assert [x.id for x in cat] == ["other", "qwen"]
    assert cat.resolve("coder").entry is e


def test_defaults_apply_to_discovered_models(tmp_path):
    touch(tmp_path / "a.gguf")
    cat = build_catalog(settings(tmp_path, "defaults: {ctx_size: 1024, parallel: 2, args: [--flash-attn, 'on']}\n", tmp_path))
    e = cat.get("a")
    assert (e.ctx_size, e.parallel, e.args) == (1024, 2, ("--flash-attn", "on"))


def test_one_name_on_two_engines_gets_engine_qualified_ids(tmp_path):
    touch(tmp_path / "qwen.gguf")
    touch(tmp_path / "hf" / "config.json")
    touch(tmp_path / "hf" / "model.safetensors")
    cat = build_catalog(settings(tmp_path, "models:\n  qwen@vllm: {path: hf}\n", tmp_path))
    assert "qwen@llamacpp" in cat.names() and "qwen@vllm" in cat.names()
    assert cat.resolve("qwen").entry.engine == "llamacpp", "the entry declared first wins"
    assert cat.resolve("qwen", owned_by="vllm").entry.id == "qwen@vllm"
    assert cat.resolve("qwen@vllm").entry.engine == "vllm"


def test_adapters_resolve_to_their_base_model(tmp_path):
    touch(tmp_path / "base.gguf")
    touch(tmp_path / "sql.gguf")
    cat = build_catalog(settings(tmp_path, "models:\n  base: {path: base.gguf, adapters: {sql-lora: sql.gguf}}\n", tmp_path))
    res = cat.resolve("sql-lora")
    assert res.entry.id == "base" and res.adapter.name == "sql-lora"
    assert res.adapter.path == tmp_path / "sql.gguf"


def test_names_are_never_paths(tmp_path):
    touch(tmp_path / "a.gguf")
    cat = build_catalog(settings(tmp_path))
    for evil in ("../../etc/passwd", "/etc/passwd", str(tmp_path / "a.gguf"), "%2e%2e/a", "a.gguf", "", None):
        assert cat.resolve(evil) is None


def test_models_command_lists_name_file_size_source(tmp_path):
    from swapper.synth import write_model

    write_model(tmp_path / "tiny.gguf", 1 << 20)
    r = subprocess.run([sys.executable, "-m", "swapper", "models", "--models-dir", str(tmp_path), "--json",
                        "--state-dir", str(tmp_path / "state"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=60, env={"SWAPPER_HF_CACHE": "0", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["id"] == "tiny" and row["source"] == "models_dir" and row["size_bytes"] == (tmp_path / "tiny.gguf").stat().st_size
    assert row["estimate_bytes"] > row["size_bytes"] and row["learned_bytes"] is None
    r = subprocess.run([sys.executable, "-m", "swapper", "models", "--models-dir", str(tmp_path), "--device", "cpu",
                        "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "tiny" in r.stdout and "ESTIMATE" in r.stdout
