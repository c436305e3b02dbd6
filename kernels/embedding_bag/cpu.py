from .reference import lookup  # noqa: F401  (placeholder until the Numba kernel lands)
