"""The engine's figures for issue 19, by the protocol of ../shared/BENCHMARKING.md, into bench/results/engine.json.

    flock /tmp/recscore-cpu.lock .venv/bin/python -m bench.compare_engine --build    # bundles only (once)
    flock /tmp/recscore-cpu.lock .venv/bin/python -m bench.compare_engine            # measure, record, RESULTS.md

- MovieLens bundle (`recscore build --movielens`, tuned): recommend latency (one user, k = 10, no LLM),
  feedback latency at both durabilities, and `recscore eval`'s quality table (engine config and baselines).
- A synthetic 1M-item bundle, d = 64 (bundle.build_factor_bundle: item vectors around 8 genre centres,
  20k users whose histories come from one or two genres), once with fp32 and once with int8 index rows:
  recommend latency against the scan's floor (index bytes / read bandwidth measured in this run, torch sum
  over 512 MB, 2 threads), 8 client threads micro-batched against unbatched, and the engine against a peer
  pipeline doing the same job (FAISS IndexFlatIP + torch.nn.EmbeddingBag + a Python dict of histories,
  same item vectors, same recency weights, seen items excluded), checked to return the same items.
Throughput pairs alternate (A, B, A, B ...; who goes first alternates too) and report the median of the
per-pair ratios with min and max. 2 threads for every side (protocol.set_threads).
"""
import argparse
import concurrent.futures
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench import protocol  # noqa: F401  (sets OMP_WAIT_POLICY before any runtime starts)
from bench.engine_latency import timed
from bench.protocol import BENCH_DIR, machine_info, set_threads

import numpy as np  # noqa: E402

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
ML_BUNDLE = Path("/tmp/recscore-engine-bench/ml")
BIG_BUNDLE = "/tmp/recscore-engine-bench/items1m-{dtype}"
BIG_ITEMS, BIG_USERS, BIG_DIM = 1_000_000, 20_000, 64
K = 10
TARGETS = {
    "ml_p50_ms": 0.15, "ml_p99_ms": 0.5, "feedback_p99_ms": 0.5, "scan_factor": 1.3,
    "batching_ratio": 3.0, "peer_ratio": 3.0, "recall@20": 0.18, "ndcg@20": 0.15, "coverage@20": 0.10,
}


# ---- data ------------------------------------------------------------------------------------

def synthetic_factor_data(num_items=BIG_ITEMS, num_users=BIG_USERS, dim=BIG_DIM, seed=11):
    """(bundle.Catalogue, events, item vectors): items around one of 8 genre centres; each user's 10..60
    events drawn uniformly from one or two favourite genres, a minute apart."""
    from recscore import bundle
    from recscore.datasets import _GENRES

    rng = np.random.default_rng(seed)
    genres = list(_GENRES)
    centres = rng.standard_normal((len(genres), dim)).astype(np.float32) / np.sqrt(dim)
    item_genre = rng.integers(0, len(genres), num_items)
    vectors = centres[item_genre]
    vectors += (0.6 / np.sqrt(dim)) * rng.standard_normal((num_items, dim), dtype=np.float32)
    by_genre = np.argsort(item_genre, kind="stable")
    start = np.concatenate([[0], np.cumsum(np.bincount(item_genre, minlength=len(genres)))])
    lengths = rng.integers(10, 61, num_users)
    users = np.repeat(np.arange(1, num_users + 1), lengths)
    favourites = rng.integers(0, len(genres), (num_users, 2))
    genre = favourites[users - 1, rng.integers(0, 2, len(users))]
    rows = by_genre[start[genre] + (rng.random(len(users)) * (start[genre + 1] - start[genre])).astype(np.int64)]
    ids = np.arange(1, num_items + 1, dtype=np.int64)
    catalogue = bundle.Catalogue(ids, [f"Item {i}" for i in ids], [[genres[g]] for g in item_genre])
    position = np.arange(len(users)) - np.concatenate([[0], np.cumsum(lengths)])[users - 1]
    events = (users.astype(np.int64), ids[rows], np.full(len(users), 1.0), 1_000_000 + 60 * position)
    return catalogue, events, vectors


def build_bundles(log=print):
    from recscore import bundle, train

    if not (ML_BUNDLE / bundle.MANIFEST).exists():
        started = time.perf_counter()
        catalogue, events, malformed = bundle.read_movielens(MOVIELENS)
        bundle.build(catalogue, events, ML_BUNDLE, value_range=bundle.MOVIELENS_VALUE_RANGE, malformed=malformed,
                     log=log)
        log(f"MovieLens bundle: {time.perf_counter() - started:.1f} s")
    data = None
    for dtype in ("fp32", "int8"):
        path = Path(BIG_BUNDLE.format(dtype=dtype))
        if (path / bundle.MANIFEST).exists():
            continue
        started = time.perf_counter()
        data = data or synthetic_factor_data()
        generated = time.perf_counter()
        config = train.ServingConfig(scorer="puresvd", svd_rank=BIG_DIM, decay=0.9, max_history=64, index_dtype=dtype)
        bundle.build_factor_bundle(*data, path, config=config, log=log)
        size = sum(f.stat().st_size for f in path.iterdir())
        log(f"1M-item bundle ({dtype}): generated in {generated - started:.1f} s, written in "
            f"{time.perf_counter() - generated:.1f} s, {size / 1e6:.0f} MB")


# ---- helpers ---------------------------------------------------------------------------------

def pct(seconds):
    p50, p99 = np.percentile(np.asarray(seconds) * 1e3, [50, 99])
    return float(p50), float(p99)


class Bandwidth:
    """Memory read bandwidth, 2 threads: torch sum over 512 MB (BENCHMARKING.md's ceiling), median of repeats."""

    def __init__(self, n_bytes=512 << 20):
        import torch
        self.x = torch.ones(n_bytes // 4)
        self.n_bytes = n_bytes
        for _ in range(3):
            self.x.sum()

    def gbps(self, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.x.sum()
            times.append(time.perf_counter() - start)
        return self.n_bytes / statistics.median(times) / 1e9


def fsync_ms(folder, count=2000):
    """p50, p99 of a bare append of 100 bytes + fsync in `folder`: what synchronous=FULL adds per commit."""
    import os
    fd = os.open(Path(folder) / "fsync.probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return pct(timed(lambda i: (os.write(fd, b"x" * 100), os.fsync(fd)), count))
    finally:
        os.close(fd)


def run_clients(call, users, clients, per_client):
    """Requests/s and per-request latencies of `clients` threads each making per_client calls call(user)."""
    def client(c):
        lat = []
        for i in range(per_client):
            user = users[(c * 7919 + i) % len(users)]
            start = time.perf_counter()
            call(user)
            lat.append(time.perf_counter() - start)
        return lat
    start = time.perf_counter()
    if clients == 1:
        lat = client(0)
    else:
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            lat = sum((f.result() for f in [pool.submit(client, c) for c in range(clients)]), [])
    return len(lat) / (time.perf_counter() - start), lat


def alternate(name_a, call_a, name_b, call_b, users, clients, per_client, pairs):
    """Alternating rounds of A and B (B first on odd pairs); ratio = A's req/s / B's req/s per pair."""
    rates = {name_a: [], name_b: []}
    lat = {name_a: [], name_b: []}
    ratios = []
    for p in range(pairs):
        # each round its own slice of users: no request repeats a user of the round before
        part = users[(p * clients * per_client) % len(users):] + users
        order = [(name_a, call_a), (name_b, call_b)] if p % 2 == 0 else [(name_b, call_b), (name_a, call_a)]
        got = {}
        for name, call in order:
            got[name], l = run_clients(call, part, clients, per_client)
            rates[name].append(got[name])
            lat[name].extend(l)
        ratios.append(got[name_a] / got[name_b])
    return {
        "a_rps": statistics.median(rates[name_a]), "b_rps": statistics.median(rates[name_b]),
        "a_p50_ms": pct(lat[name_a])[0], "a_p99_ms": pct(lat[name_a])[1],
        "b_p50_ms": pct(lat[name_b])[0], "b_p99_ms": pct(lat[name_b])[1],
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "pairs": pairs, "requests_per_round": clients * per_client,
    }


class PeerPipeline:
    """The same job without recscore: a Python dict of histories (bundle events + feedback), the user vector
    from torch.nn.EmbeddingBag (sum, per-sample weights decay^age over the last max_history events) over the
    bundle's item vectors, FAISS IndexFlatIP over the same vectors, seen items dropped from k + |seen| results."""

    def __init__(self, bundle, config):
        import faiss
        import torch
        inter = bundle.arrays["interactions.safetensors"]
        vectors = bundle.arrays["puresvd.safetensors"]["item_vectors"]
        self.item_ids = np.array(bundle.arrays["catalogue.safetensors"]["item_ids"])
        indptr, items = inter["indptr"], np.array(inter["items"])
        self.histories = {int(u): items[indptr[i]:indptr[i + 1]] for i, u in enumerate(inter["user_ids"])}
        self.decay, self.max_history = config.decay, config.max_history
        table = torch.from_numpy(np.asarray(vectors))       # the bundle's map, not a copy
        self.bag = torch.nn.EmbeddingBag.from_pretrained(table, mode="sum", freeze=True)
        self.index = faiss.IndexFlatIP(vectors.shape[1])    # FAISS keeps its own copy of the rows
        self.index.add(np.ascontiguousarray(vectors))
        self.offsets = torch.zeros(1, dtype=torch.int64)
        self.torch = torch

    def recommend(self, user, k=K):
        rows = self.histories.get(user, np.zeros(0, np.int64))
        last = rows[-self.max_history:]
        weights = np.power(np.float32(self.decay), np.arange(len(last) - 1, -1, -1, dtype=np.float32))
        with self.torch.no_grad():
            query = self.bag(self.torch.from_numpy(last), self.offsets,
                             per_sample_weights=self.torch.from_numpy(weights)).numpy()
        seen = np.unique(rows)
        scores, found = self.index.search(query, k + len(seen))
        keep = ~np.isin(found[0], seen) & (found[0] >= 0)
        return self.item_ids[found[0][keep][:k]], scores[0][keep][:k]


# ---- MovieLens -------------------------------------------------------------------------------

def movielens_rows(log):
    from recscore import bundle
    from recscore.engine import Engine
    from recscore.evaluate import evaluate_bundle
    from recscore.state import SQLiteState

    rows = []
    opened = bundle.open_bundle(ML_BUNDLE)
    with tempfile.TemporaryDirectory() as state_dir:
        for durability in ("process", "power"):
            engine = Engine(opened, SQLiteState(Path(state_dir) / f"{durability}.db", durability))
            users = [int(u) for u in opened.arrays["interactions.safetensors"]["user_ids"]]
            order = [users[i] for i in np.random.default_rng(0).integers(0, len(users), 5000)]
            engine.recommend_many(users, k=K)          # warm: kernels loaded, every user's row cached
            for u in order[:500]:
                engine.recommend(u, K)
            if durability == "process":
                p50, p99 = pct(timed(lambda i: engine.recommend(order[i], K), 5000))
                rows.append({"kind": "latency", "bundle": "MovieLens", "name": "recommend, user's row cached (steady state)",
                             "p50_ms": p50, "p99_ms": p99, "n": 5000,
                             "target": {"p50_ms": TARGETS["ml_p50_ms"], "p99_ms": TARGETS["ml_p99_ms"]}})

                def cold(i):
                    engine._users.clear()
                    engine.recommend(order[i], K)
                p50, p99 = pct(timed(cold, 2000))
                rows.append({"kind": "latency", "bundle": "MovieLens", "n": 2000, "p50_ms": p50, "p99_ms": p99,
                             "name": "recommend, user cache cleared before each request (SQLite read + lookup)"})
                p50, p99 = pct(timed(lambda i: engine.recommend(10**9 + i, K), 2000))
                rows.append({"kind": "latency", "bundle": "MovieLens", "name": "recommend, new user (popularity)",
                             "p50_ms": p50, "p99_ms": p99, "n": 2000})
                items = engine._catalogue.item_ids
            p50, p99 = pct(timed(lambda i: engine.feedback(order[i], int(items[(7 * i) % len(items)])), 2000))
            if durability == "power":   # the floor of a synchronous commit on this disk
                rows.append({"kind": "latency", "bundle": "MovieLens", "n": 2000,
                             "name": "ceiling: bare 100-byte append + fsync, same folder (no SQLite)",
                             **dict(zip(("p50_ms", "p99_ms"), fsync_ms(state_dir)))})
            rows.append({"kind": "latency", "bundle": "MovieLens", "n": 2000, "p50_ms": p50, "p99_ms": p99,
                         "name": f"feedback, durability \"{durability}\" "
                                 + ("(WAL, synchronous=NORMAL: survives kill -9)" if durability == "process"
                                    else "(synchronous=FULL: fsync per commit, survives power loss)"),
                         "target": {"p99_ms": TARGETS["feedback_p99_ms"]}})
            engine.close()
            log(rows[-1])
    started = time.perf_counter()
    table = evaluate_bundle(ML_BUNDLE, samples=1000)
    log(f"recscore eval: {time.perf_counter() - started:.1f} s")
    for model, metrics in table.items():
        row = {"kind": "quality", "model": model, "engine": model.startswith("engine")}
        row.update({m: list(metrics[m]) for m in ("recall@20", "ndcg@20", "coverage@20", "recall@10", "ndcg@10")})
        if row["engine"]:
            row["target"] = {m: TARGETS[m] for m in ("recall@20", "ndcg@20", "coverage@20")}
        rows.append(row)
        log(model, row["recall@20"][0], row["ndcg@20"][0], row["coverage@20"][0])
    return rows


# ---- 1M items --------------------------------------------------------------------------------

def big_rows(dtype, bandwidth, quick, log):
    from recscore import bundle
    from recscore.batching import MicroBatcher
    from recscore.engine import Engine
    from recscore.kernels import topk
    from recscore.state import SQLiteState

    rows = []
    path = Path(BIG_BUNDLE.format(dtype=dtype))
    started = time.perf_counter()
    opened = bundle.open_bundle(path)
    state_dir = tempfile.TemporaryDirectory()
    engine = Engine(opened, SQLiteState(Path(state_dir.name) / "state.db"))
    open_s = time.perf_counter() - started
    table = engine.scorer.index._snapshot.table
    corpus_bytes = sum(a.nbytes for a in (table.data, table.scale, table.bias) if a is not None)
    label = f"1M items d={BIG_DIM} {dtype}"
    log(f"{label}: engine open {open_s:.1f} s, index {corpus_bytes / 1e6:.0f} MB")
    user_ids = [int(u) for u in opened.arrays["interactions.safetensors"]["user_ids"]]
    users = [user_ids[i] for i in np.random.default_rng(1).permutation(len(user_ids))]
    engine.recommend_many(users, k=K)                  # every user's row cached: the steady state
    n = 60 if quick else 400
    for u in users[:20]:
        engine.recommend(u, K)
    stages, lat, floors, ratios, gbps = [], [], [], [], []

    def request(i):
        stages.append(engine.recommend(users[i], K).timings_ms)
    # bandwidth and requests alternate (10 pairs): each block of requests is held against the floor measured
    # just before it, as the machine's bandwidth moves by 1.5x between minutes here
    pairs = 4 if quick else 10
    for p in range(pairs):
        gbps.append(bandwidth.gbps())
        floors.append(corpus_bytes / (gbps[-1] * 1e9) * 1e3)
        block = timed(lambda i: request(p * (n // pairs) + i), n // pairs)
        lat += block
        ratios.append(statistics.median(block) * 1e3 / floors[-1])
    p50, p99 = pct(lat)
    floor_ms = statistics.median(floors)
    stages = {key: statistics.median(t[key] for t in stages) for key in stages[0]}
    # the bare kernel on the same rows: one query, top k, no exclusions (what a request cannot go below),
    # and the index's search with the user's seen items excluded (the engine's select stage alone)
    queries = [engine._pooled([u], [engine._user(u)]) for u in users[:64]]
    seen = [engine._user(u).seen for u in users[:64]]
    for q in queries[:16]:
        topk(q, table, K, metric="ip")
    bare = pct(timed(lambda i: topk(queries[i % 64], table, K, metric="ip"), n))[0]
    search = pct(timed(lambda i: engine.scorer.index.search(queries[i % 64], K,
                                                            exclude=(np.array([0, len(seen[i % 64])]), seen[i % 64])), n))[0]
    # what batching can gain at most: the bare kernel for 8 queries at once against 8 single calls
    blocks = [np.concatenate(queries[8 * j:8 * j + 8]) for j in range(8)]
    bare8 = pct(timed(lambda i: topk(blocks[i % 8], table, K, metric="ip"), max(16, n // 8)))[0]
    rows.append({"kind": "scan", "bundle": label, "name": "recommend, one user, k = 10", "p50_ms": p50, "p99_ms": p99,
                 "n": n, "corpus_bytes": corpus_bytes, "read_gbps": statistics.median(gbps), "read_gbps_all": gbps,
                 "floor_ms": floor_ms, "of_floor_median": statistics.median(ratios), "of_floor_min": min(ratios),
                 "of_floor_max": max(ratios),
                 "bare_topk_p50_ms": bare, "index_search_p50_ms": search, "stages_ms": stages,
                 "bare_topk_b8_p50_ms": bare8, "open_s": open_s,
                 "target": {"of_floor_median": TARGETS["scan_factor"]}})
    log(rows[-1])

    # 8 client threads: micro-batched against unbatched calls of the same engine
    per_client = 6 if quick else 25
    with MicroBatcher(engine, max_batch=64, max_wait_us=200) as batcher:
        r = alternate("batched", lambda u: batcher.recommend(u, K, timeout=120), "unbatched",
                      lambda u: engine.recommend(u, K), users, 8, per_client, 2 if quick else 6)
    rows.append({"kind": "batching", "bundle": label, "name": "8 client threads", **r,
                 "ceiling_ratio": 8 * bare / bare8, "target": TARGETS["batching_ratio"]})
    log(rows[-1])

    if dtype == "fp32" or not quick:
        peer = PeerPipeline(opened, engine.config)
        # same job, same results: every item list of 300 users compared (fp32 rows must agree exactly)
        check = users[:300]
        ours = engine.recommend_many(check, k=K)
        same = sum(np.array_equal(o.items, peer.recommend(u)[0]) for u, o in zip(check, ours))
        overlap = statistics.mean(len(np.intersect1d(o.items, peer.recommend(u)[0])) / K for u, o in zip(check, ours))
        log(f"{label}: same lists {same}/{len(check)}, mean overlap {overlap:.4f}")
        for u in users[:8]:
            peer.recommend(u)
        for clients in (1, 8):
            with MicroBatcher(engine, max_batch=64, max_wait_us=200) as batcher:
                ours_call = (lambda u: engine.recommend(u, K)) if clients == 1 else \
                    (lambda u: batcher.recommend(u, K, timeout=120))
                per = (10 if quick else 40) if clients == 1 else (4 if quick else 12)
                r = alternate("ours", ours_call, "peer", peer.recommend, users, clients, per, 2 if quick else 6)
            rows.append({"kind": "peer", "bundle": label, "name": f"{clients} client thread{'s' * (clients > 1)}",
                         "ours": "Engine.recommend" if clients == 1 else "Engine via MicroBatcher",
                         "peer": "FAISS IndexFlatIP + torch EmbeddingBag + dict of histories",
                         "same_lists": same, "checked": len(check), "mean_overlap": overlap, **r,
                         # one client: ours cannot beat the scan's floor, so the ratio is at most peer / floor
                         # (the floor, or the bare kernel where that is faster still)
                         "ceiling_ratio": r["b_p50_ms"] / min(floor_ms, bare) if clients == 1 else None,
                         "target": TARGETS["peer_ratio"]})
            log(rows[-1])
        del peer
    engine.close()
    state_dir.cleanup()
    return rows


def met(row):
    """Whether a row meets its target (None: no target)."""
    t = row.get("target")
    if t is None:
        return None
    if row["kind"] in ("latency", "scan"):
        return all(row[key] <= limit for key, limit in t.items())
    if row["kind"] == "quality":
        return all(row[key][0] >= limit for key, limit in t.items())
    return row["ratio_median"] >= t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="only build the bundles (under /tmp)")
    parser.add_argument("--quick", action="store_true", help="few requests, nothing recorded")
    parser.add_argument("--only", choices=("movielens", "1m"), help="one part (nothing recorded)")
    args = parser.parse_args()
    set_threads()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    build_bundles(log)
    if args.build:
        return
    info = machine_info()
    bandwidth = Bandwidth()
    log(f"read bandwidth (torch sum over 512 MB, 2 threads): {bandwidth.gbps(15):.1f} GB/s")
    rows = []
    if args.only != "1m":
        rows += movielens_rows(log)
    if args.only != "movielens":
        for dtype in ("fp32", "int8"):
            rows += big_rows(dtype, bandwidth, args.quick, log)
    for row in rows:
        row["met"] = met(row)
    results = {"machine": info, "rows": rows, "targets": TARGETS,
               "bundle": f"MovieLens latest-small ({ML_BUNDLE}, tuned) and synthetic 1M items x d={BIG_DIM} "
                         f"({BIG_USERS:,} users, bundle.build_factor_bundle)"}
    if args.quick or args.only:   # a trial: its rows go to /tmp, not into the record
        Path("/tmp/recscore-engine-bench/trial.json").write_text(json.dumps(results, indent=2))
        return
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    (BENCH_DIR / "results" / "engine.json").write_text(json.dumps(results, indent=2))
    from bench.report import write
    write()
    log("wrote bench/results/engine.json and bench/RESULTS.md")


if __name__ == "__main__":
    main()
