"""The scoring path: user history -> pooled user vector -> top-k retrieval minus what was seen.

Both stages go through the public kernel API, so they run on whichever backend the data
selects (CPU kernels for NumPy, Triton for CUDA tensors).
"""
import dataclasses
import time

import numpy as np

from recscore.kernels import TableBatch, topk


@dataclasses.dataclass
class Recommendations:
    scores: np.ndarray       # float32 (B, k), best first
    ids: np.ndarray          # int64 (B, k), -1 where fewer than k items were left
    lookup_ms: float         # pooled embedding lookup
    retrieval_ms: float      # top-k over the catalogue, history excluded


class Recommender:
    """Pools a user's history over `history_table` and retrieves from `item_corpus` by inner product.

    history_table: (N, d) table or quantize_rows result, pooled per user (pooling "mean",
    or "sum" weighted by the history weights); item_corpus: (N, d) or quantize_rows result.
    The table is held as a one-table TableBatch, so its layout is described once, not per request.
    """

    def __init__(self, history_table, item_corpus, pooling="mean", weighted=False):
        self.history = TableBatch([history_table])
        self.item_corpus = item_corpus
        self.pooling = pooling
        self.weighted = weighted

    def recommend(self, history_indptr, history_items, history_weights=None, k=10):
        """Top-k for a batch of users given as CSR histories; seen items are excluded."""
        start = time.perf_counter()
        weights = history_weights if self.weighted else None
        user_vectors = self.history.lookup(history_items, history_indptr, pooling=self.pooling,
                                           per_sample_weights=weights)
        pooled = time.perf_counter()
        scores, ids = topk(user_vectors, self.item_corpus, k, metric="ip",
                           exclude=(history_indptr, history_items))
        done = time.perf_counter()
        return Recommendations(scores, ids, (pooled - start) * 1e3, (done - pooled) * 1e3)


def histories_of(catalogue, users):
    """CSR (indptr, items, weights) of the given users' histories."""
    users = np.asarray(users, dtype=np.int64)
    starts, ends = catalogue.history_indptr[users], catalogue.history_indptr[users + 1]
    lengths = ends - starts
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
    return indptr, catalogue.history_items[take], catalogue.history_weights[take]
