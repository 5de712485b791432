"""`/v1/*` and llama-server's native model routes: resolve the model, lease it, relay the answer.

A request's life: size limit (413) -> JSON or multipart parse (400) -> model from the body's
`model`, or the Gateway API's `X-Gateway-Model-Name` / `X-Gateway-Base-Model-Name` headers, with
`owned_by` choosing between engines (400 on conflict, 404 listing known models) -> a lease from
the scheduler (queues while the model swaps in; 503/504 from the error table) -> the body as sent
(or the engine's rewrite) to the child over a pooled connection (upstreams.py) -> the answer
relayed to the client's transport as its bytes arrive (relay.py, downstream.py). A request whose
child died before answering waits for the reload. A client that disconnects cancels the handler,
which closes the child's connection, so the child stops generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.http import HttpVersion11

from .catalog import Resolution
from .downstream import (Downstream, Relayed, RelayedResponse, UsageSniffer, answer_head, keeps_alive,
                         may_round, parse_json, request_head)
from .errors import bad_request, error_response, from_scheduler, not_found_model
from .framing import CHUNKED, LENGTH, UNTIL_CLOSE, Head, NoAnswer, UpstreamError
from .middleware import answer_headers
from .relay import Exchange
from .scheduler import Lease, SchedulerError

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("swapper.proxy")

MODEL_ROUTES = (
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/reranking",
    "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
    "/tokenize", "/detokenize", "/infill", "/apply-template", "/rerank", "/reranking",
    "/completion", "/completions", "/embedding", "/embeddings", "/chat/completions",
)
AUDIO_PREFIX = "/v1/audio/"
# LLAMA_SERVER_DEBUG_FAKE_TIMING: the router's test hook, honoured as the router does (each
# request holds its model 2 s before it is forwarded), so llama.cpp's queue tests run unchanged
FAKE_TIMING = bool(os.environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING"))

def autoload_of(request: web.Request, settings: Any) -> bool:
    """llama.cpp router's rule: `?autoload=` wins ("true" or "1" load), else `--models-autoload`."""
    given = request.query.get("autoload")
    if not given:
        return bool(settings.models_autoload)
    return given in ("true", "1")


def multipart_model(body: bytes, content_type: str) -> str | None:
    """The `model` field of a multipart/form-data body (audio routes)."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return None
    boundary = re.escape(m.group(1).encode())
    pat = rb"--" + boundary + rb'\r\nContent-Disposition:\s*form-data;\s*name="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--' + boundary
    hit = re.search(pat, body, re.S | re.I)
    return hit.group(1).decode(errors="replace").strip() if hit else None


def _upstream_error(model: str, e: BaseException) -> web.Response:
    return error_response(f"model '{model}' did not answer: {e.__class__.__name__}: {e}", 502, "upstream_error")


# called with (request, model id, status, seconds) as each proxied request finishes; the
# request carries "queue_wait", "ttft" (seconds) and "usage" when they are known
Finished = Callable[[web.Request, str, int, float], None]


def _too_big(limit: int) -> web.Response:
    return error_response(f"request body is larger than the limit of {limit} bytes", 413, "request_too_large")


class Proxy:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.finished: list[Finished] = []
        self._addresses: dict[str, tuple[str, int]] = {}
        self._limits: dict[int, tuple[Any, int | None]] = {}

    async def read_body(self, request: web.Request) -> bytes | web.Response:
        whole = getattr(request, "body", None)  # front.py's requests come read, within the limit
        if whole is not None:
            return whole
        limit = self.rt.settings.max_body
        if request.content_length is not None and request.content_length > limit:
            return _too_big(limit)
        chunks = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                return _too_big(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def resolve(self, request: web.Request, body_model: Any, body_owned_by: Any = None) -> Resolution | web.Response:
        """The entry (and adapter) a request is for, from body, gateway headers and owned_by."""
        cat = self.rt.catalog
        header_model = request.headers.get("X-Gateway-Model-Name")
        base_header = request.headers.get("X-Gateway-Base-Model-Name")
        owned_by = (body_owned_by if isinstance(body_owned_by, str) and body_owned_by else None) \
            or request.headers.get("x-owned-by") or request.query.get("owned_by")
        if body_model is not None and not isinstance(body_model, str):
            return bad_request("'model' must be a string", "model")
        name = body_model or header_model
        if not name:
            if base_header:
                name = base_header
            else:
                return bad_request("no model given: set 'model' in the body or the X-Gateway-Model-Name header", "model")
        res = cat.resolve(name, owned_by)
        if body_model and header_model and header_model != body_model:
            other = cat.resolve(header_model, owned_by)
            if other is None or res is None or (other.entry.id, other.adapter) != (res.entry.id, res.adapter):
                return bad_request(f"body model '{body_model}' and X-Gateway-Model-Name '{header_model}' disagree",
                                   "model")
        if base_header:
            base = cat.resolve(base_header, owned_by)
            if res is None and base is not None:
                adapter = base.entry.adapter(name)
                if adapter is None and name != base_header:
                    return not_found_model(name, [a.name for a in base.entry.adapters] or [base.entry.id])
                res = Resolution(base.entry, adapter)
            elif res is not None and base is not None and base.entry.id != res.entry.id:
                return bad_request(f"model '{name}' is not served by base model '{base_header}'", "model")
        if res is None:
            return not_found_model(name, self.rt.catalog.names())
        return res

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.rt
        t0 = time.monotonic()
        label = "unknown"
        status = 500
        try:
            if rt.closing:
                resp = error_response("swapper is shutting down", 503, "shutting_down")
                status = resp.status
                return resp
            raw = await self.read_body(request)
            if isinstance(raw, web.Response):
                status = raw.status
                return raw
            body: dict[str, Any] | None = None
            owned_by = None
            ctype = request.headers.get("Content-Type", "")
            if ctype.startswith("multipart/form-data"):
                model = multipart_model(raw, ctype)
            else:
                try:
                    parsed = parse_json(raw) if raw else None
                except (ValueError, UnicodeDecodeError) as e:
                    status = 400
                    return bad_request(f"request body is not valid JSON: {e}")
                except RecursionError:
                    status = 400
                    return bad_request("request body is not valid JSON: nested too deeply")
                if not isinstance(parsed, dict):
                    status = 400
                    return bad_request("request body must be a JSON object")
                body = parsed
                model = body.get("model")
                owned_by = body.get("owned_by")
            res = self.resolve(request, model, owned_by)
            if isinstance(res, web.Response):
                status = res.status
                return res
            label = res.entry.id
            resp = await self._forward(request, res, raw, body, t0)
            status = 502 if request.get("upstream_broken") else resp.status
            return resp
        except SchedulerError as e:
            resp = from_scheduler(e)
            status = resp.status
            return resp
        except asyncio.CancelledError:
            status = 499  # client closed the connection
            raise
        finally:
            elapsed = time.monotonic() - t0
            rt.metrics.request_done(label, status, elapsed)
            for fn in self.finished:
                fn(request, label, status, elapsed)

    async def handle_get(self, request: web.Request, name: str) -> web.StreamResponse:
        """llama-server's per-model GET routes (`/props?model=`, `/slots?model=`, ...): autoload."""
        res = self.resolve(request, name)
        if isinstance(res, web.Response):
            return res
        try:
            return await self._forward(request, res, b"", None, time.monotonic())
        except SchedulerError as e:
            return from_scheduler(e)

    async def child_metrics(self, request: web.Request, name: str) -> web.StreamResponse:
        """A loaded child's own /metrics (never loads a model just to scrape it)."""
        res = self.rt.catalog.resolve(name)
        if res is None:
            return not_found_model(name, self.rt.catalog.names())
        m = self.rt.scheduler.models.get(res.entry.id)
        if m is None or m.instance is None or not m.loaded:
            return error_response(f"model '{res.entry.id}' is not loaded", 503, "model_not_loaded")
        try:
            async with self.rt.session.get(m.instance.base_url + "/metrics",
                                           timeout=aiohttp.ClientTimeout(total=10)) as r:
                text = await r.read()
                return web.Response(status=r.status, body=text,
                                    content_type=r.content_type or "text/plain")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return error_response(f"model '{res.entry.id}' did not answer: {e}", 502, "upstream_error")

    async def _forward(self, request: web.Request, res: Resolution, raw: bytes,
                       body: dict[str, Any] | None, t0: float) -> web.StreamResponse:
        """Lease the model and send the request; a child that died before answering a byte
        (connection refused, or reset before the status line) is not the client's problem: the
        request waits for the reload like any cold request, a few times at most."""
        autoload = autoload_of(request, self.rt.settings)
        for _ in range(4):
            t_queue = time.monotonic()
            async with self.rt.scheduler.acquire(res.entry.id, res.adapter, autoload=autoload) as lease:
                request["queue_wait"] = time.monotonic() - t_queue
                if FAKE_TIMING:  # llama.cpp router's debug delay: the model counts as busy meanwhile
                    await asyncio.sleep(2.0)
                resp = await self._send(request, lease, res, raw, body, t0)
            if resp is not None:
                return resp
        return error_response(f"model '{res.entry.id}' kept exiting before it answered", 502, "upstream_error")

    async def _send(self, request: web.Request, lease: Lease, res: Resolution, raw: bytes,
                    body: dict[str, Any] | None, t0: float) -> web.StreamResponse | None:
        """One try on a leased child; None when the child is gone and the request may wait again."""
        rt = self.rt
        entry, inst = lease.entry, lease.instance
        payload = raw
        if body is not None:
            new = inst.backend.rewrite(request.path, body, entry, res.adapter)
            if new is not None:
                if may_round(raw):  # every number as sent: from the standard parser's reading
                    new = inst.backend.rewrite(request.path, json.loads(raw), entry, res.adapter)
                payload = json.dumps(new).encode()
        host, port = self._address(inst.base_url)
        message = request_head(request, host, port, len(payload), body) + payload
        stream = body is not None and body.get("stream") is True
        st, pool = rt.settings, rt.upstreams
        for attempt in (1, 2):
            try:
                ex = await pool.open(host, port, st.upstream_connect_timeout, fresh=attempt == 2,
                                     limit=self._limit(inst, entry))
            except asyncio.TimeoutError as e:
                return _upstream_error(entry.id, e)
            except OSError as e:  # refused: a child that died, its exit not known yet
                if await self._child_gone(inst, entry.id):
                    return None
                if attempt == 1:
                    continue
                return _upstream_error(entry.id, e)
            try:
                ex.send(request.method, message, st.upstream_read_timeout, keep_alive=not stream)
                head = await ex.head
            except NoAnswer as e:
                # reset or closed before the status line: a child that died (wait for its exit to
                # be known, then for the reload), or a pooled connection the child closed just as
                # it was reused (llama-server drops idle keep-alive connections): once more on a
                # fresh one
                pool.release(host, port, ex)
                if ex.reused and attempt == 1:
                    log.debug("model %s: a kept-alive connection was closed under us (%s); a fresh one", entry.id, e)
                    continue
                if await self._child_gone(inst, entry.id):
                    return None
                if attempt == 1:
                    log.debug("model %s: retrying on a fresh connection after %s", entry.id, e)
                    continue
                return _upstream_error(entry.id, e)
            except UpstreamError as e:
                pool.release(host, port, ex)
                return _upstream_error(entry.id, e)
            except BaseException:
                pool.release(host, port, ex)
                raise
            try:
                return await self._relay(request, ex, head, entry.id, t0)
            finally:
                pool.release(host, port, ex)
        return None  # pragma: no cover - the loop always returns

    async def _child_gone(self, inst: Any, model: str) -> bool:
        """Whether the child exited (its exit may take a moment to be known): the request then
        waits for the reload instead of failing."""
        if await self.rt.scheduler.child_gone(inst, timeout=2.0):
            log.info("model %s: child exited before answering; the request waits for the reload", model)
            return True
        return False

    def _limit(self, inst: Any, entry: Any) -> int | None:
        """The child's connection limit, worked out once per catalog entry."""
        known = self._limits.get(id(entry))
        if known is not None and known[0] is entry:
            return known[1]
        connections = getattr(inst.backend, "connections", None)
        limit = connections(entry) if connections is not None else None
        self._limits[id(entry)] = (entry, limit)
        return limit

    def _address(self, base_url: str) -> tuple[str, int]:
        addr = self._addresses.get(base_url)
        if addr is None:
            u = urlsplit(base_url)
            addr = self._addresses[base_url] = (u.hostname or "127.0.0.1", u.port or 80)
        return addr

    async def _relay(self, request: web.Request, ex: Exchange, head: Head, model: str,
                     t0: float) -> web.StreamResponse:
        """The child's answer to the client: the head (with swapper's request ID and CORS
        headers), then the body straight to the client's transport as it arrives."""
        keep_alive = keeps_alive(request, head)
        http11 = request.version >= HttpVersion11
        framed = head.framing == UNTIL_CLOSE and http11  # the child's body ends with its connection
        raw_head = answer_head(request, head, answer_headers(self.rt, request), keep_alive,
                               chunked=head.framing != LENGTH and http11)
        metrics = self.rt.metrics

        def first_byte() -> None:
            ttft = request["ttft"] = time.monotonic() - t0
            metrics.first_byte(model, ttft)

        down = Downstream(request, ex, raw_head, first_byte)
        sniff = UsageSniffer() if head.status == 200 else None
        if head.framing == LENGTH or (head.framing == CHUNKED) == http11:  # the bytes as they are
            down.direct = head.framing == CHUNKED
            ex.attach(down.write, sniff.feed if sniff else None)
        else:  # de-chunked for an HTTP/1.0 client, or chunked for an HTTP/1.1 one
            out = down.chunk if framed else down.write
            ex.attach(None, out if sniff is None else _both(out, sniff.feed))
        down.flush_head()
        resp: Any = (Relayed(head.status, keep_alive) if down.conn is not None  # front.py's connection
                     else RelayedResponse(head.status, head.reason or None, keep_alive))
        try:
            await _complete(ex, sniff)
        except UpstreamError as e:
            if down.gone:  # the client left first: that is a cancelled request, not a broken child
                raise asyncio.CancelledError() from None
            log.warning("model %s: upstream broke off mid-response: %s", model, e)
            # the head is gone: the only honest signal left is an incomplete response (and
            # metrics count it as the error it is, not as the status the client saw first)
            request["upstream_broken"] = True
            resp.force_close()
            if request.transport is not None:
                request.transport.close()
            return resp
        if framed:
            down.write(b"0\r\n\r\n")
        if sniff is not None:
            usage = sniff.usage()
            if usage:
                request["usage"] = usage
                metrics.tokens(model, usage)
        return resp


async def _complete(ex: Exchange, sniff: UsageSniffer | None) -> None:
    """Wait for the child's answer to end. The client has every byte of it by then (they were
    written as they came), and may close its connection at once, before this handler runs
    again: a cancellation that finds the answer complete is not a client that left early, and
    the request is counted as answered. Nor is one that comes after the stream's last event
    (`data: [DONE]`), where OpenAI's client stops reading and closes, before the end of the
    chunked body: the answer was whole."""
    try:
        await ex.done
    except asyncio.CancelledError:
        done = ex.done
        whole = done.done() and not done.cancelled() and done.exception() is None
        if not whole and sniff is not None:
            ex.halt()  # a pump under way: its last bytes first
            ex.settle()  # pieces handed on whose framing (and payload) is not read yet
            whole = sniff.ended()
        if not whole:
            raise
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):
            task.uncancel()


def _both(first: Callable[[bytes], None], second: Callable[[bytes], None]) -> Callable[[bytes], None]:
    def both(data: bytes) -> None:
        first(data)
        second(data)
    return both
