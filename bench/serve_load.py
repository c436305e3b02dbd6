"""A bounded loopback load test of POST /v1/recommend: N concurrent keep-alive clients (asyncio, raw
HTTP/1.1, so the client costs little of the 2 cores it shares with the server), each level bounded in
requests and seconds. The recommend server and the same server answering a constant JSON body
(bench/serve_constant.py: the framework's ceiling) run side by side, levels alternating between them.
`--record` writes bench/results/serve.json and rewrites RESULTS.md. Notes: bench/notes/serve.md.

    python -m bench.serve_load /tmp/ml-bundle [--server uvicorn|granian] [--record]
"""
import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np

from recscore.serve.app import BUNDLE_ENV, KEYS_ENV
from recscore.serve.keys import KEYS_FILE, KeyStore

CONCURRENCY = (1, 8, 64)
REQUESTS_PER_LEVEL = 40000
SECONDS_PER_LEVEL = 3.0
ROUNDS = 3                  # each level run this many times per app, alternating; the median run is kept
MOVIELENS_USERS = 610
TARGET_RATIO = 0.6          # recommend req/s over constant req/s (issue 20)
TARGET_P99_MS_AT_8 = 20.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server, app, port, env):
    factory = app.endswith("app_from_env")
    if server == "uvicorn":
        command = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log", "--log-level", "warning"]
        command += ["--factory"] if factory else []
    else:
        command = [os.path.join(os.path.dirname(sys.executable), "granian"), "--interface", "asgi", app,
                   "--port", str(port), "--workers", "1", "--no-ws", "--log-level", "warning"]
        command += ["--factory"] if factory else []
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{server} did not start")


async def client(port, token, deadline, budget, latencies, rng):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            body = json.dumps({"user": rng.randint(1, MOVIELENS_USERS), "k": 10}).encode()
            request = (f"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {token}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"status {status}")
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def level(port, token, concurrency):
    latencies, budget = [], [REQUESTS_PER_LEVEL]
    start = time.perf_counter()
    deadline = start + SECONDS_PER_LEVEL
    await asyncio.gather(*(client(port, token, deadline, budget, latencies, random.Random(c))
                           for c in range(concurrency)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(ms), "rps": len(ms) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn")
    parser.add_argument("--record", action="store_true", help="write bench/results/serve.json, rewrite RESULTS.md")
    args = parser.parse_args()
    keys = KeyStore(os.path.join(args.bundle, KEYS_FILE))
    _, token = keys.create("read", "bench", rate=1e9)
    env = dict(os.environ, **{BUNDLE_ENV: args.bundle, KEYS_ENV: keys.path})
    apps = {"recommend": "recscore.serve.app:app_from_env", "constant": "bench.serve_constant:app"}
    ports = {name: free_port() for name in apps}
    processes = [start_server(args.server, app, ports[name], env) for name, app in apps.items()]
    rows = []
    try:
        for name in apps:
            asyncio.run(level(ports[name], token, 8))    # warm-up: users' rows, kernels' first calls
        for concurrency in CONCURRENCY:
            runs = {name: [] for name in apps}
            for _ in range(ROUNDS):
                for name in apps:
                    runs[name].append(asyncio.run(level(ports[name], token, concurrency)))
            median = {name: sorted(r, key=lambda run: run["rps"])[len(r) // 2] for name, r in runs.items()}
            row = {"server": args.server, "clients": concurrency,
                   **{f"{name}_{key}": median[name][key] for name in apps for key in ("rps", "p50_ms", "p99_ms")},
                   "ratio": median["recommend"]["rps"] / median["constant"]["rps"]}
            rows.append(row)
            print(f"{args.server} c={concurrency:3d}  recommend {row['recommend_rps']:7.0f} req/s p50 "
                  f"{row['recommend_p50_ms']:6.2f} p99 {row['recommend_p99_ms']:6.2f} ms | constant "
                  f"{row['constant_rps']:7.0f} req/s p50 {row['constant_p50_ms']:6.2f} p99 "
                  f"{row['constant_p99_ms']:6.2f} ms | ratio {row['ratio']:.2f}", flush=True)
    finally:
        for process in processes:
            process.terminate()
            process.wait()
    if args.record:
        from bench import report
        from bench.protocol import machine_info
        machine = dict(machine_info(), server=args.server)
        path = report.RESULTS_DIR / "serve.json"
        robustness = json.loads(path.read_text()).get("robustness", []) if path.exists() else []   # kept by hand
        path.write_text(json.dumps(
            {"machine": machine, "targets": {"ratio": TARGET_RATIO, "p99_ms_at_8": TARGET_P99_MS_AT_8},
             "bundle": os.path.basename(os.path.normpath(args.bundle)), "rows": rows, "robustness": robustness},
            indent=1))
        report.write()


if __name__ == "__main__":
    main()
