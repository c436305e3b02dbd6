"""Reference top-k: plain NumPy, scores in float64 rounded to float32, then an exact sort.

Ties are decided on the float32 scores a caller sees, by the smaller id. The corpus is
scored in blocks, so no (B, N) matrix is ever held.
"""
import numpy as np

BLOCK_ROWS = 8192


def score_block(q, block, metric):
    """float64 scores of one query against a float64 block of rows."""
    if metric == "ip":
        return block @ q
    if metric == "l2":
        diff = block - q
        return np.einsum("ij,ij->i", diff, diff)
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    q_norm = np.sqrt(q @ q)
    dots = block @ q
    denom = norms * q_norm
    with np.errstate(invalid="ignore"):   # inf / inf: the row is reported below
        scores = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(np.isfinite(norms), scores, np.nan)   # a NaN or inf row is reported, not scored as a zero vector


def topk(queries, corpus, k, metric, exclude):
    """queries float32 (B, d); corpus a NumPy RowTable; exclude None or host (indptr, ids)."""
    B = queries.shape[0]
    N = corpus.shape[0]
    rows = corpus.numpy().dequantize()
    largest_first = metric != "l2"
    scores_out = np.full((B, k), -np.inf if largest_first else np.inf, dtype=np.float32)
    ids_out = np.full((B, k), -1, dtype=np.int64)
    for b in range(B):
        q = queries[b].astype(np.float64)
        scores = np.concatenate([score_block(q, rows[i:i + BLOCK_ROWS].astype(np.float64), metric)
                                 for i in range(0, N, BLOCK_ROWS)] or [np.zeros(0)]).astype(np.float32)
        if not np.isfinite(scores).all():
            raise ValueError("corpus contains NaN or inf (a score came out non-finite)")
        allowed = np.ones(N, dtype=bool)
        if exclude is not None:
            indptr, excluded = exclude
            allowed[excluded[indptr[b]:indptr[b + 1]]] = False
        candidates = np.flatnonzero(allowed)
        key = -scores[candidates] if largest_first else scores[candidates]
        best = candidates[np.lexsort((candidates, key))[:k]]
        scores_out[b, :len(best)] = scores[best]
        ids_out[b, :len(best)] = best
    return scores_out, ids_out
