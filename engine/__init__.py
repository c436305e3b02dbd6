"""recscore: real-time recommendation scoring on fast embedding, top-k and quantized-matmul kernels.
`recscore.Engine` is the embeddable recommender; `recscore.kernels` the kernels under it."""
__version__ = "0.1.0"


def __getattr__(name):   # imported on first use, so `recscore --help` does not load the kernels
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module 'recscore' has no attribute {name!r}")
