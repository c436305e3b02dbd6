"""`recscore serve BUNDLE` and `recscore keys create|list|revoke` (see cli.py)."""
import os
import sys
from pathlib import Path

from .keys import KEYS_FILE, ROLES

SERVE_COMMANDS = ("serve", "keys")


def add_parsers(commands):
    serve = commands.add_parser("serve", help="serve a bundle over HTTP (API v1, JSON, API keys)")
    serve.add_argument("bundle")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="processes (each opens the bundle; reload reaches one)")
    serve.add_argument("--keys", metavar="PATH", help=f"API key store (default: {KEYS_FILE} in the bundle)")
    serve.add_argument("--llm", action="store_const", const="gemma3",
                       help="serve rerank=llm and /v1/explain with the packaged Gemma 3 270M (loaded on first use)")
    keys = commands.add_parser("keys", help="manage the API keys of `recscore serve`")
    keys.add_argument("action", choices=("create", "list", "revoke"))
    keys.add_argument("bundle", nargs="?", help=f"the bundle whose {KEYS_FILE} to use (or --keys)")
    keys.add_argument("--keys", metavar="PATH", help="the key store file")
    keys.add_argument("--role", choices=ROLES, default="read", help="create: the key's role (default read)")
    keys.add_argument("--name", default="", help="create: a label for the key")
    keys.add_argument("--rate", type=float, help="create: requests/s for this key (default: the server's)")
    keys.add_argument("--id", help="revoke: the key's id")


def keys_path(args):
    if args.keys:
        return Path(args.keys)
    if not args.bundle:
        raise ValueError("give a bundle or --keys PATH")
    return Path(args.bundle) / KEYS_FILE


def run(args):
    from .keys import KeyStore

    try:
        store = KeyStore(keys_path(args))
        if args.command == "keys":
            return _keys(args, store)
        return _serve(args, store)
    except (FileNotFoundError, ValueError) as error:
        print(f"recscore {args.command}: {error}", file=sys.stderr)
        return 2


def _keys(args, store):
    if args.action == "create":
        key_id, token = store.create(args.role, args.name, args.rate)
        print(token)
        print(f"key {key_id} ({args.role}); the token above is shown once and not stored", file=sys.stderr)
    elif args.action == "list":
        for key in store.list():
            state = "revoked" if key["revoked"] else "active"
            print(f"{key['id']}  {key['role']:5s}  {state:7s}  rate={key['rate'] or 'default'}  {key['name']}")
    else:
        if not args.id:
            raise ValueError("revoke needs --id")
        if not store.revoke(args.id):
            raise ValueError(f"no active key {args.id}")
        print(f"revoked {args.id}")
    return 0


def _serve(args, store):
    import uvicorn

    from ..engine import Engine
    from .app import BUNDLE_ENV, KEYS_ENV, LLM_ENV, create_app

    if not store.has_admin():
        _, token = store.create("admin", "first admin key, created by serve")
        print(f"no admin key existed; created one, shown this once:\n{token}", flush=True)
    if args.workers > 1:
        os.environ[BUNDLE_ENV], os.environ[KEYS_ENV] = str(args.bundle), store.path
        os.environ[LLM_ENV] = args.llm or ""
        uvicorn.run("recscore.serve.app:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="info")
        return 0
    app = create_app(Engine.open(args.bundle, llm=args.llm), store)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
