"""The OpenAPI description of API v1, served at /openapi.json and checked in as docs/openapi.json
(`python -m recscore.serve.openapi > docs/openapi.json`; a test checks they agree)."""
import json


def _obj(required=(), **properties):
    return {"type": "object", "required": list(required), "properties": properties, "additionalProperties": False}


ID = {"type": "integer", "format": "int64"}
K = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10}
# null stands for an absent optional field (the app reads it so)
FILTERS = dict(_obj(allow_genres={"type": ["array", "null"], "items": {"type": "string"}},
                    deny_genres={"type": ["array", "null"], "items": {"type": "string"}}), type=["object", "null"])
SCORED = {"type": "array", "items": _obj(("item", "score"), item=ID, score={"type": ["number", "null"]})}
RECOMMENDED = {"type": "array", "items": _obj(("item", "score", "title"), item=ID, score={"type": ["number", "null"]},
                                              title={"type": "string"})}
RECOMMENDATION = _obj(("user", "items", "source", "timings_ms"), user=ID, items=RECOMMENDED,
                      source={"type": "string", "enum": ["history", "popularity", "text"]},
                      timings_ms={"type": "object", "additionalProperties": {"type": "number"}})
ERROR = _obj(("error", "detail"), error={"type": "string"}, detail={"type": "string"})
ERRORS = {
    "400": "malformed JSON, invalid UTF-8, NaN/Infinity or nesting too deep",
    "401": "no valid API key",
    "403": "the key's role does not allow the call",
    "404": "unknown item",
    "408": "the body arrived too slowly",
    "413": "body larger than the limit",
    "422": "wrong fields, types or ranges (k, batch size, text length)",
    "429": "the key's rate limit (Retry-After says when to retry)",
    "501": "the call needs a component not installed (LLM runtime, text encoder)",
    "503": "too many requests in flight, or the state database cannot take a write now (nothing was stored; retry)",
    "504": "the request took longer than the limit",
}


def _op(summary, role, response, body=None, parameters=()):
    op = {"summary": summary, "description": f"Needs an API key with role {role} or above.",
          "security": [{"apiKey": []}], "parameters": list(parameters),
          "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": response}}},
                        **{code: {"description": text, "content": {"application/json": {"schema": ERROR}}}
                           for code, text in ERRORS.items()}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def _plain(summary, media, schema):
    return {"summary": summary, "responses": {"200": {"description": "OK", "content": {media: {"schema": schema}}}}}


def _query(name, schema, required=False, where="query"):
    return {"name": name, "in": where, "required": required, "schema": schema}


OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "recscore", "version": "1", "description": "Real-time recommendations over a recscore bundle."},
    "components": {"securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
    "paths": {
        "/v1/recommend": {"post": _op(
            "Top k items for a user (popularity for a user with no history)", "read", RECOMMENDATION,
            _obj(("user",), user=ID, k=K, filters=FILTERS, text={"type": ["string", "null"], "maxLength": 1000},
                 rerank={"type": ["string", "null"], "enum": ["llm", None]}, exclude_seen={"type": "boolean"}))},
        "/v1/recommend/batch": {"post": _op(
            "Top k items for each of many users, in one batched lookup", "read",
            _obj(("results",), results={"type": "array", "items": RECOMMENDATION}),
            _obj(("users",), users={"type": "array", "items": ID, "maxItems": 256}, k=K, filters=FILTERS,
                 exclude_seen={"type": "boolean"}))},
        "/v1/feedback": {"post": _op(
            "Record events, durably before the answer; all or none (an unknown item refuses the call)", "write",
            _obj(("accepted",), accepted={"type": "integer"}),
            _obj(("events",), events={"type": "array", "maxItems": 256, "items": _obj(
                ("user", "item"), user=ID, item=ID, value={"type": "number", "default": 1.0},
                event={"type": "string", "maxLength": 64, "default": "click"}, ts={"type": ["number", "null"]})}))},
        "/v1/items": {
            "post": _op("Add items to the live catalogue", "write", _obj(("added",), added={"type": "integer"}),
                        _obj(("items",), items={"type": "array", "maxItems": 256, "items": _obj(
                            ("id",), id=ID, title={"type": "string"}, genres={"type": "array", "items": {"type": "string"}},
                            vector={"type": ["array", "null"], "items": {"type": "number"},
                                    "description": "the item's factor vector; null or absent: zeros (found through "
                                                   "popularity and feedback until the next build)"})})),
            "delete": _op("Stop serving items", "write", _obj(("removed",), removed={"type": "integer"}),
                          _obj(("ids",), ids={"type": "array", "items": ID, "maxItems": 256}))},
        "/v1/similar/{item}": {"get": _op(
            "Items an event on `item` raises most", "read", _obj(("item", "items"), item=ID, items=SCORED),
            parameters=[_query("item", ID, True, "path"), _query("k", K)])},
        "/v1/users/{user}": {"get": _op(
            "A user's most recent events, newest first: the bundle's (event \"bundle\") and the feedback stored since",
            "read", _obj(("user", "total", "events"), user=ID, total={"type": "integer"}, events={
                "type": "array", "items": _obj(("item", "title", "value", "event", "ts"), item=ID,
                                               title={"type": ["string", "null"]}, value={"type": ["number", "null"]},
                                               event={"type": "string"}, ts={"type": ["number", "null"]})}),
            parameters=[_query("user", ID, True, "path"),
                        _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20})])},
        "/v1/explain": {"get": {**_op(
            "Why `item` suits `user`, streamed as the LLM generates it: one server-sent event a piece of text "
            "(its data lines joined by newlines), then event: end",
            "read", {"type": "string"}, parameters=[_query("user", ID, True), _query("item", ID, True)]),
        }},
        "/v1/admin/reload": {"post": _op(
            "Swap in a bundle (default: the serving one, re-read) without dropping requests; a damaged bundle "
            "is refused (422) and the old one keeps serving", "admin",
            _obj(("bundle", "items"), bundle={"type": "string"}, items={"type": "integer"}),
            _obj((), bundle={"type": "string"}))},
        "/healthz": {"get": _plain("The process is up", "application/json", _obj(("status",), status={"type": "string"}))},
        "/readyz": {"get": _plain("A bundle is loaded", "application/json",
                                  _obj(("status",), status={"type": "string"}, items={"type": "integer"}))},
        "/metrics": {"get": _plain("Prometheus metrics", "text/plain", {"type": "string"})},
        "/openapi.json": {"get": _plain("This description", "application/json", {"type": "object"})},
        "/ui": {"get": _plain("The live page (HTML; its API calls send the key typed into it)", "text/html",
                              {"type": "string"})},
    },
}
OPENAPI["paths"]["/v1/explain"]["get"]["responses"]["200"]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
OPENAPI["paths"]["/v1/admin/reload"]["post"]["responses"]["409"] = {
    "description": "another reload is running", "content": {"application/json": {"schema": ERROR}}}
OPENAPI["paths"]["/v1/users/{user}"]["get"]["responses"]["404"]["description"] = "unknown user (no events)"

if __name__ == "__main__":
    print(json.dumps(OPENAPI, indent=1))
