"""Gateway API Inference Extension headers and `owned_by` routing on a real swapper.

`X-Gateway-Model-Name` names the model when the body does not (400 when both name different
models); `X-Gateway-Base-Model-Name` names an adapter's base; `owned_by` (body, `x-owned-by`
header or `?owned_by=`) picks between entries of one name on two engines. The vLLM entry is
never started successfully here (no vLLM on the box): its refusal shows where a request went.
"""

from __future__ import annotations

import pytest

from conftest import synth_file
from test_lora import adapter_config, complete

pytestmark = pytest.mark.real


def gateway_config(tmp_path) -> dict:  # noqa: ANN001
    cfg = adapter_config(tmp_path)
    cfg["models"]["other"] = {"path": str(synth_file(8, 2))}
    cfg["models"]["dup"] = {"path": str(synth_file(8, 3))}
    cfg["models"]["dup@vllm"] = {"path": str(synth_file(8, 3))}
    return cfg


def post(s, body: dict, headers: dict[str, str] | None = None, query: str = ""):  # noqa: ANN001, ANN201
    return s.post("/v1/completions" + query, {"prompt": "x", "max_tokens": 2, "temperature": 0, **body},
                  headers=headers)


def test_model_name_header(swapper_factory, tmp_path):
    s = swapper_factory(config=gateway_config(tmp_path))
    r = post(s, {}, {"X-Gateway-Model-Name": "other"})
    assert r.status == 200 and r.json()["model"] == "other", "the header names the model"
    assert s.status("other")["value"] == "loaded"
    assert post(s, {"model": "other"}, {"X-Gateway-Model-Name": "other"}).status == 200
    assert post(s, {"model": "base"}, {"X-Gateway-Model-Name": "base-alias"}).status == 200, \
        "an alias of the same model is no conflict"

    r = post(s, {"model": "other"}, {"X-Gateway-Model-Name": "base"})
    assert r.status == 400 and r.error_code() == "invalid_request" and r.json()["error"]["param"] == "model"
    r = post(s, {"model": "other"}, {"X-Gateway-Model-Name": "nope"})
    assert r.status == 400
    r = post(s, {}, {"X-Gateway-Model-Name": "nope"})
    assert r.status == 404 and r.error_code() == "model_not_found"
    r = post(s, {})
    assert r.status == 400 and r.json()["error"]["param"] == "model"


def test_base_model_header_for_adapter_requests(swapper_factory, tmp_path):
    s = swapper_factory(config=gateway_config(tmp_path))
    tuned = complete(s, "sql-lora")
    plain = complete(s, "base")
    assert tuned != plain
    base_header = {"X-Gateway-Base-Model-Name": "base"}
    assert complete(s, "sql-lora", base_header) == tuned
    assert complete(s, "", {"X-Gateway-Model-Name": "sql-lora", **base_header}) == tuned
    assert complete(s, "", base_header) == plain, "the base alone names the base model"
    r = post(s, {"model": "sql-lora"}, {"X-Gateway-Base-Model-Name": "other"})
    assert r.status == 400 and "not served by base model 'other'" in r.text
    r = post(s, {"model": "no-such-lora"}, base_header)
    assert r.status == 404 and r.error_code() == "model_not_found" and "sql-lora" in r.text
    assert s.status("other")["value"] == "unloaded", "no request reached the wrong base"


def test_owned_by_chooses_between_engines(swapper_factory, tmp_path):
    s = swapper_factory(config=gateway_config(tmp_path))
    listed = {m["id"]: m["owned_by"] for m in s.get("/v1/models").json()["data"]}
    assert listed["dup@llamacpp"] == "llamacpp" and listed["dup@vllm"] == "vllm"
    assert "dup" not in listed

    r = post(s, {"model": "dup"})
    assert r.status == 200 and r.json()["model"] == "dup@llamacpp", "no owned_by: the entry declared first"
    for how in ({"body": {"owned_by": "llamacpp"}}, {"headers": {"x-owned-by": "llamacpp"}},
                {"query": "?owned_by=llamacpp"}):
        r = post(s, {"model": "dup", **how.get("body", {})}, how.get("headers"), how.get("query", ""))
        assert r.status == 200 and r.json()["model"] == "dup@llamacpp", how
    for how in ({"body": {"owned_by": "vllm"}}, {"headers": {"x-owned-by": "vllm"}}, {"query": "?owned_by=vllm"}):
        r = post(s, {"model": "dup", **how.get("body", {})}, how.get("headers"), how.get("query", ""))
        # routed to the vLLM entry, which cannot start on this box
        assert r.status == 503 and r.error_code() == "model_load_failed", (how, r.text)
        assert "'dup@vllm'" in r.json()["error"]["message"]
    assert post(s, {"model": "dup@vllm"}).error_code() == "model_load_failed"
    assert post(s, {"model": "dup@llamacpp"}).status == 200
    r = post(s, {"model": "dup", "owned_by": "sglang"})
    assert r.status == 404 and r.error_code() == "model_not_found"
    r = post(s, {"model": "other", "owned_by": "vllm"})
    assert r.status == 404, "owned_by is a constraint, not a hint"
    st = {m["id"]: m["status"] for m in s.get("/models").json()["data"]}
    assert st["dup@llamacpp"]["value"] == "loaded"
    assert st["dup@vllm"]["value"] == "unloaded" and st["dup@vllm"]["failed"] is True
    assert len(s.engine_pids()) == 1
