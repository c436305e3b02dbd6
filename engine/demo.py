"""`recscore demo`: the whole scoring path on a synthetic catalogue, or on MovieLens with evaluation."""
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from recscore.kernels import RowTable, aligned_empty, cpu_info, quantize_rows

from .datasets import hold_out_last, load_movielens, synthetic_catalogue
from .evaluate import popularity_ranking, recall_ndcg
from .factorize import pure_svd
from .recommender import Recommender, histories_of

SHOWN_USERS = 3


def _print_recommendations(catalogue, recommender, users, k, out):
    indptr, items, weights = histories_of(catalogue, users)
    recs = recommender.recommend(indptr, items, weights, k=k)
    for row, user in enumerate(users):
        seen = catalogue.history(user)
        genres = Counter(g for i in seen for g in catalogue.categories[i].split(", "))
        top_categories = ", ".join(g for g, _ in genres.most_common(2))
        out(f"\nUser {user}: {len(seen)} items seen, mostly {top_categories}")
        for rank, (item, score) in enumerate(zip(recs.ids[row], recs.scores[row]), 1):
            if item < 0:
                break
            out(f"  {rank:2d}. {score:8.3f}  {catalogue.titles[item]:<50.50} [{catalogue.categories[item]:.40}]")


def _print_latency(catalogue, recommender, k, out, batch=256):
    """Per-stage latency of one request (median of many) and of a batch of users."""
    rng = np.random.default_rng(0)
    single = [recommender.recommend(*histories_of(catalogue, [u]), k=k)
              for u in rng.integers(0, catalogue.num_users, 50)]
    lookup = np.median([r.lookup_ms for r in single])
    retrieval = np.median([r.retrieval_ms for r in single])
    out(f"\nLatency, one user (median of 50): lookup {lookup:.3f} ms, retrieval {retrieval:.3f} ms, "
        f"total {lookup + retrieval:.3f} ms")
    users = rng.integers(0, catalogue.num_users, min(batch, catalogue.num_users))
    many = recommender.recommend(*histories_of(catalogue, users), k=k)
    total = many.lookup_ms + many.retrieval_ms
    out(f"Latency, batch of {len(users)} users: lookup {many.lookup_ms:.3f} ms, retrieval {many.retrieval_ms:.3f} ms "
        f"({len(users) / total * 1e3:,.0f} users/s)")


def quantize_with_progress(weights, dtype, chunk_rows=1 << 16):
    """quantize_rows in row chunks, with a progress bar that appears only if it takes over a second."""
    if dtype == "fp32":
        return weights
    parts = [quantize_rows(weights[start:start + chunk_rows], dtype)
             for start in tqdm(range(0, len(weights), chunk_rows), desc=f"quantizing to {dtype}", unit="chunk",
                               delay=1.0)]

    def join(arrays):   # into storage that starts a cache line, as quantize_rows allocates
        if arrays[0] is None:
            return None
        return np.concatenate(arrays, out=aligned_empty((sum(len(a) for a in arrays),) + arrays[0].shape[1:],
                                                        arrays[0].dtype))
    return RowTable(dtype, weights.shape, join([p.data for p in parts]),
                    join([p.scale for p in parts]), join([p.bias for p in parts]))


def _print_cpu(out):
    cpu = cpu_info()
    out(f"CPU kernels: {cpu['model']}, level {cpu['level']} (detected {cpu['detected']}; RECSCORE_CPU caps it)")


def _warm_up(catalogue, recommender, k, out):
    """Run once so kernel compilation (or loading it from the cache) is not billed to a request."""
    start = time.perf_counter()
    recommender.recommend(*histories_of(catalogue, [0]), k=k)
    out(f"Kernel warm-up (compile or cache load): {(time.perf_counter() - start) * 1e3:.0f} ms")


def run_synthetic(k=10, dtype="fp32", out=print, progress=True):
    _print_cpu(out)
    out(f"Building the synthetic catalogue (20,000 items with 32 latent factors, 2,000 users), rows as {dtype}")
    catalogue = synthetic_catalogue(progress=progress)
    table = quantize_with_progress(catalogue.item_factors, dtype)
    recommender = Recommender(table, table, pooling="mean")
    _warm_up(catalogue, recommender, k, out)
    _print_recommendations(catalogue, recommender, list(range(SHOWN_USERS)), k, out)
    _print_latency(catalogue, recommender, k, out)


def run_movielens(path, k=10, dtype="fp32", rank=64, out=print):
    _print_cpu(out)
    start = time.perf_counter()
    catalogue = load_movielens(path)
    out(f"MovieLens from {path}: {catalogue.num_users} users, {catalogue.num_items} movies, "
        f"{len(catalogue.history_items):,} ratings ({(time.perf_counter() - start) * 1e3:.0f} ms)")
    train, test_users, test_items = hold_out_last(catalogue)
    start = time.perf_counter()
    item_vectors = pure_svd(train.history_indptr, train.history_items, train.history_weights,
                            train.num_items, rank=rank)
    out(f"Item vectors: PureSVD rank {rank} of the rating matrix, stored as {dtype}, last rating per user held out "
        f"({(time.perf_counter() - start) * 1e3:.0f} ms)")
    table = quantize_with_progress(item_vectors, dtype)
    recommender = Recommender(table, table, pooling="sum", weighted=True)
    _warm_up(train, recommender, k, out)

    recs = recommender.recommend(*histories_of(train, test_users), k=k)
    recall, ndcg = recall_ndcg(recs.ids, test_items)
    popular = popularity_ranking(train.history_indptr, train.history_items, train.num_items, test_users, k)
    pop_recall, pop_ndcg = recall_ndcg(popular, test_items)
    out(f"\nHeld-out last rating, {len(test_users)} users:")
    out(f"  PureSVD    recall@{k} {recall:.4f}   NDCG@{k} {ndcg:.4f}")
    out(f"  popularity recall@{k} {pop_recall:.4f}   NDCG@{k} {pop_ndcg:.4f}")
    _print_recommendations(train, recommender, list(range(SHOWN_USERS)), k, out)
    _print_latency(train, recommender, k, out)
    return {"recall": recall, "ndcg": ndcg, "popularity_recall": pop_recall, "popularity_ndcg": pop_ndcg}


ENGINE_ITEMS, ENGINE_USERS = 3_000, 1_000   # a bundle that builds in seconds


def _print_list(engine, rec, out, mark=()):
    for rank, (item, score) in enumerate(zip(rec.items, rec.scores), 1):
        flag = "  <- new" if item in mark else ""
        out(f"  {rank:2d}. {score:8.3f}  {engine.title(item):<40.40}{flag}")


def run_engine(k=10, out=print, progress=True, llm=True):
    """The engine end to end on a synthetic catalogue: build a bundle, recommend, a click that changes
    the next answer, per-stage latency, then (llm) an LLM rerank and a streamed explanation."""
    import tempfile

    from .bundle import build
    from .datasets import synthetic_events
    from .engine import Engine, FeatureUnavailable

    _print_cpu(out)
    out(f"Building a bundle from a synthetic catalogue ({ENGINE_ITEMS:,} items, {ENGINE_USERS:,} users)")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        catalogue, events = synthetic_events(num_items=ENGINE_ITEMS, num_users=ENGINE_USERS, dim=32, seed=7,
                                             progress=progress)
        build(catalogue, events, folder, tune=False, log=lambda line: out(f"  {line}"))
        out(f"Built in {time.perf_counter() - start:.1f} s")
        with Engine.open(folder, llm="gemma3" if llm else None) as engine:
            user = 1
            rec = engine.recommend(user, k)
            out(f"\nUser {user} ({rec.source}): top {k}")
            _print_list(engine, rec, out)
            clicked = int(rec.items[0])
            engine.feedback(user, clicked)
            after = engine.recommend(user, k)
            out(f"\nAfter a click on {engine.title(clicked)!r} (feedback is durable before it returns), "
                f"the very next request:")
            _print_list(engine, after, out, mark=set(after.items) - set(rec.items))

            rng = np.random.default_rng(0)
            timings = [engine.recommend(int(u), k).timings_ms for u in rng.integers(1, ENGINE_USERS + 1, 200)]
            stages = ", ".join(f"{stage} {np.median([t[stage] for t in timings]):.3f} ms" for stage in timings[0])
            out(f"\nLatency, one request (median of 200 users): {stages}")
            if not llm:
                return
            start = time.perf_counter()
            try:
                reranked = engine.recommend(user, k, rerank="llm")
            except FeatureUnavailable as error:
                out(f"\nLLM rerank and explanation skipped: {error}")
                return
            out(f"\nRe-ranked by Gemma 3 270M (first call loads it: {(time.perf_counter() - start):.1f} s; "
                f"rerank stage {reranked.timings_ms['rerank']:.0f} ms):")
            _print_list(engine, reranked, out)
            item = int(reranked.items[0])
            out(f"\nWhy {engine.title(item)!r}? ", end="", flush=True)
            start, first = time.perf_counter(), None
            for piece in engine.explain_stream(user, item):
                first = first or time.perf_counter() - start
                out(piece, end="", flush=True)
            out(f"\n(first piece after {1e3 * (first or 0.0):.0f} ms, all in {time.perf_counter() - start:.1f} s)")
