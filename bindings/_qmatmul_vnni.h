/* Quantized matmul with AVX-512 VNNI integer dot products, llama.cpp style.
 *
 * Activations are quantized per block of 32 to int8 (d = max|x| / 127, q = rint(x / d)) and
 * stored as q + 128 (uint8), because vpdpbusd multiplies unsigned by signed bytes. Per block of
 * 32 weights and activation row, the int32 sum of code products is exact, and
 * out += float(isum) * (weight scale * d), accumulated in float32 (q6_k: one weight scale per
 * half block of 16, per group of 4 int32 lanes). q4_k's mins term, dmin * m * sum(x), uses the
 * exact float sum of x over the block.
 *
 * Four kernels:
 * - qmv_gemv_signed (M = 1; q8_0, int8): codes read in place; vpdpbusd(|w|, sign(w) * q).
 * - qmv_gemv_biased (M = 1; q5_0, q4_k, q6_k, int4): codes decoded in registers to their unsigned
 *   form (q5_0 0..31, q4_k 0..15, q6_k 0..63, int4 0..15) and multiplied with signed q; the bias
 *   (16, 0, 32, 8) times each lane's sum of q seeds vpdpbusd, once per call.
 * - qmv_matmul's tiles (M > 1): 4 weight rows decoded once to signed codes (w = code - bias) with
 *   -128 * sum(w) per block, which seeds vpdpbusd(q + 128, w); each tile meets 4 activation rows
 *   at a time in registers, so a decoded weight block is loaded once per 4 activation rows.
 * - qmv_panel_matmul (M > 1): weights repacked once per matrix into panels of 16
 *   rows (qmv_repack; layout below), 16 output rows per vpdpbusd, 2.1-5.7x the tiles on one core.
 * Parallel over rows or tiles of 4 (OpenMP, dynamic schedule in chunks of QMV_CHUNK tiles), but
 * statically split in contiguous ranges for the signed GEMV and the panels (see there).
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
#define QMV_PREFETCH 4096   /* bytes of weight rows prefetched ahead in GEMV */
/* tiles per work item: dynamic scheduling, so a thread that the OS preempts (a busy host) does not
 * hold up the call with its fixed share, in chunks long enough to keep each stream contiguous */
#define QMV_CHUNK 8

/* Format ids: those of recscore.kernels.qmatmul.cpu.FORMAT_IDS. */
enum { QMV_Q8_0 = 0, QMV_Q5_0 = 1, QMV_Q4_K = 2, QMV_Q6_K = 3, QMV_INT8 = 4, QMV_INT4 = 5 };

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
 * the scales of its two halves of 16 (scale[2b], scale[2b + 1]: equal except for q6_k, whose
 * sub-blocks are 16 long), -128 * sum(codes) per int32 lane, and (q4_k) dmin * m. */
typedef struct {
    const int8_t *codes;
    int64_t stride;
    float *scale;
    __m256i *neg_sum;
    float *min;
} qmv_row;

static inline void qmv_set_scale(qmv_row *row, int64_t b, float scale)
{
    row->scale[2 * b] = scale;
    row->scale[2 * b + 1] = scale;
}

/* (scale[2b] x 4, scale[2b + 1] x 4): the scale of each int32 lane of block b's dot product */
VNNI static inline __m256 qmv_lane_scales(const float *pair)
{
    const __m128 two = _mm_castpd_ps(_mm_load_sd((const double *)pair));
    return _mm256_permutexvar_ps(_mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0), _mm256_castps128_ps256(two));
}

/* the 6-bit scale and min of sub-block s of a Q4_K super-block from its 12 packed bytes */
static inline void qmv_q4_k_scale_min(const uint8_t *packed, int s, int *sc, int *m)
{
    if (s < 4) {
        *sc = packed[s] & 63;
        *m = packed[s + 4] & 63;
    } else {
        *sc = (packed[s + 4] & 15) | ((packed[s - 4] >> 6) << 4);
        *m = (packed[s + 4] >> 4) | ((packed[s] >> 6) << 4);
    }
}

VNNI static inline __m256i qmv_nibbles(__m128i bytes)
{
    __m128i low = _mm_and_si128(bytes, _mm_set1_epi8(15));
    __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(15));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(low), high, 1);
}

/* Weight row r -> row (scales, -128 * sums, codes: in place or decoded into `decoded`). */
/* Q6_K: the unsigned 6-bit codes (0..63) of the 4 blocks of 32 in half h of a super-block. Block t
 * takes nibble t / 2 of ql[64h + 32 (t % 2) + i] and bits 2t, 2t + 1 of qh[32h + i] (reference._q6_k). */
VNNI static inline void qmv_q6_k_codes(const uint8_t *block, int h, __m256i q[4])
{
    const __m256i low4 = _mm256_set1_epi8(15), low2 = _mm256_set1_epi8(3);
    const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(block + 64 * h));
    const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(block + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(block + 128 + 32 * h));
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_slli_epi16(_mm256_and_si256(qh, low2), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), low2), 4));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), low2), 4));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), low2), 4));
}

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
            qmv_set_scale(row, b, qmv_fp16(src + 34 * b));
    } else if (fmt == QMV_INT8) {
        row->codes = (const int8_t *)src;
        for (int64_t b = 0; b < nb; b++)
            qmv_set_scale(row, b, scales[r * (K / group_size) + b * 32 / group_size]);
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
            qmv_set_scale(row, b, scales[r * groups + b * 32 / group_size]);
    } else if (fmt == QMV_Q5_0) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *block = src + 22 * b;
            uint32_t qh;
            memcpy(&qh, block + 2, 4);
            __m256i q = qmv_nibbles(_mm_loadu_si128((const __m128i *)(block + 6)));
            q = _mm256_or_si256(q, _mm256_maskz_mov_epi8((__mmask32)qh, sixteen));
            _mm256_storeu_si256((__m256i *)(decoded + 32 * b), _mm256_sub_epi8(q, sixteen));
            qmv_set_scale(row, b, qmv_fp16(block));
        }
    } else if (fmt == QMV_Q6_K) {
        /* signed code = q - 32 in [-32, 31] */
        const __m256i bias = _mm256_set1_epi8(32);
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 210 * sb;
            const float d = qmv_fp16(block + 208);
            for (int h = 0; h < 2; h++) {
                __m256i q[4];
                qmv_q6_k_codes(block, h, q);
                for (int t = 0; t < 4; t++)
                    _mm256_storeu_si256((__m256i *)(decoded + 256 * sb + 128 * h + 32 * t),
                                        _mm256_sub_epi8(q[t], bias));
            }
            /* the 16 int8 scales, in order, are those of the halves of the super-block's 8 blocks */
            const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(block + 192)));
            _mm512_storeu_ps(row->scale + 16 * sb, _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sc)));
        }
    } else {   /* QMV_Q4_K: sub-block s takes nibble s % 2 of bytes 32 * (s / 2) .. + 32 */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 144 * sb;
            const float d = qmv_fp16(block), dmin = qmv_fp16(block + 2);
            const uint8_t *packed = block + 4;
            for (int s = 0; s < 8; s++) {
                int sc, m;
                qmv_q4_k_scale_min(packed, s, &sc, &m);
                qmv_set_scale(row, 8 * sb + s, d * (float)sc);
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

VNNI static inline float qmv_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* lane i of the result = sum of the 8 lanes of vi (by value: an array argument would keep
 * accumulators in memory) */
VNNI static inline __m256 qmv_reduce8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6,
                                      __m256 v7)
{
    const __m256 v0123 = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    const __m256 v4567 = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
    return _mm256_add_ps(_mm256_permute2f128_ps(v0123, v4567, 0x20), _mm256_permute2f128_ps(v0123, v4567, 0x31));
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
            ws[r] = qmv_lane_scales(rows[r].scale + 2 * b);                                             \
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
        for (int r = 0; r < QMV_ROWS; r++)                                                              \
            result[m][r] = qmv_hsum(acc[m][r]);                                                         \
}

QMV_BLOCK_KERNEL(qmv_block_4, 4)
QMV_BLOCK_KERNEL(qmv_block_1, 1)

/* q4_k's mins term: result[m][r] -= sum_b rows[r].min[b] * xsum[(m0 + m) * nb + b] for XR = 4 (or 1)
 * activation rows, as 4 x 4 vector dot products with two 8-way reductions (nb: a multiple of 8). */
VNNI static void qmv_subtract_mins(const qmv_row *rows, const float *xsum, int64_t nb, int64_t m0, int xr,
                                   float result[QMV_XROWS][QMV_ROWS])
{
    __m256 acc[QMV_XROWS][QMV_ROWS];
    for (int m = 0; m < QMV_XROWS; m++)
        for (int r = 0; r < QMV_ROWS; r++)
            acc[m][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b += 8)
        for (int m = 0; m < xr; m++) {
            const __m256 xs = _mm256_loadu_ps(xsum + (m0 + m) * nb + b);
            for (int r = 0; r < QMV_ROWS; r++)
                acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows[r].min + b), xs, acc[m][r]);
        }
    for (int m = 0; m < xr; m += 2) {
        const __m256 sums = qmv_reduce8(acc[m][0], acc[m][1], acc[m][2], acc[m][3],
                                        acc[m + 1][0], acc[m + 1][1], acc[m + 1][2], acc[m + 1][3]);
        _mm_storeu_ps(result[m], _mm_sub_ps(_mm_loadu_ps(result[m]), _mm256_castps256_ps128(sums)));
        if (m + 1 < xr)
            _mm_storeu_ps(result[m + 1], _mm_sub_ps(_mm_loadu_ps(result[m + 1]), _mm256_extractf128_ps(sums, 1)));
    }
}

/* GEMV (M = 1) of the formats whose codes are signed bytes in place (q8_0, int8), straight from
 * the packed rows: no decoded buffer and no -128 * sum(codes) pass. vpdpbusd takes |w| as the
 * unsigned operand and x with w's sign (vpsignb) as the signed one, so |w| * (sign(w) x) = w x;
 * |w| <= 128 fits in uint8. One float scale (weight scale * x block scale) per block. */
VNNI static void qmv_gemv_signed(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales,
                                 int64_t group_size, int64_t N, int64_t K, const uint8_t *xu,
                                 const float *xd, float *out, int num_threads)
{
    const int64_t groups = K / group_size, blocks_per_group = group_size / 32;
    const int64_t stride = fmt == QMV_Q8_0 ? 34 : 32, skip = fmt == QMV_Q8_0 ? 2 : 0;
    const int64_t n_tiles = (N + QMV_ROWS - 1) / QMV_ROWS;
    /* one contiguous range of rows per thread: for the 178 MB output projection, two streams in
     * interleaved chunks of QMV_CHUNK tiles ran at 0.47x of torch's read bandwidth, two contiguous
     * ones at ~1x (prefetch distances 0-16 KiB measured: within noise) */
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (n_tiles > 1)
    for (int64_t t = 0; t < n_tiles; t++) {
        const uint8_t *src[QMV_ROWS];
        const float *row_scales[QMV_ROWS];
        __m256 acc[QMV_ROWS];
        for (int r = 0; r < QMV_ROWS; r++) {
            /* rows past N repeat the last row; their results are dropped */
            const int64_t row = t * QMV_ROWS + r < N ? t * QMV_ROWS + r : N - 1;
            src[r] = data + row * row_bytes;
            row_scales[r] = fmt == QMV_INT8 ? scales + row * groups : NULL;
            acc[r] = _mm256_setzero_ps();
        }
        /* software prefetch QMV_PREFETCH bytes ahead: the hardware prefetcher alone keeps too few
         * lines in flight for four interleaved row streams from DRAM */
        const int64_t ahead = t * QMV_ROWS * row_bytes + QMV_PREFETCH;
        for (int64_t offset = ahead; offset < ahead + QMV_ROWS * row_bytes && offset < N * row_bytes; offset += 64)
            _mm_prefetch((const char *)(data + offset), _MM_HINT_T0);
        for (int64_t g = 0, b = 0; g < groups; g++) {
            float group_scale[QMV_ROWS];
            for (int r = 0; r < QMV_ROWS; r++)
                group_scale[r] = fmt == QMV_Q8_0 ? qmv_fp16(src[r] + 34 * g) : row_scales[r][g];
            for (int64_t j = 0; j < blocks_per_group; j++, b++) {
                const __m256i xv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xu + 32 * b)),
                                                    _mm256_set1_epi8((char)0x80));   /* back to signed */
                _Pragma("GCC unroll 4")
                for (int r = 0; r < QMV_ROWS; r++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(src[r] + stride * b + skip));
                    const __m256i isum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w),
                                                             _mm256_sign_epi8(xv, w));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(group_scale[r] * xd[b]), acc[r]);
                }
            }
        }
        const int n_rows = N - t * QMV_ROWS < QMV_ROWS ? (int)(N - t * QMV_ROWS) : QMV_ROWS;
        for (int r = 0; r < n_rows; r++)
            out[t * QMV_ROWS + r] = qmv_hsum(acc[r]);
    }
}

/* One weight row . x for the formats whose codes are unsigned plus a bias (q5_0: q - 16, int4:
 * q - 8, q6_k: q - 32, q4_k: d sc q - dmin m), decoded in registers: vpdpbusd takes the unsigned
 * codes and the signed activations xq, seeded with seed[b] = -bias * (sum of xq per int32 lane),
 * so each block's integer sum is exact; then one FMA per block with weight scale * xd. q4_k's
 * mins term uses the exact float sums of x per block. Inlined with a constant fmt. */
VNNI static inline __attribute__((always_inline)) float qmv_biased_row(
    int fmt, const uint8_t *src, const float *row_scales, int64_t K, int64_t group_size, const int8_t *xq,
    const __m256i *seed, const float *xd, const float *xsum)
{
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float mins = 0.0f;
#define QMV_XQ(b) _mm256_loadu_si256((const __m256i *)(xq + 32 * (b)))
    if (fmt == QMV_Q5_0) {
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *block = src + 22 * b;
            uint32_t qh;
            memcpy(&qh, block + 2, 4);
            const __m256i q = _mm256_or_si256(qmv_nibbles(_mm_loadu_si128((const __m128i *)(block + 6))),
                                              _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(16)));
            const __m256i isum = _mm256_dpbusd_epi32(seed[b], q, QMV_XQ(b));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(qmv_fp16(block) * xd[b]), acc0);
        }
    } else if (fmt == QMV_INT4) {
        /* byte j of a group holds element j (low nibble) and j + group/2 (high nibble) */
        const int64_t half = group_size / 2;
        for (int64_t g = 0; g < K / group_size; g++) {
            const float scale = row_scales[g];
            if (group_size == 32) {
                const __m256i q = qmv_nibbles(_mm_loadu_si128((const __m128i *)(src + 16 * g)));
                const __m256i isum = _mm256_dpbusd_epi32(seed[g], q, QMV_XQ(g));
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(scale * xd[g]), acc0);
            } else {   /* a multiple of 64: a block is 32 low or 32 high nibbles */
                for (int64_t j = 0; j < half; j += 32) {
                    const __m256i bytes = _mm256_loadu_si256((const __m256i *)(src + g * half + j));
                    const int64_t b_low = (g * group_size + j) / 32, b_high = b_low + half / 32;
                    const __m256i low = _mm256_dpbusd_epi32(seed[b_low], _mm256_and_si256(bytes, low4), QMV_XQ(b_low));
                    const __m256i high = _mm256_dpbusd_epi32(
                        seed[b_high], _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), QMV_XQ(b_high));
                    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(low), _mm256_set1_ps(scale * xd[b_low]), acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(high), _mm256_set1_ps(scale * xd[b_high]), acc1);
                }
            }
        }
    } else if (fmt == QMV_Q4_K) {
        /* sub-block s takes nibble s % 2 of bytes 32 * (s / 2) .. + 32; no bias, mins apart */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 144 * sb;
            const float d = qmv_fp16(block), dmin = qmv_fp16(block + 2);
            for (int p = 0; p < 4; p++) {
                const int64_t b = 8 * sb + 2 * p;
                int sc0, m0, sc1, m1;
                qmv_q4_k_scale_min(block + 4, 2 * p, &sc0, &m0);
                qmv_q4_k_scale_min(block + 4, 2 * p + 1, &sc1, &m1);
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(block + 16 + 32 * p));
                const __m256i low = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(bytes, low4),
                                                        QMV_XQ(b));
                const __m256i high = _mm256_dpbusd_epi32(
                    _mm256_setzero_si256(), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4), QMV_XQ(b + 1));
                acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(low), _mm256_set1_ps(d * (float)sc0 * xd[b]), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(high), _mm256_set1_ps(d * (float)sc1 * xd[b + 1]), acc1);
                mins += dmin * ((float)m0 * xsum[b] + (float)m1 * xsum[b + 1]);
            }
        }
    } else {   /* QMV_Q6_K: lanes 0-3 and 4-7 of a block have their own scale */
        const __m512i halves = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 210 * sb;
            const __m512i sc_int = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(block + 192)));
            const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(qmv_fp16(block + 208)), _mm512_cvtepi32_ps(sc_int));
            for (int h = 0; h < 2; h++) {
                __m256i q[4];
                qmv_q6_k_codes(block, h, q);
                for (int t = 0; t < 4; t++) {
                    const int64_t b = 8 * sb + 4 * h + t;
                    const __m256 lane_scale = _mm512_castps512_ps256(_mm512_permutexvar_ps(
                        _mm512_add_epi32(halves, _mm512_set1_epi32(2 * (4 * h + t))), sc));
                    const __m256i isum = _mm256_dpbusd_epi32(seed[b], q[t], QMV_XQ(b));
                    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(lane_scale, _mm256_set1_ps(xd[b])),
                                           acc0);
                }
            }
        }
    }
#undef QMV_XQ
    return qmv_hsum(_mm256_add_ps(acc0, acc1)) - mins;
}

/* GEMV (M = 1) of q5_0, q4_k, q6_k and int4 (qmv_biased_row), parallel over rows. Returns 0, or -1
 * when memory runs out. */
VNNI static int qmv_gemv_biased(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales,
                                int64_t group_size, int64_t N, int64_t K, const uint8_t *xu, const float *xd,
                                const float *xsum, float *out, int num_threads)
{
    const int64_t nb = K / 32, groups = K / group_size;
    const int bias = fmt == QMV_Q5_0 ? 16 : fmt == QMV_INT4 ? 8 : fmt == QMV_Q6_K ? 32 : 0;
    int8_t *xq = malloc((size_t)K);
    __m256i *seed = aligned_alloc(32, sizeof(__m256i) * (size_t)nb);
    if (xq == NULL || seed == NULL) {
        free(xq);
        free(seed);
        return -1;
    }
    for (int64_t b = 0; b < nb; b++) {
        const __m256i x = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(xu + 32 * b)),
                                           _mm256_set1_epi8((char)0x80));   /* back to signed */
        _mm256_storeu_si256((__m256i *)(xq + 32 * b), x);
        const __m256i lane_sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), x);
        seed[b] = _mm256_mullo_epi32(lane_sums, _mm256_set1_epi32(-bias));
    }
    #pragma omp parallel for schedule(dynamic, QMV_CHUNK * QMV_ROWS) num_threads(num_threads) if (N > 1)
    for (int64_t r = 0; r < N; r++) {
        const uint8_t *src = data + r * row_bytes;
        const float *row_scales = scales == NULL ? NULL : scales + r * groups;
        float value;
        switch (fmt) {   /* a constant fmt per call: one specialised copy of the row loop each */
        case QMV_Q5_0: value = qmv_biased_row(QMV_Q5_0, src, row_scales, K, group_size, xq, seed, xd, xsum); break;
        case QMV_INT4: value = qmv_biased_row(QMV_INT4, src, row_scales, K, group_size, xq, seed, xd, xsum); break;
        case QMV_Q4_K: value = qmv_biased_row(QMV_Q4_K, src, row_scales, K, group_size, xq, seed, xd, xsum); break;
        default: value = qmv_biased_row(QMV_Q6_K, src, row_scales, K, group_size, xq, seed, xd, xsum); break;
        }
        out[r] = value;
    }
    free(xq);
    free(seed);
    return 0;
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
    if (!failed && M == 1) {
        int status = 0;
        if (fmt == QMV_Q8_0 || fmt == QMV_INT8)
            qmv_gemv_signed(fmt, data, row_bytes, scales, group_size, N, K, xu, xd, out, num_threads);
        else
            status = qmv_gemv_biased(fmt, data, row_bytes, scales, group_size, N, K, xu, xd, xsum, out, num_threads);
        free(xu);
        free(xd);
        free(xsum);
        return status;
    }
    #pragma omp parallel num_threads(num_threads) if (!failed && n_tiles > 1)
    {
        /* per thread: decoded codes, scales, mins, -128 * sums of a tile of rows */
        int8_t *decoded = malloc((size_t)(QMV_ROWS * K));
        float *row_floats = malloc(sizeof(float) * (size_t)(3 * QMV_ROWS * nb));
        __m256i *neg_sums = aligned_alloc(32, sizeof(__m256i) * (size_t)(QMV_ROWS * nb));
        const int ready = decoded != NULL && row_floats != NULL && neg_sums != NULL && !failed;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        qmv_row rows[QMV_ROWS];
        float result[QMV_XROWS][QMV_ROWS];
        /* every thread meets the worksharing loop; one without its buffers skips its tiles */
        #pragma omp for schedule(dynamic, QMV_CHUNK)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ready)
                continue;
            const int64_t first = t * QMV_ROWS;
            for (int r = 0; r < QMV_ROWS; r++) {
                rows[r].scale = row_floats + 2 * r * nb;
                rows[r].min = row_floats + (2 * QMV_ROWS + r) * nb;
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
                if (fmt == QMV_Q4_K)
                    qmv_subtract_mins(rows, xsum, nb, m0, xr, result);
                for (int m = 0; m < xr; m++)
                    for (int r = 0; r < n_rows; r++)
                        out[(m0 + m) * N + first + r] = result[m][r];
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

/* ---- Repacked panels (M > 1, built once per matrix) ----
 * Panel p holds weight rows 16p .. 16p + 15 (rows past N: zero codes and scales). Per block b of 32
 * weights it takes QMV_PANEL_BLOCK bytes: 8 x 64 bytes of signed codes, where the 64 bytes j hold
 * codes 4j .. 4j + 3 of each of the 16 rows (row r at bytes 4r .. 4r + 3), then 16 int32 seeds
 * (-128 * sum of the row's codes), 16 float scales, 16 float mins (q4_k's dmin * m, else 0). One
 * vpdpbusd of a zmm of codes with 4 activation bytes broadcast to every lane adds 16 rows' partial
 * sums at once: per block and activation row, 8 vpdpbusd, 1 conversion, 1 multiply and 1 FMA (and
 * one for q4_k's mins) give 16 outputs. 1.375 bytes per weight (q8_0 packs 1.06, q4_k 0.56).
 * q6_k has a scale per half block of 16 (codes 64 bytes j = 0..3 and 4..7): its seeds and scales
 * there are the first half's, the mins' place holds the second half's scales, and 64 more bytes
 * its seeds (768 bytes per block; 1.5 bytes per weight). */
#define QMV_PANEL 16
#define QMV_PANEL_SEEDS 512
#define QMV_PANEL_SCALES 576
#define QMV_PANEL_MINS 640
#define QMV_PANEL_HIGH_SCALES 640
#define QMV_PANEL_HIGH_SEEDS 704
#define QMV_PANEL_BLOCK(fmt) ((fmt) == QMV_Q6_K ? 768 : 704)

static int64_t qmv_panel_bytes(int fmt, int64_t N, int64_t K)
{
    return (N + QMV_PANEL - 1) / QMV_PANEL * (K / 32) * QMV_PANEL_BLOCK(fmt);
}

/* W (N, K) in format fmt -> panels (qmv_panel_bytes(N, K) bytes, zeroed by the caller). Returns 0,
 * or -1 when memory runs out. */
VNNI static int qmv_repack(int fmt, const uint8_t *data, int64_t row_bytes, const float *scales, int64_t group_size,
                           int64_t N, int64_t K, uint8_t *panels, int num_threads)
{
    const int64_t nb = K / 32, n_panels = (N + QMV_PANEL - 1) / QMV_PANEL, block_bytes = QMV_PANEL_BLOCK(fmt);
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        int8_t *decoded = malloc((size_t)K);
        float *row_floats = malloc(sizeof(float) * (size_t)(3 * nb));
        __m256i *neg_sums = aligned_alloc(32, sizeof(__m256i) * (size_t)nb);
        const int ready = decoded != NULL && row_floats != NULL && neg_sums != NULL;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        qmv_row row = {NULL, 0, row_floats, neg_sums, row_floats + 2 * nb};
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < n_panels; p++) {
            if (!ready)
                continue;
            for (int64_t r = 0; r < QMV_PANEL && p * QMV_PANEL + r < N; r++) {
                qmv_prepare_row(fmt, data, row_bytes, scales, group_size, K, p * QMV_PANEL + r, decoded, &row);
                for (int64_t b = 0; b < nb; b++) {
                    uint8_t *block = panels + (p * nb + b) * block_bytes;
                    for (int j = 0; j < 8; j++)
                        memcpy(block + 64 * j + 4 * r, row.codes + b * row.stride + 4 * j, 4);
                    int32_t lanes[8], seed = 0, high_seed = 0;   /* lane l: codes 4l .. 4l + 3 */
                    _mm256_storeu_si256((__m256i *)lanes, row.neg_sum[b]);
                    for (int l = 0; l < 8; l++)
                        *(l < 4 || fmt != QMV_Q6_K ? &seed : &high_seed) += lanes[l];
                    memcpy(block + QMV_PANEL_SEEDS + 4 * r, &seed, 4);
                    memcpy(block + QMV_PANEL_SCALES + 4 * r, &row.scale[2 * b], 4);
                    if (fmt == QMV_Q6_K) {
                        memcpy(block + QMV_PANEL_HIGH_SCALES + 4 * r, &row.scale[2 * b + 1], 4);
                        memcpy(block + QMV_PANEL_HIGH_SEEDS + 4 * r, &high_seed, 4);
                    } else {
                        const float min = fmt == QMV_Q4_K ? row.min[b] : 0.0f;
                        memcpy(block + QMV_PANEL_MINS + 4 * r, &min, 4);
                    }
                }
            }
        }
        free(decoded);
        free(row_floats);
        free(neg_sums);
    }
    return failed ? -1 : 0;
}

/* out[m0 + m, 16 (p0 + p) + lane] for XR activation rows and NP panels of format fmt; XR, NP and
 * fmt are constants in each inlined copy, so the accumulators live in registers. */
VNNI static inline __attribute__((always_inline)) void qmv_panel_tile(
    const int XR, const int NP, const int fmt, const uint8_t *panels, int64_t p0, const uint8_t *xu,
    const float *xd, const float *xsum, int64_t K, int64_t m0, int64_t N, float *out)
{
    const int64_t nb = K / 32, block_bytes = QMV_PANEL_BLOCK(fmt);
    const int halves = fmt == QMV_Q6_K;
    __m512 acc[4][2];
    for (int m = 0; m < XR; m++)
        for (int p = 0; p < NP; p++)
            acc[m][p] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *block[2];
        __m512i isum[4][2], high[4][2];   /* q6_k: high[m][p] sums the codes of j = 4..7 */
        for (int p = 0; p < NP; p++) {
            block[p] = panels + ((p0 + p) * nb + b) * block_bytes;
            const __m512i seed = _mm512_loadu_si512(block[p] + QMV_PANEL_SEEDS);
            for (int m = 0; m < XR; m++)
                isum[m][p] = seed;
            if (halves) {
                const __m512i high_seed = _mm512_loadu_si512(block[p] + QMV_PANEL_HIGH_SEEDS);
                for (int m = 0; m < XR; m++)
                    high[m][p] = high_seed;
            }
        }
        _Pragma("GCC unroll 8")
        for (int j = 0; j < 8; j++) {
            __m512i w[2];
            for (int p = 0; p < NP; p++)
                w[p] = _mm512_loadu_si512(block[p] + 64 * j);
            for (int m = 0; m < XR; m++) {
                int32_t four;
                memcpy(&four, xu + (m0 + m) * K + 32 * b + 4 * j, 4);
                const __m512i xb = _mm512_set1_epi32(four);
                for (int p = 0; p < NP; p++) {
                    if (halves && j >= 4)
                        high[m][p] = _mm512_dpbusd_epi32(high[m][p], xb, w[p]);
                    else
                        isum[m][p] = _mm512_dpbusd_epi32(isum[m][p], xb, w[p]);
                }
            }
        }
        for (int m = 0; m < XR; m++) {
            const __m512 xs = _mm512_set1_ps(xd[(m0 + m) * nb + b]);
            for (int p = 0; p < NP; p++) {
                const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps((const float *)(block[p] + QMV_PANEL_SCALES)), xs);
                acc[m][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m][p]), scale, acc[m][p]);
                if (halves) {
                    const __m512 high_scale = _mm512_mul_ps(
                        _mm512_loadu_ps((const float *)(block[p] + QMV_PANEL_HIGH_SCALES)), xs);
                    acc[m][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(high[m][p]), high_scale, acc[m][p]);
                }
                if (fmt == QMV_Q4_K)
                    acc[m][p] = _mm512_fnmadd_ps(_mm512_loadu_ps((const float *)(block[p] + QMV_PANEL_MINS)),
                                                 _mm512_set1_ps(xsum[(m0 + m) * nb + b]), acc[m][p]);
            }
        }
    }
    for (int p = 0; p < NP; p++) {
        const int64_t col = (p0 + p) * QMV_PANEL, left = N - col;
        const __mmask16 keep = left >= QMV_PANEL ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        for (int m = 0; m < XR; m++)
            _mm512_mask_storeu_ps(out + (m0 + m) * N + col, keep, acc[m][p]);
    }
}

/* every activation row against panels p0 (and p0 + 1 when two), 4 rows at a time; fmt: only
 * whether it is q4_k, q6_k or another matters */
VNNI static inline __attribute__((always_inline)) void qmv_panel_rows(
    const int fmt, int two, const uint8_t *panels, int64_t p0, const uint8_t *xu, const float *xd,
    const float *xsum, int64_t K, int64_t M, int64_t N, float *out)
{
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) {
        if (two)
            qmv_panel_tile(4, 2, fmt, panels, p0, xu, xd, xsum, K, m0, N, out);
        else
            qmv_panel_tile(4, 1, fmt, panels, p0, xu, xd, xsum, K, m0, N, out);
    }
    for (; m0 < M; m0++) {
        if (two)
            qmv_panel_tile(1, 2, fmt, panels, p0, xu, xd, xsum, K, m0, N, out);
        else
            qmv_panel_tile(1, 1, fmt, panels, p0, xu, xd, xsum, K, m0, N, out);
    }
}

/* out (M, N) = x (M, K) @ W.T from the panels of qmv_repack (format fmt). Parallel
 * over pairs of panels, statically split; each pair (2 x 16 rows, 32 K bytes of codes: L1) meets
 * every activation row, 4 at a time. Returns 0, or -1 when memory runs out. */
VNNI static int qmv_panel_matmul(int fmt, const uint8_t *panels, int64_t N, int64_t K, const float *x, int64_t M,
                                 float *out, int num_threads)
{
    const int64_t nb = K / 32, n_panels = (N + QMV_PANEL - 1) / QMV_PANEL, n_pairs = (n_panels + 1) / 2;
    uint8_t *xu = malloc((size_t)(M * K));
    float *xd = malloc(sizeof(float) * (size_t)(M * nb));
    float *xsum = malloc(sizeof(float) * (size_t)(M * nb));
    if (xu == NULL || xd == NULL || xsum == NULL) {
        free(xu);
        free(xd);
        free(xsum);
        return -1;
    }
    qmv_quantize_x(x, M * nb, xu, xd, xsum);
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (n_pairs > 1)
    for (int64_t pair = 0; pair < n_pairs; pair++) {
        const int64_t p0 = 2 * pair;
        const int two = p0 + 1 < n_panels;
        switch (fmt) {   /* a constant fmt per copy of the row loop */
        case QMV_Q4_K: qmv_panel_rows(QMV_Q4_K, two, panels, p0, xu, xd, xsum, K, M, N, out); break;
        case QMV_Q6_K: qmv_panel_rows(QMV_Q6_K, two, panels, p0, xu, xd, xsum, K, M, N, out); break;
        default: qmv_panel_rows(QMV_Q8_0, two, panels, p0, xu, xd, xsum, K, M, N, out); break;
        }
    }
    free(xu);
    free(xd);
    free(xsum);
    return 0;
}
