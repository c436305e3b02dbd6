/* The codes the Python backends pass to the kernels, defined here only: every C unit includes this
 * file and recscore.bindings._cpu exposes them to Python (DTYPE_CODES, POOLING_CODES, METRIC_CODES,
 * QMATMUL_FORMAT_IDS), so C, the CPU backends and the Triton backends cannot disagree.
 */
#ifndef RS_CODES_H
#define RS_CODES_H

/* Row dtypes of embedding-bag tables and top-k corpora. */
enum { RS_DTYPE_FP32 = 0, RS_DTYPE_FP16 = 1, RS_DTYPE_BF16 = 2, RS_DTYPE_INT8 = 3, RS_DTYPE_INT4 = 4, RS_DTYPES = 5 };
/* Embedding-bag pooling modes. */
enum { RS_POOL_SUM = 0, RS_POOL_MEAN = 1, RS_POOL_MAX = 2, RS_POOLINGS = 3 };
/* Top-k metrics. */
enum { RS_METRIC_IP = 0, RS_METRIC_COSINE = 1, RS_METRIC_L2 = 2, RS_METRICS = 3 };
/* Quantized-matmul matrix formats. */
enum {
    RS_QM_Q8_0 = 0, RS_QM_Q5_0 = 1, RS_QM_Q4_K = 2, RS_QM_Q6_K = 3, RS_QM_INT8 = 4, RS_QM_INT4 = 5, RS_QM_F16 = 6,
    RS_QM_FORMATS = 7
};

/* Top-k selection keys: (order-preserving int32 of the score) << 32 | (~row id); the key of score -inf
 * with id 0, which every finite score's key is above (excluded rows and padding get it). */
#define RS_TOPK_FLOOR_KEY ((long long)(((unsigned long long)(unsigned int)-2139095041 << 32) | 0xFFFFFFFFULL))

#endif
