/* Self-attention of packed texts (the text encoder's) on the CPU: the driver. The per-item code lives
 * in _attention_simd.h, compiled at baseline, AVX2 and AVX-512; at_attention checks the level it is
 * asked for against the CPU and runs the best compiled one at or below it.
 *
 * Texts are handed out one at a time (dynamic schedule): they come sorted by length and one costs about
 * length squared, so equal static parts would not cost the same.
 */
#ifndef AT_ATTENTION_H
#define AT_ATTENTION_H

#include <stdint.h>
#include <stdlib.h>

#include "_cpu.h"

#define AT_LEVEL_FUNCTIONS(suffix)                                                                                 \
    void at_texts##suffix(const float *qkv, const float *bias, const int64_t *starts, int64_t n_head,             \
                          int64_t head_dim, int64_t first, int64_t last, float *buffer, float *out);             \
    int at_rows##suffix(void);
AT_LEVEL_FUNCTIONS(_baseline)
AT_LEVEL_FUNCTIONS(_avx2)
AT_LEVEL_FUNCTIONS(_avx512)

#ifndef SIMD_LEVEL   /* the driver proper: only in the extension's own unit */

/* out (T, n_head head_dim) = attention of every text; starts (n_texts + 1) non-decreasing from 0 to T,
 * checked by the caller, as are the shapes. RS_OK, RS_ERR_MEMORY or RS_ERR_LEVEL. */
static int at_attention(int level, const float *qkv, const float *bias, const int64_t *starts, int64_t n_texts,
                        int64_t n_head, int64_t head_dim, float *out, int threads)
{
    if (!rs_level_ok(level))
        return RS_ERR_LEVEL;
    void (*texts)(const float *, const float *, const int64_t *, int64_t, int64_t, int64_t, int64_t, float *, float *) =
        level >= RS_AVX512 ? at_texts_avx512 : level == RS_AVX2 ? at_texts_avx2 : at_texts_baseline;
    const int rows = level >= RS_AVX512 ? at_rows_avx512() : level == RS_AVX2 ? at_rows_avx2() : at_rows_baseline();
    int64_t longest = 0;
    for (int64_t s = 0; s < n_texts; s++)
        longest = starts[s + 1] - starts[s] > longest ? starts[s + 1] - starts[s] : longest;
    const int64_t padded = (longest + 15) / 16 * 16;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (threads > 1 && n_texts > 1)
    {
        float *buffer = malloc(sizeof(float) * (size_t)((3 * n_head * head_dim + rows) * padded + 1));
        if (buffer == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        /* every thread meets the worksharing loop; one without its buffer skips its texts */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < n_texts; s++)
            if (buffer != NULL)
                texts(qkv, bias, starts, n_head, head_dim, s, s + 1, buffer, out);
        free(buffer);
    }
    return failed ? RS_ERR_MEMORY : RS_OK;
}

#endif
#endif
