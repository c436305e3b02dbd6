/* The vector kernels of the fused similarity top-k scan, written once against _simd.h and compiled
 * once per level (setup.py). Included without SIMD_LEVEL (by the driver, _topk_scan.h), this file
 * gives only what both sides share: the codes, the candidate keys and their quickselect, a call's
 * prepared queries, a thread's running top-k, and the description of a compiled level.
 *
 * Scores go straight into each query's running top-k, never into a (B, N) matrix:
 *
 * - B >= tks_rows_below(kind): queries in panels of VF_LANES (prepared by the driver); a register block
 *   multiplies TKS_ROWS(np) corpus rows by np <= TKS_NP panels (an outer product: per dimension np
 *   panel loads, a broadcast of one value a row, rows * np FMAs). A score vector then holds one
 *   row against VF_LANES queries, so the selection is one compare with those queries' thresholds;
 *   only the rare survivors go through the scalar admission.
 * - Fewer queries: one query against VF_LANES rows at a time, each row read in order into its own
 *   accumulator, the VF_LANES reduced together into one vector of scores. int8 rows are scored on
 *   their codes there: exact integer dots with an int16-quantized query (vi_dpwssd) give a proven
 *   bound on each float score first, and only groups where a bound reaches the threshold are
 *   scored in float.
 * - fp16/bf16/int4 tiles (and int8 for panels) are widened into a per-thread float32 tile first.
 *
 * Candidates are int64 keys (order(score) << 32) | (0xFFFFFFFF - id): comparing keys compares
 * scores, then prefers the smaller id. Each query keeps a buffer of keys above its threshold key;
 * a full buffer is cut to the best k by quickselect, which raises the threshold; "score >=
 * threshold score" is the vector pre-test, the key decides ties. A NaN or inf score (or bound)
 * makes the tile report itself; exclusions arrive as a per-tile bitmap (row x panel -> query bits).
 * Measurements behind the constants: bench/notes/cpu-topk.md.
 */
#ifndef TKS_SHARED_H
#define TKS_SHARED_H

#include <stdint.h>
#include <string.h>

#include "_codes.h"

/* Corpus dtypes and metrics, by the names the scan uses. */
enum { TKS_FP32 = RS_DTYPE_FP32, TKS_FP16 = RS_DTYPE_FP16, TKS_BF16 = RS_DTYPE_BF16, TKS_INT8 = RS_DTYPE_INT8,
       TKS_INT4 = RS_DTYPE_INT4, TKS_DTYPES = RS_DTYPES };
enum { TKS_IP = RS_METRIC_IP, TKS_COSINE = RS_METRIC_COSINE, TKS_L2 = RS_METRIC_L2, TKS_METRICS = RS_METRICS };
/* Fewer queries than this go one query at a time against groups of rows, more in panels. int8 rows are
 * scored on their codes there (the integer bound), which beats widening them to float32 for the
 * panels up to ~10 queries; float32 rows reach the panels' speed from 5 (bench/notes/cpu-topk.md). */
static inline int64_t tks_rows_below(int kind) { return kind == TKS_INT8 ? 11 : 5; }
#define TKS_MAX_LANES 16   /* exclusion bitmaps hold a panel's query bits in a uint16 */
#define TKS_QUANT_ALIGN 64 /* int16 query rows are padded with zeros to a multiple of this */
#define TKS_LOW32 0xFFFFFFFFLL

/* int32 bits of a float -> an int32 that orders like the float (non-NaN); its own inverse. */
static inline int32_t tks_order(int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); }
static inline int32_t tks_bits(float x) { int32_t b; memcpy(&b, &x, 4); return b; }
static inline float tks_float(int32_t b) { float x; memcpy(&x, &b, 4); return x; }
#define TKS_FLOOR_KEY ((int64_t)RS_TOPK_FLOOR_KEY)

/* The index of the lowest set bit of bits != 0. */
static inline int tks_lowest_bit(uint32_t bits)
{
#if defined(__GNUC__)
    return __builtin_ctz(bits);
#else
    int i = 0;
    while (!((bits >> i) & 1))
        i++;
    return i;
#endif
}

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

/* One call: the corpus and the queries as the driver prepared them for the level's lane count. */
typedef struct {
    int kind, metric;
    const void *rows;            /* n_rows rows: float32, fp16/bf16 bits, int8 codes, int4 nibbles */
    const float *scale, *bias;   /* (n_rows) int8/int4 */
    int64_t n_rows, dim, B, k, cap;
    int64_t n_panels;            /* ceil(B / lanes) */
    const float *queries;        /* (B, dim) */
    const float *qpanels;        /* (n_panels, dim, lanes), zero padded */
    const float *qsq, *qnorm, *qsum;   /* (n_panels * lanes): |q|^2, |q|, sum of q; 0 on padding */
    const float *qtail;          /* (B, lanes): q[dim - lanes + i] where that is past the whole vectors, else 0 */
    uint16_t last_lanes;         /* the lanes of the last panel that hold queries */
    /* int8 rows, B < tks_rows_below(TKS_INT8): the integer bound */
    int int8_bound;              /* 0: every group scored in float (the tests' reference) */
    int64_t q16_stride;          /* dim rounded up to TKS_QUANT_ALIGN */
    const int16_t *q16;          /* (B, q16_stride) rint(q / q16_scale), zero padded */
    const int16_t *q16_tail;     /* (B, 2 * lanes): as qtail, for vectors of 2 * lanes int16 */
    const float *q16_scale, *q16_slack;   /* (B) */
} tks_call;

/* One thread's running top-k and tile buffers. */
typedef struct {
    int64_t *keys;               /* (B, cap) candidates */
    int64_t *counts;             /* (B) */
    int64_t *thr;                /* (B) threshold keys */
    float *thr_score;            /* (n_panels * lanes) threshold scores; +inf on padding lanes */
    float *widened;              /* (tile_rows * dim + lanes) a non-fp32 tile as float32 */
    float *norms;                /* (tile_rows + lanes) per row |x|^2 (l2) or |x| (cosine) */
} tks_thread;

/* Scores rows row0 .. row0+n against every query into th; excl: the tile's bitmap, (n, n_panels)
 * of excluded query bits (all zero without exclusions: one code path, whose speed does not hang on
 * how the compiler lays out a second). Returns 1 when a score came out NaN or inf. */
typedef int (*tks_tile_fn)(const tks_call *call, tks_thread *th, int64_t row0, int64_t n, const uint16_t *excl);

typedef struct {
    int lanes;        /* VF_LANES: queries a panel, rows a group */
    int block_rows;   /* TKS_ROW_UNIT: panel tiles hold whole register blocks of rows */
    tks_tile_fn tile;
} tks_level;

#endif

#if defined(SIMD_LEVEL) && !defined(TKS_SIMD_H)
#define TKS_SIMD_H

#include "_simd.h"

/* Register blocks: TKS_ROWS(np) rows x np <= TKS_NP panels of accumulators, plus np panel vectors
 * and a broadcast row value, inside the register file; AVX2's two FMA pipes need 8 or more
 * accumulators in flight (4 cycles each), so fewer panels take more rows. TKS_ROW_UNIT: a multiple
 * of every TKS_ROWS(np) (panel tiles hold whole blocks). */
#if SIMD_LEVEL >= 2
#define TKS_NP 4
#define TKS_ROWS(np) 6                                       /* 24 + 4 + 1 of 32 zmm */
#define TKS_MAX_ROWS 6
#define TKS_ROW_UNIT 6
#elif SIMD_LEVEL == 1
#define TKS_NP 3
#define TKS_ROWS(np) ((np) == 3 ? 4 : (np) == 2 ? 6 : 8)     /* 12 + 3 + 1, 12 + 2 + 1, 8 + 1 + 1 of 16 ymm */
#define TKS_MAX_ROWS 8
#define TKS_ROW_UNIT 24
#else
#define TKS_NP 2
#define TKS_ROWS(np) ((np) == 2 ? 2 : 4)                     /* 8 lanes are 2 SSE registers: 8 + 4 + 1 of 16 */
#define TKS_MAX_ROWS 4
#define TKS_ROW_UNIT 4
#endif
#define TKS_L VF_LANES
#define TKS_W (2 * VF_LANES)   /* int16 values a vi holds */
/* Rows of at most this many int8 codes are read a column step of a whole group at a time. */
#define TKS_SHORT_CODE_ROWS 64
/* Groups of int8 rows ahead prefetched into L1 on the short-row path. */
#define TKS_CODE_PREFETCH_GROUPS 4

#if defined(__GNUC__)
#define TKS_UNROLL _Pragma("GCC unroll 16")
#define TKS_UNROLL_2 _Pragma("GCC unroll 2")
#else
#define TKS_UNROLL
#define TKS_UNROLL_2
#endif

/* lanes i >= TKS_L - t of tks_ones_from(t) are 1, the others 0 (t the values past the whole vectors) */
static const float tks_ramp[2 * TKS_MAX_LANES] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                   1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1 };
SIMD_INLINE vf tks_ones_from(int64_t t) { return vf_load(tks_ramp + TKS_MAX_LANES - TKS_L + t); }

/* Offer one score of query q for corpus row id to its buffer. */
static inline void tks_admit(const tks_call *call, tks_thread *th, int64_t q, float score, int64_t id)
{
    const int64_t key = ((int64_t)tks_order(tks_bits(score + 0.0f)) << 32) | (TKS_LOW32 - id);   /* -0 -> +0 */
    if (key <= th->thr[q])
        return;
    int64_t *keys = th->keys + q * call->cap;
    keys[th->counts[q]++] = key;
    if (th->counts[q] == call->cap) {
        tks_keep_best(keys, call->cap, call->k);
        th->counts[q] = call->k;
        int64_t t = keys[0];
        for (int64_t i = 1; i < call->k; i++)
            t = keys[i] < t ? keys[i] : t;
        th->thr[q] = t;
        th->thr_score[q] = tks_float(tks_order((int32_t)(t >> 32)));
    }
}

/* NaN or inf in x turns the running check vector NaN (x * 0 is 0 for any finite x). */
SIMD_INLINE vf tks_check(vf check, vf x) { return vf_fmadd(x, vf_zero(), check); }

/* Rows row0 .. row0+n of a non-fp32 corpus as float32 (n, dim) into out (n * dim + TKS_L floats):
 * fp16/bf16 widened, int8/int4 codes dequantized as code * scale + bias (fused at the SIMD levels).
 * A row's last vector may spill zeros into the next row's start, which that row then overwrites. */
static void tks_widen(const tks_call *call, int64_t row0, int64_t n, float *out)
{
    const int64_t dim = call->dim;
    if (call->kind == TKS_FP16 || call->kind == TKS_BF16) {
        const uint16_t *src = (const uint16_t *)call->rows + row0 * dim;
        const int64_t count = n * dim;
        int64_t i = 0;
        if (call->kind == TKS_FP16) {
            for (; i + TKS_L <= count; i += TKS_L)
                vf_store(out + i, vf_load_f16(src + i));
            if (i < count)
                vf_store(out + i, vf_load_f16_n(src + i, (int)(count - i)));
        } else {
            for (; i + TKS_L <= count; i += TKS_L)
                vf_store(out + i, vf_load_bf16(src + i));
            if (i < count)
                vf_store(out + i, vf_load_bf16_n(src + i, (int)(count - i)));
        }
        return;
    }
    const int int8 = call->kind == TKS_INT8;
    const int64_t row_bytes = int8 ? dim : (dim + 1) / 2;
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *src = (const uint8_t *)call->rows + (row0 + r) * row_bytes;
        const vf s = vf_set1(call->scale[row0 + r]), b = vf_set1(call->bias[row0 + r]);
        float *dst = out + r * dim;
        int64_t c = 0;
        if (int8) {
            for (; c + TKS_L <= dim; c += TKS_L)
                vf_store(dst + c, vf_fmadd(vf_load_u8(src + c), s, b));
            if (c < dim && dim >= TKS_L)   /* the last TKS_L codes again: no partial load */
                vf_store(dst + dim - TKS_L, vf_fmadd(vf_load_u8(src + dim - TKS_L), s, b));
            else if (c < dim)
                vf_store(dst, vf_fmadd(vf_load_u8_n(src, (int)dim), s, b));
        } else {
            for (; c + TKS_L <= dim; c += TKS_L)
                vf_store(dst + c, vf_fmadd(vf_load_u4(src + c / 2), s, b));
            if (c < dim)
                vf_store(dst + c, vf_fmadd(vf_load_u4_n(src + c / 2, (int)(dim - c)), s, b));
        }
    }
}

/* sum over i < dim of row[i] * q[i]: whole vectors, then the last TKS_L values against qtail
 * (zero where the whole vectors took them), or a partial load when dim < TKS_L. */
SIMD_INLINE vf tks_dot(const float *row, const float *q, const float *qtail, int64_t dim)
{
    vf even = vf_zero(), odd = vf_zero();
    int64_t c = 0;
    for (; c + 2 * TKS_L <= dim; c += 2 * TKS_L) {
        even = vf_fmadd(vf_load(row + c), vf_load(q + c), even);
        odd = vf_fmadd(vf_load(row + c + TKS_L), vf_load(q + c + TKS_L), odd);
    }
    if (c + TKS_L <= dim) {
        even = vf_fmadd(vf_load(row + c), vf_load(q + c), even);
        c += TKS_L;
    }
    if (c < dim)
        odd = dim >= TKS_L ? vf_fmadd(vf_load(row + dim - TKS_L), vf_load(qtail), odd)
                           : vf_fmadd(vf_load_n(row, (int)dim), vf_load_n(q, (int)dim), odd);
    return vf_add(even, odd);
}

/* The same for int8 codes (as float32 codes). */
SIMD_INLINE vf tks_code_dot(const uint8_t *row, const float *q, const float *qtail, int64_t dim)
{
    vf even = vf_zero(), odd = vf_zero();
    int64_t c = 0;
    for (; c + 2 * TKS_L <= dim; c += 2 * TKS_L) {
        even = vf_fmadd(vf_load_u8(row + c), vf_load(q + c), even);
        odd = vf_fmadd(vf_load_u8(row + c + TKS_L), vf_load(q + c + TKS_L), odd);
    }
    if (c + TKS_L <= dim) {
        even = vf_fmadd(vf_load_u8(row + c), vf_load(q + c), even);
        c += TKS_L;
    }
    if (c < dim)
        odd = dim >= TKS_L ? vf_fmadd(vf_load_u8(row + dim - TKS_L), vf_load(qtail), odd)
                           : vf_fmadd(vf_load_u8_n(row, (int)dim), vf_load_n(q, (int)dim), odd);
    return vf_add(even, odd);
}

/* The norm the metric needs of each row: |x|^2 (l2) or |x| (cosine), groups of TKS_L rows (the
 * last group repeats the last row, so norms[0 .. n rounded up to TKS_L) all hold values).
 * x: float32 rows, or (codes != NULL) int8 codes standing for code * scale + bias. */
static void tks_norms(const tks_call *call, const float *x, const uint8_t *codes, int64_t row0, int64_t n,
                      float *norms)
{
    const int64_t dim = call->dim, full = dim / TKS_L * TKS_L;
    const vf keep = tks_ones_from(dim - full);   /* the last vector's lanes past the whole vectors */
    for (int64_t j = 0; j < n; j += TKS_L) {
        const int64_t m = n - j < TKS_L ? n - j : TKS_L;
        vf acc[TKS_L];
        TKS_UNROLL
        for (int r = 0; r < TKS_L; r++) {
            const int64_t row = j + (r < m ? r : m - 1);
            vf sum = vf_zero();
            if (codes == NULL) {
                const float *v = x + row * dim;
                for (int64_t c = 0; c < full; c += TKS_L)
                    sum = vf_fmadd(vf_load(v + c), vf_load(v + c), sum);
                if (full < dim) {
                    const vf last = dim >= TKS_L ? vf_mul(vf_load(v + dim - TKS_L), keep) : vf_load_n(v, (int)dim);
                    sum = vf_fmadd(last, last, sum);
                }
            } else {
                const uint8_t *v = codes + row * dim;
                const vf s = vf_set1(call->scale[row0 + row]), b = vf_set1(call->bias[row0 + row]);
                for (int64_t c = 0; c < full; c += TKS_L) {
                    const vf value = vf_fmadd(vf_load_u8(v + c), s, b);
                    sum = vf_fmadd(value, value, sum);
                }
                if (full < dim) {
                    const vf last = dim >= TKS_L ? vf_mul(vf_fmadd(vf_load_u8(v + dim - TKS_L), s, b), keep)
                                                 : vf_select(vmask_first((int)dim),
                                                             vf_fmadd(vf_load_u8_n(v, (int)dim), s, b), vf_zero());
                    sum = vf_fmadd(last, last, sum);
                }
            }
            acc[r] = sum;
        }
        const vf sq = vf_reduce_add_each(acc);
        vf_store(norms + j, call->metric == TKS_COSINE ? vf_sqrt(sq) : sq);
    }
}

/* Query q's scores from the dots s of a group of rows (lane r: row r; norms as tks_norms). */
SIMD_INLINE vf tks_group_metric(const tks_call *call, int64_t q, vf s, const float *norms, vf *check)
{
    if (call->metric == TKS_L2) {
        const vf dist = vf_add(vf_fnmadd(vf_set1(2.0f), s, vf_load(norms)), vf_set1(call->qsq[q]));
        *check = tks_check(*check, dist);
        s = vf_sub(vf_zero(), vf_max(dist, vf_zero()));
    } else if (call->metric == TKS_COSINE) {
        const vf denom = vf_mul(vf_load(norms), vf_set1(call->qnorm[q]));
        *check = tks_check(tks_check(*check, s), denom);
        s = vf_select(vf_gt(denom, vf_zero()), vf_div(s, denom), vf_zero());
    }
    return s;
}

/* Scores s of query q for rows id0 + r, lanes r in `lanes`, into its top-k (excl: the rows'
 * bitmap rows). */
SIMD_INLINE void tks_group_select(const tks_call *call, tks_thread *th, int64_t q, vf s, uint32_t lanes,
                                  int64_t id0, const uint16_t *excl)
{
    uint32_t pass = vmask_bits(vf_ge(s, vf_set1(th->thr_score[q]))) & lanes;
    if (pass) {
        float score[TKS_L];
        vf_store(score, s);
        const int64_t panel = q / TKS_L, bit = q % TKS_L;
        for (; pass; pass &= pass - 1) {
            const int r = tks_lowest_bit(pass);
            if (!((excl[r * call->n_panels + panel] >> bit) & 1))
                tks_admit(call, th, q, score[r], id0 + r);
        }
    }
}

/* One tile against each query in turn, TKS_L float32 rows at a time. */
static vf tks_tile_rows(const tks_call *call, tks_thread *th, const float *x, int64_t row0, int64_t n,
                        const uint16_t *excl, vf check)
{
    const int64_t dim = call->dim;
    for (int64_t q = 0; q < call->B; q++) {
        const float *query = call->queries + q * dim, *qtail = call->qtail + q * TKS_L;
        for (int64_t j = 0; j < n; j += TKS_L) {
            const int64_t m = n - j < TKS_L ? n - j : TKS_L;
            vf acc[TKS_L];
            TKS_UNROLL
            for (int r = 0; r < TKS_L; r++)
                acc[r] = tks_dot(x + (j + (r < m ? r : m - 1)) * dim, query, qtail, dim);
            vf s = tks_group_metric(call, q, vf_reduce_add_each(acc), th->norms + j, &check);
            check = tks_check(check, s);
            tks_group_select(call, th, q, s, (uint32_t)((1ull << m) - 1), row0 + j, excl + j * call->n_panels);
        }
    }
    return check;
}

/* Integer dots of TKS_L int8 rows (rows past m repeat row m - 1) with query q's int16 codes. */
SIMD_INLINE vi tks_code_idots(const tks_call *call, int64_t q, const uint8_t *group, int64_t m)
{
    const int64_t dim = call->dim;
    const int16_t *q16 = call->q16 + q * call->q16_stride, *q16_tail = call->q16_tail + q * TKS_W;
    const uint8_t *rows[TKS_L];
    vi acc[TKS_L];
    TKS_UNROLL
    for (int r = 0; r < TKS_L; r++) {
        rows[r] = group + (r < m ? r : m - 1) * dim;
        acc[r] = vi_zero();
    }
    if (dim < TKS_W) {   /* short rows through a zero-padded copy (q16 rows are zero padded) */
        const vi qv = vi_load(q16);
        TKS_UNROLL
        for (int r = 0; r < TKS_L; r++) {
            uint8_t padded[2 * TKS_MAX_LANES] = { 0 };
            memcpy(padded, rows[r], (size_t)dim);
            acc[r] = vi_dpwssd(acc[r], vi_load_u8_i16(padded), qv);
        }
    } else if (dim <= TKS_SHORT_CODE_ROWS) {
        /* short rows: a column step of all TKS_L rows at a time (the sums stay in registers), the
         * groups a few ahead prefetched into L1 */
        for (int64_t at = 0; at < TKS_L * dim; at += 64)
            simd_prefetch_l1(group + TKS_CODE_PREFETCH_GROUPS * TKS_L * dim + at);
        int64_t c = 0;
        for (; c + TKS_W <= dim; c += TKS_W) {
            const vi qv = vi_load(q16 + c);
            TKS_UNROLL
            for (int r = 0; r < TKS_L; r++)
                acc[r] = vi_dpwssd(acc[r], vi_load_u8_i16(rows[r] + c), qv);
        }
        if (c < dim) {
            const vi qv = vi_load(q16_tail);
            TKS_UNROLL
            for (int r = 0; r < TKS_L; r++)
                acc[r] = vi_dpwssd(acc[r], vi_load_u8_i16(rows[r] + dim - TKS_W), qv);
        }
    } else {   /* long rows: each read through in order */
        TKS_UNROLL
        for (int r = 0; r < TKS_L; r++) {
            vi sum = vi_zero();
            int64_t c = 0;
            for (; c + TKS_W <= dim; c += TKS_W)
                sum = vi_dpwssd(sum, vi_load_u8_i16(rows[r] + c), vi_load(q16 + c));
            if (c < dim)
                sum = vi_dpwssd(sum, vi_load_u8_i16(rows[r] + dim - TKS_W), vi_load(q16_tail));
            acc[r] = sum;
        }
    }
    return vi_reduce_add_each(acc);
}

/* int8 rows for one query at a time, scored on their codes as scale * (codes . q) + bias * sum(q).
 * With the bound: codes . q16 in exact int32, q16 = rint(q / q16_scale) (no sum can overflow), then
 * dot <= q16_scale * idot (rounded up) + q16_slack[q], the slack covering 255 * sum|q - q16_scale *
 * q16| and the float rounding of the float dot; the score grows with the dot where scale >= 0 (l2
 * and cosine increase with it too), so a row whose bound misses the threshold cannot enter. The
 * rare groups where one reaches it are scored in float, and the rows that reached it offered. */
static vf tks_tile_codes(const tks_call *call, tks_thread *th, const uint8_t *codes, int64_t row0, int64_t n,
                         const uint16_t *excl, vf check)
{
    const int64_t dim = call->dim;
    for (int64_t q = 0; q < call->B; q++) {
        const float *query = call->queries + q * dim, *qtail = call->qtail + q * TKS_L;
        const vf q_sum = vf_set1(call->qsum[q]);
        for (int64_t j = 0; j < n; j += TKS_L) {
            const int64_t m = n - j < TKS_L ? n - j : TKS_L;
            const uint32_t valid = (uint32_t)((1ull << m) - 1);
            const uint8_t *group = codes + j * dim;
            const vf row_scale = m == TKS_L ? vf_load(call->scale + row0 + j) : vf_load_n(call->scale + row0 + j, (int)m);
            const vf row_bias = m == TKS_L ? vf_load(call->bias + row0 + j) : vf_load_n(call->bias + row0 + j, (int)m);
            const vf bias_part = vf_mul(row_bias, q_sum);
            uint32_t reach = valid;
            if (call->int8_bound) {
                const vf approx = vf_mul(vi_to_vf(tks_code_idots(call, q, group, m)), vf_set1(call->q16_scale[q]));
                /* two roundings (int -> float, the product) of at most 2**-24 each, rounded up generously */
                const vf margin = vf_fmadd(vf_abs(approx), vf_set1(0x1p-21f), vf_set1(call->q16_slack[q]));
                /* the score grows with the dot where scale >= 0 (always, from quantize_rows), else falls */
                const vf dot_bound = vf_select(vf_gt(vf_zero(), row_scale), vf_sub(approx, margin), vf_add(approx, margin));
                vf bound = tks_group_metric(call, q, vf_fmadd(row_scale, dot_bound, bias_part), th->norms + j, &check);
                check = tks_check(check, bound);
                reach &= vmask_bits(vf_ge(bound, vf_set1(th->thr_score[q])));
                if (!reach)
                    continue;
            }
            vf acc[TKS_L];
            TKS_UNROLL
            for (int r = 0; r < TKS_L; r++)
                acc[r] = tks_code_dot(group + (r < m ? r : m - 1) * dim, query, qtail, dim);
            vf s = vf_fmadd(row_scale, vf_reduce_add_each(acc), bias_part);
            s = tks_group_metric(call, q, s, th->norms + j, &check);
            check = tks_check(check, s);
            tks_group_select(call, th, q, s, reach, row0 + j, excl + j * call->n_panels);
        }
    }
    return check;
}

/* Scores of rows x[0 .. mr) (ids id0 ..) against np panels from p0 into th, in a block of nr rows.
 * Rows past mr repeat row mr - 1 (their scores are dropped); norms as tks_norms, excl as the tile's
 * bitmap from row id0. */
SIMD_INLINE vf tks_block(const tks_call *call, tks_thread *th, const float *x, int64_t mr, int64_t id0, int64_t p0,
                         const float *norms, const uint16_t *excl, const int np, const int nr, vf check)
{
    const int64_t dim = call->dim;
    const float *rows[TKS_MAX_ROWS];
    TKS_UNROLL
    for (int r = 0; r < nr; r++)
        rows[r] = x + (r < mr ? r : mr - 1) * dim;
    const float *panel = call->qpanels + p0 * dim * TKS_L;
    vf acc[TKS_MAX_ROWS][TKS_NP];
    TKS_UNROLL
    for (int r = 0; r < nr; r++)
        TKS_UNROLL
        for (int p = 0; p < np; p++)
            acc[r][p] = vf_zero();
    TKS_UNROLL_2
    for (int64_t c = 0; c < dim; c++) {
        vf qv[TKS_NP];
        TKS_UNROLL
        for (int p = 0; p < np; p++)
            qv[p] = vf_load(panel + (p * dim + c) * TKS_L);
        TKS_UNROLL
        for (int r = 0; r < nr; r++) {
            const vf xv = vf_set1(rows[r][c]);
            TKS_UNROLL
            for (int p = 0; p < np; p++)
                acc[r][p] = vf_fmadd(xv, qv[p], acc[r][p]);
        }
    }
    vf thr[TKS_NP];
    TKS_UNROLL
    for (int p = 0; p < np; p++)
        thr[p] = vf_load(th->thr_score + (p0 + p) * TKS_L);
    TKS_UNROLL
    for (int r = 0; r < nr; r++) {
        if (r >= mr)
            break;
        TKS_UNROLL
        for (int p = 0; p < np; p++) {
            const int64_t lane0 = (p0 + p) * TKS_L;
            vf s = acc[r][p];
            if (call->metric == TKS_L2) {
                const vf dist = vf_add(vf_fnmadd(vf_set1(2.0f), s, vf_set1(norms[r])), vf_load(call->qsq + lane0));
                check = tks_check(check, dist);
                s = vf_sub(vf_zero(), vf_max(dist, vf_zero()));
            } else if (call->metric == TKS_COSINE) {
                const vf denom = vf_mul(vf_set1(norms[r]), vf_load(call->qnorm + lane0));
                check = tks_check(tks_check(check, s), denom);
                s = vf_select(vf_gt(denom, vf_zero()), vf_div(s, denom), vf_zero());
            }
            check = tks_check(check, s);
            uint32_t pass = vmask_bits(vf_ge(s, thr[p]));
            if (pass) {   /* rare: the masks of excluded queries and padding lanes only here */
                pass &= ~(uint32_t)excl[r * call->n_panels + p0 + p];
                if (p0 + p == call->n_panels - 1)
                    pass &= call->last_lanes;
                float score[TKS_L];
                vf_store(score, s);
                for (; pass; pass &= pass - 1) {
                    const int lane = tks_lowest_bit(pass);
                    tks_admit(call, th, lane0 + lane, score[lane], id0 + r);
                }
                thr[p] = vf_load(th->thr_score + lane0);   /* raised by a full buffer */
            }
        }
    }
    return check;
}

/* Rows x[0 .. n) against np panels from p0 in blocks of TKS_ROWS(np) rows. */
SIMD_INLINE vf tks_panels_block(const tks_call *call, tks_thread *th, const float *x, int64_t row0, int64_t n,
                                int64_t p0, const uint16_t *excl, const int np, vf check)
{
    const int nr = TKS_ROWS(np);
    for (int64_t j = 0; j < n; j += nr)
        check = tks_block(call, th, x + j * call->dim, n - j < nr ? n - j : nr, row0 + j, p0, th->norms + j,
                          excl + j * call->n_panels, np, nr, check);
    return check;
}

/* One tile (float32 rows x) against every query panel, in blocks of up to TKS_NP panels as even as
 * they come (4 panels at TKS_NP = 3: 2 + 2, not 3 + 1). */
static vf tks_tile_panels(const tks_call *call, tks_thread *th, const float *x, int64_t row0, int64_t n,
                          const uint16_t *excl, vf check)
{
    const int64_t n_blocks = (call->n_panels + TKS_NP - 1) / TKS_NP;
    for (int64_t b = 0, p0 = 0; b < n_blocks; b++) {
        const int64_t np = call->n_panels / n_blocks + (b < call->n_panels % n_blocks);
        switch (np) {
#if TKS_NP >= 4
        case 4: check = tks_panels_block(call, th, x, row0, n, p0, excl, 4, check); break;
#endif
#if TKS_NP >= 3
        case 3: check = tks_panels_block(call, th, x, row0, n, p0, excl, 3, check); break;
#endif
        case 2: check = tks_panels_block(call, th, x, row0, n, p0, excl, 2, check); break;
        default: check = tks_panels_block(call, th, x, row0, n, p0, excl, 1, check); break;
        }
        p0 += np;
    }
    return check;
}

static int tks_tile(const tks_call *call, tks_thread *th, int64_t row0, int64_t n, const uint16_t *excl)
{
    const int rows_mode = call->B < tks_rows_below(call->kind);
    /* int8 rows for one query at a time are scored on their codes where they lie */
    const uint8_t *codes = rows_mode && call->kind == TKS_INT8 ? (const uint8_t *)call->rows + row0 * call->dim : NULL;
    const float *x = th->widened;
    if (call->kind == TKS_FP32)
        x = (const float *)call->rows + row0 * call->dim;
    else if (codes == NULL)
        tks_widen(call, row0, n, th->widened);
    if (call->metric != TKS_IP)
        tks_norms(call, x, codes, row0, n, th->norms);
    vf check = vf_zero();
    if (codes != NULL)
        check = tks_tile_codes(call, th, codes, row0, n, excl, check);
    else if (rows_mode)
        check = tks_tile_rows(call, th, x, row0, n, excl, check);
    else
        check = tks_tile_panels(call, th, x, row0, n, excl, check);
    return vmask_bits(vf_finite(check)) != (uint32_t)((1ull << TKS_L) - 1);
}

const tks_level SIMD_FN(tks_level) = { VF_LANES, TKS_ROW_UNIT, tks_tile };

#endif
