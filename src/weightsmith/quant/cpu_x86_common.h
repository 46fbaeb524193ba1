/* What every per-instruction-set copy of the x86 kernels (cpu_qdot_x86.h, cpu_ggml_x86.h)
 * shares: the naming macros and the horizontal sum. Included by cpu_x86_isas.h before each
 * copy, with SUFFIX and TARGET defined (see there). */

#ifndef WS_X86_NAMES
#define WS_X86_NAMES 1
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
/* name_SUFFIX: this instruction set's copy of a function */
#define FN(name) CAT(name, SUFFIX)
#define KERNEL static inline __attribute__((always_inline, target(TARGET)))
#endif

/* The sum of a's 8 lanes. */
KERNEL float FN(hsum)(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}
