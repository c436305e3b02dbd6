"""Item vectors from a ratings matrix: PureSVD (Cremonesi, Koren & Turrin, RecSys 2010).

The user-item matrix R (ratings, zeros where unrated) is factorised by a truncated SVD,
R ~ U S V^T. A user's scores are the fold-in r_u V V^T: the user vector r_u V is exactly a
rating-weighted pooled sum of item rows of V over the user's history, so recommendation is
one `embedding_bag` (pooling="sum", per_sample_weights=ratings) and one `topk` (metric="ip")
against the same V. The SVD comes from the small U x U Gram matrix R R^T (610 x 610 for
MovieLens small), which takes well under a second.
"""
import numpy as np


def pure_svd(history_indptr, history_items, history_weights, num_items, rank=64):
    """float32 item vectors V (num_items, rank) of the truncated SVD of the user x item matrix."""
    num_users = len(history_indptr) - 1
    users = np.repeat(np.arange(num_users), np.diff(history_indptr))
    R = np.zeros((num_users, num_items), dtype=np.float64)
    R[users, history_items] = history_weights
    gram = R @ R.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)           # ascending
    top = np.argsort(eigenvalues)[::-1][:rank]
    singular = np.sqrt(np.maximum(eigenvalues[top], 1e-12))
    V = (R.T @ eigenvectors[:, top]) / singular                 # right singular vectors
    return np.ascontiguousarray(V, dtype=np.float32)
