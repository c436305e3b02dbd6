"""`topk`: exact similarity top-k of queries over an item corpus (the backends: cpu.py, triton.py,
reference.py)."""
import numbers

from .._backend import backend_module, choose_backend, like, to_numpy_float32
from .._rows import as_row_table
from .._validate import FLOAT_DTYPES, check_array, check_choice, check_exclude, check_finite, check_same_device

METRICS = ("ip", "cosine", "l2")
# A k past the corpus only adds padding slots; past this many (B * k) result slots such a k is refused
# (ValueError) rather than allocated (a MemoryError, or gigabytes of -1).
MAX_PADDED_SLOTS = 1 << 26


def check_k(k):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def check_result_size(k, n_queries, n_rows):
    """ValueError for a k beyond the n_rows candidates whose (B, k) result would be huge, or past int64."""
    if k >= 1 << 63:
        raise ValueError(f"k = {k} is past the int64 range")
    if k > n_rows and n_queries * k > MAX_PADDED_SLOTS:
        raise ValueError(f"k = {k} is more than the {n_rows} corpus rows, and a ({n_queries}, {k}) result would "
                         f"be {n_queries * k} slots of padding mostly (at most {MAX_PADDED_SLOTS} are allowed)")


def topk(queries, corpus, k, *, metric="ip", exclude=None):
    """The k best corpus rows per query: (scores float32 (B, k), ids int64 (B, k)), best first.

    Ties go to the smaller id; unfillable slots hold id -1 and score -inf (+inf for "l2").
    exclude: None or CSR (indptr, excluded_ids): query q never returns those ids.
    """
    check_choice("metric", metric, METRICS)
    kind = check_array("queries", queries, 2, FLOAT_DTYPES)
    device = queries.device if kind == "cuda" else None
    corpus = as_row_table(corpus, "corpus")
    check_same_device("corpus", corpus.data, kind, device)
    if corpus.shape[1] != queries.shape[1]:
        raise ValueError(f"queries have d = {queries.shape[1]} but corpus rows have d = {corpus.shape[1]}")
    k = check_k(k)
    check_result_size(k, queries.shape[0], corpus.shape[0])
    check_finite("queries", queries)
    exclude = check_exclude(exclude, queries.shape[0], corpus.shape[0])
    backend = choose_backend(kind)
    if backend == "triton" and kind == "numpy":
        raise ValueError("the triton backend takes torch tensors (CPU tensors under TRITON_INTERPRET=1), "
                         "got NumPy queries")
    if backend == "triton":
        scores, ids = backend_module(__package__, "triton").topk(queries, corpus, k, metric, exclude)
    else:
        scores, ids = backend_module(__package__, backend).topk(to_numpy_float32(queries), corpus, k, metric, exclude)
    return like(scores, kind, device), like(ids, kind, device)
