/* Quantized matmul with AVX-512 VNNI integer dot products, llama.cpp style.
 *
 * Activations are quantized per block of 32 to int8 (d = max|x| / 127, q = rint(x / d)) and
 * stored as q + 128 (uint8), because vpdpbusd multiplies unsigned by signed bytes. Weights are
 * signed codes per block of 32 (q8_0, int8 read in place; q5_0, q4_k, int4 decoded into a small
 * per-tile buffer). Per block: isum = sum((q + 128) * w) - 128 * sum(w) = sum(q * w) exactly in
 * int32 (the -128 * sum(w) term is computed once per weight block and seeds vpdpbusd), and
 * out += float(isum) * (weight scale * d), accumulated in float32. q4_k's mins term,
 * dmin * m * sum(x), uses the exact float sum of x over the block.
 *
 * Parallel over tiles of 4 weight rows (OpenMP, static schedule: each thread streams a
 * contiguous range of rows); each tile's rows are multiplied with 4 activation rows at a time
 * from registers, so a weight block is loaded once per 4 activation rows.
 *
 * Only the functions marked VNNI use those instructions; callers check qmv_has_vnni() first,
 * so the extension itself runs on any x86-64 CPU.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define QMV_ROWS 4      /* weight rows per tile */
#define QMV_XROWS 4     /* activation rows per register block */

/* Format ids: those of recscore.kernels.qmatmul.cpu.FORMAT_IDS. */
enum { QMV_Q8_0 = 0, QMV_Q5_0 = 1, QMV_Q4_K = 2, QMV_INT8 = 4, QMV_INT4 = 5 };

static int qmv_has_vnni(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

VNNI static inline float qmv_fp16(const uint8_t *p)
{
    uint16_t bits;
    memcpy(&bits, p, 2);
    return _cvtsh_ss(bits);
}

/* x (M, K) -> xu (M, K) = q + 128, xd (M, K/32) = d, xsum (M, K/32) = sum of x per block. */
VNNI static void qmv_quantize_x(const float *x, int64_t n_blocks, uint8_t *xu, float *xd, float *xsum)
{
    for (int64_t i = 0; i < n_blocks; i++) {
        __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* round to nearest even (the default MXCSR mode); |q| <= 127 */
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inverse));
        __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse));
        __m512i offset = _mm512_set1_epi32(128);
        _mm_storeu_si128((__m128i *)(xu + 32 * i), _mm512_cvtepi32_epi8(_mm512_add_epi32(qa, offset)));
        _mm_storeu_si128((__m128i *)(xu + 32 * i + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(qb, offset)));
        xd[i] = amax / 127.0f;
        xsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
}

/* One weight row prepared for the dot products: block b's 32 signed codes at codes + b * stride,
 * its scale, -128 * sum(codes) per int32 lane, and (q4_k) dmin * m. */
typedef struct {
    const int8_t *codes;
    int64_t stride;
    float *scale;
    __m256i *neg_sum;
    float *min;
} qmv_row;

VNNI static inline __m256i qmv_nibbles(__m128i bytes)
{
    __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
    __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
}

/* Weight row r -> row (scales, -128 * sums, codes: in place or decoded into `decoded`). */
VNNI static void qmv_prepare_row(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales,
                                 int64_t group_size, int64_t K, int64_t r, int8_t *decoded, qmv_row *row)
{
    const int64_t nb = K / 32;
    const uint8_t *src = data + r * row_bytes;
    const __m256i eight = _mm256_set1_epi8(8), sixteen = _mm256_set1_epi8(16);
    row->codes = (const int8_t *)decoded;
    row->stride = 32;
    if (fmt == QMV_Q8_0) {
        row->codes = (const int8_t *)src + 2;
        row->stride = 34;
        for (int64_t b = 0; b < nb; b++)
            row->scale[b] = qmv_fp16(src + 34 * b);
    } else if (fmt == QMV_INT8) {
        row->codes = (const int8_t *)src;
        for (int64_t b = 0; b < nb; b++)
            row->scale[b] = scales[r * (K / group_size) + b * 32 / group_size];
    } else if (fmt == QMV_INT4) {
        /* byte j of a group holds element j (low nibble) and j + group/2 (high nibble) */
        const int64_t groups = K / group_size, half = group_size / 2;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *group = src + g * half;
            if (group_size == 32) {
                __m256i q = qmv_nibbles(_mm_loadu_si128((const __m128i *)group));
                _mm256_storeu_si256((__m256i *)(decoded + g * 32), _mm256_sub_epi8(q, eight));
            } else {   /* group_size a multiple of 64: a block is 32 low or 32 high nibbles */
                for (int64_t j = 0; j < half; j += 32) {
                    __m256i bytes = _mm256_loadu_si256((const __m256i *)(group + j));
                    __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
                    __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
                    _mm256_storeu_si256((__m256i *)(decoded + g * group_size + j), _mm256_sub_epi8(low, eight));
                    _mm256_storeu_si256((__m256i *)(decoded + g * group_size + half + j), _mm256_sub_epi8(high, eight));
                }
            }
        }
        for (int64_t b = 0; b < nb; b++)
            row->scale[b] = scales[r * groups + b * 32 / group_size];
    } else if (fmt == QMV_Q5_0) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *block = src + 22 * b;
            uint32_t qh;
            memcpy(&qh, block + 2, 4);
            __m256i q = qmv_nibbles(_mm_loadu_si128((const __m128i *)(block + 6)));
            q = _mm256_or_si256(q, _mm256_maskz_mov_epi8((__mmask32)qh, sixteen));
            _mm256_storeu_si256((__m256i *)(decoded + 32 * b), _mm256_sub_epi8(q, sixteen));
            row->scale[b] = qmv_fp16(block);
        }
    } else {   /* QMV_Q4_K: sub-block s takes nibble s % 2 of bytes 32 * (s / 2) .. + 32 */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 144 * sb;
            const float d = qmv_fp16(block), dmin = qmv_fp16(block + 2);
            const uint8_t *packed = block + 4;
            for (int s = 0; s < 8; s++) {
                int sc, m;
                if (s < 4) {
                    sc = packed[s] & 63;
                    m = packed[s + 4] & 63;
                } else {
                    sc = (packed[s + 4] & 15) | ((packed[s - 4] >> 6) << 4);
                    m = (packed[s + 4] >> 4) | ((packed[s] >> 6) << 4);
                }
                row->scale[8 * sb + s] = d * (float)sc;
                row->min[8 * sb + s] = dmin * (float)m;
            }
            for (int p = 0; p < 4; p++) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(block + 16 + 32 * p));
                __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
                _mm256_storeu_si256((__m256i *)(decoded + 256 * sb + 64 * p), low);
                _mm256_storeu_si256((__m256i *)(decoded + 256 * sb + 64 * p + 32), high);
            }
        }
    }
    const __m256i minus_128 = _mm256_set1_epi8((char)0x80);   /* as unsigned: 128 */
    for (int64_t b = 0; b < nb; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(row->codes + b * row->stride));
        row->neg_sum[b] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                           _mm256_dpbusd_epi32(_mm256_setzero_si256(), minus_128, w));
    }
}

/* out[m, c] for XR activation rows (m0..) and 4 weight rows; XR is a constant in each caller. */
#define QMV_BLOCK_KERNEL(NAME, XR)                                                                      \
VNNI static inline void NAME(const qmv_row *rows, const uint8_t *xu, const float *xd, int64_t K,       \
                             int64_t m0, float result[QMV_XROWS][QMV_ROWS])                             \
{                                                                                                       \
    const int64_t nb = K / 32;                                                                          \
    __m256 acc[XR][QMV_ROWS];                                                                           \
    for (int m = 0; m < XR; m++)                                                                        \
        for (int r = 0; r < QMV_ROWS; r++)                                                              \
            acc[m][r] = _mm256_setzero_ps();                                                            \
    for (int64_t b = 0; b < nb; b++) {                                                                  \
        __m256i w[QMV_ROWS], seed[QMV_ROWS];                                                            \
        __m256 ws[QMV_ROWS];                                                                            \
        _Pragma("GCC unroll 4")                                                                         \
        for (int r = 0; r < QMV_ROWS; r++) {                                                            \
            w[r] = _mm256_loadu_si256((const __m256i *)(rows[r].codes + b * rows[r].stride));           \
            seed[r] = rows[r].neg_sum[b];                                                               \
            ws[r] = _mm256_set1_ps(rows[r].scale[b]);                                                   \
        }                                                                                               \
        _Pragma("GCC unroll 4")                                                                         \
        for (int m = 0; m < XR; m++) {                                                                  \
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xu + (m0 + m) * K + 32 * b));             \
            __m256 xs = _mm256_set1_ps(xd[(m0 + m) * nb + b]);                                          \
            _Pragma("GCC unroll 4")                                                                     \
            for (int r = 0; r < QMV_ROWS; r++) {                                                        \
                __m256i isum = _mm256_dpbusd_epi32(seed[r], xv, w[r]);                                  \
                acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(ws[r], xs), acc[m][r]); \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    for (int m = 0; m < XR; m++)                                                                        \
        _Pragma("GCC unroll 4")                                                                         \
        for (int r = 0; r < QMV_ROWS; r++) {                                                            \
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m][r]), _mm256_extractf128_ps(acc[m][r], 1)); \
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                                     \
            result[m][r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));                            \
        }                                                                                               \
}

QMV_BLOCK_KERNEL(qmv_block_4, 4)
QMV_BLOCK_KERNEL(qmv_block_1, 1)

/* sum(a[i] * b[i]) for n a multiple of 8 */
VNNI static inline float qmv_dot8(const float *a, const float *b, int64_t n)
{
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out (M, N) = x (M, K) @ W.T for W (N, K) in format fmt (row_bytes per row; scales for int8/int4).
 * K is a multiple of 32 (256 for q4_k). Returns 0, or -1 when memory runs out. */
VNNI static int qmv_matmul(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales,
                           int64_t group_size, int64_t N, int64_t K, const float *x, int64_t M,
                           float *out, int num_threads)
{
    const int64_t nb = K / 32, n_tiles = (N + QMV_ROWS - 1) / QMV_ROWS;
    uint8_t *xu = malloc((size_t)(M * K));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb));
    float *xsum = malloc(sizeof(float) * (size_t)(M * nb));
    int failed = xu == NULL || xd == NULL || xsum == NULL;
    if (!failed)
        qmv_quantize_x(x, M * nb, xu, xd, xsum);
    #pragma omp parallel num_threads(num_threads) if (!failed && n_tiles > 1)
    {
        /* per thread: decoded codes, scales, mins, -128 * sums of a tile of rows */
        int8_t *decoded = malloc((size_t)(QMV_ROWS * K));
        float *row_floats = malloc(sizeof(float) * (size_t)(2 * QMV_ROWS * nb));
        __m256i *neg_sums = aligned_alloc(32, sizeof(__m256i) * (size_t)(QMV_ROWS * nb));
        const int ready = decoded != NULL && row_floats != NULL && neg_sums != NULL && !failed;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        qmv_row rows[QMV_ROWS];
        float result[QMV_XROWS][QMV_ROWS];
        /* every thread meets the worksharing loop; one without its buffers skips its tiles */
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ready)
                continue;
            const int64_t first = t * QMV_ROWS;
            for (int r = 0; r < QMV_ROWS; r++) {
                rows[r].scale = row_floats + r * nb;
                rows[r].min = row_floats + (QMV_ROWS + r) * nb;
                rows[r].neg_sum = neg_sums + r * nb;
                /* rows past N repeat the last row; their results are dropped */
                const int64_t w_row = first + r < N ? first + r : N - 1;
                qmv_prepare_row(fmt, data, row_bytes, scales, group_size, K, w_row, decoded + r * K, &rows[r]);
            }
            const int n_rows = N - first < QMV_ROWS ? (int)(N - first) : QMV_ROWS;
            for (int64_t m0 = 0; m0 < M; ) {
                const int xr = M - m0 >= QMV_XROWS ? QMV_XROWS : 1;
                if (xr == QMV_XROWS)
                    qmv_block_4(rows, xu, xd, K, m0, result);
                else
                    qmv_block_1(rows, xu, xd, K, m0, result);
                for (int m = 0; m < xr; m++)
                    for (int r = 0; r < n_rows; r++) {
                        float value = result[m][r];
                        if (fmt == QMV_Q4_K)
                            value -= qmv_dot8(rows[r].min, xsum + (m0 + m) * nb, nb);
                        out[(m0 + m) * N + first + r] = value;
                    }
                m0 += xr;
            }
        }
        free(decoded);
        free(row_floats);
        free(neg_sums);
    }
    free(xu);
    free(xd);
    free(xsum);
    return failed ? -1 : 0;
}
