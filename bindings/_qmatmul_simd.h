/* Quantized matmul and row decoding, written once against _simd.h and compiled at every level (setup.py;
 * the driver and the format ids are in _qmatmul.h). Measurements and decisions: bench/notes/cpu-qmatmul.md.
 *
 * Integer dot products, exact at every level (the same int32 sums everywhere; only float rounding differs):
 * - activations q in [-127, 127] (signed), so vi_dot_i8(w, q) is exact for any signed codes w (q8_0, int8)
 *   and vi_dpbusd(c, q) for the unsigned codes c <= 63 of the others (q5_0 0..31 less 16, q4_k 0..15,
 *   q6_k 0..63 less 32, int4 0..15 less 8): no 16-bit pair of vpmaddubsw can saturate below VNNI. The bias
 *   is added back as -bias * sum(q), per lane (row kernel) or per block (panels).
 * - panels at the VNNI level multiply signed codes by q + 128 (one vpdpbusd), seeded by -128 * sum(w).
 * - panels below VNNI sum up to 8 vpmaddubsw results in int16 lanes before widening (vi_dpbusw) where
 *   the codes are small enough (qm_i16_run): 8 * 2 * 15 * 127 < 32768.
 */
/* take/dequantize equal reference.py (gguf) bit for bit: no multiply-add contraction in this unit (the
 * kernels call vf_fmadd where they mean one). */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "_simd.h"
#include "_qmatmul.h"

#include <stdlib.h>

#define QM_BLOCK 32                 /* weights per activation block (and per scaled block of every format) */
#define QM_VI_BYTES (4 * VF_LANES)
#define QM_PREFETCH 2048            /* bytes ahead of the row kernel's tile that it prefetches (streams from DRAM) */
/* register-blocked loops must unroll fully, or their accumulators live in memory */
#define QM_UNROLL _Pragma("GCC unroll 16")

#define QM_TILE 2           /* row kernel: weight rows per tile (4 and 1 stream slower from DRAM) */
#define QM_XROWS 4          /* row kernel: activation rows per pass when M > 1 */

/* Register blocks per level (16 vector registers below AVX-512, 32 there). */
#if VF_LANES == 16
#define QM_PANEL_XROWS 4    /* panels: activation rows per register block */
#define QM_PANEL_COLS 2     /* panels: panels per register block */
#define QM_FLOAT_ROWS 4     /* float kernel: weight rows x activation rows per register block */
#define QM_FLOAT_XROWS 4
#else
#define QM_PANEL_XROWS 4
#define QM_PANEL_COLS 1
#define QM_FLOAT_ROWS 4
#define QM_FLOAT_XROWS 2
#endif

/* Panels: QM_PANEL_ROWS weight rows; per block of 32 weights, 8 vi of codes (vi j: codes 4j .. 4j + 3 of
 * every row, row r in lane r), then per row an int32 seed (-128 * sum of its signed codes), a float scale
 * and a float extra (q4_k: dmin * m; q6_k: the scale of the block's second 16 codes). */
#define QM_PANEL_ROWS VF_LANES
#define QM_PANEL_SEEDS (32 * QM_PANEL_ROWS)
#define QM_PANEL_SCALES (36 * QM_PANEL_ROWS)
#define QM_PANEL_EXTRA (40 * QM_PANEL_ROWS)
#define QM_PANEL_BLOCK (44 * QM_PANEL_ROWS)

#define QM_SIGNED(fmt) ((fmt) == QM_Q8_0 || (fmt) == QM_INT8)   /* codes are signed bytes, else unsigned + bias */

SIMD_INLINE int qm_bias(int fmt) { return fmt == QM_Q5_0 ? 16 : fmt == QM_INT4 ? 8 : fmt == QM_Q6_K ? 32 : 0; }

/* Panels below VNNI: vpmaddubsw results summed in int16 per widening (the codes' range allows it). */
SIMD_INLINE int qm_i16_run(int fmt)
{
    if (SIMD_LEVEL == 3 || QM_SIGNED(fmt))
        return 1;
    return fmt == QM_Q6_K ? 2 : fmt == QM_Q5_0 ? 4 : 8;
}

SIMD_INLINE float qm_half(const uint8_t *p)
{
    uint16_t bits;
    memcpy(&bits, p, 2);
    return simd_half_to_float(bits);
}

/* the 6-bit scale and min of sub-block s of a Q4_K super-block from its 12 packed bytes */
SIMD_INLINE void qm_q4_k_scale_min(const uint8_t *packed, int s, int *sc, int *m)
{
    if (s < 4) {
        *sc = packed[s] & 63;
        *m = packed[s + 4] & 63;
    } else {
        *sc = (packed[s + 4] & 15) | ((packed[s - 4] >> 6) << 4);
        *m = (packed[s + 4] >> 4) | ((packed[s] >> 6) << 4);
    }
}

/* ---------------------------------------------------------------------------------------------------
 * Rows decoded in plain C (the compiler vectorises these loops for each level's target)
 * --------------------------------------------------------------------------------------------------- */

/* Row r dequantized into out (K floats) with reference.py's float32 operations, in its order. */
static void qm_row_floats(const qm_matrix *w, int64_t r, float *out)
{
    const int64_t K = w->K, G = w->group_size;
    const uint8_t *src = w->data + r * w->row_bytes;
    const float *scales = w->scales == NULL ? NULL : w->scales + r * (K / G);
    switch (w->fmt) {
    case QM_Q8_0:
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *block = src + 34 * b;
            const float d = qm_half(block);
            for (int j = 0; j < 32; j++)
                out[32 * b + j] = (float)(int8_t)block[2 + j] * d;
        }
        break;
    case QM_Q5_0:
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *block = src + 22 * b;
            const float d = qm_half(block);
            uint32_t qh;
            memcpy(&qh, block + 2, 4);
            for (int j = 0; j < 16; j++) {
                const int low = (block[6 + j] & 15) | (int)((qh >> j) & 1) << 4;
                const int high = (block[6 + j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
                out[32 * b + j] = d * (float)(low - 16);
                out[32 * b + 16 + j] = d * (float)(high - 16);
            }
        }
        break;
    case QM_Q4_K:   /* sub-block s: nibble s % 2 of bytes 32 (s / 2) .. + 32 */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 144 * sb;
            const float d = qm_half(block), dmin = qm_half(block + 2);
            for (int s = 0; s < 8; s++) {
                int sc, m;
                qm_q4_k_scale_min(block + 4, s, &sc, &m);
                const float scale = d * (float)sc, offset = dmin * (float)m;
                const uint8_t *q = block + 16 + 32 * (s / 2);
                const int shift = 4 * (s % 2);
                for (int j = 0; j < 32; j++)
                    out[256 * sb + 32 * s + j] = scale * (float)((q[j] >> shift) & 15) - offset;
            }
        }
        break;
    case QM_Q6_K:   /* half h, block t: nibble t / 2 of ql[64h + 32 (t % 2) + i], bits 2t of qh[32h + i] */
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 210 * sb;
            const float d = qm_half(block + 208);
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < 4; t++) {
                    const uint8_t *ql = block + 64 * h + 32 * (t % 2), *qh = block + 128 + 32 * h;
                    float *dst = out + 256 * sb + 128 * h + 32 * t;
                    for (int half = 0; half < 2; half++) {
                        const float scale = d * (float)(int8_t)block[192 + 8 * h + 2 * t + half];
                        for (int i = 16 * half; i < 16 * half + 16; i++) {
                            const int q = ((ql[i] >> (4 * (t / 2))) & 15) | ((qh[i] >> (2 * t)) & 3) << 4;
                            dst[i] = scale * (float)(q - 32);
                        }
                    }
                }
        }
        break;
    case QM_INT8:
        for (int64_t g = 0; g < K / G; g++)
            for (int64_t j = 0; j < G; j++)
                out[g * G + j] = (float)(int8_t)src[g * G + j] * scales[g];
        break;
    case QM_INT4:   /* byte j of a group: element j (low nibble) and j + G / 2 (high nibble), stored + 8 */
        for (int64_t g = 0; g < K / G; g++) {
            const uint8_t *group = src + g * (G / 2);
            for (int64_t j = 0; j < G / 2; j++) {
                out[g * G + j] = (float)((group[j] & 15) - 8) * scales[g];
                out[g * G + G / 2 + j] = (float)((group[j] >> 4) - 8) * scales[g];
            }
        }
        break;
    default:   /* QM_F16 */
        for (int64_t j = 0; j < K; j++)
            out[j] = qm_half(src + 2 * j);
        break;
    }
}

/* Row r's codes in natural order, block b (32 codes) at codes + b * stride: signed for q8_0 and int8,
 * else unsigned (the stored value before its bias). */
static void qm_row_codes(const qm_matrix *w, int64_t r, uint8_t *codes, int64_t stride)
{
    const int64_t K = w->K, G = w->group_size;
    const uint8_t *src = w->data + r * w->row_bytes;
    switch (w->fmt) {
    case QM_Q8_0:
    case QM_INT8:
        for (int64_t b = 0; b < K / 32; b++)
            memcpy(codes + b * stride, src + (w->fmt == QM_Q8_0 ? 34 * b + 2 : 32 * b), 32);
        break;
    case QM_Q5_0:
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *block = src + 22 * b;
            uint8_t *c = codes + b * stride;
            uint32_t qh;
            memcpy(&qh, block + 2, 4);
            for (int j = 0; j < 16; j++) {
                c[j] = (uint8_t)((block[6 + j] & 15) | ((qh >> j) & 1) << 4);
                c[16 + j] = (uint8_t)((block[6 + j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
            }
        }
        break;
    case QM_Q4_K:
        for (int64_t sb = 0; sb < K / 256; sb++)
            for (int p = 0; p < 4; p++) {
                const uint8_t *q = src + 144 * sb + 16 + 32 * p;
                uint8_t *low = codes + (8 * sb + 2 * p) * stride, *high = low + stride;
                for (int j = 0; j < 32; j++) {
                    low[j] = q[j] & 15;
                    high[j] = q[j] >> 4;
                }
            }
        break;
    case QM_Q6_K:
        for (int64_t sb = 0; sb < K / 256; sb++)
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < 4; t++) {
                    const uint8_t *ql = src + 210 * sb + 64 * h + 32 * (t % 2), *qh = src + 210 * sb + 128 + 32 * h;
                    uint8_t *c = codes + (8 * sb + 4 * h + t) * stride;
                    for (int i = 0; i < 32; i++)
                        c[i] = (uint8_t)(((ql[i] >> (4 * (t / 2))) & 15) | ((qh[i] >> (2 * t)) & 3) << 4);
                }
        break;
    default:   /* QM_INT4 */
        for (int64_t e = 0; e < K; e++) {
            const int64_t g = e / G, k = e % G;
            const uint8_t byte = src[g * (G / 2) + (k < G / 2 ? k : k - G / 2)];
            codes[e / 32 * stride + e % 32] = k < G / 2 ? byte & 15 : byte >> 4;
        }
        break;
    }
}

/* Row r's scale per 16 codes (scale16: K / 16 + 1 floats, the last 0 for padding) and q4_k's dmin * m per
 * block of 32 (mins). */
static void qm_row_scales(const qm_matrix *w, int64_t r, float *scale16, float *mins)
{
    const int64_t K = w->K, G = w->group_size;
    const uint8_t *src = w->data + r * w->row_bytes;
    switch (w->fmt) {
    case QM_Q8_0:
    case QM_Q5_0:
        for (int64_t b = 0; b < K / 32; b++)
            scale16[2 * b] = scale16[2 * b + 1] = qm_half(src + (w->fmt == QM_Q8_0 ? 34 : 22) * b);
        break;
    case QM_Q4_K:
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const uint8_t *block = src + 144 * sb;
            const float d = qm_half(block), dmin = qm_half(block + 2);
            for (int s = 0; s < 8; s++) {
                int sc, m;
                qm_q4_k_scale_min(block + 4, s, &sc, &m);
                scale16[16 * sb + 2 * s] = scale16[16 * sb + 2 * s + 1] = d * (float)sc;
                mins[8 * sb + s] = dmin * (float)m;
            }
        }
        break;
    case QM_Q6_K:
        for (int64_t sb = 0; sb < K / 256; sb++) {
            const float d = qm_half(src + 210 * sb + 208);
            for (int i = 0; i < 16; i++)
                scale16[16 * sb + i] = d * (float)(int8_t)src[210 * sb + 192 + i];
        }
        break;
    default: {   /* int8, int4: G a multiple of 32 */
        const float *scales = w->scales + r * (K / G);
        for (int64_t u = 0; u < K / 16; u++)
            scale16[u] = scales[16 * u / G];
        break;
    }
    }
    scale16[K / 16] = 0.0f;
}

/* ---------------------------------------------------------------------------------------------------
 * Activations: int8 per activation block (32 values, or an int8/int4 weight group: qm_span)
 * --------------------------------------------------------------------------------------------------- */

typedef struct {
    int8_t *q;          /* M x K: rint(x / d), |q| <= 127 */
    float *d;           /* M x K / 32: max|x| / 127 of each activation block, repeated for its blocks of 32 */
    float *sum;         /* M x K / 32: the exact float sum of each block (q4_k's mins term) */
    int32_t *qsum;      /* M x K / 16: the sum of q over each half block */
    uint8_t *u;         /* with `biased`, instead of q: M x K, q + 128 (panels of signed codes at the VNNI level) */
    int64_t span;       /* blocks of 32 per activation block: d is one value across them */
    void *memory;
} qm_acts;

/* x -> int8 per activation block of 32 span values, in one pass on `threads` threads (above
 * QM_QUANTIZE_SERIAL_BLOCKS blocks: at large M it is a tenth or more of the product). */
#define QM_QUANTIZE_SERIAL_BLOCKS 4096
static int qm_quantize(const float *x, int64_t M, int64_t K, int fmt, int64_t span, int biased, int threads,
                       qm_acts *a)
{
    const int64_t blocks = M * (K / QM_BLOCK), width = QM_BLOCK * span;
    const int sums = fmt == QM_Q4_K, qsums = !QM_SIGNED(fmt);   /* the horizontal sums only where read */
    a->memory = malloc((size_t)(M * K) + sizeof(float) * (size_t)(4 * blocks));
    if (a->memory == NULL)
        return RS_ERR_MEMORY;
    a->d = (float *)a->memory;
    a->sum = a->d + blocks;
    a->qsum = (int32_t *)(a->sum + blocks);
    a->q = biased ? NULL : (int8_t *)(a->qsum + 2 * blocks);
    a->u = biased ? (uint8_t *)(a->qsum + 2 * blocks) : NULL;
    int8_t *const codes = biased ? (int8_t *)a->u : a->q;   /* q, made q + 128 in place with `biased` */
    a->span = span;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > QM_QUANTIZE_SERIAL_BLOCKS)
    for (int64_t g = 0; g < blocks / span; g++) {
        const float *xg = x + width * g;
        vf amax = vf_zero();
        for (int64_t k = 0; k < width; k += VF_LANES)
            amax = vf_max(amax, vf_abs(vf_load(xg + k)));
        const float m = vf_reduce_max(amax);
        const vf inverse = vf_set1(m > 0.0f ? 127.0f / m : 0.0f);
        for (int64_t i = span * g; i < span * (g + 1); i++) {
            vf sum = vf_zero();
            vi halves[2] = {vi_zero(), vi_zero()};
            for (int k = 0; k < QM_BLOCK / VF_LANES; k++) {
                const vf v = vf_load(x + QM_BLOCK * i + VF_LANES * k);
                const vi q = vf_to_vi(vf_mul(v, inverse));   /* round to nearest even; |q| <= 127 */
                vi_store_i8(codes + QM_BLOCK * i + VF_LANES * k, q);
                if (sums)
                    sum = vf_add(sum, v);
                if (qsums)
                    halves[k * VF_LANES / (QM_BLOCK / 2)] = vi_add(halves[k * VF_LANES / (QM_BLOCK / 2)], q);
            }
            a->d[i] = m / 127.0f;
            a->sum[i] = sums ? vf_reduce_add(sum) : 0.0f;
            a->qsum[2 * i] = qsums ? vi_reduce_add(halves[0]) : 0;
            a->qsum[2 * i + 1] = qsums ? vi_reduce_add(halves[1]) : 0;
            if (biased) {   /* restrict: the compiler may then vectorise the loop */
                uint8_t *restrict u = a->u + QM_BLOCK * i;
                for (int j = 0; j < QM_BLOCK; j++)
                    u[j] ^= 0x80;
            }
        }
    }
    return RS_OK;
}

/* ---------------------------------------------------------------------------------------------------
 * Row kernel (M = 1 from the packed rows; M > 1 on matrices too large for panels)
 *
 * A dot vector holds QM_BLOCKS blocks of 32 codes of one row (8 lanes each). Each chunk of a row (q8_0,
 * int8: QM_BLOCKS blocks; q4_k, int4 with groups >= 64: 32 QM_BLOCKS packed bytes; q5_0, int4 with groups
 * of 32: the 16 bytes of 2 QM_BLOCKS blocks; q6_k: half a super-block) is decoded in registers, in one
 * pass over the row's bytes, into qm_dots(fmt) dot vectors of codes and of their lanes' weight scales.
 * Where a vector's lanes are not the row's codes in order (the low and high nibbles of a byte run), the
 * activations are arranged to match (qm_unit).
 * --------------------------------------------------------------------------------------------------- */

#define QM_BLOCKS (VF_LANES / 8)    /* blocks of 32 codes a dot vector holds */
#define QM_RUNS (VF_LANES / 4)      /* runs of 16 codes (4 lanes) a dot vector holds */

SIMD_INLINE int qm_dots(int fmt) { return fmt == QM_Q6_K ? 4 / QM_BLOCKS : fmt == QM_Q8_0 || fmt == QM_INT8 ? 1 : 2; }
/* chunks per super-block (q4_k, q6_k; else 1): the callers unroll them, so that the decoder's offsets in
 * the super-block are constants */
SIMD_INLINE int qm_chunks_per_super(int fmt) { return fmt == QM_Q4_K ? 4 / QM_BLOCKS : fmt == QM_Q6_K ? 2 : 1; }

static int qm_paired(int fmt, int64_t group_size) { return fmt == QM_Q5_0 || (fmt == QM_INT4 && group_size == 32); }

/* Dot vectors a row: qm_dots(fmt) per chunk, the last chunk padded with zero codes. */
static int64_t qm_vectors(int fmt, int64_t group_size, int64_t K)
{
    const int64_t nb = K / 32;
    if (qm_paired(fmt, group_size))
        return 2 * ((nb + 2 * QM_BLOCKS - 1) / (2 * QM_BLOCKS));
    if (fmt == QM_INT4)
        return 2 * ((K / 64 + QM_BLOCKS - 1) / QM_BLOCKS);
    return (nb + QM_BLOCKS - 1) / QM_BLOCKS;   /* q4_k, q6_k: nb is a multiple of 8 */
}

/* The 16-code unit of the row (unit u: codes 16u .. 16u + 15) in run q of dot vector v, or K / 16 past it. */
static int64_t qm_unit(int fmt, int64_t group_size, int64_t K, int64_t v, int q)
{
    const int64_t nb = K / 32, past = K / 16, chunk = v / 2, d = v % 2;
    if (qm_paired(fmt, group_size)) {   /* run q: the low (d = 0) or high half of block 2 QM_BLOCKS chunk + q */
        const int64_t block = 2 * QM_BLOCKS * chunk + q;
        return block < nb ? 2 * block + d : past;
    }
    if (fmt == QM_Q4_K)   /* step QM_BLOCKS chunk + q / 2: sub-blocks 2 step (low nibbles) and 2 step + 1 */
        return 2 * (2 * (QM_BLOCKS * chunk + q / 2) + d) + q % 2;
    if (fmt == QM_INT4) {   /* step s, 32 bytes at j of group g: codes g G + j .. (low), g G + G / 2 + j .. */
        const int64_t half = group_size / 2, step = QM_BLOCKS * chunk + q / 2;
        if (step >= K / 64)
            return past;
        const int64_t g = 32 * step / half, j = 32 * step % half + 16 * (q % 2);
        return (g * group_size + d * half + j) / 16;
    }
    const int64_t u = 2 * QM_BLOCKS * v + q;   /* q8_0, int8, q6_k: the row in order */
    return u < past ? u : past;
}

/* The activations in dot-vector order. */
typedef struct {
    int64_t n_vectors;
    uint8_t *x;         /* M x n_vectors x QM_VI_BYTES */
    int32_t *seed;      /* M x n_vectors x VF_LANES: -bias * the sum of the lane's 4 activations */
    float *scale;       /* M x n_vectors x VF_LANES: the lane's activation scale */
    int32_t *group;     /* int8, int4: K / 16 + 1: the group of each 16-code unit (16 u / G) */
    void *memory;
} qm_row_acts;

static int qm_arrange(const qm_matrix *w, int64_t M, const qm_acts *a, qm_row_acts *r)
{
    const int fmt = w->fmt;
    const int64_t K = w->K, G = w->group_size, nv = qm_vectors(fmt, G, K), past = K / 16;
    const int bias = qm_bias(fmt);
    static const int8_t none[16];
    r->n_vectors = nv;
    r->memory = malloc((size_t)(M * nv) * (QM_VI_BYTES + 8 * VF_LANES) + sizeof(int32_t) * (size_t)(K / 16 + 1));
    if (r->memory == NULL)
        return RS_ERR_MEMORY;
    r->seed = (int32_t *)r->memory;
    r->scale = (float *)(r->seed + M * nv * VF_LANES);
    r->group = (int32_t *)(r->scale + M * nv * VF_LANES);
    r->x = (uint8_t *)(r->group + K / 16 + 1);
    for (int64_t u = 0; u <= K / 16; u++)
        r->group[u] = (int32_t)(16 * u / G);
    for (int64_t v = 0; v < nv; v++)
        for (int q = 0; q < QM_RUNS; q++) {
            const int64_t u = qm_unit(fmt, G, K, v, q);
            for (int64_t m = 0; m < M; m++) {
                const int64_t vector = m * nv + v;
                const int8_t *x = u == past ? none : a->q + m * K + 16 * u;
                memcpy(r->x + vector * QM_VI_BYTES + 16 * q, x, 16);
                for (int l = 0; l < 4; l++) {
                    const int64_t lane = vector * VF_LANES + 4 * q + l;
                    r->seed[lane] = -bias * (x[4 * l] + x[4 * l + 1] + x[4 * l + 2] + x[4 * l + 3]);
                    r->scale[lane] = u == past ? 0.0f : a->d[m * (K / 32) + u / 2];
                }
            }
        }
    return RS_OK;
}

/* Lanes [i VF_LANES / n, (i + 1) VF_LANES / n) = s[i], for a constant n dividing VF_LANES. */
SIMD_INLINE vf qm_spread(const float *s, const int n)
{
    vf r = vf_set1(s[n - 1]);
    for (int i = n - 2; i >= 0; i--)
        r = vf_select(vmask_first((i + 1) * VF_LANES / n), vf_set1(s[i]), r);
    return r;
}

/* QM_BLOCKS blocks from p[0 ..] into one vi */
SIMD_INLINE vi qm_load_blocks(const uint8_t *const *p)
{
#if QM_BLOCKS == 2
    return vi_load_halves(p[0], p[1]);
#else
    return vi_load(p[0]);
#endif
}

/* Chunk c of the row: qm_dots(fmt) vectors of codes and of their lanes' weight scales (row_scales: the
 * row's int8/int4 scales); q4_k's dmin * m of the chunk's blocks into mins[block]. within: c modulo
 * qm_chunks_per_super(fmt). */
SIMD_INLINE void qm_decode(const int fmt, const uint8_t *row, const float *row_scales, const int32_t *group,
                           int64_t c, const int within, int64_t K, int64_t G, vi *codes, vf *scales, float *mins)
{
    static const uint8_t none[32];
    const vi low4 = vi_set1(0x0F0F0F0F), low2 = vi_set1(0x03030303), bit4 = vi_set1(0x10101010);
    const int64_t nb = K / 32;
    if (fmt == QM_Q8_0 || fmt == QM_INT8) {
        const uint8_t *blocks[QM_BLOCKS];
        float s[QM_BLOCKS];
        for (int k = 0; k < QM_BLOCKS; k++) {
            const int64_t b = QM_BLOCKS * c + k;
            uint16_t d;
            blocks[k] = b >= nb ? none : fmt == QM_Q8_0 ? row + 34 * b + 2 : row + 32 * b;
            if (fmt == QM_Q8_0 && b < nb)
                memcpy(&d, row + 34 * b, 2);
            s[k] = b >= nb ? 0.0f : fmt == QM_Q8_0 ? simd_half_to_float_fast(d) : row_scales[group[2 * b]];
        }
        codes[0] = fmt == QM_INT8 && QM_BLOCKS * (c + 1) <= nb ? vi_load(row + 32 * QM_BLOCKS * c) : qm_load_blocks(blocks);
        scales[0] = qm_spread(s, QM_BLOCKS);
    } else if (qm_paired(fmt, G)) {   /* blocks 2 QM_BLOCKS c + k: 16 bytes of nibbles each */
        const void *pieces[2 * QM_BLOCKS];
        float s[2 * QM_BLOCKS];
        uint64_t low_bits = 0, high_bits = 0;
        for (int k = 0; k < 2 * QM_BLOCKS; k++) {
            const int64_t b = 2 * QM_BLOCKS * c + k;
            pieces[k] = b >= nb ? none : fmt == QM_INT4 ? row + 16 * b : row + 22 * b + 6;
            s[k] = fmt == QM_INT4 && b < nb ? row_scales[b] : 0.0f;
            if (fmt == QM_Q5_0 && b < nb) {   /* bit 4 of code j is bit j of qh */
                uint16_t d;
                uint32_t qh;
                memcpy(&d, row + 22 * b, 2);
                memcpy(&qh, row + 22 * b + 2, 4);
                s[k] = simd_half_to_float_fast(d);
                low_bits |= (uint64_t)(qh & 0xFFFF) << (16 * k);
                high_bits |= (uint64_t)(qh >> 16) << (16 * k);
            }
        }
        const vi raw = fmt == QM_INT4 && 2 * QM_BLOCKS * (c + 1) <= nb ? vi_load(row + 32 * QM_BLOCKS * c)
                                                                      : vi_load_pieces16(pieces);
        codes[0] = vi_and(raw, low4);
        codes[1] = vi_and(vi_srli(raw, 4), low4);
        if (fmt == QM_Q5_0) {
            codes[0] = vi_or(codes[0], vi_and(vi_from_bits(low_bits), bit4));
            codes[1] = vi_or(codes[1], vi_and(vi_from_bits(high_bits), bit4));
        }
        scales[0] = scales[1] = qm_spread(s, 2 * QM_BLOCKS);
    } else if (fmt == QM_Q4_K) {   /* steps QM_BLOCKS c + k of a super-block: sub-blocks 2 step, 2 step + 1 */
        const int64_t sb = c / (4 / QM_BLOCKS);
        const int step = QM_BLOCKS * within;   /* in the super-block */
        const uint8_t *block = row + 144 * sb;
        uint16_t bits[2];
        memcpy(bits, block, 4);
        const float d = simd_half_to_float_fast(bits[0]), dmin = simd_half_to_float_fast(bits[1]);
        float low[QM_BLOCKS], high[QM_BLOCKS];
        for (int k = 0; k < QM_BLOCKS; k++)
            for (int half = 0; half < 2; half++) {
                const int sub = 2 * (step + k) + half;
                int sc, m;
                qm_q4_k_scale_min(block + 4, sub, &sc, &m);
                *(half ? &high[k] : &low[k]) = d * (float)sc;
                mins[8 * sb + sub] = dmin * (float)m;
            }
        const vi raw = vi_load(block + 16 + 32 * step);
        codes[0] = vi_and(raw, low4);
        codes[1] = vi_and(vi_srli(raw, 4), low4);
        scales[0] = qm_spread(low, QM_BLOCKS);
        scales[1] = qm_spread(high, QM_BLOCKS);
    } else if (fmt == QM_INT4) {   /* 32 QM_BLOCKS packed bytes: low and high nibbles; groups >= 64 */
        const uint8_t *steps[QM_BLOCKS];
        float s[QM_BLOCKS];
        for (int k = 0; k < QM_BLOCKS; k++) {
            const int64_t step = QM_BLOCKS * c + k;
            steps[k] = step < K / 64 ? row + 32 * step : none;
            s[k] = step < K / 64 ? row_scales[group[4 * step]] : 0.0f;
        }
        const vi raw = qm_load_blocks(steps);
        codes[0] = vi_and(raw, low4);
        codes[1] = vi_and(vi_srli(raw, 4), low4);
        scales[0] = scales[1] = qm_spread(s, QM_BLOCKS);
    } else {   /* QM_Q6_K: chunk c is half c % 2 of super-block c / 2; block t takes bits 2t of qh (qm_row_floats) */
        static const int32_t units[64] = {   /* entry k: k / 4 (from entry 4u, lane i: unit u + i / 4) */
            0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7,
            8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11, 12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14,
            15, 15, 15, 15};
        const int h = within;
        const uint8_t *block = row + 210 * (c / 2), *ql = block + 64 * h, *qh = block + 128 + 32 * h;
        uint16_t bits;
        memcpy(&bits, block + 208, 2);
        /* the 16-code scales of the super-block (AVX-512) or of this half (8 lanes) */
        const int first = VF_LANES == 16 ? 0 : 8 * h;
        const vf sc = vf_mul(vf_set1(simd_half_to_float_fast(bits)), vf_load_i8((const int8_t *)block + 192 + first));
        for (int d = 0; d < 4 / QM_BLOCKS; d++)   /* the vector's blocks start at unit 8h + 2 QM_BLOCKS d */
            scales[d] = vf_permute(sc, vi_load(units + 4 * (8 * h + 2 * QM_BLOCKS * d - first)));
#if QM_BLOCKS == 2
        static const int32_t shifts[2][16] = {{0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2},
                                              {4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6}};
        const vi low = vi_load(ql), high = vi_load_halves(qh, qh);   /* blocks (0, 1), then (2, 3) */
        codes[0] = vi_or(vi_and(low, low4), vi_slli(vi_and(vi_srlv(high, vi_load(shifts[0])), low2), 4));
        codes[1] = vi_or(vi_and(vi_srli(low, 4), low4), vi_slli(vi_and(vi_srlv(high, vi_load(shifts[1])), low2), 4));
#else
        const vi ql0 = vi_load(ql), ql1 = vi_load(ql + 32), high = vi_load(qh);
        codes[0] = vi_or(vi_and(ql0, low4), vi_slli(vi_and(high, low2), 4));
        codes[1] = vi_or(vi_and(ql1, low4), vi_slli(vi_and(vi_srli(high, 2), low2), 4));
        codes[2] = vi_or(vi_and(vi_srli(ql0, 4), low4), vi_slli(vi_and(vi_srli(high, 4), low2), 4));
        codes[3] = vi_or(vi_and(vi_srli(ql1, 4), low4), vi_slli(vi_and(vi_srli(high, 6), low2), 4));
#endif
    }
}

/* One tile of rows and its buffers. */
typedef struct {
    const uint8_t *rows[QM_TILE];
    const float *row_scales[QM_TILE];
    int64_t first, n_rows;      /* the tile's first row and rows that exist */
    uint8_t *codes;             /* M > 1: QM_TILE x n_vectors x QM_VI_BYTES decoded codes */
    float *scales;              /* M > 1: QM_TILE x n_vectors x VF_LANES their weight scales */
    float *mins;                /* QM_TILE x K / 32: q4_k's dmin * m */
} qm_tile;

/* Every chunk of the tile's rows decoded into its buffers (M > 1: once for all activation rows). */
SIMD_INLINE void qm_decode_tile(const int fmt, qm_tile *tile, const qm_row_acts *ra, int64_t K, int64_t G)
{
    const int D = qm_dots(fmt);
    const int64_t nv = ra->n_vectors;
    const int per_super = qm_chunks_per_super(fmt);
    for (int t = 0; t < QM_TILE; t++)
        for (int64_t c0 = 0; c0 < nv / D; c0 += per_super)
            QM_UNROLL
            for (int within = 0; within < per_super; within++) {
                const int64_t c = c0 + within;
                vi codes[4];
                vf scales[4];
                qm_decode(fmt, tile->rows[t], tile->row_scales[t], ra->group, c, within, K, G, codes, scales,
                          tile->mins + t * (K / 32));
                for (int d = 0; d < D; d++) {
                    vi_store(tile->codes + (t * nv + c * D + d) * QM_VI_BYTES, codes[d]);
                    vf_store(tile->scales + (t * nv + c * D + d) * VF_LANES, scales[d]);
                }
            }
}

/* out[m0 .. m0 + XR, the tile's rows]; fmt, XR and buffered are constants in each inlined copy. */
SIMD_INLINE void qm_row_pass(const int fmt, const int XR, const int buffered, const qm_tile *tile, const qm_acts *a,
                             const qm_row_acts *ra, int64_t K, int64_t G, int64_t N, int64_t m0, float *out)
{
    const int D = qm_dots(fmt), bias = qm_bias(fmt), per_super = qm_chunks_per_super(fmt);
    const int64_t nv = ra->n_vectors, nb = K / 32;
    vf acc[QM_XROWS][QM_TILE];
    QM_UNROLL
    for (int m = 0; m < XR; m++)
        QM_UNROLL
        for (int t = 0; t < QM_TILE; t++)
            acc[m][t] = vf_zero();
    for (int64_t c0 = 0; c0 < nv / D; c0 += per_super)
        QM_UNROLL
        for (int within = 0; within < per_super; within++)
        QM_UNROLL
        for (int t = 0; t < QM_TILE; t++) {
            const int64_t c = c0 + within;
            vi codes[4];
            vf scales[4];
            if (buffered) {
                QM_UNROLL
                for (int d = 0; d < D; d++) {
                    codes[d] = vi_load(tile->codes + (t * nv + c * D + d) * QM_VI_BYTES);
                    scales[d] = vf_load(tile->scales + (t * nv + c * D + d) * VF_LANES);
                }
            } else {
                qm_decode(fmt, tile->rows[t], tile->row_scales[t], ra->group, c, within, K, G, codes, scales,
                          tile->mins + t * nb);
            }
            QM_UNROLL
            for (int d = 0; d < D; d++)
                QM_UNROLL
                for (int m = 0; m < XR; m++) {
                    const int64_t mv = (m0 + m) * nv + c * D + d;
                    const vi x = vi_load(ra->x + mv * QM_VI_BYTES);
                    const vi isum = QM_SIGNED(fmt) ? vi_dot_i8(vi_zero(), codes[d], x)
                                  : vi_dpbusd(bias ? vi_load(ra->seed + mv * VF_LANES) : vi_zero(), codes[d], x);
                    const vf scale = vf_mul(scales[d], vf_load(ra->scale + mv * VF_LANES));
                    acc[m][t] = vf_fmadd(vi_to_vf(isum), scale, acc[m][t]);
                }
        }
    QM_UNROLL
    for (int m = 0; m < XR; m++)
        QM_UNROLL
        for (int t = 0; t < QM_TILE; t++) {
            if (t >= tile->n_rows)
                continue;
            if (fmt == QM_Q4_K) {   /* dmin * m times the exact sums of x; nb is a multiple of 8 */
                const float *mins = tile->mins + t * nb, *sums = a->sum + (m0 + m) * nb;
                int64_t b = 0;
                vf product = vf_zero();
                for (; b + VF_LANES <= nb; b += VF_LANES)
                    product = vf_fmadd(vf_load(mins + b), vf_load(sums + b), product);
                if (b < nb)
                    product = vf_fmadd(vf_load_n(mins + b, (int)(nb - b)), vf_load_n(sums + b, (int)(nb - b)), product);
                acc[m][t] = vf_sub(acc[m][t], product);
            }
            out[(m0 + m) * N + tile->first + t] = vf_reduce_add(acc[m][t]);
        }
}

#define QM_FORMAT_SWITCH(CALL)   /* one inlined copy per format */                                       \
    switch (fmt) {                                                                                      \
    case QM_Q8_0: CALL(QM_Q8_0); break;                                                                 \
    case QM_Q5_0: CALL(QM_Q5_0); break;                                                                 \
    case QM_Q4_K: CALL(QM_Q4_K); break;                                                                 \
    case QM_Q6_K: CALL(QM_Q6_K); break;                                                                 \
    case QM_INT8: CALL(QM_INT8); break;                                                                 \
    default: CALL(QM_INT4); break;                                                                      \
    }
#define QM_GEMV(F) qm_row_pass(F, 1, 0, &tile, &acts, &row_acts, K, G, N, 0, out)
#define QM_DECODE_TILE(F) qm_decode_tile(F, &tile, &row_acts, K, G)
#define QM_PASS(F) qm_row_pass(F, QM_XROWS, 1, &tile, &acts, &row_acts, K, G, N, m0, out)
#define QM_PASS_1(F) qm_row_pass(F, 1, 1, &tile, &acts, &row_acts, K, G, N, m0, out)

/* out (M, N) = x (M, K) @ W.T on the int8-activation path from the packed rows. M = 1 decodes in
 * registers; M > 1 decodes each tile once into its buffers and meets QM_XROWS activation rows per pass.
 * One contiguous range of tiles per thread: two interleaved streams over a matrix far larger than the L3
 * read slower. */
int SIMD_FN(qm_matmul)(const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
{
    const int fmt = w->fmt, buffered = M > 1;
    const int64_t K = w->K, N = w->N, G = w->group_size, nb = K / 32;
    const int64_t n_tiles = (N + QM_TILE - 1) / QM_TILE, tile_bytes = QM_TILE * w->row_bytes;
    qm_acts acts;
    qm_row_acts row_acts;
    if (qm_quantize(x, M, K, fmt, qm_span(fmt, G), 0, threads, &acts) != RS_OK)
        return RS_ERR_MEMORY;
    if (qm_arrange(w, M, &acts, &row_acts) != RS_OK) {
        free(acts.memory);
        return RS_ERR_MEMORY;
    }
    const int64_t nv = row_acts.n_vectors;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (n_tiles > 1)
    {
        float *floats = malloc(sizeof(float) * (size_t)(QM_TILE * (nb + (buffered ? nv * VF_LANES : 0))));
        uint8_t *codes = buffered ? malloc((size_t)(QM_TILE * nv * QM_VI_BYTES)) : NULL;
        const int ready = floats != NULL && (codes != NULL || !buffered);
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        qm_tile tile = {.codes = codes, .mins = floats, .scales = ready ? floats + QM_TILE * nb : NULL};
        /* every thread meets the worksharing loop; one without its buffers skips its tiles */
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (!ready)
                continue;
            tile.first = t * QM_TILE;
            tile.n_rows = N - tile.first < QM_TILE ? N - tile.first : QM_TILE;
            for (int64_t offset = t * tile_bytes + QM_PREFETCH; QM_PREFETCH && offset < (t + 1) * tile_bytes + QM_PREFETCH
                                                                && offset < N * w->row_bytes; offset += 64)
                simd_prefetch_l1(w->data + offset);
            for (int i = 0; i < QM_TILE; i++) {
                const int64_t row = i < tile.n_rows ? tile.first + i : N - 1;   /* results dropped */
                tile.rows[i] = w->data + row * w->row_bytes;
                tile.row_scales[i] = w->scales == NULL ? NULL : w->scales + row * (K / G);
            }
            if (!buffered) {
                QM_FORMAT_SWITCH(QM_GEMV)
                continue;
            }
            QM_FORMAT_SWITCH(QM_DECODE_TILE)
            int64_t m0 = 0;
            for (; m0 + QM_XROWS <= M; m0 += QM_XROWS)
                QM_FORMAT_SWITCH(QM_PASS)
            for (; m0 < M; m0++)
                QM_FORMAT_SWITCH(QM_PASS_1)
        }
        free(floats);
        free(codes);
    }
    free(acts.memory);
    free(row_acts.memory);
    return failed ? RS_ERR_MEMORY : RS_OK;
}

/* ---------------------------------------------------------------------------------------------------
 * Panels (M >= 2): QM_PANEL_ROWS rows per vpdpbusd (layout at QM_PANEL_BLOCK)
 * --------------------------------------------------------------------------------------------------- */

int64_t SIMD_FN(qm_panel_bytes)(int64_t N, int64_t K)
{
    return (N + QM_PANEL_ROWS - 1) / QM_PANEL_ROWS * (K / 32) * QM_PANEL_BLOCK;
}

/* Panel p of W into `panel` (K / 32 * QM_PANEL_BLOCK bytes, zeroed: rows past N stay zero); codes (K
 * bytes) and scale16 (K / 16 + 1 + K / 32 floats) are the caller's scratch. */
static void qm_repack_panel(const qm_matrix *w, int64_t p, uint8_t *panel, uint8_t *codes, float *scale16)
{
    const int fmt = w->fmt;
    const int64_t K = w->K, N = w->N, nb = K / 32;
    float *mins = scale16 + K / 16 + 1;
    for (int64_t r = 0; r < QM_PANEL_ROWS && p * QM_PANEL_ROWS + r < N; r++) {
        qm_row_codes(w, p * QM_PANEL_ROWS + r, codes, 32);
        qm_row_scales(w, p * QM_PANEL_ROWS + r, scale16, mins);
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *block = panel + b * QM_PANEL_BLOCK;
            int32_t seed = 0;
            for (int j = 0; j < 8; j++)
                memcpy(block + 4 * QM_PANEL_ROWS * j + 4 * r, codes + 32 * b + 4 * j, 4);
            for (int k = 0; k < 32 && QM_SIGNED(fmt); k++)
                seed -= 128 * (int8_t)codes[32 * b + k];
            const float extra = fmt == QM_Q6_K ? scale16[2 * b + 1] : fmt == QM_Q4_K ? mins[b] : 0.0f;
            memcpy(block + QM_PANEL_SEEDS + 4 * r, &seed, 4);
            memcpy(block + QM_PANEL_SCALES + 4 * r, &scale16[2 * b], 4);
            memcpy(block + QM_PANEL_EXTRA + 4 * r, &extra, 4);
        }
    }
}

/* W -> panels (qm_panel_bytes(N, K) bytes, zeroed by the caller: rows past N stay zero). */
int SIMD_FN(qm_repack)(const qm_matrix *w, uint8_t *panels, int threads)
{
    const int64_t K = w->K, N = w->N, nb = K / 32, n_panels = (N + QM_PANEL_ROWS - 1) / QM_PANEL_ROWS;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (n_panels > 1)
    {
        uint8_t *codes = malloc((size_t)K);
        float *scale16 = malloc(sizeof(float) * (size_t)(K / 16 + 1 + nb));
        const int ready = codes != NULL && scale16 != NULL;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < n_panels; p++)
            if (ready)
                qm_repack_panel(w, p, panels + p * nb * QM_PANEL_BLOCK, codes, scale16);
        free(codes);
        free(scale16);
    }
    return failed ? RS_ERR_MEMORY : RS_OK;
}

/* out[m0 .. m0 + XR, rows of panels p0 .. p0 + NP), those panels at `group`; fmt, XR and NP are constants
 * in each inlined copy, so the accumulators live in registers. */
SIMD_INLINE void qm_panel_tile(const int fmt, const int XR, const int NP, const uint8_t *group, int64_t p0,
                               const qm_acts *a, int64_t K, int64_t m0, int64_t N, float *out)
{
    const int64_t nb = K / 32;
    const int bias = qm_bias(fmt), halves = fmt == QM_Q6_K ? 2 : 1, run = qm_i16_run(fmt);
    const vi ones = vi_set1(0x00010001);
    vf acc[QM_PANEL_XROWS][QM_PANEL_COLS];
    vi isum[QM_PANEL_XROWS][QM_PANEL_COLS];
    for (int m = 0; m < XR; m++)
        for (int p = 0; p < NP; p++) {
            acc[m][p] = vf_zero();
            isum[m][p] = vi_zero();   /* set at each activation block's first block; this quiets -Wmaybe-uninitialized */
        }
    /* int8, int4: the int32 sums run over a whole activation block (a weight group), then one scaling */
    const int64_t span = fmt == QM_INT8 || fmt == QM_INT4 ? a->span : 1;
    for (int64_t b0 = 0; b0 < nb; b0 += span)
    for (int64_t b = b0; b < b0 + span; b++) {
        const uint8_t *block[QM_PANEL_COLS];
        for (int p = 0; p < NP; p++)
            block[p] = group + (p * nb + b) * QM_PANEL_BLOCK;
        const int first = b == b0, last = b == b0 + span - 1;
        QM_UNROLL
        for (int h = 0; h < halves; h++) {   /* q6_k: codes 0-15 and 16-31 of the block have their own scale */
            for (int m = 0; m < XR; m++) {
                const int32_t *qsum = a->qsum + 2 * ((m0 + m) * nb + b);
                const vi seed = vi_set1(-bias * (halves == 2 ? qsum[h] : qsum[0] + qsum[1]));
                for (int p = 0; p < NP; p++) {
                    const vi block_seed = !QM_SIGNED(fmt) ? seed
                                        : SIMD_LEVEL == 3 ? vi_load(block[p] + QM_PANEL_SEEDS) : vi_zero();
                    isum[m][p] = first ? block_seed : vi_add(isum[m][p], block_seed);
                }
            }
            QM_UNROLL
            for (int j0 = 8 / halves * h; j0 < 8 / halves * (h + 1); j0 += run) {
                vi part[QM_PANEL_XROWS][QM_PANEL_COLS];
                for (int m = 0; m < XR; m++)
                    for (int p = 0; p < NP; p++)
                        part[m][p] = vi_zero();
                QM_UNROLL
                for (int j = j0; j < j0 + run; j++) {
                    vi codes[QM_PANEL_COLS];
                    for (int p = 0; p < NP; p++)
                        codes[p] = vi_load(block[p] + 4 * QM_PANEL_ROWS * j);
                    QM_UNROLL
                    for (int m = 0; m < XR; m++) {
                        const int64_t at = (m0 + m) * K + 32 * b + 4 * j;
                        int32_t four;   /* q, or q + 128 where the biased activations are the ones kept */
                        memcpy(&four, SIMD_LEVEL == 3 && QM_SIGNED(fmt) ? (const void *)(a->u + at) : a->q + at, 4);
                        for (int p = 0; p < NP; p++) {
                            if (run > 1) {
                                part[m][p] = vi_dpbusw(part[m][p], codes[p], vi_set1(four));
                            } else if (!QM_SIGNED(fmt)) {
                                isum[m][p] = vi_dpbusd(isum[m][p], codes[p], vi_set1(four));
                            } else if (SIMD_LEVEL == 3) {   /* q + 128 times the signed codes */
                                isum[m][p] = vi_dpbusd(isum[m][p], vi_set1(four), codes[p]);
                            } else {
                                isum[m][p] = vi_dot_i8(isum[m][p], codes[p], vi_set1(four));
                            }
                        }
                    }
                }
                if (run > 1)
                    for (int m = 0; m < XR; m++)
                        for (int p = 0; p < NP; p++)
                            isum[m][p] = vi_dpwssd(isum[m][p], part[m][p], ones);
            }
            if (!last)
                continue;
            vf scale[QM_PANEL_COLS];
            for (int p = 0; p < NP; p++)
                scale[p] = vf_load((const float *)(block[p] + (h ? QM_PANEL_EXTRA : QM_PANEL_SCALES)));
            for (int m = 0; m < XR; m++) {
                const vf xd = vf_set1(a->d[(m0 + m) * nb + b]);
                for (int p = 0; p < NP; p++)
                    acc[m][p] = vf_fmadd(vi_to_vf(isum[m][p]), vf_mul(scale[p], xd), acc[m][p]);
            }
        }
        if (fmt == QM_Q4_K)
            for (int m = 0; m < XR; m++) {
                const vf xsum = vf_set1(a->sum[(m0 + m) * nb + b]);
                for (int p = 0; p < NP; p++)
                    acc[m][p] = vf_fnmadd(vf_load((const float *)(block[p] + QM_PANEL_EXTRA)), xsum, acc[m][p]);
            }
    }
    for (int p = 0; p < NP; p++) {
        const int64_t column = (p0 + p) * QM_PANEL_ROWS, left = N - column;
        for (int m = 0; m < XR; m++) {
            if (left >= QM_PANEL_ROWS)
                vf_store(out + (m0 + m) * N + column, acc[m][p]);
            else
                vf_store_n(out + (m0 + m) * N + column, acc[m][p], (int)left);
        }
    }
}

/* every activation row against panels p0 .. p0 + NP (at `group`), QM_PANEL_XROWS rows at a time and the
 * rest in one tile: each tile reads the panels once, and for a few rows (one short text) that read is the
 * cost */
SIMD_INLINE void qm_panel_rows(const int fmt, const int NP, const uint8_t *group, int64_t p0, const qm_acts *a,
                               int64_t K, int64_t M, int64_t N, float *out)
{
    int64_t m0 = 0;
    for (; m0 + QM_PANEL_XROWS <= M; m0 += QM_PANEL_XROWS)
        qm_panel_tile(fmt, QM_PANEL_XROWS, NP, group, p0, a, K, m0, N, out);
    switch (M - m0) {   /* QM_PANEL_XROWS is 4 */
    case 3: qm_panel_tile(fmt, 3, NP, group, p0, a, K, m0, N, out); break;
    case 2: qm_panel_tile(fmt, 2, NP, group, p0, a, K, m0, N, out); break;
    case 1: qm_panel_tile(fmt, 1, NP, group, p0, a, K, m0, N, out); break;
    default: break;
    }
}

SIMD_INLINE void qm_panel_columns(const int NP, int fmt, const uint8_t *group, int64_t p0, const qm_acts *a,
                                  int64_t K, int64_t M, int64_t N, float *out)
{
    switch (fmt) {   /* one inlined copy per format */
    case QM_Q8_0: qm_panel_rows(QM_Q8_0, NP, group, p0, a, K, M, N, out); break;
    case QM_Q5_0: qm_panel_rows(QM_Q5_0, NP, group, p0, a, K, M, N, out); break;
    case QM_Q4_K: qm_panel_rows(QM_Q4_K, NP, group, p0, a, K, M, N, out); break;
    case QM_Q6_K: qm_panel_rows(QM_Q6_K, NP, group, p0, a, K, M, N, out); break;
    case QM_INT8: qm_panel_rows(QM_INT8, NP, group, p0, a, K, M, N, out); break;
    default: qm_panel_rows(QM_INT4, NP, group, p0, a, K, M, N, out); break;
    }
}

/* Panels p0 .. p0 + QM_PANEL_COLS (or to the last) at `group` against every activation row. */
SIMD_INLINE void qm_panel_group(int fmt, const uint8_t *group, int64_t p0, int64_t n_panels, const qm_acts *a,
                                int64_t K, int64_t M, int64_t N, float *out)
{
    const int64_t panel_bytes = K / 32 * QM_PANEL_BLOCK;
    if (p0 + QM_PANEL_COLS <= n_panels)
        qm_panel_columns(QM_PANEL_COLS, fmt, group, p0, a, K, M, N, out);
    else
        for (int64_t p = p0; p < n_panels; p++)
            qm_panel_columns(1, fmt, group + (p - p0) * panel_bytes, p, a, K, M, N, out);
}

/* out (M, N) = x (M, K) @ W.T from qm_repack's panels. Parallel over groups of QM_PANEL_COLS panels (their
 * codes stay in L1/L2 while every activation row meets them), statically split. */
int SIMD_FN(qm_panel_matmul)(int fmt, const uint8_t *panels, int64_t N, int64_t K, int64_t group_size, const float *x,
                             int64_t M, float *out, int threads)
{
    const int64_t n_panels = (N + QM_PANEL_ROWS - 1) / QM_PANEL_ROWS;
    const int64_t n_groups = (n_panels + QM_PANEL_COLS - 1) / QM_PANEL_COLS;
    qm_acts acts;
    if (qm_quantize(x, M, K, fmt, qm_span(fmt, group_size), SIMD_LEVEL == 3 && QM_SIGNED(fmt), threads, &acts) != RS_OK)
        return RS_ERR_MEMORY;
    #pragma omp parallel for schedule(static) num_threads(threads) if (n_groups > 1)
    for (int64_t g = 0; g < n_groups; g++)
        qm_panel_group(fmt, panels + g * QM_PANEL_COLS * (K / 32) * QM_PANEL_BLOCK, g * QM_PANEL_COLS, n_panels,
                       &acts, K, M, N, out);
    free(acts.memory);
    return RS_OK;
}

/* out (M, N) = x (M, K) @ W.T through panels repacked on the fly from the packed rows, one group of
 * QM_PANEL_COLS panels at a time into a buffer that stays in L1/L2 while every activation row meets it:
 * the panel kernel's speed for matrices whose stored panels would cost too much memory. */
int SIMD_FN(qm_streamed_panel_matmul)(const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
{
    const int fmt = w->fmt;
    const int64_t K = w->K, N = w->N, nb = K / 32, group_bytes = QM_PANEL_COLS * nb * QM_PANEL_BLOCK;
    const int64_t n_panels = (N + QM_PANEL_ROWS - 1) / QM_PANEL_ROWS;
    const int64_t n_groups = (n_panels + QM_PANEL_COLS - 1) / QM_PANEL_COLS;
    qm_acts acts;
    if (qm_quantize(x, M, K, fmt, qm_span(fmt, w->group_size), SIMD_LEVEL == 3 && QM_SIGNED(fmt), threads, &acts) != RS_OK)
        return RS_ERR_MEMORY;
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (n_groups > 1)
    {
        uint8_t *group = malloc((size_t)(group_bytes + K));
        float *scale16 = malloc(sizeof(float) * (size_t)(K / 16 + 1 + nb));
        const int ready = group != NULL && scale16 != NULL;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < n_groups; g++) {
            if (!ready)
                continue;
            const int64_t p0 = g * QM_PANEL_COLS;
            if ((p0 + QM_PANEL_COLS) * QM_PANEL_ROWS > N)   /* the last group: rows past N are zero */
                memset(group, 0, (size_t)group_bytes);
            for (int64_t p = p0; p < p0 + QM_PANEL_COLS && p < n_panels; p++)
                qm_repack_panel(w, p, group + (p - p0) * nb * QM_PANEL_BLOCK, group + group_bytes, scale16);
            qm_panel_group(fmt, group, p0, n_panels, &acts, K, M, N, out);
        }
        free(group);
        free(scale16);
    }
    free(acts.memory);
    return failed ? RS_ERR_MEMORY : RS_OK;
}

/* ---------------------------------------------------------------------------------------------------
 * Float32 activations (f16 rows; group sizes the int8 path does not take): tiles of rows dequantized
 * exactly, then register blocks of float dot products
 * --------------------------------------------------------------------------------------------------- */

SIMD_INLINE void qm_float_block(const int XR, const float *tile, int64_t n_rows, const float *x, int64_t Kp,
                                int64_t m0, int64_t N, int64_t first, float *out)
{
    vf acc[QM_FLOAT_XROWS][QM_FLOAT_ROWS];
    for (int m = 0; m < XR; m++)
        for (int r = 0; r < QM_FLOAT_ROWS; r++)
            acc[m][r] = vf_zero();
    for (int64_t k = 0; k < Kp; k += VF_LANES) {
        vf wv[QM_FLOAT_ROWS];
        QM_UNROLL
        for (int r = 0; r < QM_FLOAT_ROWS; r++)
            wv[r] = vf_load(tile + r * Kp + k);
        QM_UNROLL
        for (int m = 0; m < XR; m++) {
            const vf xv = vf_load(x + (m0 + m) * Kp + k);
            QM_UNROLL
            for (int r = 0; r < QM_FLOAT_ROWS; r++)
                acc[m][r] = vf_fmadd(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < XR; m++)
        for (int r = 0; r < n_rows; r++)
            out[(m0 + m) * N + first + r] = vf_reduce_add(acc[m][r]);
}

/* out (M, N) = x (M, K) @ W.T in float32, any format. Rows padded to Kp floats (zeros) so that every
 * load is a whole vector. */
int SIMD_FN(qm_float_matmul)(const qm_matrix *w, const float *x, int64_t M, float *out, int threads)
{
    const int64_t K = w->K, N = w->N, Kp = (K + VF_LANES - 1) / VF_LANES * VF_LANES;
    const int64_t n_tiles = (N + QM_FLOAT_ROWS - 1) / QM_FLOAT_ROWS;
    float *padded = calloc((size_t)(M * Kp), sizeof(float));
    if (padded == NULL)
        return RS_ERR_MEMORY;
    for (int64_t m = 0; m < M; m++)
        memcpy(padded + m * Kp, x + m * K, sizeof(float) * (size_t)K);
    int failed = 0;
    #pragma omp parallel num_threads(threads) if (n_tiles > 1)
    {
        float *tile = calloc((size_t)(QM_FLOAT_ROWS * Kp), sizeof(float));
        if (tile == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            if (tile == NULL)
                continue;
            const int64_t first = t * QM_FLOAT_ROWS, n_rows = N - first < QM_FLOAT_ROWS ? N - first : QM_FLOAT_ROWS;
            for (int64_t r = 0; r < n_rows; r++)
                qm_row_floats(w, first + r, tile + r * Kp);
            int64_t m0 = 0;
            for (; m0 + QM_FLOAT_XROWS <= M; m0 += QM_FLOAT_XROWS)
                qm_float_block(QM_FLOAT_XROWS, tile, n_rows, padded, Kp, m0, N, first, out);
            for (; m0 < M; m0++)
                qm_float_block(1, tile, n_rows, padded, Kp, m0, N, first, out);
        }
        free(tile);
    }
    free(padded);
    return failed ? RS_ERR_MEMORY : RS_OK;
}

/* out (n_rows, K) = rows of W dequantized (qm_row_floats), parallel over rows. */
int SIMD_FN(qm_take)(const qm_matrix *w, const int64_t *rows, int64_t n_rows, float *out, int threads)
{
    #pragma omp parallel for schedule(static) num_threads(threads) if (n_rows > 1)
    for (int64_t i = 0; i < n_rows; i++)
        qm_row_floats(w, rows[i], out + i * w->K);
    return RS_OK;
}
