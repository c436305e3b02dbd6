"""recscore: real-time recommendation scoring on fast embedding, top-k and quantized-matmul kernels."""
__version__ = "0.1.0"
