/* The CPU's vector level, read once from cpuid and the OS's saved-state mask (xgetbv).
 *
 * Every C kernel entry takes a level and refuses one above rs_cpu_level() (RS_ERR_LEVEL), so no
 * caller can make the process run an instruction the CPU or the OS does not support.
 * The codes are recscore.kernels._cpu.LEVELS' positions.
 */
#ifndef RS_CPU_H
#define RS_CPU_H

#include <stdint.h>

enum { RS_BASELINE = 0, RS_AVX2 = 1, RS_AVX512 = 2, RS_AVX512_VNNI = 3, RS_LEVELS = 4 };
/* A kernel entry's status: 0 done, RS_ERR_MEMORY out of memory, RS_ERR_LEVEL a level this CPU lacks. */
enum { RS_OK = 0, RS_ERR_MEMORY = 1, RS_ERR_LEVEL = 2 };

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>

static int rs_cpu_detect(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d))
        return RS_BASELINE;
    const int fma = (c >> 12) & 1, popcnt = (c >> 23) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1,
              f16c = (c >> 29) & 1;
    if (!(osxsave && avx && fma && f16c && popcnt))
        return RS_BASELINE;
    unsigned xcr0_low, xcr0_high;
    __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
    if ((xcr0_low & 0x6) != 0x6)            /* the OS saves xmm and ymm state */
        return RS_BASELINE;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return RS_BASELINE;
    const int bmi1 = (b >> 3) & 1, avx2 = (b >> 5) & 1, bmi2 = (b >> 8) & 1;   /* every feature _simd.h's targets name */
    if (!(avx2 && bmi1 && bmi2))
        return RS_BASELINE;
    const int avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);   /* F DQ BW VL */
    if (!avx512 || (xcr0_low & 0xE0) != 0xE0)   /* the OS saves opmask and zmm state */
        return RS_AVX2;
    return (c >> 11) & 1 ? RS_AVX512_VNNI : RS_AVX512;
}
#else
static int rs_cpu_detect(void) { return RS_BASELINE; }
#endif

/* The best level this CPU and OS run (detected once; a race only detects twice). */
static int rs_cpu_level(void)
{
    static int level = -1;
    if (level < 0)
        level = rs_cpu_detect();
    return level;
}

static inline int rs_level_ok(int level) { return level >= 0 && level <= rs_cpu_level(); }

#endif
