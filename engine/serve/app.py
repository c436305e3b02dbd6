"""The HTTP API v1 over an Engine: a Starlette app (see openapi.py for the request and response shapes).

Every /v1 request passes `_endpoint`: API key and role, the key's token bucket, the body read under a
size and time limit and parsed strictly (UTF-8, no NaN/Infinity, bounded depth), then the engine call
under the request time limit: plain recommends batched on the event loop (those that arrive together
share one batched lookup and top-k), the rest in a worker thread. Errors become JSON through errors.py only.
"""
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import queue
import re
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batching import freeze_filters
from ..bundle import open_bundle
from ..engine import Engine
from .errors import EXCEPTION_HANDLERS, ApiError, Overloaded, error_response
from .keys import KeyStore, role_allows
from .openapi import OPENAPI
from .page import ui

INT64_MAX = 2 ** 63 - 1
KEY_HEADER = "x-api-key"
INTEGER = re.compile(r"-?[0-9]{1,19}")    # a query or path id; the int64 range is checked after
LINE_BREAK = re.compile(r"\r\n|[\r\n]")   # what ends a line of server-sent events


@dataclasses.dataclass(frozen=True)
class Limits:
    body_bytes: int = 1 << 20           # 413 past this
    batch: int = 256                    # users of one batch request, events of one feedback call, items of one call
    k: int = 1000
    text_chars: int = 1000
    json_depth: int = 16
    request_seconds: float = 10.0       # per request: 408 if the body is still arriving, then 504
    in_flight: int = 64                 # 503 past this many engine calls at once
    rate: float = 100.0                 # a key's requests/s unless its row says otherwise
    burst: float = 200.0                # a key's bucket size


class TokenBuckets:
    """One token bucket a key: `take(key, rate)` is the seconds to wait before a token, 0 if one was taken."""

    def __init__(self, burst):
        self.burst = burst
        self._lock = threading.Lock()
        self._buckets = {}              # key id -> (tokens, last refill)

    def take(self, key, rate):
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / rate
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0


class LoopBatches:
    """Plain recommends served on the event loop, batched: the requests parsed in one pass of the loop
    are answered by one Engine.recommend_many right after it. No timer (a lone request goes at once)
    and no thread hop: a plain recommend is a fraction of a millisecond of mostly GIL-held work, which
    a worker thread would only contend for with the loop."""

    MAX_BATCH = 64

    def __init__(self):
        self._pending = []

    def submit(self, engine, user, k, exclude_seen, filters):
        """An asyncio Future of the Recommendation."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:
            loop.call_soon(self._serve)
        self._pending.append((engine, user, k, exclude_seen, filters, future))
        return future

    def _serve(self):
        pending, self._pending = self._pending, []
        groups = {}
        for request in pending:
            engine, _, k, exclude_seen, filters, future = request
            if not future.done():           # a caller that timed out or went away is not served
                groups.setdefault((id(engine), k, exclude_seen, freeze_filters(filters)), []).append(request)
        for requests in groups.values():
            for start in range(0, len(requests), self.MAX_BATCH):
                batch = requests[start:start + self.MAX_BATCH]
                engine, _, k, exclude_seen, filters, _ = batch[0]
                try:
                    results = engine.recommend_many([r[1] for r in batch], k, exclude_seen=exclude_seen,
                                                    filters=filters)
                except Exception as error:  # every caller of the batch gets the error
                    for *_, future in batch:
                        future.set_exception(error)
                    continue
                for (*_, future), result in zip(batch, results):
                    future.set_result(result)


class Server:
    """What the endpoints share: the engine (swapped whole by a reload), keys, limits, counters."""

    def __init__(self, engine, keys, limits):
        self.engine, self.keys, self.limits = engine, keys, limits
        self.buckets = TokenBuckets(limits.burst)
        self.reload_lock = threading.Lock()
        self.recommends = LoopBatches()
        self.in_flight = 0
        self.registry = CollectorRegistry()
        self.http = Counter("recscore_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                            registry=self.registry)

    def authorize(self, request, role):
        token = request.headers.get(KEY_HEADER)
        found = self.keys.lookup(token) if token else None
        if found is None:
            raise ApiError(401, "unauthorized", "a valid API key is needed in the X-API-Key header")
        key_id, key_role, rate = found
        if not role_allows(key_role, role):
            raise ApiError(403, "forbidden", f"this key's role is {key_role}; the call needs {role}")
        wait = self.buckets.take(key_id, rate or self.limits.rate)
        if wait:
            raise ApiError(429, "rate_limited", f"too many requests for this key; retry in {wait:.3f} s",
                           {"Retry-After": str(max(1, math.ceil(wait)))})

    async def _admitted(self, start):
        """await start(), counted in flight and refused past the limit (the time limit is _endpoint's)."""
        if self.in_flight >= self.limits.in_flight:
            raise Overloaded(f"more than {self.limits.in_flight} requests in flight; retry later")
        self.in_flight += 1
        try:
            return await start()
        finally:
            self.in_flight -= 1

    async def call(self, fn, *args, **kwargs):
        """fn(*args) in a worker thread; abandoned on timeout: the answer goes now, the thread finishes unseen."""
        return await self._admitted(lambda: anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs),
                                                                     abandon_on_cancel=True))

    async def recommend(self, user, k, exclude_seen, filters):
        """A plain recommend (no text, no rerank), batched on the event loop."""
        return await self._admitted(lambda: self.recommends.submit(self.engine, user, k, exclude_seen, filters))


# ---- request parsing -----------------------------------------------------------------------------

def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _depth(value, limit):
    """True if `value` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


async def read_json(request, limits):
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.body_bytes):
        raise ApiError(413, "body_too_large", f"the body must be at most {limits.body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.body_bytes:
            raise ApiError(413, "body_too_large", f"the body must be at most {limits.body_bytes} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApiError(400, "invalid_utf8", f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "too_deep", f"JSON nested deeper than {limits.json_depth} levels") from None
    except ValueError as error:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {error}") from None
    if _depth(value, limits.json_depth):
        raise ApiError(400, "too_deep", f"JSON nested deeper than {limits.json_depth} levels")
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object")
    return value


def _invalid(detail):
    return ApiError(422, "invalid_request", detail)


def _fields(body, required, optional=()):
    unknown = set(body) - set(required) - set(optional)
    if unknown:
        raise _invalid(f"unknown field(s) {sorted(unknown)[:5]}; expected {sorted(required) + sorted(optional)}")
    missing = [name for name in required if name not in body]
    if missing:
        raise _invalid(f"missing field(s) {missing}")


def _id(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise _invalid(f"{name} must be an integer id in the int64 range, got {_show(value)}")
    return value


def _int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"{name} must be an integer in [{low}, {high}], got {_show(value)}")
    return value


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > 1e300:
        raise _invalid(f"{name} must be a finite number, got {_show(value)}")
    return float(value)


def _string(name, value, limit):
    if not isinstance(value, str) or len(value) > limit:
        raise _invalid(f"{name} must be a string of at most {limit} characters")
    return value


def _list(name, value, limit):
    if not isinstance(value, list):
        raise _invalid(f"{name} must be a list")
    if len(value) > limit:
        raise _invalid(f"{name} has {len(value)} entries; at most {limit} are allowed")
    return value


def _filters(value, limits):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("filters must be an object with allow_genres and/or deny_genres")
    _fields(value, (), ("allow_genres", "deny_genres"))
    return {name: [_string(name, g, limits.text_chars) for g in _list(name, genres, limits.batch)]
            for name, genres in value.items() if genres is not None}


def _show(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _recommendation(result):
    return {"items": [{"item": int(i), "score": float(s) if math.isfinite(s) else None, "title": t}
                      for i, s, t in zip(result.items, result.scores, result.titles)],
            "source": result.source, "timings_ms": result.timings_ms}


# ---- endpoints ------------------------------------------------------------------------------------

def _endpoint(role):
    """An API v1 endpoint needing `role`: handler(server, request, body) -> JSON-able or a Response."""
    def wrap(handler):
        @functools.wraps(handler)
        async def endpoint(request):
            server = request.app.state.server
            try:
                server.authorize(request, role)
                reading = True
                try:
                    with anyio.fail_after(server.limits.request_seconds):   # one deadline: body, then engine call
                        body = await read_json(request, server.limits) if request.method in ("POST", "DELETE") else None
                        reading = False
                        result = await handler(server, request, body)
                except TimeoutError:
                    if reading:
                        raise ApiError(408, "body_timeout", f"the body took longer than "
                                       f"{server.limits.request_seconds} s to arrive") from None
                    raise TimeoutError(f"the request took longer than {server.limits.request_seconds} s") from None
                response = result if isinstance(result, Response) else JSONResponse(result)
            except Exception as error:
                response = error_response(request, error)
            server.http.labels(handler.__name__, str(response.status_code)).inc()
            return response
        return endpoint
    return wrap


@_endpoint("read")
async def recommend(server, request, body):
    limits = server.limits
    _fields(body, ("user",), ("k", "filters", "text", "rerank", "exclude_seen"))
    user = _id("user", body["user"])
    k = _int("k", body.get("k", 10), 1, limits.k)
    text = body.get("text")
    if text is not None:
        _string("text", text, limits.text_chars)
    rerank = body.get("rerank")
    if rerank not in (None, "llm"):
        raise _invalid("rerank must be null or \"llm\"")
    exclude_seen = body.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise _invalid("exclude_seen must be a boolean")
    filters = _filters(body.get("filters"), limits)
    if text is None and rerank is None:
        result = await server.recommend(user, k, exclude_seen, filters)
    else:
        result = await server.call(server.engine.recommend, user, k, exclude_seen=exclude_seen,
                                   filters=filters, text=text, rerank=rerank)
    return {"user": user, **_recommendation(result)}


@_endpoint("read")
async def recommend_batch(server, request, body):
    limits = server.limits
    _fields(body, ("users",), ("k", "filters", "exclude_seen"))
    users = [_id("users[]", u) for u in _list("users", body["users"], limits.batch)]
    k = _int("k", body.get("k", 10), 1, limits.k)
    exclude_seen = body.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise _invalid("exclude_seen must be a boolean")
    filters = _filters(body.get("filters"), limits)
    results = await server.call(server.engine.recommend_many, users, k, exclude_seen=exclude_seen,
                                filters=filters) if users else []
    return {"results": [{"user": u, **_recommendation(r)} for u, r in zip(users, results)]}


EVENT_FIELDS = ("user", "item")
EVENT_OPTIONAL = ("value", "event", "ts")
EVENT_NAME_CHARS = 64


def _event(raw):
    if not isinstance(raw, dict):
        raise _invalid("each event must be an object {user, item, value?, event?, ts?}")
    _fields(raw, EVENT_FIELDS, EVENT_OPTIONAL)
    return (_id("user", raw["user"]), _id("item", raw["item"]), _number("value", raw.get("value", 1.0)),
            _string("event", raw.get("event", "click"), EVENT_NAME_CHARS),
            None if raw.get("ts") is None else _number("ts", raw["ts"]))


@_endpoint("write")
async def feedback(server, request, body):
    _fields(body, ("events",))
    events = [_event(e) for e in _list("events", body["events"], server.limits.batch)]
    await server.call(server.engine.feedback_many, events)   # all or none
    return {"accepted": len(events)}


@_endpoint("write")
async def add_items(server, request, body):
    limits = server.limits
    _fields(body, ("items",))
    ids, titles, genres, vectors = [], [], [], []
    for raw in _list("items", body["items"], limits.batch):
        if not isinstance(raw, dict):
            raise _invalid("each item must be an object {id, title?, genres?, vector?}")
        _fields(raw, ("id",), ("title", "genres", "vector"))
        ids.append(_id("id", raw["id"]))
        titles.append(_string("title", raw.get("title", str(raw["id"])), limits.text_chars))
        genres.append([_string("genres[]", g, limits.text_chars) for g in _list("genres", raw.get("genres", []), 64)])
        vector = raw.get("vector")
        vectors.append(None if vector is None else [_number("vector[]", x) for x in _list("vector", vector, 4096)])
    if any(v is None for v in vectors) and any(v is not None for v in vectors):
        raise _invalid("give a vector for every item or for none")
    vectors = None if not vectors or vectors[0] is None else vectors
    if ids:
        await server.call(server.engine.add_items, ids, titles, genres, vectors)
    return {"added": len(ids)}


@_endpoint("write")
async def remove_items(server, request, body):
    _fields(body, ("ids",))
    ids = [_id("ids[]", i) for i in _list("ids", body["ids"], server.limits.batch)]
    return {"removed": await server.call(server.engine.remove_items, ids)}


def _query_int(request, name, default, low, high):
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise _invalid(f"the query needs {name}")
        return default
    if not INTEGER.fullmatch(raw):
        raise _invalid(f"{name} must be an integer, got {raw[:40]!r}")
    return _int(name, int(raw), low, high)


def _path_id(request, name):
    raw = request.path_params[name]
    if not INTEGER.fullmatch(raw):
        raise _invalid(f"{name} must be an integer id, got {raw[:40]!r}")
    return _id(name, int(raw))


@_endpoint("read")
async def similar(server, request, body):
    item = _path_id(request, "item")
    k = _query_int(request, "k", 10, 1, server.limits.k)
    items, scores = await server.call(server.engine.similar_items, item, k)
    return {"item": item, "items": [{"item": int(i), "score": float(s) if math.isfinite(s) else None}
                                    for i, s in zip(items, scores)]}


HISTORY_EVENTS = 20       # events GET /v1/users/{user} answers unless ?limit= says otherwise


def _history(engine, user):
    """The user's events, oldest first, as the engine reads them: the bundle's (unless the user was
    forgotten), then the stored feedback; [(item, value, event, ts)], event "bundle" for the bundle's."""
    inter = engine.bundle.arrays["interactions.safetensors"]
    item_ids = engine.bundle.arrays["catalogue.safetensors"]["item_ids"]
    user_ids, indptr = inter["user_ids"], inter["indptr"]
    at = int(np.searchsorted(user_ids, user))
    events = []
    if at < len(user_ids) and user_ids[at] == user and not engine.state.is_forgotten(user):
        span = slice(int(indptr[at]), int(indptr[at + 1]))
        events = [(int(item_ids[row]), float(value), "bundle", float(ts))
                  for row, value, ts in zip(inter["items"][span], inter["values"][span], inter["times"][span])]
    return events + [tuple(e) for e in engine.state.events(user)]


def _title(engine, item):
    try:
        return engine.title(item)
    except KeyError:                    # an item of the user's past no longer in the catalogue
        return None


@_endpoint("read")
async def user_history(server, request, body):
    user = _path_id(request, "user")
    limit = _query_int(request, "limit", HISTORY_EVENTS, 1, server.limits.k)
    engine = server.engine
    events = await server.call(_history, engine, user)
    if not events:
        raise ApiError(404, "unknown_user", f"user {user} has no events (a recommendation for them is by popularity)")
    recent = events[::-1][:limit]
    return {"user": user, "total": len(events),
            "events": [{"item": item, "title": _title(engine, item), "value": value if math.isfinite(value) else None,
                        "event": event, "ts": ts if ts is not None and math.isfinite(ts) else None}
                       for item, value, event, ts in recent]}


@_endpoint("read")
async def explain(server, request, body):
    user = _query_int(request, "user", None, -INT64_MAX - 1, INT64_MAX)
    item = _query_int(request, "item", None, -INT64_MAX - 1, INT64_MAX)
    pieces, stop = queue.Queue(), threading.Event()
    threading.Thread(target=_explain_into, args=(server.engine, user, item, pieces, stop), daemon=True,
                     name=f"explain {user} {item}").start()
    try:
        first = await server.call(pieces.get)   # refusals (no LLM, unknown item) answer as JSON errors
    except BaseException:
        stop.set()
        raise
    if isinstance(first, BaseException):
        raise first

    async def events():
        piece = first
        try:
            while piece is not _EXPLAINED:
                if isinstance(piece, BaseException):
                    raise piece
                yield "".join(f"data: {line}\n" for line in LINE_BREAK.split(piece)) + "\n"
                piece = await anyio.to_thread.run_sync(pieces.get)
        finally:
            stop.set()   # the client left (or the text ended): the generation stops at its next piece
        yield "event: end\ndata: \n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


_EXPLAINED = object()   # put after the explanation's last piece


def _explain_into(engine, user, item, pieces, stop):
    """Put the pieces of engine.explain_stream into `pieces`, then _EXPLAINED (or the exception it raised).
    One thread runs the whole generation: the LLM's lock is taken and released on the same thread."""
    try:
        with contextlib.closing(engine.explain_stream(user, item)) as stream:
            for piece in stream:
                pieces.put(piece)
                if stop.is_set():
                    break
        pieces.put(_EXPLAINED)   # always last: a reader left waiting (a timed-out request) is let go
    except Exception as error:   # handed to the request, which answers it
        pieces.put(error)


def _open_engine(server, path):
    """The bundle at `path` over the serving engine's state store and LLM; ValueError if it is damaged."""
    old = server.engine
    return Engine(open_bundle(path), old.state, llm=old.llm if old.llm is not None else old.llm_name)


@_endpoint("admin")
async def reload(server, request, body):
    _fields(body, (), ("bundle",))
    path = Path(_string("bundle", body.get("bundle", str(server.engine.bundle.path)), 4096))
    if not server.reload_lock.acquire(blocking=False):
        raise ApiError(409, "reload_in_progress", "another reload is running")
    try:
        try:
            engine = await run_in_threadpool(_open_engine, server, path)
        except (ValueError, OSError) as error:
            raise ApiError(422, "bad_bundle", f"the bundle was refused and the old one keeps serving: {error}") from None
        server.engine = engine          # requests in flight finish on the engine they started with
    finally:
        server.reload_lock.release()
    return {"bundle": str(path), "items": engine.num_items}


async def healthz(request):
    return JSONResponse({"status": "ok"})


async def readyz(request):
    server = request.app.state.server
    if server.engine is None:
        return JSONResponse({"error": "not_ready", "detail": "no bundle loaded"}, 503)
    return JSONResponse({"status": "ready", "items": server.engine.num_items})


async def metrics(request):
    server = request.app.state.server
    text = server.engine.metrics.text() + generate_latest(server.registry).decode()
    return Response(text, media_type="text/plain; version=0.0.4")


async def openapi(request):
    return JSONResponse(OPENAPI)


ROUTES = [
    Route("/v1/recommend", recommend, methods=["POST"]),
    Route("/v1/recommend/batch", recommend_batch, methods=["POST"]),
    Route("/v1/feedback", feedback, methods=["POST"]),
    Route("/v1/items", add_items, methods=["POST"]),
    Route("/v1/items", remove_items, methods=["DELETE"]),
    Route("/v1/similar/{item}", similar, methods=["GET"]),
    Route("/v1/users/{user}", user_history, methods=["GET"]),
    Route("/v1/explain", explain, methods=["GET"]),
    Route("/v1/admin/reload", reload, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/ui", ui, methods=["GET"]),
]


def create_app(engine, keys, limits=Limits()):
    """The ASGI app serving `engine` to holders of `keys` (a KeyStore)."""
    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS)
    app.state.server = Server(engine, keys, limits)
    return app


BUNDLE_ENV, KEYS_ENV, LLM_ENV = "RECSCORE_SERVE_BUNDLE", "RECSCORE_SERVE_KEYS", "RECSCORE_SERVE_LLM"


def app_from_env():
    """The app of one uvicorn worker process (--workers N): bundle and key store named by the environment."""
    import os
    return create_app(Engine.open(os.environ[BUNDLE_ENV], llm=os.environ.get(LLM_ENV) or None),
                      KeyStore(os.environ[KEYS_ENV]))
