"""Engine latency on a MovieLens bundle: one user per request (cached and cold), feedback, micro-batched.

    flock /tmp/recscore-cpu.lock .venv/bin/python -m bench.engine_latency BUNDLE_DIR

Builds the bundle from /work/shared/data/ml-latest-small if BUNDLE_DIR has none. Prints
p50/p99 in microseconds (results go to bench/notes/engine.md by hand).
"""
import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recscore import bundle
from recscore.batching import MicroBatcher
from recscore.engine import Engine
from recscore.state import SQLiteState

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
THREADS = 2


def percentiles(seconds):
    p50, p99 = np.percentile(np.asarray(seconds) * 1e6, [50, 99])
    return f"p50 {p50:7.1f} us   p99 {p99:7.1f} us   (n = {len(seconds)})"


def timed(call, count):
    out = []
    for i in range(count):
        start = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - start)
    return out


def main(path):
    import numba
    numba.set_num_threads(THREADS)
    path = Path(path)
    if not (path / bundle.MANIFEST).exists():
        catalogue, events, malformed = bundle.read_movielens(MOVIELENS)
        bundle.build(catalogue, events, path, value_range=bundle.MOVIELENS_VALUE_RANGE, malformed=malformed)
    with tempfile.TemporaryDirectory() as state_dir:
        for durability in ("process", "power"):
            engine = Engine(bundle.open_bundle(path), SQLiteState(Path(state_dir) / f"{durability}.db", durability))
            users = [int(u) for u in engine.bundle.arrays["interactions.safetensors"]["user_ids"]]
            rng = np.random.default_rng(0)
            order = [users[i] for i in rng.integers(0, len(users), 5000)]
            engine.recommend_many(users, k=10)             # warm: kernels loaded, every user cached
            if durability == "process":
                print(f"config: {engine.config}")
                print("recommend, k = 10, cached user  ", percentiles(timed(lambda i: engine.recommend(order[i], 10), 5000)))

                def cold(i):
                    engine._users.clear()
                    engine.recommend(order[i], 10)
                print("recommend, k = 10, cold user    ", percentiles(timed(cold, 2000)))
                print("recommend, k = 10, new user     ", percentiles(timed(lambda i: engine.recommend(10**9 + i, 10), 2000)))
                print("recommend, genre filter (allow) ", percentiles(timed(
                    lambda i: engine.recommend(order[i], 10, filters={"allow_genres": ["Comedy"]}), 2000)))
                items = engine._catalogue.item_ids
            print(f"feedback, durability {durability:8s}", percentiles(timed(
                lambda i: engine.feedback(order[i], int(items[i % len(items)])), 2000)))
            if durability == "process":
                for clients in (1, 8, 32):
                    with MicroBatcher(engine, max_batch=64, max_wait_us=200) as batcher:
                        def client(c):
                            return [timed(lambda i: batcher.recommend(order[(c * 997 + i) % 5000], 10, timeout=60), 1)[0]
                                    for _ in range(4000 // clients)]
                        start = time.perf_counter()
                        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                            lat = sum((f.result() for f in [pool.submit(client, c) for c in range(clients)]), [])
                        rate = len(lat) / (time.perf_counter() - start)
                    print(f"micro-batched, {clients:2d} client threads ", percentiles(lat), f" {rate:8.0f} req/s")
                sizes = [l for l in engine.metrics.text().splitlines() if l.startswith("recscore_batch_size_")
                         and ("sum" in l or "count" in l)]
                print("batches:", ", ".join(sizes))
                print(f"user cache hit ratio: {engine.metrics.hits / max(1, engine.metrics.hits + engine.metrics.misses):.3f}")
            engine.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/recscore-ml-bundle")
