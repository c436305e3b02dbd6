# cython: language_level=3
"""The CPU's vector level (C in _cpu.h): what every kernel entry checks before it runs; and the codes
the backends pass to the kernels (C in _codes.h, their one definition), by name."""

cdef extern from "_cpu.h" nogil:
    int rs_cpu_level()

cdef extern from "_codes.h":
    enum:
        RS_DTYPE_FP32, RS_DTYPE_FP16, RS_DTYPE_BF16, RS_DTYPE_INT8, RS_DTYPE_INT4
        RS_POOL_SUM, RS_POOL_MEAN, RS_POOL_MAX
        RS_METRIC_IP, RS_METRIC_COSINE, RS_METRIC_L2
        RS_QM_Q8_0, RS_QM_Q5_0, RS_QM_Q4_K, RS_QM_Q6_K, RS_QM_INT8, RS_QM_INT4, RS_QM_F16
    long long RS_TOPK_FLOOR_KEY


DTYPE_CODES = {"fp32": RS_DTYPE_FP32, "fp16": RS_DTYPE_FP16, "bf16": RS_DTYPE_BF16, "int8": RS_DTYPE_INT8,
               "int4": RS_DTYPE_INT4}
POOLING_CODES = {"sum": RS_POOL_SUM, "mean": RS_POOL_MEAN, "max": RS_POOL_MAX}
METRIC_CODES = {"ip": RS_METRIC_IP, "cosine": RS_METRIC_COSINE, "l2": RS_METRIC_L2}
QMATMUL_FORMAT_IDS = {"q8_0": RS_QM_Q8_0, "q5_0": RS_QM_Q5_0, "q4_k": RS_QM_Q4_K, "q6_k": RS_QM_Q6_K,
                      "int8": RS_QM_INT8, "int4": RS_QM_INT4, "f16": RS_QM_F16}
TOPK_FLOOR_KEY = RS_TOPK_FLOOR_KEY


def detected_level():
    """The best level this CPU and OS run: 0 baseline, 1 AVX2 (+FMA, F16C, BMI2), 2 AVX-512 (F/BW/DQ/VL),
    3 AVX-512 with VNNI."""
    return rs_cpu_level()
