from .reference import quantize  # noqa: F401  (placeholder until the Numba kernel lands)
