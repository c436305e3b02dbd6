/* Quantized matmul and row decoding on the CPU: the driver (no intrinsics; compiled without target flags).
 *
 * The kernels live in _qmatmul_simd.h, written once against _simd.h and compiled at every level
 * (qm_*_baseline, _avx2, _avx512, _avx512_vnni); each entry here checks the level against the CPU
 * (rs_level_ok) and calls that level's code. The level units include this file too, for the format
 * ids and the matrix description, and so that their definitions are checked against the prototypes.
 *
 * The int8-activation path (q8_0, q5_0, q4_k, q6_k, int8, int4): activations quantized per block to int8
 * (llama.cpp's Q8_0 activations: d = max|x| / 127, q = rint(x / d); 32 values a block, an int8/int4 weight
 * group: qm_span), exact integer dot products per block (the same integers at every level), float32
 * scaling per block (per 16 weights for q6_k).
 * M = 1 and large matrices: the row kernel reads the packed rows (qm_matmul); M >= 2: 16- or 8-row
 * panels repacked once per matrix and level (qm_repack, qm_panel_matmul). f16 rows and group sizes the
 * integer path does not take: float32 activations (qm_float_matmul). take/dequantize: qm_take, equal to
 * reference.py bit for bit. See bench/notes/cpu-qmatmul.md.
 */
#ifndef RS_QMATMUL_H
#define RS_QMATMUL_H

#include <stdint.h>

#include "_codes.h"
#include "_cpu.h"

/* Format ids, by the names the kernels use. */
enum { QM_Q8_0 = RS_QM_Q8_0, QM_Q5_0 = RS_QM_Q5_0, QM_Q4_K = RS_QM_Q4_K, QM_Q6_K = RS_QM_Q6_K, QM_INT8 = RS_QM_INT8,
       QM_INT4 = RS_QM_INT4, QM_F16 = RS_QM_F16, QM_FORMATS = RS_QM_FORMATS };

/* Blocks of 32 values that share one activation scale: an int8/int4 weight group (one int32 sum and one
 * scaling per group, as the GGUF formats have per block of theirs) up to QM_MAX_SPAN blocks, where the int32
 * sums stay far from overflow (|q c| <= 127 * 127 per product: 2048 blocks of 32 reach 1.06e9); else 32. */
#define QM_MAX_SPAN 2048
static inline int64_t qm_span(int fmt, int64_t group_size)
{
    return (fmt == QM_INT8 || fmt == QM_INT4) && group_size % 32 == 0 && group_size / 32 <= QM_MAX_SPAN
           ? group_size / 32 : 1;
}

/* A packed (N, K) matrix, every size checked by the caller (_qmatmul.pyx) against the buffers. */
typedef struct {
    int fmt;
    const uint8_t *data;    /* N rows of row_bytes */
    int64_t row_bytes;
    const float *scales;    /* int8, int4: (N, K / group_size); else NULL */
    int64_t group_size;     /* int8, int4: weights per scale */
    int64_t N, K;
} qm_matrix;

/* One level's kernels; each returns RS_OK or RS_ERR_MEMORY. */
#define QM_LEVEL_KERNELS(suffix)                                                                               \
    int qm_matmul##suffix(const qm_matrix *w, const float *x, int64_t M, float *out, int threads);            \
    int64_t qm_panel_bytes##suffix(int64_t N, int64_t K);                                                      \
    int qm_repack##suffix(const qm_matrix *w, uint8_t *panels, int threads);                                   \
    int qm_panel_matmul##suffix(int fmt, const uint8_t *panels, int64_t N, int64_t K, int64_t group_size,         \
                                const float *x, int64_t M, \
                                float *out, int threads);                                                      \
    int qm_streamed_panel_matmul##suffix(const qm_matrix *w, const float *x, int64_t M, float *out, int threads); \
    int qm_float_matmul##suffix(const qm_matrix *w, const float *x, int64_t M, float *out, int threads);      \
    int qm_take##suffix(const qm_matrix *w, const int64_t *rows, int64_t n_rows, float *out, int threads);
QM_LEVEL_KERNELS(_baseline)
QM_LEVEL_KERNELS(_avx2)
QM_LEVEL_KERNELS(_avx512)
QM_LEVEL_KERNELS(_avx512_vnni)

#ifndef SIMD_LEVEL   /* the driver proper: only in the extension's own unit */

typedef struct {
    int (*matmul)(const qm_matrix *, const float *, int64_t, float *, int);
    int64_t (*panel_bytes)(int64_t, int64_t);
    int (*repack)(const qm_matrix *, uint8_t *, int);
    int (*panel_matmul)(int, const uint8_t *, int64_t, int64_t, int64_t, const float *, int64_t, float *, int);
    int (*streamed_panel_matmul)(const qm_matrix *, const float *, int64_t, float *, int);
    int (*float_matmul)(const qm_matrix *, const float *, int64_t, float *, int);
    int (*take)(const qm_matrix *, const int64_t *, int64_t, float *, int);
} qm_kernels;

#define QM_LEVEL_TABLE(suffix)                                                                                 \
    { qm_matmul##suffix, qm_panel_bytes##suffix, qm_repack##suffix, qm_panel_matmul##suffix,                 \
      qm_streamed_panel_matmul##suffix, qm_float_matmul##suffix, qm_take##suffix }
static const qm_kernels qm_levels[RS_LEVELS] = {
    QM_LEVEL_TABLE(_baseline), QM_LEVEL_TABLE(_avx2), QM_LEVEL_TABLE(_avx512), QM_LEVEL_TABLE(_avx512_vnni),
};

static int qm_matmul(int level, const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
{
    return rs_level_ok(level) ? qm_levels[level].matmul(w, x, M, out, threads) : RS_ERR_LEVEL;
}

/* Bytes of the panels of an (N, K) matrix at `level` (-1 for a level this CPU lacks). */
static int64_t qm_panel_bytes(int level, int64_t N, int64_t K)
{
    return rs_level_ok(level) ? qm_levels[level].panel_bytes(N, K) : -1;
}

static int qm_repack(int level, const qm_matrix *w, uint8_t *panels, int threads)
{
    return rs_level_ok(level) ? qm_levels[level].repack(w, panels, threads) : RS_ERR_LEVEL;
}

static int qm_panel_matmul(int level, int fmt, const uint8_t *panels, int64_t N, int64_t K, int64_t group_size,
                           const float *x, int64_t M, float *out, int threads)
{
    return rs_level_ok(level) ? qm_levels[level].panel_matmul(fmt, panels, N, K, group_size, x, M, out, threads)
                              : RS_ERR_LEVEL;
}

static int qm_streamed_panel_matmul(int level, const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
{
    return rs_level_ok(level) ? qm_levels[level].streamed_panel_matmul(w, x, M, out, threads) : RS_ERR_LEVEL;
}

static int qm_float_matmul(int level, const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
{
    return rs_level_ok(level) ? qm_levels[level].float_matmul(w, x, M, out, threads) : RS_ERR_LEVEL;
}

static int qm_take(int level, const qm_matrix *w, const int64_t *rows, int64_t n_rows, float *out, int threads)
{
    return rs_level_ok(level) ? qm_levels[level].take(w, rows, n_rows, out, threads) : RS_ERR_LEVEL;
}

#endif
#endif
