"""A real LoRA adapter GGUF served through its base model by a real llama-server.

The adapter is written with the `gguf` package for a synthetic base (swapper.synth.write_lora);
at temperature 0 its output must differ from the base model's and repeat exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import synth_file

pytestmark = pytest.mark.real

PROMPT = "The answer is"


def adapter_config(tmp_path: Path) -> dict:
    """A base model with one adapter, as a config file declares them."""
    from swapper.synth import write_lora

    base = synth_file(8, 1)
    lora = tmp_path / "adapters" / "sql-lora.gguf"
    lora.parent.mkdir(parents=True, exist_ok=True)
    write_lora(lora, base, rank=8, seed=7)
    return {"models": {"base": {"path": str(base), "aliases": ["base-alias"], "adapters": {"sql-lora": str(lora)}}}}


def complete(s, model: str, headers: dict[str, str] | None = None, **body) -> str:  # noqa: ANN001
    payload = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, **body}
    if model:
        payload["model"] = model
    r = s.post("/v1/completions", payload, headers=headers)
    assert r.status == 200, r.text
    return r.json()["choices"][0]["text"]


def test_adapter_request_loads_the_base_and_changes_the_output(swapper_factory, tmp_path):
    s = swapper_factory(config=adapter_config(tmp_path))
    models = {m["id"]: m for m in s.get("/v1/models").json()["data"]}
    assert set(models) == {"base", "sql-lora"}
    assert models["sql-lora"]["parent"] == "base" and models["sql-lora"]["owned_by"] == "llamacpp"
    assert models["base"]["adapters"] == ["sql-lora"]
    assert [m["id"] for m in s.get("/models").json()["data"]] == ["base"], "adapters are not router models"
    assert s.status("base")["value"] == "unloaded"

    tuned = complete(s, "sql-lora")
    assert s.status("base")["value"] == "loaded", "naming the adapter loads its base"
    assert len(s.engine_pids()) == 1
    plain = complete(s, "base")
    assert tuned != plain, "the adapter changes what the model says"
    assert complete(s, "sql-lora") == tuned and complete(s, "base") == plain, "deterministic at temperature 0"
    assert complete(s, "base-alias") == plain
    # a request that names no adapter never picks one up from an earlier request
    assert complete(s, "sql-lora") == tuned and complete(s, "base") == plain
    assert len(s.engine_pids()) == 1, "one child serves base and adapter"

    # the engine knows the adapter by its file; swapper selects it per request
    (adapter,) = s.get("/lora-adapters?model=base").json()
    assert adapter["path"].endswith("sql-lora.gguf")

    r = s.post("/models/load", {"model": "sql-lora"})
    assert r.status == 400 and "adapter of model 'base'" in r.text
