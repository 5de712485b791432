"""How many bytes a model will need, before it is loaded; and what it really took, after.

Estimate = weights (sum of GGUF tensor bytes, read from headers only) + KV cache (layers x
context x slots x (K + V dims) x bytes per element, from GGUF metadata and the child's cache-type
args) + a per-process runtime overhead that depends on the device. vLLM models (Hugging Face
folders) are estimated by their backend from config.json and safetensors headers. Guessing over- or
under-shoots (Ollama's lesson), so the footprint measured after a load replaces the estimate
and is remembered on disk, keyed by file, size, mtime and engine args: the next estimate of the
same model is exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .catalog import ModelEntry

log = logging.getLogger("swapper.estimate")

MiB = 1 << 20

# Bytes per KV element for llama.cpp's --cache-type-k/-v values (block formats: bytes / 32 values).
KV_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}

# Runtime overhead per child beyond weights and KV. On CUDA the context and compute buffers
# dominate small models: measured on an H100 (ctx 4096, one slot) a 4 MiB model took 652 MiB,
# 465 MiB -> 1,268 MiB, 2,786 MiB -> 3,724 MiB, 5,412 MiB -> 6,558 MiB. On CPU a child's RSS
# is its file size plus ~25-100 MiB.
OVERHEAD = {
    "nvidia": (700 * MiB, 0.08),
    "amd": (768 * MiB, 0.08),
    "host": (96 * MiB, 0.02),
    "fake": (0, 0.0),
}


@dataclass(frozen=True)
class GgufFacts:
    weights: int
    n_layer: int
    kv_dim: int  # (K head dim x KV heads) + (V head dim x KV heads) per token per layer
    train_ctx: int


@dataclass(frozen=True)
class Estimate:
    bytes: int  # what the scheduler plans with
    weights: int
    kv: int
    overhead: int
    learned: int | None
    source: str  # declared | learned | estimate | size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# GGUF value types (gguf.GGUFValueType): sizes of the fixed-width ones
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """A GGUF header read straight from the file: metadata scalars and tensor sizes.

    gguf.GGUFReader materialises every token of the vocabulary as numpy objects (12 s for a
    262k-token Gemma vocabulary here); estimates only need a few scalars and the tensor table,
    so string arrays are skipped by length and nothing but the header is touched.
    """

    def __init__(self, path: Path):
        import mmap
        import struct

        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.kv: dict[str, Any] = {}
        self.tensor_bytes = 0
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:4] != b"GGUF":
                raise ValueError(f"{path}: not a GGUF file")
            pos = 8
            n_tensors, n_kv = struct.unpack_from("<QQ", mm, pos)
            pos += 16

            def string(p: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", mm, p)
                return mm[p + 8:p + 8 + n].decode(errors="replace"), p + 8 + n

            def value(t: int, p: int, keep: bool) -> tuple[Any, int]:
                if t in _SCALAR:
                    fmt = _SCALAR[t]
                    return struct.unpack_from(fmt, mm, p)[0], p + struct.calcsize(fmt)
                if t == _STRING:
                    return string(p)
                if t == _ARRAY:
                    et, count = struct.unpack_from("<IQ", mm, p)
                    p += 12
                    if et in _SCALAR:
                        size = struct.calcsize(_SCALAR[et])
                        vals = (list(struct.unpack_from(f"<{count}{_SCALAR[et][1]}", mm, p))
                                if keep and count <= 4096 else None)
                        return vals, p + size * count
                    for _ in range(count):  # arrays of strings (vocabularies): skip by length
                        if et == _STRING:
                            (n,) = struct.unpack_from("<Q", mm, p)
                            p += 8 + n
                        else:
                            _, p = value(et, p, False)
                    return None, p
                raise ValueError(f"{path}: unknown GGUF value type {t}")

            for _ in range(n_kv):
                key, pos = string(pos)
                (t,) = struct.unpack_from("<I", mm, pos)
                val, pos = value(t, pos + 4, keep=True)
                if val is not None:
                    self.kv[key] = val
            for _ in range(n_tensors):
                _, pos = string(pos)
                (n_dims,) = struct.unpack_from("<I", mm, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
                pos += 4 + 8 * n_dims
                ttype, _offset = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                n = 1
                for d in dims:
                    n *= d
                self.tensor_bytes += n * type_size // block


def gguf_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's metadata scalars and strings (string arrays such as vocabularies skipped)."""
    return _Header(path).kv


def read_gguf(files: list[Path]) -> GgufFacts:
    """Weights and KV geometry from GGUF headers; tensor data is never read."""
    weights = 0
    meta: dict[str, Any] | None = None
    for path in files:
        h = _Header(path)
        weights += h.tensor_bytes
        if meta is None and "mmproj" not in path.name and "general.architecture" in h.kv:
            meta = h.kv
    if meta is None:
        return GgufFacts(weights=weights, n_layer=0, kv_dim=0, train_ctx=0)
    arch = meta["general.architecture"]

    def num(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}", default)  # type: ignore[union-attr]
        if isinstance(v, list):
            return int(max(v)) if v else default
        return int(v)

    n_head = num("attention.head_count")
    n_kv = num("attention.head_count_kv", n_head)
    head = num("embedding_length") // n_head if n_head else 0
    k_len = num("attention.key_length", head)
    v_len = num("attention.value_length", head)
    return GgufFacts(weights=weights, n_layer=num("block_count"), kv_dim=(k_len + v_len) * n_kv,
                     train_ctx=num("context_length"))


def _cache_type(args: tuple[str, ...], which: str) -> str:
    names = {"k": ("--cache-type-k", "-ctk"), "v": ("--cache-type-v", "-ctv")}[which]
    t = "f16"
    for i, a in enumerate(args):
        if a in names and i + 1 < len(args):
            t = args[i + 1].lower()
        for n in names:
            if a.startswith(n + "="):
                t = a.split("=", 1)[1].lower()
    return t


def kv_bytes(facts: GgufFacts, ctx: int, slots: int, args: tuple[str, ...] = ()) -> int:
    ctx = ctx or facts.train_ctx
    per_elem = (KV_TYPE_BYTES.get(_cache_type(args, "k"), 2.0) + KV_TYPE_BYTES.get(_cache_type(args, "v"), 2.0)) / 2
    return int(facts.n_layer * ctx * slots * facts.kv_dim * per_elem)


# ------------------------------------------------------------------------------ learning


def footprint_key(entry: ModelEntry, device_kind: str) -> str:
    """Same file, size, mtime, engine args and device -> same footprint."""
    parts: list[str] = [entry.engine, device_kind, str(entry.ctx_size), str(entry.parallel), *entry.args]
    for f in entry.files:
        try:
            s = f.stat()
            parts += [str(f.resolve()), str(s.st_size), str(int(s.st_mtime))]
        except OSError:
            parts.append(str(f))
    parts += [str(a.path) for a in entry.adapters]
    if entry.repo:
        parts.append(entry.repo)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


class FootprintStore:
    """Measured footprints on disk (JSON), so that estimates become exact after one load."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = {}
        if path is not None and path.exists():
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable footprint store %s: %s", path, e)

    def get(self, key: str) -> int | None:
        rec = self._data.get(key)
        return int(rec["bytes"]) if rec else None

    def put(self, key: str, model: str, nbytes: int) -> None:
        with self._lock:
            self._data[key] = {"model": model, "bytes": int(nbytes)}
            if self.path is None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".footprints.")
                with os.fdopen(fd, "w") as f:
                    json.dump(self._data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except OSError as e:
                log.warning("cannot save footprints to %s: %s", self.path, e)


class Estimator:
    """Lazy, cached estimates; listing models never reads a header."""

    def __init__(self, store: FootprintStore, device_kind: str):
        self.store = store
        self.device_kind = device_kind
        self._cache: dict[str, Estimate] = {}

    def estimate(self, entry: ModelEntry) -> Estimate:
        key = footprint_key(entry, self.device_kind)
        learned = self.store.get(key)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._compute(entry)
            self._cache[key] = cached
        if entry.footprint:
            return Estimate(entry.footprint, cached.weights, cached.kv, cached.overhead, learned, "declared")
        if learned:
            return Estimate(learned, cached.weights, cached.kv, cached.overhead, learned, "learned")
        return cached

    def peek(self, entry: ModelEntry) -> Estimate | None:
        """The estimate if it costs nothing (declared, learned or already computed): listings use it."""
        key = footprint_key(entry, self.device_kind)
        if entry.footprint or self.store.get(key) or key in self._cache:
            return self.estimate(entry)
        return None

    def learn(self, entry: ModelEntry, measured: int) -> None:
        self.store.put(footprint_key(entry, self.device_kind), entry.id, measured)

    def _compute(self, entry: ModelEntry) -> Estimate:
        base, share = OVERHEAD.get(self.device_kind, OVERHEAD["host"])
        gguf_files = [f for f in entry.files if f.suffix == ".gguf"]
        gguf_files += [a.path for a in entry.adapters if a.path.suffix == ".gguf"]
        if entry.engine == "llamacpp" and gguf_files:
            try:
                facts = read_gguf(gguf_files)
            except Exception as e:  # unreadable header: fall back to file sizes
                log.warning("%s: cannot read GGUF header (%s); estimating from file size", entry.id, e)
            else:
                kv = kv_bytes(facts, entry.ctx_size, entry.parallel, entry.args)
                overhead = int(base + share * facts.weights)
                return Estimate(facts.weights + kv + overhead, facts.weights, kv, overhead, None, "estimate")
        if entry.engine == "vllm":  # Hugging Face folder: config.json + safetensors headers
            from .backends.vllm import estimate_parts

            try:
                weights, kv, overhead = estimate_parts(entry, self.device_kind)
            except Exception as e:
                log.warning("%s: cannot read the model's config (%s); estimating from file size", entry.id, e)
            else:
                if weights:
                    return Estimate(weights + kv + overhead, weights, kv, overhead, None, "estimate")
        weights = entry.size
        overhead = int(base + share * weights)
        return Estimate(weights + overhead, weights, 0, overhead, None, "size")
