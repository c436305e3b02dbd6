"""A served small bundle for the serve tests: the app, its key store and one key per role."""
import dataclasses

from starlette.testclient import TestClient

from recscore.engine import Engine
from recscore.serve.app import Limits, create_app
from recscore.serve.keys import ROLES, KeyStore


@dataclasses.dataclass
class Served:
    client: TestClient
    app: object
    keys: KeyStore
    tokens: dict           # role -> token

    def headers(self, role="admin"):
        return {"X-API-Key": self.tokens[role]}

    def post(self, path, body, role="admin", **kwargs):
        return self.client.post(path, json=body, headers=self.headers(role), **kwargs)


def serve(bundle, tmp_path, limits=Limits(), state=None):
    keys = KeyStore(tmp_path / "keys.sqlite3")
    tokens = {role: keys.create(role, f"test {role}")[1] for role in ROLES}
    engine = Engine.open(bundle, state)
    app = create_app(engine, keys, limits)
    return Served(TestClient(app, raise_server_exceptions=False), app, keys, tokens)
