"""What the LLM rerank does to quality, and the blend weight picked on validation (issue 19).

    flock /tmp/recscore-cpu.lock .venv/bin/python -m bench.rerank_quality BUNDLE [--users 100]

The bundle's events are split in time as `recscore eval` does (each user's last 20% held out = test);
a validation split is carved the same way from the rest. For a seeded sample of users, the served
retrieval (the bundle's config, fitted on the part before each held-out split) gives its top
`Engine.rerank_candidates` with scores; Gemma 3 270M scores every candidate's title after the user's
history prompt (the engine's own prompt, `llm_prompt_prefix`, and per-token mean log-probability);
the two are blended by `blend_scores` for each weight of a grid. The weight with the best NDCG@10 on
validation is then measured on test, next to retrieval alone (weight 0) and the LLM alone (weight 1),
with bootstrap 95% intervals of the difference over users. Prints a table; with --record writes
bench/results/accuracy/rerank.json.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from recscore.bundle import fit_models, open_bundle
from recscore.engine import RERANK_CANDIDATES, blend_scores, llm_prompt_prefix, prompt_titles
from recscore.evaluate import BOOTSTRAP_SAMPLES
from recscore.scoring import history_bags, scorer_for
from recscore.train import temporal_split

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
K = 10
RESULTS = Path(__file__).resolve().parent / "results" / "accuracy" / "rerank.json"


def candidates(config, fit, users, n):
    """(scores, rows) (U, n) of the served retrieval fitted on `fit`, seen items excluded."""
    vectors, columns, weights = fit_models(fit, config)
    scorer = scorer_for(config, vectors, columns, weights)
    seen = [fit.items[fit.indptr[u]:fit.indptr[u + 1]] for u in users]
    bags = history_bags([(s, np.ones(len(s), np.float32)) for s in seen], scorer.decay, scorer.max_history)
    return scorer.select(scorer.pool(*bags), n, seen)


def llm_scores(llm, titles, fit, users, rows):
    """Per-token mean log-probability of each candidate title after the user's history prompt."""
    out = np.full(rows.shape, -np.inf)
    for i, u in enumerate(users):
        history = prompt_titles(fit.items[fit.indptr[u]:fit.indptr[u + 1]], titles)
        valid = rows[i] >= 0
        scored = llm.score(llm_prompt_prefix(history), [" " + titles[r] for r in rows[i][valid]])
        out[i, valid] = [s.mean for s in scored]
    return out


def per_user_metrics(scores, rows, llm, held_out, users, weight):
    """Per-user (ndcg@K, recall@K) of the candidates re-ordered by the blend at `weight`."""
    discount = 1.0 / np.log2(np.arange(2, K + 2))
    ndcg, recall = np.zeros(len(users)), np.zeros(len(users))
    for i, u in enumerate(users):
        relevant = held_out.items[held_out.indptr[u]:held_out.indptr[u + 1]]
        valid = rows[i] >= 0
        blended = blend_scores(scores[i][valid], llm[i][valid], weight)
        top = rows[i][valid][np.argsort(-blended, kind="stable")[:K]]
        hits = np.isin(top, relevant)
        ideal = discount[:min(K, len(relevant))].sum()
        ndcg[i] = (hits * discount[:len(hits)]).sum() / ideal
        recall[i] = hits.sum() / min(K, len(relevant))
    return ndcg, recall


def interval(values, samples=BOOTSTRAP_SAMPLES, seed=0):
    """(mean, low, high): the mean over users with a bootstrap 95% interval."""
    draws = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
    low, high = np.percentile(values[draws].mean(1), [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def split_run(llm, bundle, fit, held_out, users, n):
    """Candidates and LLM scores of `users` on one (fit, held_out) split; the per-weight metrics."""
    eligible = users[held_out.counts()[users] > 0]
    scores, rows = candidates(bundle.config, fit, eligible, n)
    start = time.perf_counter()
    llm_part = llm_scores(llm, bundle.titles, fit, eligible, rows)
    seconds = time.perf_counter() - start
    return {w: per_user_metrics(scores, rows, llm_part, held_out, eligible, w) for w in WEIGHTS}, len(eligible), seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=RERANK_CANDIDATES)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    from recscore.models.llm import LLM

    bundle = open_bundle(args.bundle)
    llm = LLM.from_gguf()
    train_part, test = temporal_split(bundle.interactions())
    fit, validation = temporal_split(train_part)
    users = np.sort(np.random.default_rng(0).choice(train_part.num_users, min(args.users, train_part.num_users),
                                                    replace=False))
    val, val_users, val_s = split_run(llm, bundle, fit, validation, users, args.candidates)
    best = max(WEIGHTS, key=lambda w: val[w][0].mean())
    tst, test_users, test_s = split_run(llm, bundle, train_part, test, users, args.candidates)
    rows = []
    for w in WEIGHTS:
        rows.append({"weight": w, "validation_ndcg": float(val[w][0].mean()), "validation_recall": float(val[w][1].mean()),
                     "test_ndcg": interval(tst[w][0]), "test_recall": interval(tst[w][1]),
                     "test_ndcg_gain_over_retrieval": interval(tst[w][0] - tst[0.0][0])})
    print(f"{val_users} validation users, {test_users} test users, top {args.candidates} reranked, metrics @{K}; "
          f"LLM scoring {val_s / val_users * 1e3:.0f} ms a user")
    print("weight  val NDCG  val recall   test NDCG [95%]          test recall [95%]        NDCG gain over weight 0 [95%]")
    for r in rows:
        n, rc, g = r["test_ndcg"], r["test_recall"], r["test_ndcg_gain_over_retrieval"]
        print(f"{r['weight']:6.1f}  {r['validation_ndcg']:8.4f}  {r['validation_recall']:10.4f}   "
              f"{n[0]:.4f} [{n[1]:.3f},{n[2]:.3f}]   {rc[0]:.4f} [{rc[1]:.3f},{rc[2]:.3f}]   "
              f"{g[0]:+.4f} [{g[1]:+.3f},{g[2]:+.3f}]" + ("   <- best on validation" if r["weight"] == best else ""))
    if args.record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"bundle": str(args.bundle), "users": int(len(users)), "k": K,
                                       "candidates": args.candidates, "best_weight_on_validation": best,
                                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows},
                                      indent=1))


if __name__ == "__main__":
    main()
