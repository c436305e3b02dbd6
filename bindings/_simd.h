/* One vector layer under every CPU kernel: a kernel is written once against these types and
 * operations and compiled once per level (setup.py makes one translation unit a level, each
 * defining SIMD_LEVEL before including the kernel source, which includes this file first).
 *
 *   SIMD_LEVEL 0  baseline: plain C on arrays of 8 lanes, which the compiler vectorises for the
 *                 target it builds for (SSE2 on x86-64, NEON on ARM); any C99 compiler.
 *   SIMD_LEVEL 1  AVX2 + FMA + F16C (+ BMI2), 8 float lanes.
 *   SIMD_LEVEL 2  AVX-512 F/BW/DQ/VL, 16 float lanes.
 *   SIMD_LEVEL 3  level 2 with AVX-512 VNNI (vi_dpbusd in one instruction).
 *
 * Only this file names intrinsics; the target of each level is set here by a pragma over the
 * whole translation unit, so no compile flag (-march) is needed and the extension loads on any
 * CPU: the C entry points refuse a level the CPU lacks (_cpu.h). Exported kernel functions are
 * named SIMD_FN(name): name_baseline, name_avx2, name_avx512, name_avx512_vnni.
 *
 * Types: vf (VF_LANES float32), vi (VF_LANES int32, or 4 * VF_LANES bytes for the dot
 * products), vmask (a per-lane condition).
 */
#ifndef RS_SIMD_H
#define RS_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifndef SIMD_LEVEL
#error "define SIMD_LEVEL (0 baseline, 1 avx2, 2 avx512, 3 avx512 vnni) before including _simd.h"
#endif

#define SIMD_CAT2(a, b) a##b
#define SIMD_CAT(a, b) SIMD_CAT2(a, b)
#if defined(__GNUC__)
#define SIMD_INLINE static inline __attribute__((always_inline))
#else
#define SIMD_INLINE static inline
#endif

#if SIMD_LEVEL == 0
#define SIMD_SUFFIX _baseline
#elif SIMD_LEVEL == 1
#define SIMD_SUFFIX _avx2
#elif SIMD_LEVEL == 2
#define SIMD_SUFFIX _avx512
#elif SIMD_LEVEL == 3
#define SIMD_SUFFIX _avx512_vnni
#else
#error "SIMD_LEVEL must be 0, 1, 2 or 3"
#endif
#define SIMD_FN(name) SIMD_CAT(name, SIMD_SUFFIX)

/* The target of the whole translation unit (closed by _simd_end.h for clang). */
#if SIMD_LEVEL == 1
#define SIMD_TARGET "avx2,fma,f16c,bmi,bmi2,popcnt"
#elif SIMD_LEVEL == 2
#define SIMD_TARGET "avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512dq,avx512vl"
#elif SIMD_LEVEL == 3
#define SIMD_TARGET "avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"
#endif
#if SIMD_LEVEL >= 1
#if defined(__clang__)
#define SIMD_STRING(x) #x
#define SIMD_PRAGMA(x) _Pragma(SIMD_STRING(x))
SIMD_PRAGMA(clang attribute push(__attribute__((target(SIMD_TARGET))), apply_to = function))
#else
#if SIMD_LEVEL == 1
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#elif SIMD_LEVEL == 2
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512dq,avx512vl")
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
#endif
#endif
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------------------------------
 * Scalar helpers every level shares
 * --------------------------------------------------------------------------------------- */

/* IEEE half -> float, exact (subnormals, inf, NaN). */
SIMD_INLINE float simd_half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {                                  /* subnormal: the value is mantissa * 2^-24 */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The same in one instruction where the level has F16C: equal for every value but a signalling NaN,
 * which comes back quiet. */
SIMD_INLINE float simd_half_to_float_fast(uint16_t h)
{
#if SIMD_LEVEL >= 1
    return _cvtsh_ss(h);
#else
    return simd_half_to_float(h);
#endif
}

SIMD_INLINE float simd_bf16_to_float(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if SIMD_LEVEL >= 2
/* =======================================================================================
 * AVX-512: 16 lanes
 * ======================================================================================= */
#define VF_LANES 16
typedef __m512 vf;
typedef __m512i vi;
typedef __mmask16 vmask;

SIMD_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
SIMD_INLINE vf vf_set1(float x) { return _mm512_set1_ps(x); }
SIMD_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
SIMD_INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
/* Branch-free (one bzhi), so a loop-invariant n stays hoisted out of the loop. */
SIMD_INLINE vmask vmask_first(int n) { return (vmask)_bzhi_u32(0xFFFF, (unsigned)(n < 0 ? 0 : n > 16 ? 16 : n)); }
/* The first n lanes (0 <= n <= VF_LANES) from p, the rest 0; reads p[0..n-1] only. */
SIMD_INLINE vf vf_load_n(const float *p, int n) { return _mm512_maskz_loadu_ps(vmask_first(n), p); }
SIMD_INLINE void vf_store_n(float *p, vf v, int n) { _mm512_mask_storeu_ps(p, vmask_first(n), v); }
SIMD_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
SIMD_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
SIMD_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
SIMD_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
SIMD_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }     /* a * b + c */
SIMD_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }   /* c - a * b */
SIMD_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
SIMD_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
SIMD_INLINE vf vf_abs(vf a) { return _mm512_abs_ps(a); }
SIMD_INLINE vf vf_sqrt(vf a) { return _mm512_sqrt_ps(a); }
SIMD_INLINE float vf_reduce_add(vf a) { return _mm512_reduce_add_ps(a); }
SIMD_INLINE float vf_reduce_max(vf a) { return _mm512_reduce_max_ps(a); }
SIMD_INLINE vmask vf_gt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
SIMD_INLINE vmask vf_ge(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
/* Lanes that are neither inf nor NaN. */
SIMD_INLINE vmask vf_finite(vf a) { return (vmask)~_mm512_fpclass_ps_mask(a, 0x99); }
SIMD_INLINE vf vf_select(vmask m, vf if_true, vf if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
SIMD_INLINE uint32_t vmask_bits(vmask m) { return (uint32_t)m; }
SIMD_INLINE vmask vmask_and(vmask a, vmask b) { return (vmask)(a & b); }

SIMD_INLINE vf vf_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
SIMD_INLINE vf vf_load_bf16(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
SIMD_INLINE vf vf_load_u8(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))); }
SIMD_INLINE vf vf_load_i8(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
/* 16 4-bit codes from 8 bytes: lane 2j the low nibble of byte j, lane 2j+1 its high nibble. */
SIMD_INLINE vf vf_from_u4_bytes(__m128i packed)
{
    const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(packed, packed));
    const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(twice, shifts), _mm512_set1_epi32(15)));
}
SIMD_INLINE vf vf_load_u4(const uint8_t *p) { return vf_from_u4_bytes(_mm_loadl_epi64((const __m128i *)p)); }
/* Tails: the first n values (0 <= n <= VF_LANES), the other lanes 0; reads nothing past them. */
SIMD_INLINE vf vf_load_f16_n(const uint16_t *p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(vmask_first(n), p)); }
SIMD_INLINE vf vf_load_bf16_n(const uint16_t *p, int n)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(vmask_first(n), p)), 16));
}
SIMD_INLINE vf vf_load_u8_n(const uint8_t *p, int n) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(vmask_first(n), p))); }
SIMD_INLINE vf vf_load_i8_n(const int8_t *p, int n) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(vmask_first(n), p))); }
SIMD_INLINE vf vf_load_u4_n(const uint8_t *p, int n)
{
    return _mm512_maskz_mov_ps(vmask_first(n), vf_from_u4_bytes(_mm_maskz_loadu_epi8(vmask_first((n + 1) / 2), p)));
}

SIMD_INLINE vi vi_zero(void) { return _mm512_setzero_si512(); }
SIMD_INLINE vi vi_set1(int32_t x) { return _mm512_set1_epi32(x); }
SIMD_INLINE vi vi_load(const void *p) { return _mm512_loadu_si512(p); }   /* VF_LANES int32 or 4 * VF_LANES bytes */
SIMD_INLINE void vi_store(void *p, vi v) { _mm512_storeu_si512(p, v); }
/* The VF_LANES int32 lanes as VF_LANES bytes at p, each saturated to int8. */
SIMD_INLINE void vi_store_i8(int8_t *p, vi v) { _mm_storeu_si128((__m128i *)p, _mm512_cvtsepi32_epi8(v)); }
SIMD_INLINE vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
SIMD_INLINE vi vi_sub(vi a, vi b) { return _mm512_sub_epi32(a, b); }
SIMD_INLINE vi vi_mullo(vi a, vi b) { return _mm512_mullo_epi32(a, b); }
SIMD_INLINE vf vi_to_vf(vi a) { return _mm512_cvtepi32_ps(a); }
SIMD_INLINE vi vf_to_vi(vf a) { return _mm512_cvtps_epi32(a); }   /* round to nearest even */
SIMD_INLINE vf vi_as_vf(vi a) { return _mm512_castsi512_ps(a); }   /* the same bits as float32 lanes */
SIMD_INLINE int32_t vi_reduce_add(vi a) { return _mm512_reduce_add_epi32(a); }
/* acc + per lane the sum of 4 adjacent products u[j] * s[j] of unsigned bytes u and signed bytes s.
 * Exact at every level when no two adjacent products sum beyond int16 (|u| <= 127, or s never -128
 * with u <= 128): below VNNI the pairs go through a saturating 16-bit step (vpmaddubsw). */
SIMD_INLINE vi vi_dpbusd(vi acc, vi u, vi s)
{
#if SIMD_LEVEL == 3
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
/* acc + per lane the sum of 2 adjacent int16 products (exact but for -32768 * -32768 twice). */
SIMD_INLINE vi vi_dpwssd(vi acc, vi a, vi b)
{
#if SIMD_LEVEL == 3
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
/* acc + per lane the sum of 4 adjacent products of signed bytes a and b (exact at every level when b
 * never holds -128; a may). */
SIMD_INLINE vi vi_dot_i8(vi acc, vi a, vi b)
{
    const __mmask64 negative = _mm512_movepi8_mask(a);
    const __m512i b_signed = _mm512_mask_sub_epi8(b, negative, _mm512_setzero_si512(), b);
    return vi_dpbusd(acc, _mm512_abs_epi8(a), b_signed);
}
/* acc + per int16 lane (2 * VF_LANES of them) the sum of 2 adjacent products u[j] * s[j] of unsigned
 * bytes u and signed bytes s; exact while each pair and the int16 sums stay within int16. */
SIMD_INLINE vi vi_dpbusw(vi acc, vi u, vi s) { return _mm512_add_epi16(acc, _mm512_maddubs_epi16(u, s)); }
SIMD_INLINE vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
SIMD_INLINE vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
SIMD_INLINE vi vi_xor(vi a, vi b) { return _mm512_xor_si512(a, b); }
SIMD_INLINE vi vi_srli(vi a, int n) { return _mm512_srli_epi32(a, (unsigned)n); }   /* logical, per int32 lane */
SIMD_INLINE vi vi_slli(vi a, int n) { return _mm512_slli_epi32(a, (unsigned)n); }
SIMD_INLINE vi vi_srlv(vi a, vi n) { return _mm512_srlv_epi32(a, n); }   /* lane i shifted right by n[i] (0..31) */
/* The low half of a vi (2 * VF_LANES bytes) from lo, the high half from hi. */
SIMD_INLINE vi vi_load_halves(const void *lo, const void *hi)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}
/* 16 bytes from each of p[0 .. VF_LANES / 4), in that order. */
SIMD_INLINE vi vi_load_pieces16(const void *const *p)
{
    const __m256i low = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p[0])),
                                                _mm_loadu_si128((const __m128i *)p[1]), 1);
    const __m256i high = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p[2])),
                                                 _mm_loadu_si128((const __m128i *)p[3]), 1);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}
/* Byte i (< 4 * VF_LANES) all ones where bit i of bits is set, else 0. */
SIMD_INLINE vi vi_from_bits(uint64_t bits) { return _mm512_movm_epi8((__mmask64)bits); }
/* Lane i = a[idx[i]] (0 <= idx[i] < VF_LANES). */
SIMD_INLINE vf vf_permute(vf a, vi idx) { return _mm512_permutexvar_ps(idx, a); }
/* 2 * VF_LANES bytes zero-extended to int16 lanes (for vi_dpwssd). */
SIMD_INLINE vi vi_load_u8_i16(const uint8_t *p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
/* Lane i of the result = the sum of a[i]'s lanes, for a[0 .. VF_LANES) (a transpose-add tree). */
SIMD_INLINE vf vf_reduce_add_each(const vf *a)
{
    __m512 s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; i++)   /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: rows 4i .. 4i+3 */
        const __m512d x = _mm512_castps_pd(s1[2 * i]), y = _mm512_castps_pd(s1[2 * i + 1]);
        s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88), _mm512_shuffle_f32x4(s3[0], s3[1], 0xDD));
}
SIMD_INLINE vi vi_reduce_add_each(const vi *a)
{
    __m512i s1[8], s2[4], s3[2];
    for (int i = 0; i < 8; i++)
        s1[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        s2[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s1[2 * i], s1[2 * i + 1]), _mm512_unpackhi_epi64(s1[2 * i], s1[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        s3[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], 0x88),
                                 _mm512_shuffle_i32x4(s2[2 * i], s2[2 * i + 1], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s3[0], s3[1], 0x88), _mm512_shuffle_i32x4(s3[0], s3[1], 0xDD));
}

#elif SIMD_LEVEL == 1
/* =======================================================================================
 * AVX2 + FMA + F16C: 8 lanes
 * ======================================================================================= */
#define VF_LANES 8
typedef __m256 vf;
typedef __m256i vi;
typedef __m256 vmask;   /* all bits set in a true lane */

SIMD_INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
SIMD_INLINE vf vf_set1(float x) { return _mm256_set1_ps(x); }
SIMD_INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
SIMD_INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
SIMD_INLINE __m256i simd_first_lanes(int n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
SIMD_INLINE vmask vmask_first(int n) { return _mm256_castsi256_ps(simd_first_lanes(n)); }
SIMD_INLINE vf vf_load_n(const float *p, int n) { return _mm256_maskload_ps(p, simd_first_lanes(n)); }
SIMD_INLINE void vf_store_n(float *p, vf v, int n) { _mm256_maskstore_ps(p, simd_first_lanes(n), v); }
SIMD_INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
SIMD_INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
SIMD_INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
SIMD_INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
SIMD_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
SIMD_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
SIMD_INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
SIMD_INLINE vf vf_min(vf a, vf b) { return _mm256_min_ps(a, b); }
SIMD_INLINE vf vf_abs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
SIMD_INLINE vf vf_sqrt(vf a) { return _mm256_sqrt_ps(a); }
SIMD_INLINE float vf_reduce_add(vf a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
SIMD_INLINE float vf_reduce_max(vf a)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
SIMD_INLINE vmask vf_gt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
SIMD_INLINE vmask vf_ge(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
SIMD_INLINE vmask vf_finite(vf a)   /* exponent bits not all ones */
{
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    return _mm256_castsi256_ps(_mm256_xor_si256(
        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(a), exponent), exponent), _mm256_set1_epi32(-1)));
}
SIMD_INLINE vf vf_select(vmask m, vf if_true, vf if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
SIMD_INLINE uint32_t vmask_bits(vmask m) { return (uint32_t)_mm256_movemask_ps(m); }
SIMD_INLINE vmask vmask_and(vmask a, vmask b) { return _mm256_and_ps(a, b); }

SIMD_INLINE vf vf_load_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
SIMD_INLINE vf vf_load_bf16(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
SIMD_INLINE vf vf_load_u8(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
SIMD_INLINE vf vf_load_i8(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
SIMD_INLINE vf vf_from_u4_bytes(__m128i packed)   /* 8 codes from the low 4 bytes */
{
    const __m256i twice = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(packed, packed));
    const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(twice, shifts), _mm256_set1_epi32(15)));
}
SIMD_INLINE vf vf_load_u4(const uint8_t *p)
{
    int32_t bytes;
    memcpy(&bytes, p, 4);
    return vf_from_u4_bytes(_mm_cvtsi32_si128(bytes));
}
/* Tails: through a zeroed buffer, so nothing past the n values is read. */
SIMD_INLINE vf vf_load_f16_n(const uint16_t *p, int n)
{
    uint16_t b[8] = { 0 };
    memcpy(b, p, 2 * (size_t)n);
    return vf_load_f16(b);
}
SIMD_INLINE vf vf_load_bf16_n(const uint16_t *p, int n)
{
    uint16_t b[8] = { 0 };
    memcpy(b, p, 2 * (size_t)n);
    return vf_load_bf16(b);
}
SIMD_INLINE vf vf_load_u8_n(const uint8_t *p, int n)
{
    uint8_t b[16] = { 0 };
    memcpy(b, p, (size_t)n);
    return vf_load_u8(b);
}
SIMD_INLINE vf vf_load_i8_n(const int8_t *p, int n)
{
    int8_t b[16] = { 0 };
    memcpy(b, p, (size_t)n);
    return vf_load_i8(b);
}
SIMD_INLINE vf vf_load_u4_n(const uint8_t *p, int n)
{
    uint8_t b[8] = { 0 };
    memcpy(b, p, (size_t)(n + 1) / 2);
    return _mm256_and_ps(vf_load_u4(b), vmask_first(n));
}

SIMD_INLINE vi vi_zero(void) { return _mm256_setzero_si256(); }
SIMD_INLINE vi vi_set1(int32_t x) { return _mm256_set1_epi32(x); }
SIMD_INLINE vi vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
SIMD_INLINE void vi_store(void *p, vi v) { _mm256_storeu_si256((__m256i *)p, v); }
SIMD_INLINE void vi_store_i8(int8_t *p, vi v)
{
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)p, _mm_packs_epi16(words, words));
}
SIMD_INLINE vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
SIMD_INLINE vi vi_sub(vi a, vi b) { return _mm256_sub_epi32(a, b); }
SIMD_INLINE vi vi_mullo(vi a, vi b) { return _mm256_mullo_epi32(a, b); }
SIMD_INLINE vf vi_to_vf(vi a) { return _mm256_cvtepi32_ps(a); }
SIMD_INLINE vi vf_to_vi(vf a) { return _mm256_cvtps_epi32(a); }
SIMD_INLINE vf vi_as_vf(vi a) { return _mm256_castsi256_ps(a); }   /* the same bits as float32 lanes */
SIMD_INLINE int32_t vi_reduce_add(vi a)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
SIMD_INLINE vi vi_dpbusd(vi acc, vi u, vi s)
{
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
SIMD_INLINE vi vi_dpwssd(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
SIMD_INLINE vi vi_dot_i8(vi acc, vi a, vi b) { return vi_dpbusd(acc, _mm256_abs_epi8(a), _mm256_sign_epi8(b, a)); }
SIMD_INLINE vi vi_dpbusw(vi acc, vi u, vi s) { return _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s)); }
SIMD_INLINE vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
SIMD_INLINE vi vi_or(vi a, vi b) { return _mm256_or_si256(a, b); }
SIMD_INLINE vi vi_xor(vi a, vi b) { return _mm256_xor_si256(a, b); }
SIMD_INLINE vi vi_srli(vi a, int n) { return _mm256_srli_epi32(a, n); }
SIMD_INLINE vi vi_slli(vi a, int n) { return _mm256_slli_epi32(a, n); }
SIMD_INLINE vi vi_srlv(vi a, vi n) { return _mm256_srlv_epi32(a, n); }
SIMD_INLINE vi vi_load_halves(const void *lo, const void *hi)
{
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                   _mm_loadu_si128((const __m128i *)hi), 1);
}
SIMD_INLINE vi vi_load_pieces16(const void *const *p) { return vi_load_halves(p[0], p[1]); }
SIMD_INLINE vi vi_from_bits(uint64_t bits)   /* each byte takes its bit's byte of bits, then tests its own bit */
{
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int32_t)(uint32_t)bits),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                 0x0101010101010101, 0));
    const __m256i others = _mm256_set1_epi64x(0x7FBFDFEFF7FBFDFE);   /* every bit but the byte's own */
    return _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1));
}
SIMD_INLINE vf vf_permute(vf a, vi idx) { return _mm256_permutevar8x32_ps(a, idx); }
SIMD_INLINE vi vi_load_u8_i16(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }
SIMD_INLINE vf vf_reduce_add_each(const vf *a)
{
    /* per 128-bit half: lane i = the sum of that half of a[i] (rows 0-3, then 4-7) */
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}
SIMD_INLINE vi vi_reduce_add_each(const vi *a)
{
    const __m256i s0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    const __m256i s1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(s0, s1, 0x20), _mm256_permute2x128_si256(s0, s1, 0x31));
}

#else
/* =======================================================================================
 * Baseline: plain C on 8 lanes; -O3 vectorises these loops for the build's own target.
 * ======================================================================================= */
#define VF_LANES 8
typedef struct { float v[8]; } vf;
typedef struct { int32_t v[8]; } vi;
typedef struct { int32_t v[8]; } vmask;   /* 1 in a true lane */

#define SIMD_LANEWISE(type, expr) type r; for (int j = 0; j < 8; j++) r.v[j] = (expr); return r
SIMD_INLINE vf vf_zero(void) { SIMD_LANEWISE(vf, 0.0f); }
SIMD_INLINE vf vf_set1(float x) { SIMD_LANEWISE(vf, x); }
SIMD_INLINE vf vf_load(const float *p) { vf r; memcpy(r.v, p, sizeof r.v); return r; }
SIMD_INLINE void vf_store(float *p, vf v) { memcpy(p, v.v, sizeof v.v); }
SIMD_INLINE vmask vmask_first(int n) { SIMD_LANEWISE(vmask, j < n); }
SIMD_INLINE vf vf_load_n(const float *p, int n) { vf r = vf_zero(); memcpy(r.v, p, 4 * (size_t)n); return r; }
SIMD_INLINE void vf_store_n(float *p, vf v, int n) { memcpy(p, v.v, 4 * (size_t)n); }
SIMD_INLINE vf vf_add(vf a, vf b) { SIMD_LANEWISE(vf, a.v[j] + b.v[j]); }
SIMD_INLINE vf vf_sub(vf a, vf b) { SIMD_LANEWISE(vf, a.v[j] - b.v[j]); }
SIMD_INLINE vf vf_mul(vf a, vf b) { SIMD_LANEWISE(vf, a.v[j] * b.v[j]); }
SIMD_INLINE vf vf_div(vf a, vf b) { SIMD_LANEWISE(vf, a.v[j] / b.v[j]); }
SIMD_INLINE vf vf_fmadd(vf a, vf b, vf c) { SIMD_LANEWISE(vf, a.v[j] * b.v[j] + c.v[j]); }
SIMD_INLINE vf vf_fnmadd(vf a, vf b, vf c) { SIMD_LANEWISE(vf, c.v[j] - a.v[j] * b.v[j]); }
SIMD_INLINE vf vf_max(vf a, vf b) { SIMD_LANEWISE(vf, a.v[j] > b.v[j] ? a.v[j] : b.v[j]); }
SIMD_INLINE vf vf_min(vf a, vf b) { SIMD_LANEWISE(vf, a.v[j] < b.v[j] ? a.v[j] : b.v[j]); }
SIMD_INLINE vf vf_abs(vf a) { SIMD_LANEWISE(vf, fabsf(a.v[j])); }
SIMD_INLINE vf vf_sqrt(vf a) { SIMD_LANEWISE(vf, sqrtf(a.v[j])); }
SIMD_INLINE float vf_reduce_add(vf a)
{
    return ((a.v[0] + a.v[4]) + (a.v[2] + a.v[6])) + ((a.v[1] + a.v[5]) + (a.v[3] + a.v[7]));
}
SIMD_INLINE float vf_reduce_max(vf a)
{
    float m = a.v[0];
    for (int j = 1; j < 8; j++)
        m = a.v[j] > m ? a.v[j] : m;
    return m;
}
SIMD_INLINE vmask vf_gt(vf a, vf b) { SIMD_LANEWISE(vmask, a.v[j] > b.v[j]); }
SIMD_INLINE vmask vf_ge(vf a, vf b) { SIMD_LANEWISE(vmask, a.v[j] >= b.v[j]); }
SIMD_INLINE vmask vf_finite(vf a) { SIMD_LANEWISE(vmask, isfinite(a.v[j]) != 0); }
SIMD_INLINE vf vf_select(vmask m, vf if_true, vf if_false) { SIMD_LANEWISE(vf, m.v[j] ? if_true.v[j] : if_false.v[j]); }
SIMD_INLINE uint32_t vmask_bits(vmask m)
{
    uint32_t bits = 0;
    for (int j = 0; j < 8; j++)
        bits |= (uint32_t)(m.v[j] != 0) << j;
    return bits;
}
SIMD_INLINE vmask vmask_and(vmask a, vmask b) { SIMD_LANEWISE(vmask, a.v[j] & b.v[j]); }

SIMD_INLINE vf vf_load_f16(const uint16_t *p) { SIMD_LANEWISE(vf, simd_half_to_float(p[j])); }
SIMD_INLINE vf vf_load_bf16(const uint16_t *p) { SIMD_LANEWISE(vf, simd_bf16_to_float(p[j])); }
SIMD_INLINE vf vf_load_u8(const uint8_t *p) { SIMD_LANEWISE(vf, (float)p[j]); }
SIMD_INLINE vf vf_load_i8(const int8_t *p) { SIMD_LANEWISE(vf, (float)p[j]); }
SIMD_INLINE vf vf_load_u4(const uint8_t *p) { SIMD_LANEWISE(vf, (float)((p[j / 2] >> (4 * (j & 1))) & 15)); }
SIMD_INLINE vf vf_load_f16_n(const uint16_t *p, int n) { SIMD_LANEWISE(vf, j < n ? simd_half_to_float(p[j]) : 0.0f); }
SIMD_INLINE vf vf_load_bf16_n(const uint16_t *p, int n) { SIMD_LANEWISE(vf, j < n ? simd_bf16_to_float(p[j]) : 0.0f); }
SIMD_INLINE vf vf_load_u8_n(const uint8_t *p, int n) { SIMD_LANEWISE(vf, j < n ? (float)p[j] : 0.0f); }
SIMD_INLINE vf vf_load_i8_n(const int8_t *p, int n) { SIMD_LANEWISE(vf, j < n ? (float)p[j] : 0.0f); }
SIMD_INLINE vf vf_load_u4_n(const uint8_t *p, int n)
{
    SIMD_LANEWISE(vf, j < n ? (float)((p[j / 2] >> (4 * (j & 1))) & 15) : 0.0f);
}

SIMD_INLINE vi vi_zero(void) { SIMD_LANEWISE(vi, 0); }
SIMD_INLINE vi vi_set1(int32_t x) { SIMD_LANEWISE(vi, x); }
SIMD_INLINE vi vi_load(const void *p) { vi r; memcpy(r.v, p, sizeof r.v); return r; }
SIMD_INLINE void vi_store(void *p, vi v) { memcpy(p, v.v, sizeof v.v); }
SIMD_INLINE void vi_store_i8(int8_t *p, vi v)
{
    for (int j = 0; j < 8; j++)
        p[j] = (int8_t)(v.v[j] < -128 ? -128 : v.v[j] > 127 ? 127 : v.v[j]);
}
SIMD_INLINE vi vi_add(vi a, vi b) { SIMD_LANEWISE(vi, (int32_t)((uint32_t)a.v[j] + (uint32_t)b.v[j])); }
SIMD_INLINE vi vi_sub(vi a, vi b) { SIMD_LANEWISE(vi, (int32_t)((uint32_t)a.v[j] - (uint32_t)b.v[j])); }
SIMD_INLINE vi vi_mullo(vi a, vi b) { SIMD_LANEWISE(vi, (int32_t)((uint32_t)a.v[j] * (uint32_t)b.v[j])); }
SIMD_INLINE vf vi_to_vf(vi a) { SIMD_LANEWISE(vf, (float)a.v[j]); }
SIMD_INLINE vi vf_to_vi(vf a) { SIMD_LANEWISE(vi, (int32_t)lrintf(a.v[j])); }
SIMD_INLINE vf vi_as_vf(vi a) { vf r; memcpy(r.v, a.v, sizeof r.v); return r; }   /* the same bits as float32 lanes */
SIMD_INLINE int32_t vi_reduce_add(vi a)
{
    uint32_t s = 0;
    for (int j = 0; j < 8; j++)
        s += (uint32_t)a.v[j];
    return (int32_t)s;
}
SIMD_INLINE vi vi_dpbusd(vi acc, vi u, vi s)
{
    const uint8_t *a = (const uint8_t *)u.v;
    const int8_t *b = (const int8_t *)s.v;
    SIMD_LANEWISE(vi, acc.v[j] + a[4 * j] * b[4 * j] + a[4 * j + 1] * b[4 * j + 1] + a[4 * j + 2] * b[4 * j + 2]
                      + a[4 * j + 3] * b[4 * j + 3]);
}
SIMD_INLINE vi vi_dpwssd(vi acc, vi a, vi b)
{
    int16_t x[16], y[16];   /* copied, not cast: int16 views of int32 lanes would break aliasing rules */
    memcpy(x, a.v, sizeof x);
    memcpy(y, b.v, sizeof y);
    SIMD_LANEWISE(vi, acc.v[j] + x[2 * j] * y[2 * j] + x[2 * j + 1] * y[2 * j + 1]);
}
SIMD_INLINE vi vi_dot_i8(vi acc, vi a, vi b)
{
    const int8_t *x = (const int8_t *)a.v, *y = (const int8_t *)b.v;
    SIMD_LANEWISE(vi, acc.v[j] + x[4 * j] * y[4 * j] + x[4 * j + 1] * y[4 * j + 1] + x[4 * j + 2] * y[4 * j + 2]
                      + x[4 * j + 3] * y[4 * j + 3]);
}
SIMD_INLINE vi vi_dpbusw(vi acc, vi u, vi s)
{
    const uint8_t *a = (const uint8_t *)u.v;
    const int8_t *b = (const int8_t *)s.v;
    int16_t x[16];
    memcpy(x, acc.v, sizeof x);
    for (int j = 0; j < 16; j++)
        x[j] = (int16_t)(x[j] + a[2 * j] * b[2 * j] + a[2 * j + 1] * b[2 * j + 1]);
    vi r;
    memcpy(r.v, x, sizeof x);
    return r;
}
SIMD_INLINE vi vi_and(vi a, vi b) { SIMD_LANEWISE(vi, a.v[j] & b.v[j]); }
SIMD_INLINE vi vi_or(vi a, vi b) { SIMD_LANEWISE(vi, a.v[j] | b.v[j]); }
SIMD_INLINE vi vi_xor(vi a, vi b) { SIMD_LANEWISE(vi, a.v[j] ^ b.v[j]); }
SIMD_INLINE vi vi_srli(vi a, int n) { SIMD_LANEWISE(vi, (int32_t)((uint32_t)a.v[j] >> n)); }
SIMD_INLINE vi vi_slli(vi a, int n) { SIMD_LANEWISE(vi, (int32_t)((uint32_t)a.v[j] << n)); }
SIMD_INLINE vi vi_srlv(vi a, vi n) { SIMD_LANEWISE(vi, (int32_t)((uint32_t)a.v[j] >> (n.v[j] & 31))); }
SIMD_INLINE vi vi_load_halves(const void *lo, const void *hi)
{
    vi r;
    memcpy(r.v, lo, 16);
    memcpy(r.v + 4, hi, 16);
    return r;
}
SIMD_INLINE vi vi_load_pieces16(const void *const *p) { return vi_load_halves(p[0], p[1]); }
SIMD_INLINE vi vi_from_bits(uint64_t bits)
{
    uint8_t b[32];
    for (int j = 0; j < 32; j++)
        b[j] = (uint8_t)(0 - ((bits >> j) & 1));
    vi r;
    memcpy(r.v, b, sizeof b);
    return r;
}
SIMD_INLINE vf vf_permute(vf a, vi idx) { SIMD_LANEWISE(vf, a.v[idx.v[j] & 7]); }
SIMD_INLINE vi vi_load_u8_i16(const uint8_t *p)
{
    int16_t x[16];
    for (int j = 0; j < 16; j++)
        x[j] = p[j];
    vi r;
    memcpy(r.v, x, sizeof x);
    return r;
}
SIMD_INLINE vf vf_reduce_add_each(const vf *a) { SIMD_LANEWISE(vf, vf_reduce_add(a[j])); }
SIMD_INLINE vi vi_reduce_add_each(const vi *a) { SIMD_LANEWISE(vi, vi_reduce_add(a[j])); }
#undef SIMD_LANEWISE
#endif

/* Prefetch into L2 (T1) or L1 (T0); a hint, never a fault. */
#if SIMD_LEVEL >= 1
SIMD_INLINE void simd_prefetch_l2(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T1); }
SIMD_INLINE void simd_prefetch_l1(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }
#elif defined(__GNUC__)
SIMD_INLINE void simd_prefetch_l2(const void *p) { __builtin_prefetch(p, 0, 2); }
SIMD_INLINE void simd_prefetch_l1(const void *p) { __builtin_prefetch(p, 0, 3); }
#else
SIMD_INLINE void simd_prefetch_l2(const void *p) { (void)p; }
SIMD_INLINE void simd_prefetch_l1(const void *p) { (void)p; }
#endif

#endif
