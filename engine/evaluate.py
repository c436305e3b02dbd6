"""Offline evaluation of top-k lists against held-out items: recall@k and NDCG@k."""
import numpy as np


def recall_ndcg(ranked_ids, held_out):
    """ranked_ids (U, k) best first; held_out (U,) one relevant item per user.

    recall@k is the share of users whose held-out item is in their list; NDCG@k with one
    relevant item is 1 / log2(rank + 2) at its rank (0 if absent), averaged over users.
    """
    hit = ranked_ids == held_out[:, None]
    rank = np.argmax(hit, axis=1)
    found = hit.any(axis=1)
    recall = float(found.mean()) if len(found) else 0.0
    ndcg = float(np.where(found, 1.0 / np.log2(rank + 2), 0.0).mean()) if len(found) else 0.0
    return recall, ndcg


def popularity_ranking(history_indptr, history_items, num_items, users, k):
    """The k most popular items each user has not seen yet (ties to the smaller id)."""
    popularity = np.bincount(history_items, minlength=num_items).astype(np.int64)
    order = np.lexsort((np.arange(num_items), -popularity))
    out = np.empty((len(users), k), dtype=np.int64)
    for row, user in enumerate(users):
        seen = history_items[history_indptr[user]:history_indptr[user + 1]]
        candidates = order[:k + len(seen)]
        out[row] = candidates[~np.isin(candidates, seen)][:k]
    return out


# ---- full-ranking evaluation on a temporal split (recscore eval) ----------------------------

KS = (10, 20)
BOOTSTRAP_SAMPLES = 1000
RANK_CHUNK_USERS = 256


def rank_users(scorer, interactions, k):
    """Top-k catalogue rows (U, k) of every user from their `interactions`, seen items excluded."""
    from .scoring import history_bags

    indptr, items = interactions.indptr, interactions.items
    out = np.empty((interactions.num_users, k), np.int64)
    for start in range(0, interactions.num_users, RANK_CHUNK_USERS):
        users = range(start, min(start + RANK_CHUNK_USERS, interactions.num_users))
        seen = [items[indptr[u]:indptr[u + 1]] for u in users]
        bags = history_bags([(s, np.ones(len(s), np.float32)) for s in seen], scorer.decay, scorer.max_history)
        _, out[start:start + len(seen)] = scorer.select(scorer.pool(*bags), k, seen)
    return out


def rank_by_popularity(interactions, k):
    """Top-k by training popularity, each user's seen items excluded."""
    from .scoring import select_by_score
    from .train import popularity

    column = popularity(interactions)[:, None]
    indptr, items = interactions.indptr, interactions.items
    return select_by_score(column, k, [items[indptr[u]:indptr[u + 1]] for u in range(interactions.num_users)])[1]


def ranking_metrics(top, held_out, num_items, ks=KS):
    """Per-user recall, NDCG, MRR and hit rate at each k (users with held-out events only), and coverage.

    recall@k = hits / min(k, |held out|); NDCG@k normalised by the ideal ranking of min(k, |held out|)
    hits; MRR@k = 1 / rank of the first hit (0 if none in the top k). Returns (per_user dict, coverage dict).
    """
    counts = held_out.counts()
    users = np.flatnonzero(counts > 0)
    hits = np.zeros((len(users), top.shape[1]), bool)
    for row, u in enumerate(users):
        hits[row] = np.isin(top[u], held_out.items[held_out.indptr[u]:held_out.indptr[u + 1]])
    discount = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    ideal = np.cumsum(discount)
    per_user, coverage = {}, {}
    for k in ks:
        h = hits[:, :k]
        relevant = np.minimum(counts[users], k)
        per_user[f"recall@{k}"] = h.sum(1) / relevant
        per_user[f"ndcg@{k}"] = (h * discount[:k]).sum(1) / ideal[relevant - 1]
        first = np.where(h.any(1), h.argmax(1) + 1, np.inf)
        per_user[f"mrr@{k}"] = 1.0 / first
        per_user[f"hit@{k}"] = h.any(1).astype(np.float64)
        shown = top[:, :k]
        coverage[f"coverage@{k}"] = len(np.unique(shown[shown >= 0])) / num_items
    return per_user, coverage


def summarize(per_user, coverage, samples=0, seed=0):
    """Means, and with samples > 0 bootstrap 95% intervals over users: {name: (mean, low, high)}."""
    rng = np.random.default_rng(seed)
    out = {}
    n = len(next(iter(per_user.values())))
    draws = rng.integers(0, n, (samples, n)) if samples and n else None
    for name, values in per_user.items():
        mean = float(values.mean()) if n else 0.0
        if draws is None:
            out[name] = mean
        else:
            low, high = np.percentile(values[draws].mean(1), [2.5, 97.5])
            out[name] = (mean, float(low), float(high))
    for name, value in coverage.items():
        out[name] = value if draws is None else (value, value, value)
    return out


class ConfigEvaluator:
    """Scores ServingConfigs on a (fit, validation) pair with the served code path, for train.tune:
    the fitted models are shared between configurations that only differ in blend weights or decay."""

    def __init__(self, k=max(KS)):
        self.k = k
        self._fits = {}
        self._scorer_key = self._scorer = None

    def __call__(self, config, fit, validation):
        from .scoring import scorer_for
        from .train import ease, gram, support_of, svd_vectors

        models = self._fits.setdefault(id(fit), {"fit": fit})
        if ("svd", config.svd_rank) not in models:
            models[("svd", config.svd_rank)] = svd_vectors(fit, config.svd_rank)
        if ("gram", config.min_support) not in models:
            columns = support_of(fit, config.min_support)
            models[("gram", config.min_support)] = (columns, gram(fit, columns))
        columns, G = models[("gram", config.min_support)]
        if ("ease", config.min_support, config.ease_lambda) not in models:
            models[("ease", config.min_support, config.ease_lambda)] = ease(G, config.ease_lambda)
        key = (id(fit), config.scorer, config.svd_rank, config.min_support, config.ease_lambda,
               config.ease_weight, config.svd_weight)
        if key != self._scorer_key:
            self._scorer = scorer_for(config, models[("svd", config.svd_rank)], columns,
                                      models[("ease", config.min_support, config.ease_lambda)])
            self._scorer_key = key
        self._scorer.decay, self._scorer.max_history = config.decay, config.max_history
        top = rank_users(self._scorer, fit, self.k)
        return summarize(*ranking_metrics(top, validation, fit.num_items))


def evaluate_bundle(path, samples=BOOTSTRAP_SAMPLES, log=None):
    """The bundle's events split in time (each user's last 20% held out); popularity, ItemKNN, PureSVD,
    EASE and the engine's served configuration fitted on the rest and ranked over the whole catalogue.
    Returns {model name: summarize(...) with intervals}."""
    from .bundle import fit_models, open_bundle
    from .scoring import FactorScorer, ItemItemScorer, scorer_for
    from .train import blend_matrix, gram, item_knn, popularity, temporal_split

    bundle = open_bundle(path)
    config = bundle.config
    train_part, test = temporal_split(bundle.interactions())
    k = max(KS)
    vectors, columns, weights = fit_models(train_part, config)
    full_history = int(train_part.counts().max())
    knn = np.zeros((train_part.num_items, len(columns)), np.float32)
    knn[columns] = item_knn(gram(train_part, columns), popularity(train_part)[columns])
    rankings = {
        "popularity": lambda: rank_by_popularity(train_part, k),
        "ItemKNN (cosine)": lambda: rank_users(ItemItemScorer(knn, columns, 1.0, full_history), train_part, k),
        f"PureSVD (rank {config.svd_rank})": lambda: rank_users(
            FactorScorer(vectors, 1.0, full_history), train_part, k),
        f"EASE (lambda {config.ease_lambda:g})": lambda: rank_users(
            ItemItemScorer(blend_matrix(vectors, weights, columns, 1.0, 0.0), columns, 1.0, full_history),
            train_part, k),
        "engine (" + describe_config(config) + ")": lambda: rank_users(
            scorer_for(config, vectors, columns, weights), train_part, k),
    }
    table = {}
    for name, rank in rankings.items():
        table[name] = summarize(*ranking_metrics(rank(), test, train_part.num_items), samples=samples)
        if log:
            log(f"  {name}: NDCG@20 {table[name]['ndcg@20'][0]:.4f}")
    return table


def describe_config(config):
    if config.scorer == "puresvd":
        return f"PureSVD rank {config.svd_rank}, decay {config.decay:g}"
    return (f"EASE lambda {config.ease_lambda:g} + {config.svd_weight:g} x PureSVD rank {config.svd_rank}, "
            f"decay {config.decay:g}, last {config.max_history}")


def format_table(table, ks=KS):
    """The evaluation table as text: one row per model, mean [95% interval] per metric."""
    names = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "mrr", "hit")] + [f"coverage@{max(ks)}"]
    width = max(len(n) for n in table)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{n:>21}" for n in names)]
    for model, metrics in table.items():
        cells = []
        for n in names:
            mean, low, high = metrics[n]
            cells.append(f"{mean:.4f}" if n.startswith("coverage") else f"{mean:.4f} [{low:.3f},{high:.3f}]")
        lines.append(f"{model:<{width}}  " + "  ".join(f"{c:>21}" for c in cells))
    return "\n".join(lines)
