/* Row storage conversions of quantize_rows, written once and compiled at every level (setup.py): plain
 * C that each level's target pragma (_simd.h) lets the compiler vectorise; the same IEEE operations at
 * every level, so the same bits, equal to recscore.kernels.quantize_rows.reference (driver: _quantize_rows.h).
 *
 * int8/int4 follow the reference's arithmetic: min and max in double, scale and bias rounded to float,
 * codes rint((w - bias) / scale) in double with those float values; no contraction in this unit, so no
 * multiply-add changes a code.
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <math.h>

#include "_simd.h"
#include "_quantize_rows.h"

#define RQ_LANES 8      /* independent min/max accumulators, so the scan vectorises without reassociating */

/* One code: rint in the default rounding mode (ties to even, as np.rint), clamped to 0..levels;
 * a NaN quotient (only from qparams beyond float range) clamps to 0, as NumPy's cast does on x86. */
SIMD_INLINE uint8_t rq_code(double value, double offset, double step, double levels)
{
    double code = rint((value - offset) / step);
    code = code > 0.0 ? code : 0.0;
    return (uint8_t)(code < levels ? code : levels);
}

/* One row of dim float or double weights (weights_double) -> its codes (dim bytes for 8 bits,
 * (dim + 1) / 2 for 4), scale and bias. */
SIMD_INLINE void rq_quantize_row(const void *row, int weights_double, int64_t dim, int bits, uint8_t *out,
                                 float *scale, float *bias)
{
    const float *row32 = (const float *)row;
    const double *row64 = (const double *)row;
#define RQ_VALUE(d) (weights_double ? row64[d] : (double)row32[d])   /* exact widening to double */
    const double levels = (double)((1 << bits) - 1);
    double low = dim ? RQ_VALUE(0) : 0.0, high = low;
    if (dim >= RQ_LANES) {
        double lows[RQ_LANES], highs[RQ_LANES];
        for (int k = 0; k < RQ_LANES; k++)
            lows[k] = highs[k] = RQ_VALUE(k);
        int64_t d = RQ_LANES;
        for (; d + RQ_LANES <= dim; d += RQ_LANES)
            for (int k = 0; k < RQ_LANES; k++) {
                const double value = RQ_VALUE(d + k);
                lows[k] = value < lows[k] ? value : lows[k];
                highs[k] = value > highs[k] ? value : highs[k];
            }
        for (int k = 0; k < RQ_LANES; k++) {
            low = lows[k] < low ? lows[k] : low;
            high = highs[k] > high ? highs[k] : high;
        }
        for (; d < dim; d++) {
            const double value = RQ_VALUE(d);
            low = value < low ? value : low;
            high = value > high ? value : high;
        }
    } else {
        for (int64_t d = 1; d < dim; d++) {
            const double value = RQ_VALUE(d);
            low = value < low ? value : low;
            high = value > high ? value : high;
        }
    }
    const float scale32 = (float)((high - low) / levels), bias32 = (float)low;
    *scale = scale32;
    *bias = bias32;
    const double step = scale32, offset = bias32;
    const int64_t row_bytes = bits == 8 ? dim : (dim + 1) / 2;
    if (!(step > 0.0)) {    /* a constant row (or a scale below float's range): every code 0 */
        for (int64_t b = 0; b < row_bytes; b++)
            out[b] = 0;
    } else if (bits == 8) {
        for (int64_t d = 0; d < dim; d++)
            out[d] = rq_code(RQ_VALUE(d), offset, step, levels);
    } else {    /* two codes a byte, low nibble first; an odd dim leaves the last high nibble 0 */
        for (int64_t b = 0; b < dim / 2; b++)
            out[b] = (uint8_t)(rq_code(RQ_VALUE(2 * b), offset, step, levels)
                               | rq_code(RQ_VALUE(2 * b + 1), offset, step, levels) << 4);
        if (dim & 1)
            out[row_bytes - 1] = rq_code(RQ_VALUE(dim - 1), offset, step, levels);
    }
#undef RQ_VALUE
}

/* rows first..last-1 of (rows, dim) weights; one function a weight type, so each sees a constant type */
void SIMD_FN(rq_quantize_float_rows)(const float *weights, int64_t first, int64_t last, int64_t dim, int bits,
                                     uint8_t *codes, float *scale, float *bias)
{
    const int64_t row_bytes = bits == 8 ? dim : (dim + 1) / 2;
    for (int64_t r = first; r < last; r++)
        rq_quantize_row(weights + r * dim, 0, dim, bits, codes + r * row_bytes, scale + r, bias + r);
}

void SIMD_FN(rq_quantize_double_rows)(const double *weights, int64_t first, int64_t last, int64_t dim, int bits,
                                      uint8_t *codes, float *scale, float *bias)
{
    const int64_t row_bytes = bits == 8 ? dim : (dim + 1) / 2;
    for (int64_t r = first; r < last; r++)
        rq_quantize_row(weights + r * dim, 1, dim, bits, codes + r * row_bytes, scale + r, bias + r);
}

/* float32 bits -> IEEE half bits, rounded to nearest even, as NumPy's astype(float16). Branch-free, so
 * it vectorises: every case is computed and one selected. */
SIMD_INLINE uint16_t rq_half_bits(uint32_t bits)
{
    const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    /* NaN: the payload's top bits, or 1 where they are 0 (as NumPy) */
    const uint32_t payload = (magnitude >> 13) & 0x3ffu, nan = 0x7c00u | (payload ? payload : 1);
    /* half normal (from 2^-14): rebias, round the 13 dropped bits to even; a carry into the exponent
     * is right, up to 65520 -> infinity */
    const uint32_t normal = (magnitude + 0xfffu + ((magnitude >> 13) & 1) - 0x38000000u) >> 13;
    /* below 2^-14: adding 0.5f rounds to float's ulp there, 2^-24, the half subnormal step (to nearest
     * even, and right even with flush-to-zero on: only inputs that round to 0 are float subnormals) */
    union { uint32_t u; float f; } value = {magnitude}, sum;
    sum.f = value.f + 0.5f;
    const uint32_t subnormal = sum.u - 0x3f000000u;
    const uint32_t half = magnitude > 0x7f800000u ? nan
                          : magnitude >= 0x47800000u ? 0x7c00u          /* 2^16 and up, and infinity */
                          : magnitude >= 0x38800000u ? normal : subnormal;
    return (uint16_t)(sign | half);
}

/* float32 bits -> bfloat16 bits, rounded to nearest even as torch (and reference.float32_to_bf16_bits) does. */
SIMD_INLINE uint16_t rq_bf16_bits(uint32_t bits)
{
    return (uint16_t)((bits + (((bits >> 16) & 1) + 0x7fffu)) >> 16);
}

/* values first..last-1 */
void SIMD_FN(rq_half_values)(const uint32_t *bits, int64_t first, int64_t last, uint16_t *out)
{
    for (int64_t i = first; i < last; i++)
        out[i] = rq_half_bits(bits[i]);
}

void SIMD_FN(rq_bf16_values)(const uint32_t *bits, int64_t first, int64_t last, uint16_t *out)
{
    for (int64_t i = first; i < last; i++)
        out[i] = rq_bf16_bits(bits[i]);
}
