/* Closes a level's translation unit opened by _simd.h (clang's target attribute region). */
#if defined(__clang__) && SIMD_LEVEL >= 1
#pragma clang attribute pop
#endif
