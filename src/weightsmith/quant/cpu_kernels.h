/* Shared declarations of cpu_kernels.c and cpu_decode.c (see those files). */
#ifndef WEIGHTSMITH_CPU_KERNELS_H
#define WEIGHTSMITH_CPU_KERNELS_H

#include <stdint.h>

enum { WS_INT4 = 4, WS_INT4_TILES = 5, WS_Q4_0_TILES = 6, WS_Q4_K_TILES = 7, WS_Q6_K_TILES = 11, WS_Q5_0_TILES = 12, WS_Q5_1_TILES = 13, WS_Q5_K_TILES = 14, WS_IQ4_NL_TILES = 17, WS_IQ4_XS_TILES = 18, WS_Q3_K_TILES = 19, WS_Q2_K_TILES = 20, WS_INT8 = 8, WS_INT8_TILES = 9, WS_Q8_0_TILES = 10, WS_GGML = 16,
       WS_F32_ROWS = 32, WS_F32_COLS = 33, WS_BF16_ROWS = 48, WS_BF16_COLS = 49 };

/* One projection y = x @ W.T (+ bias), W (n, k). kind WS_INT4: q uint8 (n, k/2), byte j of a
 * row holding codes 2j (low nibble) and 2j + 1, scales and zeros fp16 bits (n, k/group);
 * WS_INT4_TILES / WS_INT8_TILES: q the same weights as 16-row tiles (quant/tiles.py, cpu_qdot.c's
 * ws_q4t_projs / ws_q8t_projs), n % 16 == 0; WS_Q4_0_TILES / WS_Q5_0_TILES / WS_Q5_1_TILES /
 * WS_Q2_K_TILES ... WS_Q6_K_TILES / WS_Q8_0_TILES / WS_IQ4_NL_TILES / WS_IQ4_XS_TILES: a GGUF matrix of that type as 16-row tiles
 * (tiles.py's tile_q4_0, tile_q5_0, ...); WS_INT8: q int8 (n, k), scales (n,);
 * WS_GGML: q rows of GGUF blocks of ggml type `group` (cpu_ggml.c); WS_F32_ROWS:
 * W[i, j] = q[i * ld + j]; WS_F32_COLS: W[i, j] = q[j * ld + i]; WS_BF16_ROWS / WS_BF16_COLS: the
 * same with q bf16 (uint16 bits, cpu_bf16.c). bias may be NULL. */
typedef struct {
    int64_t kind, n, k, group, ld;
    const void *q;
    const void *scales, *zeros; /* float for WS_INT8, fp16 bits for WS_INT4 */
    const float *bias;
} ws_proj;

extern int ws_threads;

/* Activations quantized to int8 per block of 32 (cpu_qdot.c): for row m and block b,
 * d[m * nb + b] = max |x| / 127 over the block, q = round(x / d) in -127..127 (stored in the
 * order `layout` names: WS_QACT_INT8 as x is, WS_QACT_INT4 each block's even elements then
 * its odd ones), xs[m * nb + b] = d * sum(q). Rows are kp = 32 * nb bytes apart, the last
 * block padded with zeros. `src` is the input quantized last: a caller that quantizes the
 * same input for several projections (q/k/v, gate/up) does it once, and clears `src` when
 * that buffer changes. Layout WS_QACT_BF16 (cpu_bf16.c) is the input rounded to bf16 instead:
 * q holds the bf16 bits (2 bytes an element), d the same values as floats, rows kp elements
 * apart (zero-padded to a multiple of 32); xs is unused. */
enum { WS_QACT_INT8 = 0, WS_QACT_INT4 = 1, WS_QACT_BF16 = 2 };
typedef struct {
    int64_t m, k, kp, nb, layout;
    const float *src;
    int8_t *q;
    float *d, *xs;
    int64_t cap_q, cap_d, cap_x; /* allocated sizes (bytes of q, floats of d, of xs) */
} ws_qact;

int ws_qact_quantize(ws_qact *a, const float *x, int64_t M, int64_t K, int64_t layout);
void ws_qact_free(ws_qact *a);
int ws_q4_proj(const ws_qact *a, int64_t N, const uint8_t *q, const uint16_t *scales, const uint16_t *zeros,
               int64_t G, const float *bias, float *y);
/* Up to WS_MAX_PROJS projections of one input in one parallel loop (cpu_qdot.c, cpu_kernels.c). */
enum { WS_MAX_PROJS = 3 };
/* The layouts of the tiles read with the input in the WS_QACT_INT4 order (their low nibbles as
 * the int4 tiles hold them): int4 (scales and zeros per group), GGUF Q4_0 (scales only), GGUF
 * Q2_K to Q6_K (super-blocks of 256), GGUF Q5_0 and Q5_1 (a fifth bit), GGUF IQ4_NL
 * and IQ4_XS (codes that index WS_IQ4_LEVELS); -1 for another kind. */
enum { WS_Q4T_INT4 = 0, WS_Q4T_Q4_0 = 1, WS_Q4T_Q4_K = 2, WS_Q4T_Q6_K = 3, WS_Q4T_Q5_0 = 4, WS_Q4T_Q5_1 = 5,
       WS_Q4T_Q5_K = 6, WS_Q4T_IQ4_NL = 7, WS_Q4T_IQ4_XS = 8, WS_Q4T_Q3_K = 9, WS_Q4T_Q2_K = 10 };
/* The 16 int8 levels a GGUF IQ4_NL / IQ4_XS code indexes (ggml's kvalues_iq4nl). */
static const int8_t WS_IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static inline int ws_q4t_layout(int64_t kind) {
    switch (kind) {
    case WS_INT4_TILES: return WS_Q4T_INT4;
    case WS_Q4_0_TILES: return WS_Q4T_Q4_0;
    case WS_Q4_K_TILES: return WS_Q4T_Q4_K;
    case WS_Q6_K_TILES: return WS_Q4T_Q6_K;
    case WS_Q5_0_TILES: return WS_Q4T_Q5_0;
    case WS_Q5_1_TILES: return WS_Q4T_Q5_1;
    case WS_Q5_K_TILES: return WS_Q4T_Q5_K;
    case WS_IQ4_NL_TILES: return WS_Q4T_IQ4_NL;
    case WS_IQ4_XS_TILES: return WS_Q4T_IQ4_XS;
    case WS_Q3_K_TILES: return WS_Q4T_Q3_K;
    case WS_Q2_K_TILES: return WS_Q4T_Q2_K;
    default: return -1;
    }
}
int ws_q4t_projs(const ws_qact *a, int n, const int64_t *N, const uint8_t *const *tiles, int64_t G, int layout,
                 const float *const *bias, float *const *y);
int ws_q8t_projs(const ws_qact *a, int n, const int64_t *N, const uint8_t *const *tiles, int block_scales,
                 const float *const *bias, float *const *y);
void ws_q8_proj(const ws_qact *a, int64_t N, const int8_t *q, const float *scales, const float *bias,
                float *y);

/* bf16 <-> fp32: widening is exact (the bits shifted up); narrowing rounds to nearest even, as
 * torch's .bfloat16() does (a NaN stays a quiet NaN). */
static inline float ws_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static inline uint16_t ws_f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(v.u >> 16 | 0x40);
    return (uint16_t)((v.u + 0x7fffu + (v.u >> 16 & 1)) >> 16);
}

/* IEEE half (fp16 bits) to float, exact: subnormals, infinities and NaN included. */
static inline float ws_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = h >> 10 & 31, man = h & 1023;
    union { uint32_t u; float f; } v;
    if (exp == 31) {
        v.u = sign | 0x7f800000u | man << 13;
    } else if (exp) {
        v.u = sign | (exp + 112) << 23 | man << 13;
    } else { /* zero or subnormal: man * 2^-24, exact in float */
        v.f = (float)man * 5.9604644775390625e-8f;
        v.u |= sign;
    }
    return v.f;
}

/* Q4_K / Q5_K: the 6-bit scale and minimum of sub-block j (0..7) from the 12 packed bytes
 * s[0], s[stride], ... (stride 1 in a file's block, 16 in a Q4_K tile's header): j < 4 in the
 * low 6 bits of bytes j and j + 4; j >= 4 as 4 low bits in byte j + 4 (low nibble: scale,
 * high: minimum) and 2 high bits in the top of bytes j - 4 and j. */
static inline void ws_k_scale_min(const uint8_t *s, int stride, int j, int *sc, int *mn) {
#define WS_KS(i) s[(i) * stride]
    if (j < 4) {
        *sc = WS_KS(j) & 63, *mn = WS_KS(j + 4) & 63;
    } else {
        *sc = (WS_KS(j + 4) & 15) | (WS_KS(j - 4) >> 6) << 4;
        *mn = (WS_KS(j + 4) >> 4) | (WS_KS(j) >> 6) << 4;
    }
#undef WS_KS
}

int ws_bf16_proj(const ws_proj *p, const float *x, int64_t M, float *y, ws_qact *a);

/* CPUID (cpu_qdot.c): AVX2 with FMA; AVX-512 F, BW and VL; AVX512-VNNI; AVX-VNNI; AVX512-BF16. */
enum { WS_CPU_AVX2 = 1, WS_CPU_AVX512 = 2, WS_CPU_VNNI512 = 4, WS_CPU_AVXVNNI = 8, WS_CPU_BF16_512 = 16 };
int ws_x86_features(void);

/* cpu_qdot.c's chosen instruction set: 0 scalar, 1 avx2, 2 avxvnni, 3 avx512vnni. */
int ws_qdot_isa_index(void);

/* GGUF quantized blocks read in place (cpu_ggml.c): ggml type id, rows of whole blocks. */
int64_t ws_ggml_row_bytes(int64_t type, int64_t k);
int ws_ggml_proj(const ws_qact *a, int64_t N, int64_t type, const uint8_t *q, const float *bias, float *y);

/* These return 0, or -1 when out of memory. `act` (may be NULL) holds the quantized input
 * for the int4 / int8 projections (the rounded one for bf16), reused while its `src` is x. */
int ws_proj_matmul(const ws_proj *p, const float *x, int64_t M, float *y, ws_qact *act);
/* y[i] = x @ p[i].W.T (+ bias) for i < n (n <= WS_MAX_PROJS): projections of the same input, in
 * one parallel region where they are all int4 tiles of one group size, all int8 tiles or all
 * fp32 columns, else one after another. */
int ws_projs_matmul(const ws_proj *const *p, int n, const float *x, int64_t M, float *const *y, ws_qact *act);

#endif
