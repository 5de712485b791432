"""Estimates from GGUF headers; measured footprints replace them and are remembered."""

from __future__ import annotations

import os
from pathlib import Path

from swapper.catalog import ModelEntry
from swapper.estimate import Estimator, FootprintStore, footprint_key, kv_bytes, read_gguf
from swapper.synth import read_shape, write_model


def model(tmp_path: Path, size: int = 4 << 20, seed: int = 0, ctx: int = 2048) -> Path:
    p = tmp_path / f"m{seed}.gguf"
    if not p.exists():
        write_model(p, size, seed=seed, ctx=ctx)
    return p


def entry(path: Path, ctx: int = 1024, parallel: int = 1, args: tuple[str, ...] = ()) -> ModelEntry:
    return ModelEntry(id=path.stem, name=path.stem, engine="llamacpp", path=path, source="models_dir",
                      size=path.stat().st_size, files=(path,), ctx_size=ctx, parallel=parallel, args=args)


def test_weights_are_the_sum_of_tensor_bytes_from_the_header(tmp_path):
    p = model(tmp_path)
    facts = read_gguf([p])
    assert 0 < facts.weights < p.stat().st_size, "weights exclude the header, never more than the file"
    assert p.stat().st_size - facts.weights < 64 << 10
    shape = read_shape(p)
    assert facts.n_layer == shape.n_layer
    assert facts.kv_dim == 2 * shape.head_dim * shape.n_head_kv
    assert facts.train_ctx == 2048


def test_kv_cache_grows_with_context_and_slots_and_shrinks_with_quantized_cache(tmp_path):
    facts = read_gguf([model(tmp_path)])
    base = kv_bytes(facts, 1024, 1)
    assert base == facts.n_layer * 1024 * facts.kv_dim * 2
    assert kv_bytes(facts, 2048, 1) == 2 * base
    assert kv_bytes(facts, 1024, 4) == 4 * base
    assert kv_bytes(facts, 1024, 1, ("--cache-type-k", "q8_0", "-ctv", "q8_0")) < base * 0.6
    assert kv_bytes(facts, 0, 1) == facts.n_layer * 2048 * facts.kv_dim * 2, "ctx 0 = the model's own"


def test_estimate_adds_weights_kv_and_device_overhead(tmp_path):
    e = entry(model(tmp_path))
    host = Estimator(FootprintStore(None), "host").estimate(e)
    cuda = Estimator(FootprintStore(None), "nvidia").estimate(e)
    assert host.source == "estimate" and host.bytes == host.weights + host.kv + host.overhead
    assert cuda.overhead > host.overhead, "a CUDA context costs far more than a CPU process"


def test_learned_footprint_wins_and_survives_a_restart(tmp_path):
    e = entry(model(tmp_path))
    store_path = tmp_path / "state" / "footprints.json"
    est = Estimator(FootprintStore(store_path), "host")
    assert est.peek(e) is None, "listings never pay for a header read"
    first = est.estimate(e)
    est.learn(e, 123_456_789)
    again = Estimator(FootprintStore(store_path), "host").estimate(e)
    assert again.bytes == 123_456_789 and again.source == "learned" and first.bytes != again.bytes


def test_footprint_key_changes_with_file_args_and_device(tmp_path):
    p = model(tmp_path)
    k = footprint_key(entry(p), "host")
    assert footprint_key(entry(p, args=("--flash-attn", "on")), "host") != k
    assert footprint_key(entry(p), "nvidia") != k
    assert footprint_key(entry(p, ctx=4096), "host") != k
    st = p.stat()
    os.utime(p, (st.st_atime, st.st_mtime + 10))
    assert footprint_key(entry(p), "host") != k, "a replaced file must be measured again"


def test_declared_footprint_beats_everything(tmp_path):
    from dataclasses import replace

    e = replace(entry(model(tmp_path)), footprint=7 << 30)
    assert Estimator(FootprintStore(None), "host").estimate(e).bytes == 7 << 30


def test_unreadable_header_falls_back_to_the_file_size(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf" * 1000)
    est = Estimator(FootprintStore(None), "host").estimate(entry(p))
    assert est.source == "size" and est.bytes > 10_000
