"""A tiny synchronous HTTP client for tests (urllib; no extra dependency)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def error_code(self) -> str | None:
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 120, raw: bytes | None = None) -> Reply:
    data = raw
    h = dict(headers or {})
    if body is not None and raw is None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.read(), {k.lower(): v for k, v in r.headers.items()})
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read(), {k.lower(): v for k, v in e.headers.items()})


def get(url: str, **kw: Any) -> Reply:
    return request("GET", url, **kw)


def post(url: str, body: Any = None, **kw: Any) -> Reply:
    return request("POST", url, body, **kw)
