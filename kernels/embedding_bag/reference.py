"""Reference pooled lookup: plain NumPy, float64 accumulation. What the fast backends are tested against."""
import numpy as np


def lookup(batch, indices, offsets, bags_per_table, pooling, per_sample_weights, bounds):
    """batch: a TableBatch; indices int32/int64, offsets int64 (T*B + 1): validated NumPy arrays.

    Returns float32 (B, sum of D_t). With bounds="skip" an index outside [0, R_t) counts as
    padding; with bounds="error" the caller has already checked the range.
    """
    B = bags_per_table
    tables = [t.numpy() for t in batch.tables]
    out = np.zeros((B, sum(t.shape[1] for t in tables)), dtype=np.float32)
    column = 0
    for t, table in enumerate(tables):
        rows = table.dequantize().astype(np.float64)
        R, D = table.shape
        for b in range(B):
            start, end = offsets[t * B + b], offsets[t * B + b + 1]
            idx = indices[start:end].astype(np.int64)
            valid = (idx >= 0) & (idx < R)
            if not valid.any():
                continue
            picked = rows[idx[valid]]
            if pooling == "sum":
                if per_sample_weights is not None:
                    picked = picked * per_sample_weights[start:end][valid].astype(np.float64)[:, None]
                pooled = picked.sum(axis=0)
            elif pooling == "mean":
                pooled = picked.sum(axis=0) / valid.sum()
            else:
                pooled = picked.max(axis=0)
            out[b, column:column + D] = pooled
        column += D
    return out
