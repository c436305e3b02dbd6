"""Models trained on interaction data, and the temporal split their settings are chosen on.

Interactions are CSR by user, oldest first: user u's events are rows
`indptr[u]:indptr[u+1]` of `items` (catalogue rows 0..N-1), `values` and `times`.
Training treats every event as an implicit positive (the matrix X is binary).

- PureSVD (factorize.pure_svd): item vectors V (N, rank); a user's scores are x_u V V^T.
- EASE (Steck, WWW 2019): B = I - P diag(1/diag P) with P = (X^T X + lambda I)^-1 and a zero
  diagonal; a user's scores are x_u B. It is fitted on the items with at least `min_support`
  events (the support S): an item with fewer has almost no column to learn, and the inverse
  costs |S|^3 (all 9.7k MovieLens items: 30 s; the 3k with 5 events or more: 1 s).
- The blend served by the engine: score = x_u (ease_weight B + svd_weight V V_S^T) over the
  columns S, with x_u the user's last `max_history` events weighted decay^(age in events).
"""
import dataclasses
import itertools

import numpy as np

from .factorize import pure_svd

HOLD_OUT_FRACTION = 0.2     # each user's last 20% of events (at least one event stays in training)
GRAM_CHUNK_USERS = 4096     # users per dense block when accumulating X^T X


@dataclasses.dataclass
class Interactions:
    indptr: np.ndarray      # int64 (U + 1,)
    items: np.ndarray       # int64 catalogue rows, oldest first within each user
    values: np.ndarray      # float32
    times: np.ndarray       # int64 seconds
    num_items: int

    @property
    def num_users(self):
        return len(self.indptr) - 1

    def counts(self):
        return np.diff(self.indptr)

    def select(self, keep):
        """The events where the boolean mask `keep` is set, same users."""
        users = np.repeat(np.arange(self.num_users), self.counts())
        indptr = np.zeros(self.num_users + 1, np.int64)
        np.cumsum(np.bincount(users[keep], minlength=self.num_users), out=indptr[1:])
        return Interactions(indptr, self.items[keep], self.values[keep], self.times[keep], self.num_items)


def temporal_split(interactions, fraction=HOLD_OUT_FRACTION):
    """(train, held_out): each user's last ceil(fraction * n) events held out, keeping one in train."""
    counts = interactions.counts()
    held = np.minimum(np.ceil(counts * fraction).astype(np.int64), np.maximum(counts - 1, 0))
    users = np.repeat(np.arange(interactions.num_users), counts)
    position = np.arange(len(users)) - interactions.indptr[users]
    is_held = position >= (counts - held)[users]
    return interactions.select(~is_held), interactions.select(is_held)


def popularity(interactions):
    """Events per catalogue row, float32."""
    return np.bincount(interactions.items, minlength=interactions.num_items).astype(np.float32)


def support_of(interactions, min_support):
    """Catalogue rows with at least min_support events: the columns of the item-item models."""
    return np.flatnonzero(popularity(interactions) >= min_support).astype(np.int64)


def gram(interactions, support):
    """X^T X over the columns `support` (float64), X the binary user x item matrix."""
    column = np.full(interactions.num_items, -1, np.int64)
    column[support] = np.arange(len(support))
    G = np.zeros((len(support), len(support)), np.float64)
    for start in range(0, interactions.num_users, GRAM_CHUNK_USERS):
        stop = min(start + GRAM_CHUNK_USERS, interactions.num_users)
        lo, hi = interactions.indptr[start], interactions.indptr[stop]
        users = np.repeat(np.arange(stop - start), np.diff(interactions.indptr[start:stop + 1]))
        cols = column[interactions.items[lo:hi]]
        X = np.zeros((stop - start, len(support)), np.float32)
        X[users[cols >= 0], cols[cols >= 0]] = 1.0
        G += (X.T @ X).astype(np.float64)
    return G


def ease(G, lam):
    """EASE weights B (float32, |S| x |S|, zero diagonal) from the Gram matrix and L2 weight lam."""
    if not lam > 0:
        raise ValueError(f"lambda must be > 0, got {lam}")
    A = G.copy()
    A[np.diag_indices_from(A)] += lam
    P = np.linalg.inv(A)
    B = P / (-np.diag(P))
    B[np.diag_indices_from(B)] = 0.0
    return B.astype(np.float32)


def item_knn(G, support_counts):
    """ItemKNN baseline weights: cosine similarity of item columns (zero diagonal), float32."""
    norm = np.sqrt(np.maximum(support_counts, 1.0))
    S = G / norm[:, None] / norm[None, :]
    S[np.diag_indices_from(S)] = 0.0
    return S.astype(np.float32)


def svd_vectors(interactions, rank):
    """PureSVD item vectors (N, rank) of the binary interaction matrix."""
    rank = min(rank, interactions.num_users, interactions.num_items)
    return pure_svd(interactions.indptr, interactions.items, np.ones(len(interactions.items), np.float32),
                    interactions.num_items, rank=rank)


def blend_matrix(item_vectors, ease_weights, support, ease_weight, svd_weight):
    """The served item-item matrix M (N x |S|, float32): row j holds what one event on item j adds to
    the scores of the columns S: ease_weight B[j] (rows outside S have none) + svd_weight V_j V_S^T."""
    num_items = item_vectors.shape[0]
    M = np.zeros((num_items, len(support)), np.float32)
    if svd_weight:
        M += svd_weight * (item_vectors @ item_vectors[support].T)
    if ease_weight:
        M[support] += ease_weight * ease_weights
    return M


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """How the engine scores: `scorer` "blend" (item-item matrix over S) or "puresvd" (item vectors)."""
    scorer: str = "blend"
    ease_lambda: float = 100.0
    min_support: int = 5
    svd_rank: int = 64
    ease_weight: float = 1.0
    svd_weight: float = 1.0
    decay: float = 0.9
    max_history: int = 64
    index_dtype: str = "fp32"   # "puresvd": the item rows its index scans ("fp32" or "int8", kernels' row dtypes)

    def as_dict(self):
        return dataclasses.asdict(self)


# The grid searched on validation: every combination, each scored with the served code path.
TUNING_GRID = {
    "ease_lambda": (100.0, 200.0, 400.0, 800.0),
    "svd_weight": (0.0, 0.3, 1.0, 2.0),
    "decay": (1.0, 0.95, 0.9, 0.8),
}


def tune(interactions, evaluate_config, grid=TUNING_GRID, base=ServingConfig(), metric="ndcg@20", log=None):
    """The ServingConfig with the best `metric` on validation, and every result.

    Validation: `interactions` (a training set: never the test part) is split again in time; each
    candidate is fitted on the earlier part and scored on the later one by evaluate_config(config,
    fit, validation) -> {metric: value}. The blend is linear, so the fits are shared per lambda.
    """
    fit, validation = temporal_split(interactions)
    results = []
    for values in itertools.product(*grid.values()):
        config = dataclasses.replace(base, **dict(zip(grid, values)))
        scores = evaluate_config(config, fit, validation)
        results.append((config, scores))
        if log:
            log(f"  {_describe(config)}: {metric} {scores[metric]:.4f}")
    best = max(results, key=lambda r: r[1][metric])
    return best[0], results


def _describe(config):
    return (f"lambda {config.ease_lambda:g}, svd weight {config.svd_weight:g}, decay {config.decay:g}")
