"""OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}`.

The statuses and codes are DESIGN.md's error table; every error swapper itself produces goes
through `error_response`, so clients see one shape whatever went wrong.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .scheduler import SchedulerError

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    431: "invalid_request_error",
    502: "server_error", 503: "server_error", 504: "server_error",
}


def error_body(message: str, status: int, code: str, param: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": _TYPES.get(status, "server_error"),
                           "param": param, "code": code}
    if extra:
        err.update(extra)
    return {"error": err}


def error_response(message: str, status: int, code: str, param: str | None = None,
                   retry_after: float | None = None, extra: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    h = dict(headers or {})
    if retry_after is not None:
        h["Retry-After"] = str(max(1, int(math.ceil(retry_after))))
    return web.Response(status=status, text=json.dumps(error_body(message, status, code, param, extra)),
                        content_type="application/json", headers=h)


# the scheduler's domain errors (by their code) -> HTTP status; anything else unknown is 503
SCHEDULER_STATUS = {
    "queue_full": 503, "queue_timeout": 504, "insufficient_memory": 503, "model_load_failed": 503,
    "shutting_down": 503, "model_not_found": 404, "model_unloaded": 503, "model_not_loaded": 400,
    "model_already_loaded": 400, "model_pinned": 400,
}
# admin answers keep llama.cpp router's code for these
_ADMIN_CODE = {"model_already_loaded": "invalid_request", "model_pinned": "invalid_request"}


def scheduler_status(e: SchedulerError) -> int:
    return SCHEDULER_STATUS.get(e.code, 503)


def from_scheduler(e: SchedulerError) -> web.Response:
    status = scheduler_status(e)
    param = "force" if e.code == "model_pinned" else "model" if status in (400, 404) else None
    return error_response(e.message, status, _ADMIN_CODE.get(e.code, e.code), param, retry_after=e.retry_after)


def bad_request(message: str, param: str | None = None) -> web.Response:
    return error_response(message, 400, "invalid_request", param)


def not_found_model(name: str, known: list[str]) -> web.Response:
    shown = ", ".join(known[:50]) + (f" (and {len(known) - 50} more)" if len(known) > 50 else "")
    return error_response(f"model '{name}' not found; known models: {shown or '(none)'}", 404,
                          "model_not_found", "model", extra={"known_models": known[:1000]})


# ------------------------------------------------------------------ the HTTP parser's own errors

_PARSER_CODES = {400: "invalid_request", 413: "request_too_large", 431: "headers_too_large"}
_parser_log = logging.getLogger("swapper.http")


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its own parser errors (a malformed request line,
    a 64 KiB header) in swapper's JSON error shape instead of plain text plus a traceback.

    aiohttp offers no public hook for these: they are raised before any middleware runs, and
    `handle_error` is the one place they pass through."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        # the client's bytes are not echoed: a long header may well be a credential
        if isinstance(exc, LineTooLong):
            status, text = 431, "a request header (or the request line) is longer than the server accepts"
        elif isinstance(exc, (BadStatusLine, BadHttpMethod, InvalidURLError)):
            text = "malformed request line"
        else:
            text = "malformed HTTP request: " + str(getattr(exc, "message", "") or exc or message or "").split("\n")[0][:200]
        _parser_log.info("rejected a malformed request from %s: %s %s", request.remote, status, text)
        resp = error_response(text, status, _PARSER_CODES.get(status, "invalid_request"))
        resp.force_close()
        return resp


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """An AppRunner whose connections use `JsonErrorHandler`."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = JsonErrorServer  # same state, one method different
        return server
