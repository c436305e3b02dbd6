# cython: language_level=3
"""The CPU's vector level (C in _cpu.h): what every kernel entry checks before it runs."""

cdef extern from "_cpu.h" nogil:
    int rs_cpu_level()


def detected_level():
    """The best level this CPU and OS run: 0 baseline, 1 AVX2 (+FMA, F16C, BMI2), 2 AVX-512 (F/BW/DQ/VL),
    3 AVX-512 with VNNI."""
    return rs_cpu_level()
