"""The one middleware every request passes: request ID and access log, CORS, keys, last-resort errors.

Keys: probes are always open and `/metrics` unless `--protect-metrics`; admin routes take an
admin key when admin keys are set (else an API key); everything else takes any key once any key
is set. Keys are compared in constant time and never logged. Any exception a handler lets out
becomes an OpenAI-style error, so nothing crashes the supervisor.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import re
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from . import control
from .errors import bad_request, error_response, from_scheduler
from .logsetup import access_log, log_access
from .scheduler import SchedulerError

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("swapper.api")

# the control page's shell holds no data (its routes under /api/ take the key), so it opens
# without one and asks for the key itself
PUBLIC = {"/health/live", "/health/ready", "/health", "/v1/health", "/", "/ui"}
ADMIN_PREFIXES = ("/models/load", "/models/unload", control.ADMIN_ROUTE)
PAGE_PATHS = {"/", "/ui", "/api/status", "/api/events"} | control.PAGE_ROUTES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ------------------------------------------------------------------------------ middlewares


def _keys_match(given: str | None, keys: list[str]) -> bool:
    if not given:
        return False
    ok = False
    for k in keys:  # compare with every key, so timing says nothing about which matched
        ok |= hmac.compare_digest(given.encode(), k.encode())
    return ok


def _given_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or (request.query.get("api_key") if request.path in PAGE_PATHS else None)


_bits = random.Random().getrandbits  # seeded from the system once
_RID_OK = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")


def request_id_of(request: web.Request) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one (no log injection)."""
    given = request.headers.get("X-Request-ID")
    if given and _RID_OK.match(given):
        return given
    # 128 random bits as 32 hex digits, like a uuid4's hex without its cost (an ID to follow a
    # request by, not a secret: no system call for it on every request)
    return f"{_bits(128):032x}"


def required_keys(rt: Runtime, request: web.Request) -> list[str]:
    """Keys that open this route; empty = open.

    Probes are always open and `/metrics` unless `--protect-metrics`; admin routes (and
    `GET /models?reload=1`) take an admin key when admin keys are set, else an API key; the
    status page and everything else take any key once any key is set.
    """
    path = request.path
    if request.method == "OPTIONS" or path in PUBLIC:
        return []
    api_keys, admin_keys = rt.api_keys, rt.settings.admin_keys
    if path == "/metrics" and not rt.settings.protect_metrics:
        return []
    if path.startswith(ADMIN_PREFIXES) or (path == "/models" and ("reload" in request.query
                                                                  or request.method in ("POST", "DELETE"))):
        return admin_keys or api_keys
    if path in PAGE_PATHS or path == "/metrics":
        return api_keys + admin_keys
    return api_keys + admin_keys if api_keys else []


def make_middlewares(rt: Runtime) -> list[Any]:
    """One middleware doing, in order: request ID and access log, CORS preflight, last-resort
    errors, API keys.

    One coroutine instead of four nested ones, and the key and CORS steps cost nothing when
    no keys or origins are configured: this runs on every proxied request.
    """

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await serve(rt, request, handler)

    return [front]


async def serve(rt: Runtime, request: Any, handler: Handler) -> web.StreamResponse:
    """A request's way through: request ID and access log, CORS preflight, keys, the handler,
    any exception turned into an OpenAI-style error. aiohttp's requests come here through the
    middleware, front.py's directly (one frame for all of it: every proxied request passes)."""
    rid = request_id_of(request)
    request["request_id"] = rid
    t0 = time.monotonic()
    resp: web.StreamResponse | None = None
    try:
        if rt.settings.cors_origins and request.method == "OPTIONS":
            resp = _preflight(rt, request)
            if resp is not None:
                return resp
        if rt.api_keys or rt.settings.admin_keys:
            resp = _refused(rt, request)
            if resp is not None:
                return resp
        resp = await handler(request)
        return resp
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status, "invalid_request")
        resp = error_response(e.reason or "error", e.status, code)
        return resp
    except asyncio.CancelledError:
        raise
    except SchedulerError as e:
        resp = from_scheduler(e)
        return resp
    except RecursionError:  # JSON nested too deep for the parser
        resp = bad_request("request body is nested too deeply")
        return resp
    except Exception as e:  # nothing crashes the supervisor
        log.exception("unhandled error on %s %s", request.method, request.path)
        resp = error_response(f"internal error: {e.__class__.__name__}", 500, "internal_error")
        return resp
    finally:
        if access_log.isEnabledFor(logging.INFO):
            # the query string may carry the status page's api_key: never logged
            shown = request.path if "api_key" in request.query else request.path_qs
            log_access(rid, "%s %s %s %s %.1fms" % (rid, request.method, shown,
                                                     resp.status if resp is not None else "-",
                                                     (time.monotonic() - t0) * 1000))


def _refused(rt: Runtime, request: web.Request) -> web.Response | None:
    """The 401 for a request without a key this route takes."""
    required = required_keys(rt, request)
    if required and not _keys_match(_given_key(request), required):
        return error_response("missing or invalid API key", 401, "invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
    return None


def _preflight(rt: Runtime, request: web.Request) -> web.Response | None:
    """A CORS preflight from an allowed origin, answered before keys are asked for."""
    allowed = _allowed_origin(rt, request)
    if not allowed or not request.headers.get("Access-Control-Request-Method"):
        return None
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": allowed,
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
        "Access-Control-Max-Age": "600", "Vary": "Origin"})


def _allowed_origin(rt: Runtime, request: web.Request) -> str | None:
    origins = rt.settings.cors_origins
    if not origins:
        return None
    origin = request.headers.get("Origin")
    return origin if origin and ("*" in origins or origin in origins) else None


def answer_headers(rt: Runtime, request: web.Request) -> list[tuple[str, str]]:
    """Headers every answer carries, relayed ones included: the request ID, and CORS for an
    allowed origin."""
    out = []
    rid = request.get("request_id")
    if rid:
        out.append(("X-Request-ID", rid))
    if rt.settings.cors_origins:
        allowed = _allowed_origin(rt, request)
        if allowed:
            out += [("Access-Control-Allow-Origin", allowed),
                    ("Access-Control-Expose-Headers", "X-Request-ID, Retry-After"), ("Vary", "Origin")]
    return out


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """`answer_headers` on the responses aiohttp writes (set just before they are sent)."""
    for k, v in answer_headers(request.app["rt"], request):
        response.headers[k] = v
