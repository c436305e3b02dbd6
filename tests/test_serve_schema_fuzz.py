"""Schemathesis over the OpenAPI description (recscore.serve.openapi.OPENAPI, checked in as docs/openapi.json)
against the in-process ASGI app: every operation, with schema-valid (positive) and schema-violating (negative)
requests, as admin, as a read key, with no key and with a wrong key. Each answer must be: no 5xx but the
documented 501/503, JSON {error, detail} for every 4xx/5xx of API v1, a status code, content type and body
that the description declares, a 4xx for schema-violating data, and no hang (each call gets a deadline).
The number of cases sent is counted per operation and checked against a minimum."""
import collections
import copy
import time

import pytest
from engine_data import build_small
from hypothesis import HealthCheck, given, settings
from serve_data import serve

schemathesis = pytest.importorskip("schemathesis", reason="the schema fuzz needs schemathesis (pip install schemathesis)")
import schemathesis.specs.openapi.checks as openapi_checks  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from recscore.serve.openapi import OPENAPI  # noqa: E402

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CALL_TIMEOUT_S = 20              # a call that takes longer is a hang
OPERATIONS = [(method.upper(), path) for path, item in OPENAPI["paths"].items() for method in item]
# (mode, role, examples) per API v1 operation; a role of None sends no key, "bogus" a key nobody was given
RUNS = [(POSITIVE, "admin", 150), (NEGATIVE, "admin", 150), (POSITIVE, "read", 20), (POSITIVE, None, 10),
        (NEGATIVE, "bogus", 10)]
# /v1/admin/reload re-opens a bundle per call: fewer cases, but every kind of run
RELOAD_RUNS = [(POSITIVE, "admin", 30), (NEGATIVE, "admin", 30), (POSITIVE, "read", 5), (POSITIVE, None, 5)]
UNSECURED_RUNS = [(POSITIVE, "admin", 5), (POSITIVE, None, 5)]   # /healthz, /metrics, ...: no parameters
ROLE_RANK = {"read": 0, "write": 1, "admin": 2}
CHECKS = [openapi_checks.status_code_conformance, openapi_checks.content_type_conformance,
          openapi_checks.response_schema_conformance, openapi_checks.response_headers_conformance,
          openapi_checks.negative_data_rejection]

tried = collections.Counter()        # (method, path) -> cases sent


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("schema_fuzz")
    return serve(build_small(path / "b"), path)


@pytest.fixture(scope="module")
def schema(served):
    loaded = schemathesis.openapi.from_dict(copy.deepcopy(OPENAPI))
    loaded.app = served.app          # cases are sent in-process, through schemathesis' ASGI transport
    return loaded


def _needed_role(operation):
    """The role an API v1 operation needs ("Needs an API key with role X or above."), None if unsecured."""
    if not operation.definition.raw.get("security"):
        return None
    text = operation.definition.raw["description"]
    return next(role for role in ROLE_RANK if f"role {role} " in text)


def _fuzz(served, operation, mode, role, examples):
    needed = _needed_role(operation)
    label = (operation.method.upper(), operation.path)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "x-api-key"}
        if role == "bogus":
            headers["X-API-Key"] = "rsk_not-a-key-anyone-was-given"
        elif role is not None:
            headers["X-API-Key"] = served.tokens[role]
        case.headers = headers       # schemathesis re-checks which parts of the case are still schema-violating
        started = time.monotonic()
        response = case.call(timeout=CALL_TIMEOUT_S)
        elapsed = time.monotonic() - started
        tried[label] += 1
        status = response.status_code
        assert elapsed < CALL_TIMEOUT_S, f"{label} took {elapsed:.1f} s"
        assert status < 500 or status in (501, 503), f"{label} answered {status}: {response.text[:500]}"
        if needed is not None:
            if role is None or role == "bogus":
                assert status == 401, (label, status, response.text[:300])
            elif ROLE_RANK[role] < ROLE_RANK[needed]:
                assert status == 403, (label, status, response.text[:300])
            if status >= 400:
                content_type = response.headers.get("content-type", [""])[0]   # lowercase keys, list values
                assert content_type.startswith("application/json"), response.headers
                payload = response.json()
                assert set(payload) == {"error", "detail"}, payload
                assert isinstance(payload["error"], str) and isinstance(payload["detail"], str), payload
        case.validate_response(response, checks=CHECKS)

    run()


def _runs_for(path, operation):
    if path == "/v1/admin/reload":
        return RELOAD_RUNS
    return RUNS if _needed_role(operation) else UNSECURED_RUNS


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schema_fuzz(served, schema, method, path):
    operation = schema[path][method]
    has_parameters = bool(operation.definition.raw.get("parameters")) or "requestBody" in operation.definition.raw
    for mode, role, examples in _runs_for(path, operation):
        if mode == NEGATIVE and not has_parameters and role != "bogus":
            continue                 # nothing to make invalid
        _fuzz(served, operation, mode, role, examples)
    # a hypothesis run stops early only when its strategy has fewer distinct cases than asked for: one,
    # for an operation without parameters
    runs = _runs_for(path, operation)
    minimum = sum(n for _, _, n in runs) // 2 if has_parameters else len(runs)
    assert tried[(method, path)] >= minimum, (method, path, tried[(method, path)])


def test_schema_fuzz_covered_every_operation():
    assert set(tried) == set(OPERATIONS), set(OPERATIONS) - set(tried)
    assert sum(tried.values()) >= 2500, sum(tried.values())
    print(f"\nschema fuzz: {sum(tried.values())} cases:",
          ", ".join(f"{m} {p} {n}" for (m, p), n in sorted(tried.items())))
