/* The measured ceiling of int8 GEMM on blocked weight formats (bench/qmatmul_ceiling.py).
 *
 * Two bare AVX-512 VNNI kernels over the same panel layout as recscore's qmatmul (16 weight rows per
 * vpdpbusd, 4 activation rows x 2 panels per register block, 2 OpenMP threads), doing only the work
 * each kind of format cannot avoid:
 *   blocked:    GGUF-style formats (a float scale per 32 weights and per 32 activations): int32 sums per
 *               block, then per block and output pair a convert, a scale product and a fused add;
 *   per_tensor: what torch's dynamic int8 Linear does (one scale per row and per tensor): int32 sums over
 *               all of K, one convert at the end.
 * No decoding, no bias terms, no edges (M % 4 == 0, N % 32 == 0, K % 32 == 0): a lower bound on the work.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 16          /* weight rows per panel */
#define BLOCK_CODES 512  /* bytes of codes per panel and block of 32 weights */

static void tile_blocked(const uint8_t *p0, const uint8_t *p1, const float *s0, const float *s1,
                         const uint8_t *x, const float *xd, int64_t K, int64_t m0, int64_t N, int64_t col, float *out)
{
    const int64_t nb = K / 32;
    __m512 acc[4][2];
    for (int m = 0; m < 4; m++)
        acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i isum[4][2];
        for (int m = 0; m < 4; m++)
            isum[m][0] = isum[m][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m512i c0 = _mm512_load_si512(p0 + b * BLOCK_CODES + 64 * j);
            const __m512i c1 = _mm512_load_si512(p1 + b * BLOCK_CODES + 64 * j);
            for (int m = 0; m < 4; m++) {
                const __m512i a = _mm512_set1_epi32(*(const int32_t *)(x + (m0 + m) * K + 32 * b + 4 * j));
                isum[m][0] = _mm512_dpbusd_epi32(isum[m][0], a, c0);
                isum[m][1] = _mm512_dpbusd_epi32(isum[m][1], a, c1);
            }
        }
        const __m512 w0 = _mm512_load_ps(s0 + ROWS * b), w1 = _mm512_load_ps(s1 + ROWS * b);
        for (int m = 0; m < 4; m++) {
            const __m512 d = _mm512_set1_ps(xd[(m0 + m) * nb + b]);
            acc[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m][0]), _mm512_mul_ps(w0, d), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m][1]), _mm512_mul_ps(w1, d), acc[m][1]);
        }
    }
    for (int m = 0; m < 4; m++) {
        _mm512_storeu_ps(out + (m0 + m) * N + col, acc[m][0]);
        _mm512_storeu_ps(out + (m0 + m) * N + col + ROWS, acc[m][1]);
    }
}

static void tile_per_tensor(const uint8_t *p0, const uint8_t *p1, const float *s0, const float *s1,
                            const uint8_t *x, const float *xd, int64_t K, int64_t m0, int64_t N, int64_t col, float *out)
{
    const int64_t nb = K / 32;
    __m512i isum[4][2];
    for (int m = 0; m < 4; m++)
        isum[m][0] = isum[m][1] = _mm512_setzero_si512();
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m512i c0 = _mm512_load_si512(p0 + b * BLOCK_CODES + 64 * j);
            const __m512i c1 = _mm512_load_si512(p1 + b * BLOCK_CODES + 64 * j);
            for (int m = 0; m < 4; m++) {
                const __m512i a = _mm512_set1_epi32(*(const int32_t *)(x + (m0 + m) * K + 32 * b + 4 * j));
                isum[m][0] = _mm512_dpbusd_epi32(isum[m][0], a, c0);
                isum[m][1] = _mm512_dpbusd_epi32(isum[m][1], a, c1);
            }
        }
    }
    const __m512 w0 = _mm512_load_ps(s0), w1 = _mm512_load_ps(s1);
    for (int m = 0; m < 4; m++) {
        const __m512 d = _mm512_set1_ps(xd[m0 + m]);
        _mm512_storeu_ps(out + (m0 + m) * N + col, _mm512_mul_ps(_mm512_cvtepi32_ps(isum[m][0]), _mm512_mul_ps(w0, d)));
        _mm512_storeu_ps(out + (m0 + m) * N + col + ROWS, _mm512_mul_ps(_mm512_cvtepi32_ps(isum[m][1]), _mm512_mul_ps(w1, d)));
    }
}

/* out (M, N) = x (M, K) . panels; panels: N / 16 panels of K / 32 blocks of 512 code bytes; scales: N / 16
 * panels of K / 32 x 16 floats. blocked != 0 picks the blocked kernel. Parallel over pairs of panels. */
void ceiling_gemm(int blocked, const uint8_t *panels, const float *scales, const uint8_t *x, const float *xd,
                  int64_t M, int64_t N, int64_t K, float *out, int threads)
{
    const int64_t nb = K / 32, pairs = N / 32;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < pairs; g++) {
        const uint8_t *p0 = panels + 2 * g * nb * BLOCK_CODES, *p1 = p0 + nb * BLOCK_CODES;
        const float *s0 = scales + 2 * g * nb * ROWS, *s1 = s0 + nb * ROWS;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            if (blocked)
                tile_blocked(p0, p1, s0, s1, x, xd, K, m0, N, 32 * g, out);
            else
                tile_per_tensor(p0, p1, s0, s1, x, xd, K, m0, N, 32 * g, out);
        }
    }
}
