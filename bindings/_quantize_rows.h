/* Row storage conversions of quantize_rows on the CPU: the driver (no intrinsics; compiled without
 * target flags). The conversions live in _quantize_rows_simd.h, compiled at every level
 * (rq_*_baseline, _avx2, _avx512, _avx512_vnni); each entry here checks the level against the CPU
 * (rs_level_ok) and runs that level's code over chunks of rows with OpenMP.
 */
#ifndef RQ_QUANTIZE_ROWS_H
#define RQ_QUANTIZE_ROWS_H

#include <stdint.h>

#include "_cpu.h"

#define RQ_LEVEL_FUNCTIONS(suffix)                                                                              \
    void rq_quantize_float_rows##suffix(const float *weights, int64_t first, int64_t last, int64_t dim, int bits, \
                                        uint8_t *codes, float *scale, float *bias);                            \
    void rq_quantize_double_rows##suffix(const double *weights, int64_t first, int64_t last, int64_t dim,        \
                                         int bits, uint8_t *codes, float *scale, float *bias);                 \
    void rq_half_values##suffix(const uint32_t *bits, int64_t first, int64_t last, uint16_t *out);              \
    void rq_bf16_values##suffix(const uint32_t *bits, int64_t first, int64_t last, uint16_t *out);
RQ_LEVEL_FUNCTIONS(_baseline)
RQ_LEVEL_FUNCTIONS(_avx2)
RQ_LEVEL_FUNCTIONS(_avx512)
RQ_LEVEL_FUNCTIONS(_avx512_vnni)

#ifndef SIMD_LEVEL   /* the driver proper: only in the extension's own unit */

typedef struct {
    void (*quantize_float_rows)(const float *, int64_t, int64_t, int64_t, int, uint8_t *, float *, float *);
    void (*quantize_double_rows)(const double *, int64_t, int64_t, int64_t, int, uint8_t *, float *, float *);
    void (*half_values)(const uint32_t *, int64_t, int64_t, uint16_t *);
    void (*bf16_values)(const uint32_t *, int64_t, int64_t, uint16_t *);
} rq_functions;

#define RQ_LEVEL_TABLE(suffix) \
    { rq_quantize_float_rows##suffix, rq_quantize_double_rows##suffix, rq_half_values##suffix, rq_bf16_values##suffix }
static const rq_functions rq_levels[RS_LEVELS] = {
    RQ_LEVEL_TABLE(_baseline), RQ_LEVEL_TABLE(_avx2), RQ_LEVEL_TABLE(_avx512), RQ_LEVEL_TABLE(_avx512_vnni),
};

/* Rows a call of a level's function: one indirect call per row cost as much as a 64-value row. */
#define RQ_CHUNK_ROWS 256

/* weights (rows, dim), float or double (weights_double) -> codes, scale (rows), bias (rows); bits 8 or 4.
 * RS_OK, or RS_ERR_LEVEL for a level this CPU lacks. */
static int rq_quantize_rows(int level, const void *weights, int weights_double, int64_t rows, int64_t dim, int bits,
                            uint8_t *codes, float *scale, float *bias, int num_threads)
{
    if (!rs_level_ok(level))
        return RS_ERR_LEVEL;
    const rq_functions *fn = &rq_levels[level];
    const int64_t chunks = (rows + RQ_CHUNK_ROWS - 1) / RQ_CHUNK_ROWS;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        const int64_t first = chunk * RQ_CHUNK_ROWS, last = first + RQ_CHUNK_ROWS < rows ? first + RQ_CHUNK_ROWS : rows;
        if (weights_double)
            fn->quantize_double_rows((const double *)weights, first, last, dim, bits, codes, scale, bias);
        else
            fn->quantize_float_rows((const float *)weights, first, last, dim, bits, codes, scale, bias);
    }
    return RS_OK;
}

/* (rows, dim) float32 bit patterns -> half (to_bf16 0) or bfloat16 (to_bf16 1) bits. RS_OK, or
 * RS_ERR_LEVEL for a level this CPU lacks. */
static int rq_narrow_rows(int level, const uint32_t *bits, int64_t rows, int64_t dim, int to_bf16, uint16_t *out,
                          int num_threads)
{
    if (!rs_level_ok(level))
        return RS_ERR_LEVEL;
    const rq_functions *fn = &rq_levels[level];
    const int64_t chunks = (rows + RQ_CHUNK_ROWS - 1) / RQ_CHUNK_ROWS;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        const int64_t first = chunk * RQ_CHUNK_ROWS, last = first + RQ_CHUNK_ROWS < rows ? first + RQ_CHUNK_ROWS : rows;
        (to_bf16 ? fn->bf16_values : fn->half_values)(bits, first * dim, last * dim, out);
    }
    return RS_OK;
}

#endif
#endif
