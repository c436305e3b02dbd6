"""A small client of API v1 on urllib (no dependency):

    client = Client("http://127.0.0.1:8000", api_key)
    client.recommend(414, k=10)["items"]
"""
import json
import urllib.error
import urllib.parse
import urllib.request


class ApiError(Exception):
    """An answer with a 4xx/5xx status: .status, .error (code), .detail."""

    def __init__(self, status, error, detail):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


class Client:
    def __init__(self, base_url, api_key=None, timeout=30.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, method, path, body=None, query=None, parse=True):
        url = self.base_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                payload = json.loads(raw)
                code, detail = payload["error"], payload["detail"]
            except (ValueError, KeyError, TypeError):
                code, detail = "http_error", raw.decode(errors="replace")[:200]
            raise ApiError(error.code, code, detail) from None
        return json.loads(raw) if parse else raw.decode()

    def recommend(self, user, k=10, filters=None, text=None, rerank=None, exclude_seen=True):
        body = {"user": user, "k": k, "exclude_seen": exclude_seen}
        body.update({name: value for name, value in (("filters", filters), ("text", text), ("rerank", rerank))
                     if value is not None})
        return self._request("POST", "/v1/recommend", body)

    def recommend_batch(self, users, k=10, filters=None):
        body = {"users": list(users), "k": k}
        if filters is not None:
            body["filters"] = filters
        return self._request("POST", "/v1/recommend/batch", body)["results"]

    def feedback(self, events):
        """events: dicts {user, item, value?, event?, ts?}; returns how many were accepted (all, durably)."""
        return self._request("POST", "/v1/feedback", {"events": list(events)})["accepted"]

    def add_items(self, items):
        return self._request("POST", "/v1/items", {"items": list(items)})["added"]

    def remove_items(self, ids):
        return self._request("DELETE", "/v1/items", {"ids": list(ids)})["removed"]

    def similar(self, item, k=10):
        return self._request("GET", f"/v1/similar/{int(item)}", query={"k": k})["items"]

    def history(self, user, limit=20):
        """The user's most recent events, newest first: {user, total, events: [{item, title, value, event, ts}]}."""
        return self._request("GET", f"/v1/users/{int(user)}", query={"limit": limit})

    def explain(self, user, item):
        """The explanation's text: the pieces (one server-sent event each, its data lines joined by
        newlines) joined, up to the end event."""
        stream = self._request("GET", "/v1/explain", query={"user": user, "item": item}, parse=False)
        pieces = []
        for event in stream.split("\n\n"):
            lines = event.split("\n")
            if "event: end" in lines:
                break
            pieces.append("\n".join(line[len("data: "):] for line in lines if line.startswith("data: ")))
        return "".join(pieces)

    def reload(self, bundle=None):
        return self._request("POST", "/v1/admin/reload", {} if bundle is None else {"bundle": str(bundle)})

    def health(self):
        return self._request("GET", "/healthz")

    def ready(self):
        return self._request("GET", "/readyz")

    def metrics(self):
        return self._request("GET", "/metrics", parse=False)
