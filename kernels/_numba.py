"""Numba set-up shared by the CPU kernels. Import it before compiling any parallel kernel.

Host services call the kernels from many threads at once: Numba's default `workqueue`
layer aborts on concurrent parallel regions, so ask for a thread-safe layer (OpenMP or TBB).
Kernels are compiled with cache=True so a restarted service loads them from disk.
"""
import numba

numba.config.THREADING_LAYER = "threadsafe"
