from .reference import topk  # noqa: F401  (placeholder until the Numba kernel lands)
