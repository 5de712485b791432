"""Discovery in the Hugging Face cache, on a cache laid out here the way huggingface-hub writes it
(`models--org--name/{blobs,refs,snapshots}` with snapshot files linked to blobs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_vllm import write_safetensors
from swapper.backends.vllm import estimate_parts
from swapper.catalog import build_catalog
from swapper.config import ModelSpec, Settings
from swapper.hfcache import scan_hf_cache

C1 = "1" * 40
C2 = "2" * 40


def cache_repo(cache: Path, repo: str, commit: str, files: dict[str, bytes], ref: str | None = "main",
               kind: str = "models", mtime: float | None = None) -> Path:
    """One revision of a repo in the cache; returns its snapshot folder."""
    root = cache / f"{kind}--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        b = root / "blobs" / digest
        b.parent.mkdir(parents=True, exist_ok=True)
        b.write_bytes(data)
        if mtime is not None:
            os.utime(b, (mtime, mtime))
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(b, link.parent))
    if ref:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snap


def safetensors(tmp: Path, n: int) -> bytes:
    p = tmp / f"w{n}.safetensors"
    write_safetensors(p, {"w": ("BF16", [n, 64])})
    return p.read_bytes()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "hub"
    cfg = json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 2,
                      "num_key_value_heads": 2, "hidden_size": 64, "head_dim": 32,
                      "max_position_embeddings": 512, "torch_dtype": "bfloat16"}).encode()
    # a vLLM model with two revisions: main points at the newer one
    cache_repo(c, "org/tiny-llama", C1, {"config.json": cfg, "model.safetensors": safetensors(tmp_path, 8)},
               ref=None, mtime=1_000_000)
    cache_repo(c, "org/tiny-llama", C2, {"config.json": cfg, "model.safetensors": safetensors(tmp_path, 16),
                                         "tokenizer.json": b"{}"})
    # several quants, one split into a folder, with mmproj companions
    cache_repo(c, "org/multi-GGUF", C1, {
        "multi-Q8_0.gguf": b"q8" * 100,
        "Q4_K_M/multi-Q4_K_M-00001-of-00002.gguf": b"a" * 100,
        "Q4_K_M/multi-Q4_K_M-00002-of-00002.gguf": b"b" * 100,
        "mmproj-multi-f16.gguf": b"mm16" * 10,
        "mmproj-multi-Q8_0.gguf": b"mm8" * 10,
    })
    cache_repo(c, "org/single-GGUF", C1, {"single-Q4_K_M.gguf": b"s" * 100, "README.md": b"#"})
    cache_repo(c, "org/docs-only", C1, {"README.md": b"# nothing to serve"})
    cache_repo(c, "org/data", C1, {"config.json": cfg, "x.safetensors": safetensors(tmp_path, 4)}, kind="datasets")
    return c


def test_scan_finds_vllm_and_gguf_models(cache):
    found = {f.name: f for f in scan_hf_cache(cache)}
    assert sorted(found) == ["org/multi-GGUF:Q4_K_M", "org/multi-GGUF:Q8_0", "org/single-GGUF:Q4_K_M",
                             "org/tiny-llama"], "GGUF models named as llama.cpp names them: always with the tag"
    assert found["org/single-GGUF:Q4_K_M"].aliases == ("org/single-GGUF",), "the earlier name answers too"

    llama = found["org/tiny-llama"]
    assert llama.engine == "vllm" and llama.path == cache / "models--org--tiny-llama" / "snapshots" / C2, \
        "the revision main points at"
    assert {p.name for p in llama.files} == {"config.json", "model.safetensors", "tokenizer.json"}

    q4 = found["org/multi-GGUF:Q4_K_M"]
    assert q4.engine == "llamacpp" and q4.path.name == "multi-Q4_K_M-00001-of-00002.gguf"
    assert [p.name for p in q4.files] == ["multi-Q4_K_M-00001-of-00002.gguf", "multi-Q4_K_M-00002-of-00002.gguf",
                                          "mmproj-multi-f16.gguf"]
    assert all(p.exists() for p in q4.files), "shards resolved in their sub-folder of the snapshot"
    assert found["org/multi-GGUF:Q8_0"].mmproj.name == "mmproj-multi-Q8_0.gguf", "mmproj of the same quant"
    assert found["org/single-GGUF:Q4_K_M"].mmproj is None


def test_catalog_entries_from_the_cache_and_config_wins(cache):
    st = Settings()
    st.models["org/single-GGUF"] = ModelSpec(name="org/single-GGUF", path=str(cache / "elsewhere.gguf"))
    cat = build_catalog(st, scan_hf_cache(cache))
    e = cat.get("org/tiny-llama")
    assert e is not None and e.source == "cache" and e.engine == "vllm"
    assert e.size == sum(p.stat().st_size for p in e.files)
    assert cat.get("org/single-GGUF").source == "config", "a declared model of the same name wins"
    assert cat.resolve("org/multi-GGUF:Q8_0").entry.engine == "llamacpp"


def test_a_repo_id_entry_is_estimated_from_the_cached_config(cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    st = Settings()
    st.models["tiny"] = ModelSpec(name="tiny", engine="vllm", source="org/tiny-llama", ctx_size=256)
    e = build_catalog(st).get("tiny")
    assert e.path is None and e.repo == "org/tiny-llama"
    weights, kv, _ = estimate_parts(e, "nvidia")
    assert weights == 16 * 64 * 2, "weights from the safetensors header of the main revision"
    assert kv == 2 * 2 * 2 * 32 * 2 * 256


def test_scan_can_be_turned_off_and_a_missing_cache_is_empty(cache, tmp_path, monkeypatch):
    assert scan_hf_cache(tmp_path / "no-such-cache") == []
    monkeypatch.setenv("SWAPPER_HF_CACHE", "0")
    assert scan_hf_cache(cache) == []


def test_swapper_models_lists_the_cache(cache, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SWAPPER_"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "swapper", "models", "--json", "--no-estimate",
                          "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, env=env, check=True)
    rows = {r["id"]: r for r in json.loads(out.stdout)}
    assert rows["org/tiny-llama"]["engine"] == "vllm" and rows["org/tiny-llama"]["source"] == "cache"
    assert "org/multi-GGUF:Q4_K_M" in rows
