"""API keys, admin keys, request IDs, CORS and upstream timeouts on a real swapper."""

from __future__ import annotations

import re

import openai
import pytest
import requests_shim as rq

pytestmark = pytest.mark.real

MODEL_ROUTE = ("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 1})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def preflight(s, path: str, headers: dict[str, str]):  # noqa: ANN001, ANN201
    return rq.request("OPTIONS", s.url + path, headers=headers)


def assert_401(r) -> None:  # noqa: ANN001
    assert r.status == 401, r.text
    assert r.error_code() == "invalid_api_key"
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers.get("www-authenticate") == "Bearer"


def test_keys_from_flags_and_file_guard_every_route_but_probes(swapper_factory, models_dir, tmp_path,
                                                               openai_client):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# operators\nfile-key-3141\n\n")
    s = swapper_factory("--models-dir", str(models_dir), "--api-key", "flag-key-2718", "--api-key",
                        "flag-key-1618", "--api-key-file", str(key_file))
    for path in ("/health/live", "/metrics"):
        assert s.get(path).status == 200, path
    # probes answer without a key: readiness says no model is loaded yet, /health that swapper is up
    assert s.get("/health/ready").status == 503, "probes answer without a key"
    assert s.get("/health").status == 200, "probes answer without a key"

    wrong = "wrong-key-5772"
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/models", None), ("GET", "/running", None),
                               ("GET", "/props", None), ("POST", *MODEL_ROUTE),
                               ("POST", "/models/load", {"model": "tiny-a"}), ("GET", "/api/control/state", None),
                               ("GET", "/api/status", None), ("GET", "/slots?model=tiny-a", None)):
        send = s.get if method == "GET" else (lambda p, **kw: s.post(p, body, **kw))  # noqa: B023
        assert_401(send(path))
        assert_401(send(path, headers=bearer(wrong)))
        assert_401(send(path, headers={"Authorization": "Basic ZmxhZy1rZXktMjcxOA=="}))
    assert s.engine_pids() == [], "a refused request loads nothing"

    for key in ("flag-key-2718", "flag-key-1618", "file-key-3141"):
        assert s.get("/v1/models", headers=bearer(key)).status == 200, key
        assert s.get("/v1/models", headers={"x-api-key": key}).status == 200, key
    out = openai_client(s, api_key="file-key-3141").completions.create(model="tiny-a", prompt="x", max_tokens=1)
    assert out.choices
    with pytest.raises(openai.AuthenticationError):
        openai_client(s, api_key=wrong).completions.create(model="tiny-a", prompt="x", max_tokens=1)
    # the status page is opened with ?api_key= (a browser cannot set headers on EventSource)
    assert s.get("/?api_key=flag-key-1618").status == 200
    assert s.get("/api/status?api_key=flag-key-1618").json()["models"]
    assert_401(s.get("/v1/models?api_key=flag-key-1618"))
    # without admin keys, API keys open the admin routes
    assert s.post("/models/unload?wait=1", {"model": "tiny-a"}, headers=bearer("flag-key-2718")).status == 200

    s.stop()
    log = s.log()
    assert "swapper.access" in log and "/api/status" in log
    for secret in ("flag-key-2718", "flag-key-1618", "file-key-3141", wrong, "ZmxhZy1rZXktMjcxOA"):
        assert secret not in log, f"{secret} appears in the log"


def test_keys_from_the_environment(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), env={"SWAPPER_API_KEY": "env-key-1,env-key-2"})
    assert_401(s.get("/v1/models"))
    assert s.get("/v1/models", headers=bearer("env-key-1")).status == 200
    assert s.get("/v1/models", headers=bearer("env-key-2")).status == 200
    assert_401(s.get("/v1/models", headers=bearer("env-key-1,env-key-2")))


def test_admin_key_and_protected_metrics(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--api-key", "user-key", "--admin-key", "admin-key",
                        "--protect-metrics")
    assert_401(s.post("/models/load?wait=1", {"model": "tiny-a"}, headers=bearer("user-key")))
    assert_401(s.get("/models?reload=1", headers=bearer("user-key")))
    assert s.get("/models", headers=bearer("user-key")).status == 200
    assert s.post("/models/load?wait=1", {"model": "tiny-a"}, headers=bearer("admin-key")).status == 200
    assert s.get("/models?reload=1", headers=bearer("admin-key")).status == 200
    assert s.get("/v1/models", headers=bearer("admin-key")).status == 200, "an admin key opens user routes too"
    assert s.post(*MODEL_ROUTE, headers=bearer("user-key")).status == 200
    assert_401(s.get("/metrics"))
    assert s.get("/metrics", headers=bearer("user-key")).status == 200
    assert s.get("/health/live").status == 200 and s.get("/health/ready").status == 200
    assert_401(s.post("/models/unload", {"model": "tiny-a"}, headers=bearer("user-key")))
    assert s.post("/models/unload?wait=1", {"model": "tiny-a"}, headers=bearer("admin-key")).status == 200


def test_status_page_needs_a_key_when_only_admin_keys_are_set(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--admin-key", "admin-only")
    assert s.get("/v1/models").status == 200, "no API keys: model routes stay open"
    assert s.get("/metrics").status == 200
    for path in ("/api/status", "/api/control/state", "/api/control/events"):
        assert_401(s.get(path))
    assert s.get("/api/status?api_key=admin-only").status == 200
    for path in ("/", "/ui"):  # the page's shell holds no data: it opens, then asks for the key
        r = s.get(path)
        assert r.status == 200 and b"sessionStorage" in r.body
    assert_401(s.post("/models/load", {"model": "tiny-a"}))


def test_request_ids_are_kept_or_generated_returned_and_logged(swapper_factory, models_dir, openai_client):
    s = swapper_factory("--models-dir", str(models_dir))
    r = s.post(*MODEL_ROUTE, headers={"X-Request-ID": "trace-4242-abc"})
    assert r.status == 200 and r.headers["x-request-id"] == "trace-4242-abc"
    r = s.get("/v1/models")
    generated = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    r = s.post("/v1/completions", {"model": "nope", "prompt": "x"}, headers={"X-Request-ID": "err-77"})
    assert r.status == 404 and r.headers["x-request-id"] == "err-77"
    # a streamed response carries it too (its headers leave before the body is known)
    r = s.post("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 3, "stream": True},
               headers={"X-Request-ID": "stream-99"})
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"] == "stream-99"
    r = s.get("/v1/models", headers={"X-Request-ID": "bad id\twith tab"})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), "unsafe ids are replaced"
    raw = openai_client(s).with_raw_response.completions.create(model="tiny-a", prompt="x", max_tokens=1,
                                                               extra_headers={"X-Request-ID": "sdk-1"})
    assert raw.headers["x-request-id"] == "sdk-1"
    # access lines are written in batches, at most 0.1 s after their request
    s.wait_for(lambda: all(re.search(rf"swapper.access: {re.escape(rid)} (POST|GET) /v1/\S+ \d{{3}}", s.log())
                           for rid in ("trace-4242-abc", generated, "err-77", "stream-99", "sdk-1")),
               10, "an access line per request, with its ID")
    assert "with tab" not in s.log()


def test_cors_origin(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--cors-origin", "https://ui.example")
    pre = preflight(s, "/v1/chat/completions", {"Origin": "https://ui.example",
                                                     "Access-Control-Request-Method": "POST",
                                                     "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://ui.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = s.get("/v1/models", headers={"Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    r = s.post("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 2, "stream": True},
               headers={"Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example", "streamed responses too"
    r = s.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = preflight(s, "/v1/chat/completions", {"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_upstream_read_timeout_is_configurable(swapper_factory, models_dir):
    s = swapper_factory("--models-dir", str(models_dir), "--upstream-read-timeout", "100ms",
                        "--upstream-connect-timeout", "2s")
    # load the model first (a slow machine may need several tries of a 100 ms window)
    s.wait_for(lambda: s.post(*MODEL_ROUTE).status == 200, 30, "a short answer within 100 ms")
    # ~2,500 tokens/s here: 2,000 tokens keep the child silent far longer than 100 ms
    r = s.post("/v1/completions", {"model": "tiny-a", "prompt": "x", "max_tokens": 2000, "ignore_eos": True})
    assert r.status == 502 and r.error_code() == "upstream_error", r.text
    # the child finishes (or drops) the abandoned generation, then serves again
    s.wait_for(lambda: s.post(*MODEL_ROUTE).status == 200, 15, "the child to serve again")
