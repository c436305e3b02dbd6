/* Fused similarity top-k scan of a float corpus: register-blocked dot products whose scores go
 * straight into each query's running top-k, never into a (B, N) matrix.
 *
 * Batches (B >= TKS_ROWS_BELOW): queries are packed once per call into panels of 16 (panel p
 * holds queries 16p .. 16p+15 as dim x 16 floats, zero padded). A block multiplies TKS_MR = 6
 * corpus rows by TKS_NP = 4 panels (64 queries): 24 zmm accumulators; per dimension 4 panel
 * loads, 6 broadcasts of one row value and 24 FMAs (an outer product; 6 x 4 measured 5% over
 * 12 x 2). A score vector then holds one row against 16 queries, so the selection is one
 * compare with a vector of those queries' thresholds (the score of each query's k-th best
 * candidate so far); only the rare survivors go through the scalar admission.
 * Fewer queries: one query against 16 rows at a time, each row read in order into its own
 * accumulator, then the 16 reduced together (a transpose-add tree) into one vector of scores;
 * int8 rows are scored on their codes there, with VNNI integer dots and a proven error bound
 * as a pre-selection (tks_tile_codes_vnni) where the CPU has it.
 *
 * Candidates are int64 keys (order(score) << 32) | (0xFFFFFFFF - id), as in kernels/topk/cpu.py:
 * comparing keys compares scores, then prefers the smaller id. Each query keeps a buffer of keys
 * above its threshold key; a full buffer is cut to the best k by quickselect, which raises the
 * threshold; "score >= threshold score" is the vector pre-test, the key decides ties.
 *
 * Parallel over chunks of whole corpus tiles (OpenMP, dynamic): each thread fills its own
 * (B, cap) candidate buffers over the chunks it takes, merged afterwards by the caller.
 * fp16/bf16 tiles are widened to float32 into a per-thread buffer first; fp32 rows are read in
 * place. Exclusions arrive as the caller's CSR; the threads first sort them by tile (a counting
 * sort, each thread a share of the queries), then each tile's become a bitmap (row x panel -> 16
 * query bits) that masks the survivors. A score that comes out NaN or inf sets bad[thread].
 *
 * The AVX-512 functions carry their own target attribute; the caller picks the ISA level (at most
 * tks_best_isa()); the portable path (the panel algorithm in plain C, for every B) runs where the
 * CPU has no AVX-512, or when asked for.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TKS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")))
#define TKS_MR 6         /* corpus rows per register block (cpu.C_MR) */
#define TKS_NP 4         /* query panels per register block */
#define TKS_ROWS_BELOW 8 /* fewer queries than this: one query at a time against 16 rows */
#define TKS_LANES 16     /* queries per panel */
#define TKS_LOW32 0xFFFFFFFFLL
/* The key of score -inf with id 0 (cpu.FLOOR_KEY): every finite score's key is above it. */
#define TKS_FLOOR_KEY ((int64_t)(((uint64_t)(uint32_t)-2139095041 << 32) | 0xFFFFFFFFULL))

enum { TKS_FP32 = 0, TKS_FP16 = 1, TKS_BF16 = 2, TKS_INT8 = 3, TKS_INT4 = 4 };   /* = cpu.DTYPE_CODES */
enum { TKS_IP = 0, TKS_COSINE = 1, TKS_L2 = 2 };     /* = cpu.METRIC_CODES */

enum { TKS_PORTABLE = 0, TKS_ISA_AVX512 = 1, TKS_ISA_VNNI = 2 };   /* = cpu.ISA_CODES */

/* The best of TKS_PORTABLE, TKS_ISA_AVX512 (F/BW/DQ/VL), TKS_ISA_VNNI (and AVX512-VNNI) this CPU runs. */
static int tks_best_isa(void)
{
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
          && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")))
        return TKS_PORTABLE;
    return __builtin_cpu_supports("avx512vnni") ? TKS_ISA_VNNI : TKS_ISA_AVX512;
}

/* int32 bits of a float -> an int32 that orders like the float (non-NaN); its own inverse. */
static inline int32_t tks_order(int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); }

static inline int32_t tks_bits(float x) { int32_t b; memcpy(&b, &x, 4); return b; }

static inline float tks_float(int32_t b) { float x; memcpy(&x, &b, 4); return x; }

/* Quickselect: move the k largest of keys[:n] to keys[:k] (keys are distinct). Branch-free
 * Lomuto partitions (a swap each step): the comparisons are data-dependent coin flips. */
static void tks_keep_best(int64_t *keys, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        int64_t mid = (lo + hi) >> 1, a = keys[lo], b = keys[mid], c = keys[hi];
        int64_t lo_ab = a < b ? a : b, hi_ab = a < b ? b : a;
        int64_t pivot = hi_ab < c ? hi_ab : (lo_ab > c ? lo_ab : c);   /* median of three */
        /* keys[lo .. store) > pivot, then the pivot, then the rest */
        int64_t at = keys[hi] == pivot ? hi : (keys[mid] == pivot ? mid : lo);
        keys[at] = keys[hi];
        keys[hi] = pivot;
        int64_t store = lo;
        for (int64_t i = lo; i < hi; i++) {
            int64_t v = keys[i];
            keys[i] = keys[store];
            keys[store] = v;
            store += v > pivot;
        }
        keys[hi] = keys[store];
        keys[store] = pivot;
        if (store == k - 1 || store == k)
            break;
        if (store > k)
            hi = store - 1;
        else
            lo = store + 1;
    }
}

/* One call's read-only inputs and one thread's running top-k. */
typedef struct {
    int64_t dim, B, n_panels, k, cap;
    int metric;
    const float *queries;  /* (B, dim) */
    const float *qpanels;  /* (n_panels, dim, 16) */
    const float *qsq;      /* (n_panels * 16): |q|^2 (l2) */
    const float *qnorm;    /* (n_panels * 16): |q| (cosine) */
    const float *qsum;     /* (n_panels * 16): sum of q (int8 codes) */
    const int16_t *q16;    /* (B, dim rounded up to 32) queries quantized for the VNNI pre-selection */
    const float *q16_scale, *q16_slack;   /* (B) */
    int64_t *keys;         /* (B, cap) this thread's candidates */
    int64_t *counts;       /* (B) */
    int64_t *thr;          /* (B) threshold keys */
    float *thr_score;      /* (n_panels * 16) threshold scores; +inf on padding lanes */
    uint16_t last_lanes;   /* the lanes of the last panel that hold queries */
} tks_state;

/* Offer one score of query q for corpus row id to its buffer. */
static inline void tks_admit(tks_state *st, int64_t q, float score, int64_t id)
{
    int64_t key = ((int64_t)tks_order(tks_bits(score + 0.0f)) << 32) | (TKS_LOW32 - id);  /* -0 -> +0 */
    if (key <= st->thr[q])
        return;
    int64_t *keys = st->keys + q * st->cap;
    keys[st->counts[q]++] = key;
    if (st->counts[q] == st->cap) {
        tks_keep_best(keys, st->cap, st->k);
        st->counts[q] = st->k;
        int64_t t = keys[0];
        for (int64_t i = 1; i < st->k; i++)
            t = keys[i] < t ? keys[i] : t;
        st->thr[q] = t;
        st->thr_score[q] = tks_float(tks_order((int32_t)(t >> 32)));
    }
}

static inline float tks_half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 31, mantissa = h & 0x3FF;
    if (exponent == 0) {   /* zero or subnormal: m * 2**-24, exact in float32 */
        float x = (float)mantissa * 5.960464477539063e-08f;
        return sign ? -x : x;
    }
    uint32_t bits = exponent == 31 ? 0x7F800000u | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13);
    return tks_float((int32_t)(sign | bits));
}

/* Rows row0 .. row0+n of a non-fp32 corpus as float32 (n, dim) into out: fp16/bf16 widened,
 * int8/int4 codes dequantized as code * scale + bias (rounded after the product, as the
 * reference dequantizes; no FMA here: this function is compiled for baseline x86-64). */
__attribute__((noinline))   /* never inlined into AVX-512 code, where the product and sum could fuse */
static void tks_widen_portable(int kind, const void *rows, int64_t row0, int64_t n, int64_t dim,
                               const float *scale, const float *bias, float *out)
{
    if (kind == TKS_FP16 || kind == TKS_BF16) {
        const uint16_t *src = (const uint16_t *)rows + row0 * dim;
        for (int64_t i = 0; i < n * dim; i++)
            out[i] = kind == TKS_FP16 ? tks_half(src[i]) : tks_float((int32_t)((uint32_t)src[i] << 16));
        return;
    }
    const int64_t row_bytes = kind == TKS_INT8 ? dim : (dim + 1) / 2;
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *src = (const uint8_t *)rows + (row0 + r) * row_bytes;
        const float s = scale[row0 + r], b = bias[row0 + r];
        for (int64_t c = 0; c < dim; c++) {
            int code = kind == TKS_INT8 ? src[c] : (src[c >> 1] >> ((c & 1) * 4)) & 15;
            float product = (float)code * s;
            out[r * dim + c] = product + b;
        }
    }
}

TKS_AVX512 static void tks_widen_avx512(int kind, const void *rows, int64_t row0, int64_t n, int64_t dim,
                                        const float *scale, const float *bias, float *out)
{
    if (kind == TKS_FP16 || kind == TKS_BF16) {
        const uint16_t *src = (const uint16_t *)rows + row0 * dim;
        const int64_t count = n * dim;
        int64_t i = 0;
        for (; i + 16 <= count; i += 16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
            __m512 v = kind == TKS_FP16 ? _mm512_cvtph_ps(h)
                                        : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            _mm512_storeu_ps(out + i, v);
        }
        for (; i < count; i++)
            out[i] = kind == TKS_FP16 ? _cvtsh_ss(src[i]) : tks_float((int32_t)((uint32_t)src[i] << 16));
    } else if (kind == TKS_INT8) {
        for (int64_t r = 0; r < n; r++) {
            const uint8_t *src = (const uint8_t *)rows + (row0 + r) * dim;
            const __m512 s = _mm512_set1_ps(scale[row0 + r]), b = _mm512_set1_ps(bias[row0 + r]);
            for (int64_t c = 0; c < dim; c += 16) {
                __mmask16 m = (__mmask16)(dim - c >= 16 ? 0xFFFF : (1u << (dim - c)) - 1);
                __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, src + c)));
                /* a rounded product, then the sum (no FMA): the reference's dequantization */
                __m512 product = _mm512_mul_round_ps(codes, s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                _mm512_mask_storeu_ps(out + r * dim + c, m, _mm512_add_ps(product, b));
            }
        }
    } else {
        tks_widen_portable(kind, rows, row0, n, dim, scale, bias, out);
    }
}

/* Scores of rows x[0 .. mr) (ids id0 ..) against NP panels from p0, admitted into st.
 * Rows past mr repeat row mr - 1 (their scores are dropped). rsq: |x|^2 per row (l2, cosine);
 * excl: NULL or 16 excluded-query bits per (row, panel). Returns 1 when a score is NaN or inf. */
#define TKS_KERNEL_AVX512(NAME, NP)                                                                       \
TKS_AVX512 static int NAME(tks_state *st, const float *x, int64_t mr, int64_t id0, int64_t p0,             \
                           const float *rsq, const uint16_t *excl)                                         \
{                                                                                                          \
    const int64_t dim = st->dim;                                                                           \
    const float *rows[TKS_MR];                                                                             \
    for (int r = 0; r < TKS_MR; r++)                                                                       \
        rows[r] = x + (r < mr ? r : mr - 1) * dim;                                                         \
    const float *panel = st->qpanels + p0 * dim * TKS_LANES;                                               \
    __m512 acc[TKS_MR][NP];                                                                                \
    _Pragma("GCC unroll 12")                                                                               \
    for (int r = 0; r < TKS_MR; r++)                                                                       \
        _Pragma("GCC unroll 4")                                                                            \
        for (int p = 0; p < NP; p++)                                                                       \
            acc[r][p] = _mm512_setzero_ps();                                                               \
    for (int64_t c = 0; c < dim; c++) {                                                                    \
        __m512 qv[NP];                                                                                     \
        _Pragma("GCC unroll 4")                                                                            \
        for (int p = 0; p < NP; p++)                                                                       \
            qv[p] = _mm512_loadu_ps(panel + (p * dim + c) * TKS_LANES);                                    \
        _Pragma("GCC unroll 12")                                                                           \
        for (int r = 0; r < TKS_MR; r++) {                                                                 \
            __m512 xv = _mm512_set1_ps(rows[r][c]);                                                        \
            _Pragma("GCC unroll 4")                                                                        \
            for (int p = 0; p < NP; p++)                                                                   \
                acc[r][p] = _mm512_fmadd_ps(xv, qv[p], acc[r][p]);                                         \
        }                                                                                                  \
    }                                                                                                      \
    const __m512 zero = _mm512_setzero_ps();                                                               \
    __m512 thr[NP];                                                                                        \
    _Pragma("GCC unroll 4")                                                                                \
    for (int p = 0; p < NP; p++)                                                                           \
        thr[p] = _mm512_loadu_ps(st->thr_score + (p0 + p) * TKS_LANES);                                    \
    __mmask16 bad = 0;                                                                                     \
    _Pragma("GCC unroll 12")                                                                               \
    for (int r = 0; r < TKS_MR; r++) {                                                                     \
        if (r >= mr)                                                                                       \
            break;                                                                                         \
        _Pragma("GCC unroll 4")                                                                            \
        for (int p = 0; p < NP; p++) {                                                                     \
            const int64_t lane0 = (p0 + p) * TKS_LANES;                                                    \
            /* fpclass 0x99: NaN or inf, tested before max/select could hide it */                        \
            __m512 s = acc[r][p];                                                                          \
            if (st->metric == TKS_L2) {                                                                    \
                __m512 dist = _mm512_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(2.0f), s,                      \
                                                             _mm512_set1_ps(rsq[r])),                      \
                                            _mm512_loadu_ps(st->qsq + lane0));                             \
                bad |= _mm512_fpclass_ps_mask(dist, 0x99);                                                 \
                s = _mm512_sub_ps(zero, _mm512_max_ps(dist, zero));                                        \
            } else if (st->metric == TKS_COSINE) {                                                         \
                __m512 denom = _mm512_mul_ps(_mm512_set1_ps(sqrtf(rsq[r])), _mm512_loadu_ps(st->qnorm + lane0)); \
                __mmask16 positive = _mm512_cmp_ps_mask(denom, zero, _CMP_GT_OQ);                           \
                bad |= _mm512_fpclass_ps_mask(s, 0x99) | _mm512_fpclass_ps_mask(denom, 0x99);              \
                s = _mm512_maskz_div_ps(positive, s, denom);                                               \
            }                                                                                              \
            bad |= _mm512_fpclass_ps_mask(s, 0x99);                                                        \
            __mmask16 pass = _mm512_cmp_ps_mask(s, thr[p], _CMP_GE_OQ);                                    \
            if (pass) {   /* rare: the masks of excluded queries and padding lanes only here */           \
                if (excl != NULL)                                                                          \
                    pass &= (__mmask16)~excl[r * st->n_panels + p0 + p];                                   \
                if (p0 + p == st->n_panels - 1)                                                            \
                    pass &= st->last_lanes;                                                                \
                float lanes[TKS_LANES];                                                                    \
                _mm512_storeu_ps(lanes, s);                                                                \
                for (unsigned m = pass; m; m &= m - 1) {                                                   \
                    int lane = __builtin_ctz(m);                                                           \
                    tks_admit(st, lane0 + lane, lanes[lane], id0 + r);                                     \
                }                                                                                          \
                thr[p] = _mm512_loadu_ps(st->thr_score + lane0);   /* raised by a full buffer */            \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    return bad != 0;                                                                                       \
}

TKS_KERNEL_AVX512(tks_block_avx512_4, 4)
TKS_KERNEL_AVX512(tks_block_avx512_3, 3)
TKS_KERNEL_AVX512(tks_block_avx512_2, 2)
TKS_KERNEL_AVX512(tks_block_avx512_1, 1)

/* The same block in plain C: one panel at a time. Returns 1 when a score is NaN or inf. */
static int tks_block_portable(tks_state *st, const float *x, int64_t mr, int64_t id0, int64_t p,
                              const float *rsq, const uint16_t *excl)
{
    const int64_t dim = st->dim, lane0 = p * TKS_LANES;
    const float *panel = st->qpanels + p * dim * TKS_LANES;
    int bad = 0;
    for (int64_t r = 0; r < mr; r++) {
        float s[TKS_LANES] = {0};
        for (int64_t c = 0; c < dim; c++)
            for (int l = 0; l < TKS_LANES; l++)
                s[l] += x[r * dim + c] * panel[c * TKS_LANES + l];
        for (int l = 0; l < TKS_LANES; l++) {
            float score = s[l];
            if (st->metric == TKS_L2) {
                float dist = rsq[r] - 2.0f * score + st->qsq[lane0 + l];
                bad |= !isfinite(dist);
                score = -(dist > 0.0f ? dist : 0.0f);
            } else if (st->metric == TKS_COSINE) {
                float denom = sqrtf(rsq[r]) * st->qnorm[lane0 + l];
                bad |= !isfinite(score) || !isfinite(denom);
                score = denom > 0.0f ? score / denom : 0.0f;
            }
            bad |= !isfinite(score);
            int excluded = excl != NULL && ((excl[r * st->n_panels + p] >> l) & 1);
            if (lane0 + l < st->B && score >= st->thr_score[lane0 + l] && !excluded)
                tks_admit(st, lane0 + l, score, id0 + r);
        }
    }
    return bad;
}

TKS_AVX512 static float tks_sq_avx512(const float *x, int64_t dim)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= dim; c += 16) {
        __m512 v = _mm512_loadu_ps(x + c);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (c < dim) {
        __m512 v = _mm512_maskz_loadu_ps((__mmask16)((1u << (dim - c)) - 1), x + c);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static float tks_sq_portable(const float *x, int64_t dim)
{
    float s = 0.0f;
    for (int64_t c = 0; c < dim; c++)
        s += x[c] * x[c];
    return s;
}

/* a[i] -> lane i of the result = the sum of a[i]'s lanes (a transpose-add tree). */
TKS_AVX512 static inline __m512 tks_sum16_avx512(const __m512 a[16])
{
    __m512 s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; i++)   /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: rows 4i .. 4i+3 */
        __m512d x = _mm512_castps_pd(s1[2 * i]), y = _mm512_castps_pd(s1[2 * i + 1]);
        s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88), _mm512_shuffle_f32x4(s3[0], s3[1], 0xDD));
}

/* Query q's dots with float32 rows x[0 .. m) (m <= 16; rows past m repeat row m - 1): lane r =
 * row r. Row after row (a sequential read the prefetchers follow), two accumulators per row, the
 * 16 reduced together. */
TKS_AVX512 static inline __m512 tks_dots16_avx512(const float *x, int64_t m, int64_t dim, const float *query)
{
    const int64_t full = dim & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (dim - full)) - 1);
    __m512 acc[16];
    for (int r = 0; r < 16; r++) {
        const float *row = x + (r < m ? r : m - 1) * dim;
        __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
        int64_t c = 0;
        for (; c + 32 <= full; c += 32) {
            even = _mm512_fmadd_ps(_mm512_loadu_ps(row + c), _mm512_loadu_ps(query + c), even);
            odd = _mm512_fmadd_ps(_mm512_loadu_ps(row + c + 16), _mm512_loadu_ps(query + c + 16), odd);
        }
        if (c < full)
            even = _mm512_fmadd_ps(_mm512_loadu_ps(row + c), _mm512_loadu_ps(query + c), even);
        if (tail)
            odd = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row + full), _mm512_maskz_loadu_ps(tail, query + full),
                                  odd);
        acc[r] = _mm512_add_ps(even, odd);
    }
    return tks_sum16_avx512(acc);
}

/* The same for int8 codes (dim bytes a row), as float32 codes: codes . query, before scale and bias. */
TKS_AVX512 static inline __m512 tks_code_dots16_avx512(const uint8_t *codes, int64_t m, int64_t dim,
                                                       const float *query)
{
    __m512 acc[16];
    for (int r = 0; r < 16; r++) {
        const uint8_t *row = codes + (r < m ? r : m - 1) * dim;
        acc[r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 16) {
            __mmask16 part = (__mmask16)(dim - c >= 16 ? 0xFFFF : (1u << (dim - c)) - 1);
            __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(part, row + c)));
            acc[r] = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(part, query + c), acc[r]);
        }
    }
    return tks_sum16_avx512(acc);
}

/* |x|^2 of one int8 row, x = code * s + b. */
TKS_AVX512 static float tks_code_sq_avx512(const uint8_t *codes, int64_t dim, float s, float b)
{
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += 16) {
        __mmask16 part = (__mmask16)(dim - c >= 16 ? 0xFFFF : (1u << (dim - c)) - 1);
        __m512 code = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(part, codes + c)));
        __m512 x = _mm512_maskz_mov_ps(part, _mm512_fmadd_ps(code, _mm512_set1_ps(s), _mm512_set1_ps(b)));
        acc = _mm512_fmadd_ps(x, x, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Query q's scores from dots s (lane r: row r of the group; rsq its |x|^2 for l2/cosine); flags
 * NaN/inf in `valid` lanes into *bad. */
TKS_AVX512 static inline __m512 tks_metric16_avx512(const tks_state *st, int64_t q, __m512 s, const float *rsq,
                                                    __mmask16 valid, __mmask16 *bad)
{
    const __m512 zero = _mm512_setzero_ps();
    if (st->metric == TKS_L2) {
        __m512 dist = _mm512_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(2.0f), s, _mm512_maskz_loadu_ps(valid, rsq)),
                                    _mm512_set1_ps(st->qsq[q]));
        *bad |= _mm512_mask_fpclass_ps_mask(valid, dist, 0x99);
        s = _mm512_sub_ps(zero, _mm512_max_ps(dist, zero));
    } else if (st->metric == TKS_COSINE) {
        __m512 denom = _mm512_mul_ps(_mm512_sqrt_ps(_mm512_maskz_loadu_ps(valid, rsq)), _mm512_set1_ps(st->qnorm[q]));
        *bad |= _mm512_mask_fpclass_ps_mask(valid, s, 0x99) | _mm512_mask_fpclass_ps_mask(valid, denom, 0x99);
        s = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(denom, zero, _CMP_GT_OQ), s, denom);
    }
    *bad |= _mm512_mask_fpclass_ps_mask(valid, s, 0x99);
    return s;
}

/* Dots s of query q with the rows id0 + r (lanes r in `valid`) through the metric into its top-k.
 * rsq: |x|^2 of the 16 rows (l2, cosine); excl as in the blocks. Returns 1 on a bad score. */
TKS_AVX512 static int tks_select16_avx512(tks_state *st, int64_t q, __m512 s, __mmask16 valid, int64_t id0,
                                          const float *rsq, const uint16_t *excl)
{
    __mmask16 bad = 0;
    s = tks_metric16_avx512(st, q, s, rsq, valid, &bad);
    __mmask16 pass = _mm512_mask_cmp_ps_mask(valid, s, _mm512_set1_ps(st->thr_score[q]), _CMP_GE_OQ);
    if (pass) {
        float lanes[16];
        _mm512_storeu_ps(lanes, s);
        for (unsigned bits = pass; bits; bits &= bits - 1) {
            int r = __builtin_ctz(bits);
            if (excl == NULL || !((excl[r * st->n_panels + q / TKS_LANES] >> (q % TKS_LANES)) & 1))
                tks_admit(st, q, lanes[r], id0 + r);
        }
    }
    return bad != 0;
}

/* int32 version of tks_sum16_avx512. */
#define TKS_VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,f16c,fma")))
TKS_VNNI static inline __m512i tks_sum16_epi32(const __m512i a[16])
{
    __m512i s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; i++)
        s1[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]),
                                 _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        s2[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s1[2 * i], s1[2 * i + 1]),
                                 _mm512_unpackhi_epi64(s1[2 * i], s1[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        s3[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                                 _mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s3[0], s3[1], 0x88), _mm512_shuffle_i32x4(s3[0], s3[1], 0xDD));
}

/* int8 rows for one query at a time with VNNI: codes (widened to int16) . q16 in exact int32
 * (vpdpwssd), q16 = rint(q / q16_scale[q]) the query quantized so no sum can overflow. Then
 * dot <= q16_scale * isum (rounded up) + q16_slack[q], where the slack covers 255 * sum|q - q16_scale * q16|
 * and the float rounding of the exact dot; the score is monotone in the dot (scale >= 0; l2 and
 * cosine transforms increase with it), so a row whose bound misses the threshold cannot enter.
 * The rare groups of 16 rows where one reaches it are scored exactly (as without VNNI), and the
 * rows that reached it offered.
 * Returns 1 on a bad score. */
TKS_VNNI static int tks_tile_codes_vnni(tks_state *st, const uint8_t *codes, const float *scale, const float *bias,
                                        int64_t row0, int64_t n, const float *rsq, const uint16_t *excl)
{
    const int64_t dim = st->dim, dim32 = (dim + 31) & ~(int64_t)31;
    int bad = 0;
    for (int64_t q = 0; q < st->B; q++) {
        const int16_t *q16 = st->q16 + q * dim32;
        const float *query = st->queries + q * dim;
        const __m512 q_scale = _mm512_set1_ps(st->q16_scale[q]), slack = _mm512_set1_ps(st->q16_slack[q]);
        const __m512 q_sum = _mm512_set1_ps(st->qsum[q]);
        for (int64_t j = 0; j < n; j += 16) {
            const int64_t m = n - j < 16 ? n - j : 16;
            const __mmask16 valid = (__mmask16)(m < 16 ? (1u << m) - 1 : 0xFFFF);
            const uint8_t *group = codes + j * dim;
            const uint8_t *rows[16];
            __m512i acc[16];
            _Pragma("GCC unroll 16")
            for (int r = 0; r < 16; r++) {
                rows[r] = group + (r < m ? r : m - 1) * dim;
                acc[r] = _mm512_setzero_si512();
            }
            if (dim <= 64) {
                /* short rows: the rows 4 groups ahead and their scale and bias towards L1 (the hardware
                 * prefetch alone left a core reading at 2/3 of the float32 scan's rate), then 32 columns
                 * of all 16 rows at a time (the 16 sums stay in registers) */
                for (int64_t at = 0; at < 16 * dim; at += 64)
                    _mm_prefetch((const char *)(group + 64 * dim + at), _MM_HINT_T0);
                _mm_prefetch((const char *)(scale + row0 + j + 64), _MM_HINT_T0);
                _mm_prefetch((const char *)(bias + row0 + j + 64), _MM_HINT_T0);
                for (int64_t c = 0; c < dim; c += 32) {
                    const __mmask32 part = (__mmask32)(dim - c >= 32 ? 0xFFFFFFFFu : (1u << (dim - c)) - 1);
                    const __m512i qv = _mm512_loadu_si512((const void *)(q16 + c));
                    _Pragma("GCC unroll 16")
                    for (int r = 0; r < 16; r++)
                        acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(part, rows[r] + c)),
                                                     qv);
                }
            } else {   /* long rows: each read through in order (2x the rate of the column order at d = 384) */
                for (int r = 0; r < 16; r++)
                    for (int64_t c = 0; c < dim; c += 32) {
                        const __mmask32 part = (__mmask32)(dim - c >= 32 ? 0xFFFFFFFFu : (1u << (dim - c)) - 1);
                        acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(part, rows[r] + c)),
                                                     _mm512_loadu_si512((const void *)(q16 + c)));
                    }
            }
            __m512 approx = _mm512_mul_ps(_mm512_cvtepi32_ps(tks_sum16_epi32(acc)), q_scale);
            /* two roundings (int -> float, the product) of at most 2**-24 each, rounded up generously */
            __m512 margin = _mm512_fmadd_ps(_mm512_abs_ps(approx), _mm512_set1_ps(0x1p-21f), slack);
            __m512 row_scale = _mm512_maskz_loadu_ps(valid, scale + row0 + j);
            /* the score grows with the dot where scale >= 0 (always, from quantize_rows), else falls */
            __m512 dot_bound = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(row_scale, _mm512_setzero_ps(), _CMP_LT_OQ),
                                                    _mm512_add_ps(approx, margin), _mm512_sub_ps(approx, margin));
            __m512 row_bias = _mm512_maskz_loadu_ps(valid, bias + row0 + j);
            __mmask16 flags = 0;
            __m512 bound_dot = _mm512_fmadd_ps(row_scale, dot_bound, _mm512_mul_ps(row_bias, q_sum));
            __m512 bound = tks_metric16_avx512(st, q, bound_dot, rsq + j, valid, &flags);
            __mmask16 reach = _mm512_mask_cmp_ps_mask(valid, bound, _mm512_set1_ps(st->thr_score[q]), _CMP_GE_OQ);
            bad |= flags != 0;
            if (reach) {   /* score the group exactly, as tks_tile_rows_avx512 does */
                __m512 dots = tks_code_dots16_avx512(group, m, dim, query);
                __m512 s = _mm512_fmadd_ps(row_scale, dots, _mm512_mul_ps(row_bias, q_sum));
                bad |= tks_select16_avx512(st, q, s, reach, row0 + j, rsq + j,
                                           excl == NULL ? NULL : excl + j * st->n_panels);
            }
        }
    }
    return bad;
}

/* One tile against each query in turn, 16 rows at a time: float32 rows x, or (codes != NULL) int8
 * codes scored as scale * (codes . q) + bias * sum(q), never widened. Returns 1 on a bad score. */
TKS_AVX512 static int tks_tile_rows_avx512(tks_state *st, const float *x, const uint8_t *codes,
                                           const float *scale, const float *bias, int64_t row0, int64_t n,
                                           const float *rsq, const uint16_t *excl)
{
    const int64_t dim = st->dim;
    int bad = 0;
    for (int64_t q = 0; q < st->B; q++) {
        const float *query = st->queries + q * dim;
        for (int64_t j = 0; j < n; j += 16) {
            const int64_t m = n - j < 16 ? n - j : 16;
            __m512 s;
            if (codes != NULL) {
                const __mmask16 valid = (__mmask16)(m < 16 ? (1u << m) - 1 : 0xFFFF);
                s = tks_code_dots16_avx512(codes + j * dim, m, dim, query);
                s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, scale + row0 + j), s,
                                    _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, bias + row0 + j),
                                                  _mm512_set1_ps(st->qsum[q])));
            } else {
                s = tks_dots16_avx512(x + j * dim, m, dim, query);
            }
            bad |= tks_select16_avx512(st, q, s, (__mmask16)(m < 16 ? (1u << m) - 1 : 0xFFFF), row0 + j, rsq + j,
                                       excl == NULL ? NULL : excl + j * st->n_panels);
        }
    }
    return bad;
}

/* One tile (rows row0 .. row0+n, float32 at x) against every query panel. Returns 1 on a bad score. */
TKS_AVX512 static int tks_tile_avx512(tks_state *st, const float *x, int64_t row0, int64_t n,
                                      const float *rsq, const uint16_t *excl)
{
    int bad = 0;
    for (int64_t p0 = 0; p0 < st->n_panels; p0 += TKS_NP) {
        const int64_t np = st->n_panels - p0 < TKS_NP ? st->n_panels - p0 : TKS_NP;
        for (int64_t j = 0; j < n; j += TKS_MR) {
            int64_t mr = n - j < TKS_MR ? n - j : TKS_MR;
            const uint16_t *ex = excl == NULL ? NULL : excl + j * st->n_panels;
            const float *xj = x + j * st->dim;
            if (np == 4)
                bad |= tks_block_avx512_4(st, xj, mr, row0 + j, p0, rsq + j, ex);
            else if (np == 3)
                bad |= tks_block_avx512_3(st, xj, mr, row0 + j, p0, rsq + j, ex);
            else if (np == 2)
                bad |= tks_block_avx512_2(st, xj, mr, row0 + j, p0, rsq + j, ex);
            else
                bad |= tks_block_avx512_1(st, xj, mr, row0 + j, p0, rsq + j, ex);
        }
    }
    return bad;
}

static int tks_tile_portable(tks_state *st, const float *x, int64_t row0, int64_t n,
                             const float *rsq, const uint16_t *excl)
{
    int bad = 0;
    for (int64_t p = 0; p < st->n_panels; p++)
        for (int64_t j = 0; j < n; j += TKS_MR) {
            int64_t mr = n - j < TKS_MR ? n - j : TKS_MR;
            bad |= tks_block_portable(st, x + j * st->dim, mr, row0 + j, p, rsq + j,
                                      excl == NULL ? NULL : excl + j * st->n_panels);
        }
    return bad;
}

/* The tile of row id (n_tiles for an id outside [0, n_rows)): id * (1 / tile_rows) in double,
 * corrected by one step (no integer division). */
static inline int64_t tks_tile_of(int64_t id, int64_t n_rows, int64_t tile_rows, int64_t n_tiles, double inv_tile)
{
    if ((uint64_t)id >= (uint64_t)n_rows)
        return n_tiles;
    int64_t t = (int64_t)((double)id * inv_tile);
    t -= t * tile_rows > id;
    t += (t + 1) * tile_rows <= id;
    return t;
}

/* Queries q0 .. q1 of the exclusion CSR counted (scatter == 0) or placed (scatter == 1) by tile:
 * at[t] is tile t's next free slot in entries; an entry is the bit of (row id - row0, q) in the
 * tile's bitmap, word (id - row0) * n_panels + q / 16 shifted left by 4, bit q % 16 below it. */
static void tks_bucket_queries(const int64_t *excl_ptr, const int64_t *excl_ids, int64_t q0, int64_t q1,
                               int64_t n_rows, int64_t tile_rows, int64_t n_tiles, int64_t n_panels, int scatter,
                               int64_t *at, uint64_t *entries)
{
    const double inv_tile = 1.0 / (double)tile_rows;
    for (int64_t q = q0; q < q1; q++) {
        const uint64_t bit = (uint64_t)(q % TKS_LANES), panel = (uint64_t)(q / TKS_LANES);
        for (int64_t e = excl_ptr[q]; e < excl_ptr[q + 1]; e++) {
            const int64_t id = excl_ids[e], t = tks_tile_of(id, n_rows, tile_rows, n_tiles, inv_tile);
            if (scatter)   /* (an id outside the rows goes past the last tile, never read) */
                entries[at[t]++] = t < n_tiles ? (((uint64_t)(id - t * tile_rows) * (uint64_t)n_panels + panel) << 4) | bit : 0;
            else
                at[t]++;
        }
    }
}

/* The scan. rows: n_rows rows of float32 (kind FP32), uint16 bits (FP16/BF16), or codes (INT8: dim
 * bytes, INT4: (dim + 1) / 2 bytes a row, low nibble first) with scale, bias (n_rows) float32.
 * queries (B, dim).
 * excl_ptr: NULL or the exclusion CSR as given: (B + 1) offsets into excl_ids, query q's excluded
 * ids (any order, repeats allowed) at excl_ptr[q] .. excl_ptr[q + 1] (offsets validated by the
 * caller; ids outside [0, n_rows) are ignored). The corpus is cut into n_chunks runs of whole tiles, handed to the threads in turn;
 * a thread keeps one running top-k per query over all its chunks (a candidate below a threshold
 * that k of its candidates beat cannot be in the final top-k, whichever chunk it comes from).
 * Out, per thread slot t < num_threads: keys (num_threads, B, cap), counts (num_threads, B),
 * bad (num_threads); counts and bad must be zero on entry (a slot may go unused). cap > k.
 * n_rows < 2**32 (ids are 32 bits in the keys).
 * Returns 0, or -1 when memory runs out. */
static int tks_scan(int isa, int kind, const void *rows, const float *scale, const float *bias,
                    int64_t n_rows, int64_t dim, const float *queries, int64_t B, int metric, int64_t k,
                    int64_t tile_rows, const int64_t *excl_ptr, const int64_t *excl_ids, int64_t n_chunks, int64_t cap,
                    int64_t *keys_out, int64_t *counts_out, uint8_t *bad_out, int num_threads)
{
    const int64_t n_panels = (B + TKS_LANES - 1) / TKS_LANES, lanes = n_panels * TKS_LANES;
    const int64_t n_tiles = (n_rows + tile_rows - 1) / tile_rows;
    const int64_t tiles_per_chunk = (n_tiles + n_chunks - 1) / n_chunks;
    const int use_avx512 = isa >= TKS_ISA_AVX512, rows_mode = use_avx512 && B < TKS_ROWS_BELOW;
    const int vnni_codes = isa == TKS_ISA_VNNI && rows_mode && kind == TKS_INT8;
    const int64_t dim32 = (dim + 31) & ~(int64_t)31;
    float *qpanels = aligned_alloc(64, sizeof(float) * (size_t)(lanes * dim + 16));
    float *qstats = malloc(sizeof(float) * (size_t)(3 * lanes));   /* |q|^2, |q|, sum of q */
    int16_t *q16 = vnni_codes ? aligned_alloc(64, sizeof(int16_t) * (size_t)(B * dim32 + 32)) : NULL;
    float *q16_scale = vnni_codes ? malloc(sizeof(float) * (size_t)(2 * B)) : NULL;
    /* exclusions sorted by tile (a counting sort, the threads taking a share of the queries each):
     * tile t's bitmap entries at excl_entries[tile_start[t] .. tile_start[t + 1]) */
    const int64_t n_excl = excl_ptr == NULL ? 0 : excl_ptr[B] - excl_ptr[0];
    uint64_t *excl_entries = excl_ptr == NULL ? NULL : malloc(sizeof(uint64_t) * (size_t)(n_excl + 1));
    int64_t *tile_at = excl_ptr == NULL ? NULL : malloc(sizeof(int64_t) * (size_t)((num_threads + 1) * (n_tiles + 1)));
    int64_t *tile_start = tile_at == NULL ? NULL : tile_at + num_threads * (n_tiles + 1);
    int failed = qpanels == NULL || qstats == NULL || (vnni_codes && (q16 == NULL || q16_scale == NULL))
                 || (excl_ptr != NULL && (excl_entries == NULL || tile_at == NULL));
    if (!failed && vnni_codes) {
        /* |q16| <= qmax keeps 255 * qmax * dim, the largest |codes . q16|, inside int32 */
        const double qmax = fmin(32767.0, floor(2147483647.0 / (255.0 * (double)(dim > 0 ? dim : 1))));
        memset(q16, 0, sizeof(int16_t) * (size_t)(B * dim32));
        for (int64_t q = 0; q < B; q++) {
            const float *query = queries + q * dim;
            double amax = 0.0, abs_sum = 0.0, residual = 0.0;
            for (int64_t c = 0; c < dim; c++) {
                amax = fmax(amax, fabs((double)query[c]));
                abs_sum += fabs((double)query[c]);
            }
            const float step = (float)(amax / qmax);
            for (int64_t c = 0; c < dim && step > 0.0f; c++) {
                double code = fmin(qmax, fmax(-qmax, rint((double)query[c] / step)));
                q16[q * dim32 + c] = (int16_t)code;
                residual += fabs((double)query[c] - (double)step * code);
            }
            if (step == 0.0f)
                residual = abs_sum;
            /* codes <= 255: |codes . (q - step * q16)| <= 255 * residual; the float dot it is compared
             * with is off by at most dim * 2**-24 * 255 * sum|q| (taken twice); 1e-5 more covers the float
             * roundings of the bound itself beyond the 2**-21 * |approx| in the kernel */
            q16_scale[q] = step;
            double slack = (255.0 * residual + 2.0 * (double)dim * 0x1p-24 * 255.0 * abs_sum) * (1.0 + 1e-5) + 1e-30;
            q16_scale[B + q] = nextafterf((float)slack, INFINITY);
        }
    }
    if (!failed) {
        memset(qpanels, 0, sizeof(float) * (size_t)(lanes * dim));
        for (int64_t q = 0; q < B; q++) {
            float sq = 0.0f, sum = 0.0f;
            for (int64_t c = 0; c < dim; c++) {
                float v = queries[q * dim + c];
                qpanels[((q / TKS_LANES) * dim + c) * TKS_LANES + q % TKS_LANES] = v;
                sq += v * v;
                sum += v;
            }
            qstats[q] = sq;
            qstats[lanes + q] = sqrtf(sq);
            qstats[2 * lanes + q] = sum;
        }
        for (int64_t q = B; q < lanes; q++)
            qstats[q] = qstats[lanes + q] = qstats[2 * lanes + q] = 0.0f;
    }
    #pragma omp parallel num_threads(num_threads) if (!failed && n_chunks > 1 && num_threads > 1)
    {
        const int slot = omp_get_thread_num();
        float *widened = kind == TKS_FP32 ? NULL : malloc(sizeof(float) * (size_t)(tile_rows * dim + 16));
        float *rsq = malloc(sizeof(float) * (size_t)(tile_rows + TKS_LANES));   /* read 16 at a time */
        float *thr_score = malloc(sizeof(float) * (size_t)lanes);
        int64_t *thr = malloc(sizeof(int64_t) * (size_t)B);
        uint16_t *excl = excl_ptr == NULL ? NULL : malloc(sizeof(uint16_t) * (size_t)(tile_rows * n_panels));
        const int ready = !failed && slot < num_threads && rsq != NULL && thr_score != NULL && thr != NULL
                          && (kind == TKS_FP32 || widened != NULL) && (excl_ptr == NULL || excl != NULL);
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        if (excl_ptr != NULL && tile_at != NULL && excl_entries != NULL) {   /* the same for every thread */
            const int team = omp_get_num_threads();
            const int64_t q0 = B * slot / team, q1 = B * (slot + 1) / team;
            int64_t *at = tile_at + slot * (n_tiles + 1);
            memset(at, 0, sizeof(int64_t) * (size_t)(n_tiles + 1));
            tks_bucket_queries(excl_ptr, excl_ids, q0, q1, n_rows, tile_rows, n_tiles, n_panels, 0, at, NULL);
            #pragma omp barrier
            #pragma omp single
            {   /* tile by tile, thread by thread: where each thread's entries of a tile go */
                int64_t start = 0;
                for (int64_t t = 0; t <= n_tiles; t++) {
                    tile_start[t] = start;
                    for (int th = 0; th < team; th++) {
                        const int64_t count = tile_at[th * (n_tiles + 1) + t];
                        tile_at[th * (n_tiles + 1) + t] = start;
                        start += count;
                    }
                }
            }
            tks_bucket_queries(excl_ptr, excl_ids, q0, q1, n_rows, tile_rows, n_tiles, n_panels, 1, at, excl_entries);
            #pragma omp barrier
        }
        tks_state st = {dim, B, n_panels, k, cap, metric, queries, qpanels, qstats, qstats + lanes, qstats + 2 * lanes,
                        q16, q16_scale, q16_scale == NULL ? NULL : q16_scale + B,
                        keys_out + slot * B * cap, counts_out + slot * B, thr, thr_score,
                        (uint16_t)(B % TKS_LANES ? (1u << (B % TKS_LANES)) - 1 : 0xFFFF)};
        if (ready) {
            for (int64_t q = 0; q < B; q++) {
                thr[q] = TKS_FLOOR_KEY;
                thr_score[q] = -INFINITY;
            }
            for (int64_t q = B; q < lanes; q++)
                thr_score[q] = INFINITY;   /* padding lanes never pass */
        }
        int bad = 0;
        /* every thread meets the worksharing loop; one without its buffers skips its chunks */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t chunk = 0; chunk < n_chunks; chunk++) {
            if (!ready)
                continue;
            int64_t tile_end = (chunk + 1) * tiles_per_chunk < n_tiles ? (chunk + 1) * tiles_per_chunk : n_tiles;
            for (int64_t tile = chunk * tiles_per_chunk; tile < tile_end; tile++) {
                const int64_t row0 = tile * tile_rows;
                const int64_t n = n_rows - row0 < tile_rows ? n_rows - row0 : tile_rows;
                /* int8 rows for one query at a time are scored on their codes where they lie */
                const uint8_t *codes = rows_mode && kind == TKS_INT8 ? (const uint8_t *)rows + row0 * dim : NULL;
                const float *x = widened;
                if (kind == TKS_FP32)
                    x = (const float *)rows + row0 * dim;
                else if (codes == NULL && use_avx512)
                    tks_widen_avx512(kind, rows, row0, n, dim, scale, bias, widened);
                else if (codes == NULL)
                    tks_widen_portable(kind, rows, row0, n, dim, scale, bias, widened);
                if (metric != TKS_IP)
                    for (int64_t j = 0; j < n; j++)
                        rsq[j] = codes != NULL ? tks_code_sq_avx512(codes + j * dim, dim, scale[row0 + j],
                                                                    bias[row0 + j])
                               : use_avx512 ? tks_sq_avx512(x + j * dim, dim) : tks_sq_portable(x + j * dim, dim);
                const uint16_t *tile_excl = NULL;
                if (excl_ptr != NULL && tile_start[tile + 1] > tile_start[tile]) {
                    memset(excl, 0, sizeof(uint16_t) * (size_t)(n * n_panels));
                    for (int64_t e = tile_start[tile]; e < tile_start[tile + 1]; e++)
                        excl[excl_entries[e] >> 4] |= (uint16_t)(1u << (excl_entries[e] & 15));
                    tile_excl = excl;
                }
                if (vnni_codes)
                    bad |= tks_tile_codes_vnni(&st, codes, scale, bias, row0, n, rsq, tile_excl);
                else if (rows_mode)
                    bad |= tks_tile_rows_avx512(&st, x, codes, scale, bias, row0, n, rsq, tile_excl);
                else if (use_avx512)
                    bad |= tks_tile_avx512(&st, x, row0, n, rsq, tile_excl);
                else
                    bad |= tks_tile_portable(&st, x, row0, n, rsq, tile_excl);
            }
        }
        if (ready)
            bad_out[slot] = (uint8_t)bad;
        free(widened);
        free(rsq);
        free(thr_score);
        free(thr);
        free(excl);
    }
    free(qpanels);
    free(qstats);
    free(q16);
    free(q16_scale);
    free(excl_entries);
    free(tile_at);
    return failed ? -1 : 0;
}
