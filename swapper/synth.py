"""Synthetic GGUF models: llama-architecture files with random weights that llama-server serves.

They exist so that memory-budget behaviour can be exercised with several distinct models of
chosen sizes on any machine (tests, `make demo`, benchmarks). The vocabulary is byte-level
(259 tokens: `<unk>`, `<s>`, `</s>`, `<0x00>`..`<0xFF>`), so any text tokenizes.

    python -m swapper.synth OUT.gguf --size 64MiB [--seed N] [--ctx 2048]
    python -m swapper.synth OUT.gguf --lora-for BASE.gguf [--rank 8] [--seed N]

`python swapper/synth.py ...` (the file run as a script, from a checkout) works the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: Python put swapper/ itself first on sys.path, where its modules could shadow
    # others and the package is not importable; the checkout root is what `-m` would have put there.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import math
from dataclasses import dataclass

import numpy as np

N_VOCAB = 259
HEAD_DIM = 64


@dataclass(frozen=True)
class Shape:
    """Dimensions of a synthetic llama model."""

    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        per_layer = 2 * self.n_embd * self.n_embd  # q, o
        per_layer += 2 * self.n_embd * (self.n_head_kv * self.head_dim)  # k, v
        per_layer += 3 * self.n_embd * self.n_ff  # gate, up, down
        return self.n_layer * per_layer + 2 * N_VOCAB * self.n_embd


def shape_for_size(size_bytes: int) -> Shape:
    """Pick dimensions whose F16 weights come close to `size_bytes`."""
    n_layer = 2
    while True:
        # per layer ~ 2d^2 + 2d*(d/2) + 3*d*2d = 9 d^2 parameters, 2 bytes each
        d = math.sqrt(max(size_bytes, 1) / (2 * 9 * n_layer))
        if d <= 2048 or n_layer >= 64:
            break
        n_layer *= 2
    # a multiple of two heads, so that the KV heads (half the heads) divide the heads (GQA)
    n_embd = max(HEAD_DIM * 2, int(round(d / (2 * HEAD_DIM))) * 2 * HEAD_DIM)
    n_head = n_embd // HEAD_DIM
    n_head_kv = max(1, n_head // 2)
    return Shape(n_embd=n_embd, n_layer=n_layer, n_ff=2 * n_embd, n_head=n_head, n_head_kv=n_head_kv)


def _vocab() -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    scores = [0.0] * len(tokens)
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256
    return tokens, scores, types


def _weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)


def write_model(path: str | Path, size_bytes: int = 16 << 20, seed: int = 0, ctx: int = 4096,
                name: str | None = None, shape: Shape | None = None) -> Shape:
    """Write a llama-architecture GGUF of about `size_bytes` (or of `shape`) with random weights."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = shape or shape_for_size(size_bytes)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name or path.stem)
    w.add_context_length(ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, scores, types = _vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    d, kv = shape.n_embd, shape.n_head_kv * shape.head_dim
    w.add_tensor("token_embd.weight", _weights(rng, (N_VOCAB, d), 1.0))
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("output.weight", _weights(rng, (N_VOCAB, d)))
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", _weights(rng, (d, d)))
        w.add_tensor(p + "attn_k.weight", _weights(rng, (kv, d)))
        w.add_tensor(p + "attn_v.weight", _weights(rng, (kv, d)))
        w.add_tensor(p + "attn_output.weight", _weights(rng, (d, d)))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", _weights(rng, (shape.n_ff, d)))
        w.add_tensor(p + "ffn_up.weight", _weights(rng, (shape.n_ff, d)))
        w.add_tensor(p + "ffn_down.weight", _weights(rng, (d, shape.n_ff)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shape


def read_shape(path: str | Path) -> Shape:
    """Read back the dimensions of a synthetic (or any llama) GGUF."""
    import gguf

    r = gguf.GGUFReader(str(path))

    def val(key: str) -> int:
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    return Shape(n_embd=val("llama.embedding_length"), n_layer=val("llama.block_count"),
                 n_ff=val("llama.feed_forward_length"), n_head=val("llama.attention.head_count"),
                 n_head_kv=val("llama.attention.head_count_kv"))


def write_lora(path: str | Path, base: str | Path, rank: int = 8, alpha: float = 16.0,
               seed: int = 1, scale: float = 1.0) -> None:
    """Write a LoRA adapter GGUF for a llama base model, touching attn_output and ffn_down of each layer.

    Layout as llama.cpp's convert_lora_to_gguf.py writes it: `general.type = adapter`,
    `adapter.type = lora`, `adapter.lora.alpha`, and `<tensor>.lora_a` (rank x n_in) /
    `<tensor>.lora_b` (n_out x rank) pairs.
    """
    import gguf

    shape = read_shape(base)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    d = shape.n_embd
    # attn_output and ffn_down write straight into the residual stream, so the adapter visibly
    # changes what even a random model says
    for i in range(shape.n_layer):
        for t, n_in in (("attn_output", d), ("ffn_down", shape.n_ff)):
            name = f"blk.{i}.{t}.weight"
            w.add_tensor(name + ".lora_a", _weights(rng, (rank, n_in), scale))
            w.add_tensor(name + ".lora_b", _weights(rng, (d, rank), scale))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _size(text: str) -> int:
    """argparse type: a bad size is a usage error, not a traceback."""
    from swapper.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m swapper.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", type=_size, default="16MiB", help="approximate weight bytes (e.g. 64MiB, 1GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=4096, help="training context written to the header")
    ap.add_argument("--lora-for", metavar="BASE", help="write a LoRA adapter for this base instead")
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args(argv)
    if a.lora_for:
        write_lora(a.out, a.lora_for, rank=a.rank, seed=a.seed)
    else:
        write_model(a.out, a.size, seed=a.seed, ctx=a.ctx)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
