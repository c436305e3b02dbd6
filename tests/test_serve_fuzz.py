"""Random JSON bodies and headers against every JSON endpoint: never a 500, always a JSON answer."""
import pytest
from engine_data import build_small
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_data import serve

EXAMPLES = 300
ENDPOINTS = [("POST", "/v1/recommend"), ("POST", "/v1/recommend/batch"), ("POST", "/v1/feedback"),
             ("POST", "/v1/items"), ("DELETE", "/v1/items"), ("POST", "/v1/admin/reload")]
FIELDS = ["user", "users", "k", "filters", "text", "rerank", "events", "item", "items", "ids", "id", "value",
          "allow_genres", "deny_genres", "exclude_seen", "bundle", "vector", "genres", "ts"]

scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.integers(990, 1210)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) | st.sampled_from(["Drama", "llm"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4),
                           max_leaves=20)
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4) | json_values
raw_bodies = st.binary(max_size=64)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz")
    return serve(build_small(path / "b"), path)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies | raw_bodies, role=st.sampled_from(["read", "write", "admin", None]),
       extra=st.dictionaries(st.sampled_from(["Content-Type", "Content-Length", "X-API-Key", "Accept", "X-Other"]),
                             header_values, max_size=2))
def test_random_requests_never_500(served, endpoint, body, role, extra):
    headers = dict(extra)
    if role:
        headers["X-API-Key"] = served.tokens[role]
    if "Content-Length" in headers:
        del headers["Content-Length"]                   # a wrong length is the transport's business, not the app's
    method, path = endpoint
    if isinstance(body, bytes):
        response = served.client.request(method, path, content=body, headers=headers)
    else:
        response = served.client.request(method, path, json=body, headers=headers)
    test_random_requests_never_500.tried += 1
    assert response.status_code < 500 or response.status_code in (501, 503), response.text
    payload = response.json()
    assert response.status_code < 300 or set(payload) == {"error", "detail"}


test_random_requests_never_500.tried = 0


def test_fuzz_tried_enough_inputs():
    assert test_random_requests_never_500.tried >= EXAMPLES, test_random_requests_never_500.tried
