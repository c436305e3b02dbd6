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
