"""API v1 over a small bundle: endpoints, keys and roles, limits, error classes, reload, OpenAPI."""
import asyncio
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from engine_data import build_small
from serve_data import serve

from recscore.serve.app import Limits
from recscore.serve.client import Client
from recscore.serve.openapi import OPENAPI
from recscore.state import SQLiteState

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return build_small(tmp_path_factory.mktemp("serve") / "b")


@pytest.fixture
def bundle(small_bundle, tmp_path):
    """A private copy: feedback and reloads write beside it."""
    return shutil.copytree(small_bundle, tmp_path / "b")


@pytest.fixture
def served(bundle, tmp_path):
    s = serve(bundle, tmp_path)
    yield s
    s.app.state.server.engine.close()


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str)
    if code:
        assert body["error"] == code, body


def test_recommend_batch_similar_and_feedback(served):
    r = served.post("/v1/recommend", {"user": 3, "k": 5}, "read")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user"] == 3 and body["source"] == "history" and len(body["items"]) == 5
    top = body["items"][0]["item"]
    filtered = served.post("/v1/recommend", {"user": 3, "k": 5, "filters": {"allow_genres": ["Horror"]}}, "read")
    assert filtered.status_code == 200 and len(filtered.json()["items"]) == 5
    batch = served.post("/v1/recommend/batch", {"users": [3, 99999], "k": 5}, "read").json()["results"]
    assert [r["user"] for r in batch] == [3, 99999] and batch[1]["source"] == "popularity"
    assert batch[0]["items"] == body["items"]
    assert served.post("/v1/feedback", {"events": [{"user": 3, "item": top, "value": 2.0}]}, "write").json() == {"accepted": 1}
    after = served.post("/v1/recommend", {"user": 3, "k": 5}, "read").json()
    assert top not in [i["item"] for i in after["items"]]
    similar = served.client.get("/v1/similar/1005?k=4", headers=served.headers("read"))
    assert similar.status_code == 200 and len(similar.json()["items"]) == 4


def test_items_add_and_remove(served):
    assert served.post("/v1/items", {"items": [{"id": 5555, "title": "New", "genres": ["Drama"]}]}, "write").json() == {"added": 1}
    top = [i["item"] for i in served.post("/v1/recommend", {"user": 3, "k": 3}, "read").json()["items"]]
    r = served.client.request("DELETE", "/v1/items", json={"ids": top[:2]}, headers=served.headers("write"))
    assert r.json() == {"removed": 2}
    now = [i["item"] for i in served.post("/v1/recommend", {"user": 3, "k": 3}, "read").json()["items"]]
    assert not set(now) & set(top[:2])
    assert_error(served.post("/v1/items", {"items": [{"id": 5555}]}, "write"), 422)   # already there


def test_health_ready_metrics_and_unauthenticated_paths(served):
    assert served.client.get("/healthz").json() == {"status": "ok"}
    assert served.client.get("/readyz").json()["status"] == "ready"
    served.post("/v1/recommend", {"user": 3}, "read")
    text = served.client.get("/metrics").text
    assert "recscore_requests_total" in text and 'recscore_http_requests_total{endpoint="recommend",status="200"}' in text


def test_explain_answers_feature_unavailable_until_the_llm_lands(served):
    r = served.client.get("/v1/explain?user=3&item=1005", headers=served.headers("read"))
    assert_error(r, 501, "feature_unavailable")
    assert_error(served.post("/v1/recommend", {"user": 3, "rerank": "llm"}, "read"), 501, "feature_unavailable")
    assert_error(served.post("/v1/recommend", {"user": 3, "text": "space opera"}, "read"), 501)


def test_explain_streams_server_sent_events(served):
    class LLM:
        def stream(self, prompt, max_new_tokens):
            yield from ["Because ", "you liked\nthem."]
    served.app.state.server.engine.llm = LLM()
    r = served.client.get("/v1/explain?user=3&item=1005", headers=served.headers("read"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text == "data: Because \n\ndata: you liked\ndata: them.\n\nevent: end\ndata: \n\n"
    client = Client("http://unused")
    client._request = lambda *args, **kwargs: r.text    # the client's reading of the same stream
    assert client.explain(3, 1005) == "Because you liked\nthem."
    assert_error(served.client.get("/v1/explain?user=3&item=999999", headers=served.headers("read")), 404)


def test_keys_and_roles(served):
    assert_error(served.client.post("/v1/recommend", json={"user": 3}), 401, "unauthorized")
    assert_error(served.client.post("/v1/recommend", json={"user": 3}, headers={"X-API-Key": "x.y"}), 401)
    forged = served.tokens["read"].split(".")[0] + ".forged"
    assert_error(served.client.post("/v1/recommend", json={"user": 3}, headers={"X-API-Key": forged}), 401)
    assert_error(served.post("/v1/feedback", {"events": []}, "read"), 403, "forbidden")
    assert_error(served.post("/v1/admin/reload", {}, "write"), 403)
    assert served.post("/v1/feedback", {"events": []}, "admin").status_code == 200
    key_id = served.tokens["read"].split(".")[0]
    assert served.keys.revoke(key_id)
    assert_error(served.post("/v1/recommend", {"user": 3}, "read"), 401)
    stored = (Path(served.keys.path)).read_bytes()
    assert all(token.split(".")[1].encode() not in stored for token in served.tokens.values())
    assert all("hash" not in key for key in served.keys.list())


def test_rate_limit_is_per_key(bundle, tmp_path):
    s = serve(bundle, tmp_path, Limits(rate=1.0, burst=3))
    codes = [s.post("/v1/recommend", {"user": 3}, "read").status_code for _ in range(5)]
    assert codes[:3] == [200] * 3 and codes[3:] == [429] * 2
    r = s.post("/v1/recommend", {"user": 3}, "read")
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1
    assert s.post("/v1/recommend", {"user": 3}, "write").status_code == 200   # another key, its own bucket


@pytest.mark.parametrize("body, status, code", [
    (b"{", 400, "malformed_json"),
    (b"", 400, "malformed_json"),
    (b'{"user": 3, "k": NaN}', 400, "malformed_json"),
    (b'{"user": 3, "k": Infinity}', 400, "malformed_json"),
    (b'{"user": 3, "k": 1e999}', 400, "malformed_json"),
    (b'{"user": "\xff\xfe"}', 400, "invalid_utf8"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "too_deep"),
    (json.dumps({"user": 3, "filters": {"allow_genres": [[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]}}).encode(), 400, "too_deep"),
    (b'{"user": 1' + b"0" * 5000 + b"}", 400, "malformed_json"),     # past Python's int digit limit
    (b'{"user": 1' + b"0" * 30 + b"}", 422, "invalid_request"),        # past int64
    (b"[3]", 422, "invalid_request"),
    (b'{"user": "3"}', 422, "invalid_request"),
    (b'{"user": 3.0}', 422, "invalid_request"),
    (b'{"user": true}', 422, "invalid_request"),
    (b'{"k": 3}', 422, "invalid_request"),
    (b'{"user": 3, "k": 0}', 422, "invalid_request"),
    (b'{"user": 3, "k": 1001}', 422, "invalid_request"),
    (b'{"user": 3, "bogus": 1}', 422, "invalid_request"),
    (b'{"user": 3, "filters": {"allow_genres": ["Jazz"]}}', 422, "invalid_request"),
    (b'{"user": 3, "filters": []}', 422, "invalid_request"),
    (b'{"user": 3, "rerank": "gpt"}', 422, "invalid_request"),
    (json.dumps({"user": 3, "text": "x" * 1001}).encode(), 422, "invalid_request"),
])
def test_bad_recommend_bodies_get_4xx_json(served, body, status, code):
    r = served.client.post("/v1/recommend", content=body, headers=served.headers("read"))
    assert_error(r, status, code)


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/feedback", {"events": [{"user": 3, "item": 424242}]}, 404, "unknown_item"),
    ("/v1/feedback", {"events": [{"user": 3, "item": 1005, "value": "a"}]}, 422, None),
    ("/v1/feedback", {"events": [{"user": 3}]}, 422, None),
    ("/v1/feedback", {"events": [{"user": 3, "item": 1005}] * 257}, 422, None),
    ("/v1/feedback", {"events": "all"}, 422, None),
    ("/v1/recommend/batch", {"users": list(range(257))}, 422, None),
    ("/v1/recommend/batch", {"users": [1, "2"]}, 422, None),
    ("/v1/items", {"items": [{"id": 9, "vector": [1.0]}]}, 422, None),
    ("/v1/items", {"items": [{"id": 9, "genres": "Drama"}]}, 422, None),
])
def test_bad_write_bodies_get_4xx_json(served, path, body, status, code):
    assert_error(served.post(path, body, "write"), status, code)


def test_an_unknown_item_refuses_the_whole_feedback_call(served, bundle):
    events = [{"user": 77, "item": 1005}, {"user": 77, "item": 424242}]
    assert_error(served.post("/v1/feedback", {"events": events}, "write"), 404)
    assert served.app.state.server.engine.state.events(77) == []


def test_a_locked_database_is_503_and_stores_nothing(bundle, tmp_path):
    state = SQLiteState(bundle / "state.sqlite3", busy_seconds=0.05)
    s = serve(bundle, tmp_path, state=state)
    blocker = sqlite3.connect(bundle / "state.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")          # another writer holds the database
    events = [{"user": 78, "item": 1005}, {"user": 78, "item": 1006}]
    assert_error(s.post("/v1/feedback", {"events": events}, "write"), 503, "storage_unavailable")
    blocker.execute("ROLLBACK")
    assert state.events(78) == []
    assert s.post("/v1/feedback", {"events": events}, "write").json() == {"accepted": 2}
    assert [e[0] for e in state.events(78)] == [1005, 1006]
    s.app.state.server.engine.close()


def test_a_full_database_is_503_and_stores_nothing(bundle, tmp_path):
    state = SQLiteState(bundle / "state.sqlite3")
    s = serve(bundle, tmp_path, state=state)
    pages = state._db.execute("PRAGMA page_count").fetchone()[0]
    state._db.execute(f"PRAGMA max_page_count = {pages}")   # no page left: what a full disk looks like to SQLite
    events = [{"user": 79, "item": 1005, "event": "x" * 64}] * 200
    assert_error(s.post("/v1/feedback", {"events": events}, "write"), 503, "storage_unavailable")
    assert state.events(79) == []
    state._db.execute("PRAGMA max_page_count = 1073741823")
    assert s.post("/v1/feedback", {"events": events}, "write").json() == {"accepted": 200}
    s.app.state.server.engine.close()


def test_bad_paths_queries_and_methods(served):
    h = served.headers("read")
    assert_error(served.client.get("/v1/similar/424242", headers=h), 404, "unknown_item")
    assert_error(served.client.get("/v1/similar/abc", headers=h), 422)
    assert_error(served.client.get("/v1/similar/²", headers=h), 422)
    assert_error(served.client.get("/v1/similar/99999999999999999999", headers=h), 422)
    assert_error(served.client.get("/v1/similar/1005?k=-1", headers=h), 422)
    assert_error(served.client.get("/v1/explain?user=3", headers=h), 422)
    assert_error(served.client.get("/v1/nothing", headers=h), 404)
    assert_error(served.client.get("/v1/recommend", headers=h), 405)


def test_body_size_and_request_time_limits(bundle, tmp_path):
    s = serve(bundle, tmp_path, Limits(body_bytes=1000, request_seconds=0.2))
    big = json.dumps({"user": 3, "text": "x" * 2000}).encode()
    assert_error(s.client.post("/v1/recommend", content=big, headers=s.headers("read")), 413, "body_too_large")

    def chunks():                       # no Content-Length: the limit applies as the body streams in
        for _ in range(10):
            yield b" " * 200
    assert_error(s.client.post("/v1/recommend", content=chunks(), headers=s.headers("read")), 413)
    engine = s.app.state.server.engine
    slow = engine.recommend_many        # the batch endpoint's engine call runs in a worker thread
    engine.recommend_many = lambda *a, **k: (time.sleep(0.5), slow(*a, **k))[1]
    assert_error(s.post("/v1/recommend/batch", {"users": [3]}, "read"), 504, "timeout")


def test_a_body_slower_than_the_time_limit_is_408(bundle, tmp_path):
    s = serve(bundle, tmp_path, Limits(request_seconds=0.2))
    sent = []

    async def receive():                # the body does not arrive within the limit
        await asyncio.sleep(2)
        return {"type": "http.request", "body": b'{"user": 3}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/recommend", "raw_path": b"/v1/recommend",
             "query_string": b"", "headers": [(b"x-api-key", s.tokens["read"].encode())], "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    start = time.perf_counter()
    asyncio.run(s.app(scope, receive, send))
    assert time.perf_counter() - start < 1.5
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"])["error"] == "body_timeout"


def test_too_many_in_flight_is_503(bundle, tmp_path):
    s = serve(bundle, tmp_path, Limits(in_flight=0))
    assert_error(s.post("/v1/recommend", {"user": 3}, "read"), 503, "overloaded")


def test_reload_swaps_bundles_and_refuses_a_damaged_one(served, bundle, tmp_path):
    server = served.app.state.server
    old = server.engine
    r = served.post("/v1/admin/reload", {})
    assert r.status_code == 200 and server.engine is not old
    damaged = shutil.copytree(bundle, tmp_path / "damaged", ignore=shutil.ignore_patterns("*.sqlite3*"))
    victim = next(damaged.glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    current = server.engine
    assert_error(served.post("/v1/admin/reload", {"bundle": str(damaged)}), 422, "bad_bundle")
    assert_error(served.post("/v1/admin/reload", {"bundle": str(tmp_path / "nowhere")}), 422, "bad_bundle")
    assert server.engine is current
    assert served.post("/v1/recommend", {"user": 3}, "read").status_code == 200


def test_reload_does_not_drop_requests_in_flight(served):
    import threading
    codes, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            codes.append(served.post("/v1/recommend", {"user": 3}, "read").status_code)
    worker = threading.Thread(target=load)
    worker.start()
    for _ in range(3):
        assert served.post("/v1/admin/reload", {}).status_code == 200
    stop.set()
    worker.join()
    assert codes and set(codes) == {200}


def test_openapi_is_served_checked_in_and_covers_every_route(served):
    served_spec = served.client.get("/openapi.json").json()
    assert served_spec == json.loads((ROOT / "docs" / "openapi.json").read_text()) == json.loads(json.dumps(OPENAPI))
    routes = {(route.path, method.lower()) for route in served.app.routes for method in route.methods - {"HEAD"}}
    documented = {(path, method) for path, ops in served_spec["paths"].items() for method in ops}
    assert routes == documented


def test_keys_command_creates_lists_and_revokes(tmp_path, capsys):
    from recscore.cli import main
    from recscore.serve.keys import KeyStore
    path = tmp_path / "keys.sqlite3"
    assert main(["keys", "create", "--keys", str(path), "--role", "write", "--name", "ingest"]) == 0
    token = capsys.readouterr().out.strip()
    store = KeyStore(path)
    key_id, role, _ = store.lookup(token)
    assert role == "write"
    assert main(["keys", "list", "--keys", str(path)]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "active" in listed and token.split(".")[1] not in listed
    assert main(["keys", "revoke", "--keys", str(path), "--id", key_id]) == 0
    assert store.lookup(token) is None
    assert main(["keys", "revoke", "--keys", str(path), "--id", key_id]) == 2
    assert main(["keys", "create", "--keys", str(path), "--role", "write", "--rate", "-1"]) == 2
