/* int4 / int8 weight matmuls with integer dot products, chosen at run time from CPUID.
 *
 * Decoding reads every weight once per token, so at 4 or 8 bits a weight it should be bound
 * by memory bandwidth. Dequantizing the weights to float in registers (the first kernels
 * here) is bound by arithmetic instead. As llama.cpp does, the layer input is quantized to
 * int8 per block of 32 once (ws_qact, shared by the projections that read it), and each
 * block's product with the weight codes is summed in int32 by the CPU's integer
 * dot-product instructions:
 *   int4: y[m, n] = sum_b d[m, b] * s[n, g(b)] * sum_j q[n, j] xq[m, j]
 *                  + sum_g z[n, g] * sum_{b in g} d[m, b] * sum_j xq[m, j]
 *   int8: y[m, n] = s[n] * sum_b d[m, b] * sum_j q[n, j] xq[m, j]
 * (then + bias[n]). Against the float product this adds the activations' rounding
 * (|x - d * xq| <= d / 2 per element), the error llama.cpp's Q4/Q8 decoding has.
 *
 * The weights are read as the layers hold them, with no second copy: in the portable layout
 * (Int4Linear's nibble rows with fp16 scales and zeros, Int8Linear's int8 rows), or in the
 * decode layout's 16-row tiles (quant/tiles.py; the ws_q4t / ws_q8t kernels, cpu_qtile_x86.h),
 * where one dot-product instruction takes 4 inputs of 16 rows and a tile's sums leave in one
 * vector. The int4 layouts pair codes 2j and 2j + 1 in a byte, so int4 inputs are quantized
 * with each block's even elements first.
 *
 * Instruction sets (one copy of cpu_qdot_x86.h each, made by cpu_x86_isas.h and compiled
 * for exactly that set: this file is built without -march=native): AVX512-VNNI (vpdpbusd on
 * 512-bit vectors, two blocks a vector), AVX-VNNI (vpdpbusd, VEX encoded, 256-bit), AVX2
 * (vpmaddubsw + vpmaddwd), and portable C. `ws_qdot_select` forces one (tests; benchmarks restricted to AVX2).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#define QB 32
#define QROWS 4
#ifndef PF_ROWS
#define PF_ROWS 4 /* rows ahead the kernels prefetch */
#endif

enum { ISA_SCALAR, ISA_AVX2, ISA_AVXVNNI, ISA_AVX512VNNI, ISA_COUNT };
static const char *const isa_names[ISA_COUNT] = {"scalar", "avx2", "avxvnni", "avx512vnni"};
static int current_isa(void);
static void quantize_block_x86(const float *x, int64_t layout, int8_t *q, float *d, float *xs);

/* ---- the quantized input --------------------------------------------------------------- */

static int grow(void **buf, int64_t *cap, int64_t need, size_t size) {
    if (*cap >= need) return 0;
    void *p = realloc(*buf, (size_t)need * size);
    if (!p) return -1;
    *buf = p, *cap = need;
    return 0;
}

static void quantize_block(const float *x, int64_t len, int64_t layout, int8_t *q, float *d, float *xs) {
    float amax = 0;
    for (int64_t j = 0; j < len; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
    const float scale = amax / 127.0f, inv = scale > 0 ? 1.0f / scale : 0.0f;
    int8_t v[QB] = {0};
    int32_t sum = 0;
    for (int64_t j = 0; j < len; j++) {
        float r = nearbyintf(x[j] * inv); /* ties to even, as torch.round */
        r = r > 127 ? 127 : (r < -127 ? -127 : r);
        v[j] = (int8_t)r;
        sum += v[j];
    }
    if (layout == WS_QACT_INT4) {
        for (int j = 0; j < QB / 2; j++) q[j] = v[2 * j], q[QB / 2 + j] = v[2 * j + 1];
    } else {
        memcpy(q, v, QB);
    }
    *d = scale, *xs = scale * (float)sum;
}

int ws_qact_quantize(ws_qact *a, const float *x, int64_t M, int64_t K, int64_t layout) {
    if (a->src == x && a->m == M && a->k == K && a->layout == layout) return 0;
    const int64_t nb = (K + QB - 1) / QB;
    if (grow((void **)&a->q, &a->cap_q, M * nb * QB, 1) || grow((void **)&a->d, &a->cap_d, M * nb, 4) ||
        grow((void **)&a->xs, &a->cap_x, M * nb, 4))
        return -1;
    a->m = M, a->k = K, a->nb = nb, a->kp = nb * QB, a->layout = layout, a->src = x;
    const int isa = current_isa();
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t len = K - b * QB < QB ? K - b * QB : QB;
            int8_t *q = a->q + m * a->kp + b * QB;
            float *d = a->d + m * nb + b, *xs = a->xs + m * nb + b;
            if (len < QB || isa == ISA_SCALAR)
                quantize_block(x + m * K + b * QB, len, layout, q, d, xs);
            else
                quantize_block_x86(x + m * K + b * QB, layout, q, d, xs);
        }
    return 0;
}

void ws_qact_free(ws_qact *a) {
    free(a->q), free(a->d), free(a->xs);
    memset(a, 0, sizeof *a);
}

/* The rows m0.. of a, as a ws_qact of their own. */
static inline ws_qact ws_qact_rows(const ws_qact *a, int64_t m0) {
    ws_qact r = *a;
    r.m = a->m - m0, r.q = a->q + m0 * a->kp, r.d = a->d + m0 * a->nb, r.xs = a->xs + m0 * a->nb;
    return r;
}

/* Projections of one input held as 16-row tiles, multiplied in one parallel loop over all their
 * tiles (q, k and v; gate and up): one fork and join of the threads instead of one each, and
 * one split of the whole work among them. Tile i belongs to projection p where
 * first[p] <= i < first[p + 1], first[p + 1] = first[p] + N[p] / 16; y[p] is its output. */
typedef struct {
    int np;
    int64_t N[WS_MAX_PROJS], first[WS_MAX_PROJS + 1];
    const uint8_t *tiles[WS_MAX_PROJS];
    float *y[WS_MAX_PROJS];
} tile_set;

/* Projection p of tile i of s (the few projections searched in order). */
static inline int tile_owner(const tile_set *s, int64_t i) {
    int p = 0;
    while (i >= s->first[p + 1]) p++;
    return p;
}

/* Bytes of a 16-row tile of K inputs in 4-bit `layout` (WS_Q4T_*), groups of G: 16 rows' codes
 * and, per group, 16 fp16 scales and (int4) 16 fp16 zeros; Q4_K: 144 bytes a row per 256. */
static inline int64_t q4t_tile_bytes(int64_t K, int64_t G, int layout) {
    if (layout == WS_Q4T_Q4_K || layout == WS_Q4T_Q5_K || layout == WS_Q4T_Q6_K)
        return K / 256 * 16 * (layout == WS_Q4T_Q4_K ? 144 : layout == WS_Q4T_Q5_K ? 176 : 210);
    if (layout == WS_Q4T_Q5_0 || layout == WS_Q4T_Q5_1) return K / 32 * 16 * (layout == WS_Q4T_Q5_0 ? 22 : 24);
    if (layout == WS_Q4T_IQ4_XS || layout == WS_Q4T_Q3_K || layout == WS_Q4T_Q2_K)
        return K / 256 * 16 * (layout == WS_Q4T_Q3_K ? 110 : layout == WS_Q4T_Q2_K ? 84 : 136);
    return 16 * (K / 2) + K / G * (layout == WS_Q4T_Q4_0 || layout == WS_Q4T_IQ4_NL ? 32 : 64);
}

/* ---- portable C ---------------------------------------------------------------------- */

static void q4_matmul_scalar(const ws_qact *a, int64_t N, const uint8_t *q, const uint16_t *scales,
                             const uint16_t *zeros, int64_t G, const float *gsum, const float *bias, float *y) {
    const int64_t K = a->k, groups = K / G, per_group = G / QB;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qrow = q + n * (K / 2);
        for (int64_t m = 0; m < a->m; m++) {
            const int8_t *xq = a->q + m * a->kp;
            float acc = 0;
            for (int64_t b = 0; b < a->nb; b++) {
                int32_t isum = 0;
                for (int j = 0; j < QB / 2; j++) {
                    const uint8_t c = qrow[QB / 2 * b + j];
                    isum += (c & 15) * xq[QB * b + j] + (c >> 4) * xq[QB * b + QB / 2 + j];
                }
                acc += (float)isum * a->d[m * a->nb + b] * ws_f16_to_f32(scales[n * groups + b / per_group]);
            } /* (the division is slow; this is the fallback for CPUs without AVX2) */
            for (int64_t g = 0; g < groups; g++) acc += ws_f16_to_f32(zeros[n * groups + g]) * gsum[m * groups + g];
            y[m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
    }
}

static void q8_matmul_scalar(const ws_qact *a, int64_t N, const int8_t *q, const float *scales,
                             const float *bias, float *y) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qrow = q + n * a->k;
        for (int64_t m = 0; m < a->m; m++) {
            const int8_t *xq = a->q + m * a->kp;
            float acc = 0;
            for (int64_t b = 0; b < a->nb; b++) {
                int32_t isum = 0;
                const int64_t end = a->k < QB * (b + 1) ? a->k : QB * (b + 1);
                for (int64_t k = QB * b; k < end; k++) isum += qrow[k] * xq[k];
                acc += (float)isum * a->d[m * a->nb + b];
            }
            y[m * N + n] = acc * scales[n] + (bias ? bias[n] : 0.0f);
        }
    }
}

/* The portable tile kernels: output n of every projection of the set, for each input row m, is
 * dot(a, m, its tile, its row r in the tile, ctx); the threads split the outputs. */
typedef float (*tile_dot)(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx);
static void tiles_scalar(const ws_qact *a, const tile_set *set, int64_t tile_bytes, tile_dot dot, const void *ctx) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t i = 0; i < 16 * set->first[set->np]; i++) {
        const int p = tile_owner(set, i / 16);
        const int64_t n = i - 16 * set->first[p];
        const uint8_t *tile = set->tiles[p] + n / 16 * tile_bytes;
        for (int64_t m = 0; m < a->m; m++) set->y[p][m * set->N[p] + n] = dot(a, m, tile, n % 16, ctx);
    }
}

/* The 4-bit tiles' parameters: groups of G, the input's sums (per group; for Q6_K 32 times
 * those of each half block), the WS_Q4T_* layout. */
typedef struct {
    int64_t G;
    const float *sums;
    int layout;
} q4t_ctx;

/* int4 16-row tiles (the decode layout, see ws_q4t_projs): row 16t + r, block b of group g is
 * chunk c's bytes 4r..4r+3 for its portable bytes 4c..4c+3; after the group's blocks its 16 fp16
 * scales, then (not Q4_0, whose zero is -8 times the scale) its 16 fp16 zeros. */
static float q4t_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const q4t_ctx *c = ctx;
    const int sym = c->layout == WS_Q4T_Q4_0;
    const int64_t groups = a->k / c->G, per_group = c->G / QB, gbytes = per_group * 256 + (sym ? 32 : 64);
    float acc = 0;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *gp = tile + g * gbytes;
        float gacc = 0;
        for (int64_t i = 0; i < per_group; i++) {
            const int64_t b = g * per_group + i;
            const int8_t *xq = a->q + m * a->kp + QB * b; /* evens, then odds */
            int32_t isum = 0;
            for (int j = 0; j < QB / 2; j++) { /* portable byte j of the block */
                const uint8_t w = gp[i * 256 + 64 * (j / 4) + 4 * r + j % 4];
                isum += (w & 15) * xq[j] + (w >> 4) * xq[QB / 2 + j];
            }
            gacc += (float)isum * a->d[m * a->nb + b];
        }
        uint16_t s, z = 0;
        memcpy(&s, gp + per_group * 256 + 2 * r, 2);
        if (!sym) memcpy(&z, gp + per_group * 256 + 32 + 2 * r, 2);
        const float scale = ws_f16_to_f32(s), zero = sym ? -8.0f * scale : ws_f16_to_f32(z);
        acc += gacc * scale + zero * c->sums[m * groups + g];
    }
    return acc;
}

/* Codes 2t and 2t + 1 of row r in the int4 tiles' chunks at w (t < 16), with their fifth bits
 * (Q5_* tiles) from the 64 bytes at h when h is not NULL: byte 4r + b holds those of chunk c's
 * byte b at bits c and 4 + c. */
static inline void codes5(const uint8_t *w, const uint8_t *h, int64_t r, int t, int *even, int *odd) {
    const int c = t / 4;
    const uint8_t lo = w[64 * c + 4 * r + t % 4], hb = h ? h[4 * r + t % 4] : 0;
    *even = (lo & 15) | (hb >> c & 1) << 4, *odd = (lo >> 4) | (hb >> (4 + c) & 1) << 4;
}

/* Q5_0 / Q5_1 16-row tiles: for each block of 32 inputs, its codes' low nibbles as the int4
 * tiles' chunks (256 bytes), then 64 bytes of their fifth bits (codes5), then the 16 rows' fp16
 * d, then (Q5_1) their fp16 m. Code q weighs d (q - 16) (Q5_0) or d q + m. */
static float q5t_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const q4t_ctx *c = ctx;
    const int one = c->layout == WS_Q4T_Q5_1;
    const int64_t stride = one ? 384 : 352;
    float acc = 0;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *bp = tile + b * stride;
        const int8_t *xq = a->q + m * a->kp + QB * b; /* evens, then odds */
        int32_t isum = 0;
        for (int t = 0; t < QB / 2; t++) {
            int even, odd;
            codes5(bp, bp + 256, r, t, &even, &odd);
            isum += even * xq[t] + odd * xq[QB / 2 + t];
        }
        uint16_t sh, zh = 0;
        memcpy(&sh, bp + 320 + 2 * r, 2);
        if (one) memcpy(&zh, bp + 352 + 2 * r, 2);
        const float scale = ws_f16_to_f32(sh), zero = one ? ws_f16_to_f32(zh) : -16.0f * scale;
        acc += (float)isum * a->d[m * a->nb + b] * scale + zero * c->sums[m * a->nb + b];
    }
    return acc;
}

/* Q4_K 16-row tiles: for each super-block of 256 inputs, its 8 sub-blocks' codes as the int4
 * tiles' blocks (256 bytes each), then the 16 rows' headers (256 bytes): fp16 d, fp16 dmin,
 * then the 12 packed scale bytes, byte i of row r at 64 + 16 i + r. Sub-block j of row r is
 * d sc_j q - dmin m_j (ws_k_scale_min). Q5_K tiles follow each sub-block's 256 bytes with 64
 * bytes of its codes' fifth bits, as Q5_0 tiles hold them (codes5). */
static float q4kt_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const q4t_ctx *c = ctx;
    const int five = c->layout == WS_Q4T_Q5_K;
    const int64_t sub = five ? 320 : 256; /* bytes a sub-block */
    float acc = 0;
    for (int64_t sb = 0; sb < a->k / 256; sb++) {
        const uint8_t *sp = tile + sb * 8 * (sub + 32), *hp = sp + 8 * sub;
        uint16_t dh, mh;
        memcpy(&dh, hp + 2 * r, 2), memcpy(&mh, hp + 32 + 2 * r, 2);
        const float d = ws_f16_to_f32(dh), dmin = ws_f16_to_f32(mh);
        for (int j = 0; j < 8; j++) {
            const int64_t b = sb * 8 + j;
            const int8_t *xq = a->q + m * a->kp + QB * b; /* evens, then odds */
            int32_t isum = 0;
            for (int t = 0; t < QB / 2; t++) {
                int even, odd;
                codes5(sp + j * sub, five ? sp + j * sub + 256 : NULL, r, t, &even, &odd);
                isum += even * xq[t] + odd * xq[QB / 2 + t];
            }
            int sc, mn;
            ws_k_scale_min(hp + 64 + r, 16, j, &sc, &mn);
            acc += (float)isum * a->d[m * a->nb + b] * (d * (float)sc) - dmin * (float)mn * c->sums[m * a->nb + b];
        }
    }
    return acc;
}

/* Q6_K 16-row tiles: for each super-block of 256 inputs, its 8 sub-blocks of 32, each as 256
 * bytes of the codes' low nibbles (the int4 tiles' chunks) and 128 bytes of their top 2 bits:
 * two 64-byte vectors H_k (k 0, 1 for chunks 2k, 2k + 1) whose byte 4r + b holds, 2 bits each
 * from bit 0, the top bits of row r's codes 2t and 2t' and then 2t + 1 and 2t' + 1, for
 * t = 8k + b and t' = t + 4 (the codes of chunk 2k's byte b, then of chunk 2k + 1's); then the
 * 16 rows' fp16 d and their 16 int8 scales (scale i of row r at 32 + 16 i + r). Code q of a
 * row in sub-block j weighs d sc (q - 32), sc its scale 2j (codes 0..15) or 2j + 1 (16..31);
 * the sums are 32 times the input's integer sums over each half of each block of 32. */
static float q6kt_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const float *hs32 = ((const q4t_ctx *)ctx)->sums;
    float acc = 0;
    for (int64_t sb = 0; sb < a->k / 256; sb++) {
        const uint8_t *sp = tile + sb * 3360, *hp = sp + 3072;
        uint16_t dh;
        memcpy(&dh, hp + 2 * r, 2);
        const float d = ws_f16_to_f32(dh);
        for (int j = 0; j < 8; j++) {
            const int64_t b = sb * 8 + j;
            const int8_t *xq = a->q + m * a->kp + QB * b; /* evens, then odds */
            const uint8_t *wp = sp + j * 384;
            int32_t isum[2] = {0, 0};
            for (int t = 0; t < QB / 2; t++) { /* codes 2t and 2t + 1 */
                const int c = t / 4, k = c / 2, shift = 2 * (c % 2);
                const uint8_t lo = wp[64 * c + 4 * r + t % 4], hi = wp[256 + 64 * k + 4 * r + t % 4];
                const int even = (lo & 15) | (hi >> shift & 3) << 4, odd = (lo >> 4) | (hi >> (4 + shift) & 3) << 4;
                isum[k] += even * xq[t] + odd * xq[QB / 2 + t];
            }
            for (int h = 0; h < 2; h++) {
                const float sc = d * (float)(int8_t)hp[32 + 16 * (2 * j + h) + r];
                acc += ((float)isum[h] - hs32[(m * a->nb + b) * 2 + h]) * a->d[m * a->nb + b] * sc;
            }
        }
    }
    return acc;
}

/* IQ4_NL tiles: Q4_0's layout (each block's codes as the int4 tiles' chunks, 256 bytes, then
 * the 16 rows' fp16 d). IQ4_XS tiles: for each super-block of 256 inputs, its 8 sub-blocks' codes
 * as those chunks (256 bytes each), then the 16 rows' headers in 128 bytes: fp16 d (row r at
 * 2r), the 16 bits holding the high 2 bits of the 8 sub-block scales (at 32 + 2r), and the 4
 * bytes of their low 4 bits (sub-block j in byte j / 2, high nibble for odd j), byte i of row r
 * at 64 + 16 i + r. Code q weighs WS_IQ4_LEVELS[q] times d (IQ4_NL) or d (ls - 32) (IQ4_XS). */
static float iq4t_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const int xs = ((const q4t_ctx *)ctx)->layout == WS_Q4T_IQ4_XS;
    float acc = 0;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *cp;
        uint16_t dh, sh;
        float scale;
        if (xs) {
            const uint8_t *sp = tile + b / 8 * 2176, *hp = sp + 2048;
            const int j = (int)(b % 8);
            memcpy(&dh, hp + 2 * r, 2), memcpy(&sh, hp + 32 + 2 * r, 2);
            const int ls = (hp[64 + 16 * (j / 2) + r] >> 4 * (j % 2) & 15) | (sh >> 2 * j & 3) << 4;
            scale = ws_f16_to_f32(dh) * (float)(ls - 32), cp = sp + 256 * j;
        } else {
            cp = tile + b * 288;
            memcpy(&dh, cp + 256 + 2 * r, 2);
            scale = ws_f16_to_f32(dh);
        }
        const int8_t *xq = a->q + m * a->kp + QB * b; /* evens, then odds */
        int32_t isum = 0;
        for (int j = 0; j < QB / 2; j++) { /* portable byte j of the block */
            const uint8_t w = cp[64 * (j / 4) + 4 * r + j % 4];
            isum += WS_IQ4_LEVELS[w & 15] * xq[j] + WS_IQ4_LEVELS[w >> 4] * xq[QB / 2 + j];
        }
        acc += (float)isum * a->d[m * a->nb + b] * scale;
    }
    return acc;
}

/* Q3_K 16-row tiles: for each super-block of 256 inputs, each sub-block of 32 as three 64-byte
 * vectors whose byte 4r + b holds row r's codes for operand k (the input's dword k in the
 * WS_QACT_INT4 order) byte b: the low 2 bits of operands 0-3 (at bits 2k), of operands 4-7, and
 * the third bits of all 8 (at bit k); then the 16 rows' fp16 d and their 12 packed scale bytes,
 * byte i of row r at 32 + 16 i + r. Code u (0..7) weighs d (sc - 32) (u - 4), sc the 6-bit scale
 * 2j + h of half h of sub-block j (operands 0, 1, 4, 5: half 0).
 * Q2_K 16-row tiles: each sub-block as the first two of those vectors, then the 16 rows' fp16
 * d, their fp16 dmin and their 16 scale bytes (sc | m << 4), byte i of row r at 64 + 16 i + r;
 * code q of half h of sub-block j weighs d sc q - dmin m with byte 2j + h.
 * The sums are 32 times the input's half-block sums (Q6_K's). */
static float crumbt_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const q4t_ctx *c = ctx;
    const int three = c->layout == WS_Q4T_Q3_K;
    const int64_t sub = three ? 192 : 128; /* bytes a sub-block */
    float acc = 0;
    for (int64_t sb = 0; sb < a->k / 256; sb++) {
        const uint8_t *sp = tile + sb * (three ? 1760 : 1344), *hp = sp + 8 * sub;
        uint16_t dh, mh;
        memcpy(&dh, hp + 2 * r, 2), memcpy(&mh, hp + 32 + 2 * r, 2);
        const float d = ws_f16_to_f32(dh), dmin = three ? 0 : ws_f16_to_f32(mh);
        for (int j = 0; j < 8; j++) {
            const int64_t b = sb * 8 + j;
            const int8_t *xq = a->q + m * a->kp + QB * b; /* evens, then odds */
            const uint8_t *wp = sp + sub * j;
            int32_t isum[2] = {0, 0};
            for (int k = 0; k < 8; k++)
                for (int e = 0; e < 4; e++) {
                    const int u = (wp[64 * (k / 4) + 4 * r + e] >> 2 * (k % 4) & 3) |
                                  (three ? (wp[128 + 4 * r + e] >> k & 1) << 2 : 0);
                    isum[k % 4 / 2] += u * xq[4 * k + e];
                }
            for (int h = 0; h < 2; h++) {
                const int s = 2 * j + h;
                const float xsum = c->sums[(m * a->nb + b) * 2 + h] / 32; /* the half's integer input sum */
                float part;
                if (three) { /* low bits of scale s in byte s % 8, high ones in byte 8 + s % 4 */
                    const int sc = ((hp[32 + 16 * (s % 8) + r] >> 4 * (s / 8) & 15) |
                                    (hp[32 + 16 * (8 + s % 4) + r] >> 2 * (s / 4) & 3) << 4) - 32;
                    part = ((float)isum[h] - 4 * xsum) * (d * (float)sc);
                } else {
                    const uint8_t sm = hp[64 + 16 * s + r];
                    part = (float)isum[h] * (d * (float)(sm & 15)) - dmin * (float)(sm >> 4) * xsum;
                }
                acc += part * a->d[m * a->nb + b];
            }
        }
    }
    return acc;
}

static void q4t_matmul_scalar(const ws_qact *a, const tile_set *set, int64_t G, const float *gsum, int layout) {
    const q4t_ctx c = {G, gsum, layout};
    tile_dot dot = q4t_dot;
    switch (layout) { /* the GGUF layouts with kernels of their own */
    case WS_Q4T_Q4_K: case WS_Q4T_Q5_K: dot = q4kt_dot; break;
    case WS_Q4T_Q6_K: dot = q6kt_dot; break;
    case WS_Q4T_Q5_0: case WS_Q4T_Q5_1: dot = q5t_dot; break;
    case WS_Q4T_IQ4_NL: case WS_Q4T_IQ4_XS: dot = iq4t_dot; break;
    case WS_Q4T_Q3_K: case WS_Q4T_Q2_K: dot = crumbt_dot; break;
    default: break;
    }
    tiles_scalar(a, set, q4t_tile_bytes(a->k, G, layout), dot, &c);
}

/* int8 16-row tiles (ws_q8t_projs): row 16t + r, block b: chunk c's bytes 4r..4r+3 = the row's
 * bytes 4c..4c+3 of the block, as w + 128; then the tile's 16 fp32 scales. Q8_0 tiles (*ctx
 * set): each block's 16 fp16 row scales after its chunks instead. */
static float q8t_dot(const ws_qact *a, int64_t m, const uint8_t *tile, int64_t r, const void *ctx) {
    const int bs = *(const int *)ctx;
    const int64_t stride = bs ? 544 : 512;
    float acc = 0, scale = 1.0f;
    for (int64_t b = 0; b < a->nb; b++) {
        const int8_t *xq = a->q + m * a->kp + QB * b;
        int32_t isum = 0; /* signed products here: no correction */
        for (int j = 0; j < QB; j++) isum += ((int32_t)tile[b * stride + 64 * (j / 4) + 4 * r + j % 4] - 128) * xq[j];
        float d = a->d[m * a->nb + b];
        if (bs) { /* the block's fp16 scale of row r */
            uint16_t h;
            memcpy(&h, tile + b * stride + 512 + 2 * r, 2);
            d = ws_f16_to_f32(h) * d;
        }
        acc += (float)isum * d;
    }
    if (!bs) memcpy(&scale, tile + a->nb * 512 + 4 * r, 4);
    return acc * scale;
}

static void q8t_matmul_scalar(const ws_qact *a, const tile_set *set, const int32_t *qsum, int bs) {
    (void)qsum;
    tiles_scalar(a, set, bs ? a->nb * 544 : 16 * a->k + 64, q8t_dot, &bs);
}

/* ---- x86 ------------------------------------------------------------------------------- */

#define WS_X86_KERNELS "cpu_qdot_x86.h"
#define WS_X86_EXTRA ",f16c"
#include "cpu_x86_isas.h"

#ifdef WS_X86
static uint64_t xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* What CPUID says this CPU runs (and the OS saves the registers of): WS_CPU_* bits. The one
 * CPUID reader of the kernels (cpu_bf16.c chooses from it too). */
int ws_x86_features(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1) || !(c >> 28 & 1) || !(c >> 12 & 1) || !(c >> 29 & 1))
        return 0; /* no AVX, OSXSAVE, FMA or F16C */
    const uint64_t xcr = xcr0();
    if ((xcr & 6) != 6 || __get_cpuid_max(0, NULL) < 7) return 0; /* no AVX state */
    __cpuid_count(7, 0, a, b, c, d);
    if (!(b >> 5 & 1)) return 0; /* no AVX2 */
    const int avx512 = (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1) && (xcr & 0xe6) == 0xe6;
    const int vnni512 = avx512 && (c >> 11 & 1);
    __cpuid_count(7, 1, a, b, c, d);
    return WS_CPU_AVX2 | (avx512 ? WS_CPU_AVX512 : 0) | (vnni512 ? WS_CPU_VNNI512 : 0) |
           (a >> 4 & 1 ? WS_CPU_AVXVNNI : 0) | (avx512 && (a >> 5 & 1) ? WS_CPU_BF16_512 : 0);
}

/* Bit i set: instruction set i runs on this CPU. */
static int isa_mask(void) {
    const int features = ws_x86_features();
    int mask = 1 << ISA_SCALAR;
    if (!(features & WS_CPU_AVX2)) return mask;
    mask |= 1 << ISA_AVX2;
#ifdef WS_X86_AVXVNNI
    if (features & WS_CPU_AVXVNNI) mask |= 1 << ISA_AVXVNNI;
#endif
    if (features & WS_CPU_VNNI512) mask |= 1 << ISA_AVX512VNNI;
    return mask;
}
#else
int ws_x86_features(void) { return 0; }
static int isa_mask(void) { return 1 << ISA_SCALAR; }
#endif

/* ---- dispatch ------------------------------------------------------------------------ */

static int isa_chosen = -1;

static int best_isa(void) {
    const int mask = isa_mask();
    for (int i = ISA_COUNT - 1; i > 0; i--)
        if (mask >> i & 1) return i;
    return ISA_SCALAR;
}

static int current_isa(void) {
    if (isa_chosen < 0) isa_chosen = best_isa();
    return isa_chosen;
}

/* The instruction set the kernels use: its index (cpu_ggml.c dispatches on it too), its name. */
int ws_qdot_isa_index(void) { return current_isa(); }

const char *ws_qdot_isa(void) { return isa_names[current_isa()]; }

/* Bit i: isa_names[i] runs here. */
int ws_qdot_supported(void) { return isa_mask(); }

/* Use instruction set `name` ("" or NULL: the best this CPU has). Returns 0, or -1 (nothing
 * changed) when it is unknown or this CPU lacks it. */
int ws_qdot_select(const char *name) {
    if (!name || !*name) {
        isa_chosen = best_isa();
        return 0;
    }
    for (int i = 0; i < ISA_COUNT; i++)
        if (!strcmp(name, isa_names[i])) {
            if (!(isa_mask() >> i & 1)) return -1;
            isa_chosen = i;
            return 0;
        }
    return -1;
}

/* A whole block quantized with vector instructions (every x86 copy's is the same AVX2 code). */
#ifdef WS_X86
__attribute__((target("avx2,fma,f16c"))) static void quantize_block_x86(const float *x, int64_t layout, int8_t *q,
                                                                  float *d, float *xs) {
    quantize_block_avx2(x, layout, q, d, xs);
}
#else
static void quantize_block_x86(const float *x, int64_t layout, int8_t *q, float *d, float *xs) {
    quantize_block(x, QB, layout, q, d, xs);
}
#endif

/* name_<the chosen instruction set>(args...): the one dispatch of every matmul here. */
#ifdef WS_X86
#ifdef WS_X86_AVXVNNI
#define AVXVNNI_CASE(name, ...) \
    case ISA_AVXVNNI: name##_avxvnni(__VA_ARGS__); break;
#else
#define AVXVNNI_CASE(name, ...)
#endif
#define BY_ISA(name, ...)                                                   \
    switch (current_isa()) {                                                \
    case ISA_AVX512VNNI: name##_avx512vnni(__VA_ARGS__); break;             \
    AVXVNNI_CASE(name, __VA_ARGS__)                                         \
    case ISA_AVX2: name##_avx2(__VA_ARGS__); break;                         \
    default: name##_scalar(__VA_ARGS__); break;                             \
    }
#else
#define BY_ISA(name, ...) name##_scalar(__VA_ARGS__)
#endif

/* Per input row and group of G inputs: the sum of d * sum(xq) over its blocks (what the zeros
 * multiply). Returns a malloc'd (M, K/G) array, or NULL when out of memory. */
static float *group_sums(const ws_qact *a, int64_t G) {
    const int64_t groups = a->k / G, per_group = G / QB;
    float *gsum = malloc(sizeof(float) * (size_t)(a->m * groups));
    if (!gsum) return NULL;
    for (int64_t m = 0; m < a->m; m++)
        for (int64_t g = 0; g < groups; g++) {
            float s = 0;
            for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) s += a->xs[m * a->nb + b];
            gsum[m * groups + g] = s;
        }
    return gsum;
}

/* 32 times the integer sums of the input's quantized values over each half of each block of
 * 32 (elements 0..15, 16..31), for M rows in the WS_QACT_INT4 order: exact in float. */
static float *half_sums32(const ws_qact *a) {
    float *hs = malloc(sizeof(float) * (size_t)(a->m * a->nb * 2));
    if (!hs) return NULL;
    for (int64_t m = 0; m < a->m; m++)
        for (int64_t b = 0; b < a->nb; b++) {
            const int8_t *q = a->q + m * a->kp + QB * b; /* evens 0, 2, ..., then odds */
            int32_t s[2] = {0, 0};
            for (int t = 0; t < QB / 2; t++) s[t / 8] += q[t] + q[QB / 2 + t];
            hs[(m * a->nb + b) * 2] = 32.0f * (float)s[0], hs[(m * a->nb + b) * 2 + 1] = 32.0f * (float)s[1];
        }
    return hs;
}

static void add_bias(const float *bias, int64_t M, int64_t N, float *y) {
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
}

int ws_q4_proj(const ws_qact *a, int64_t N, const uint8_t *q, const uint16_t *scales, const uint16_t *zeros,
               int64_t G, const float *bias, float *y) {
    if (G != 32 && G != 64 && G != 128) return -2;
    float *gsum = group_sums(a, G);
    if (!gsum) return -1;
    BY_ISA(q4_matmul, a, N, q, scales, zeros, G, gsum, bias, y);
    free(gsum);
    return 0;
}

/* The tile set of n projections (N[p] rows, tiles[p], into y[p]); -2 where a count is not a
 * multiple of 16 or n is out of range. */
static int tile_set_of(tile_set *s, int n, const int64_t *N, const uint8_t *const *tiles, float *const *y) {
    if (n < 1 || n > WS_MAX_PROJS) return -2;
    s->np = n, s->first[0] = 0;
    for (int p = 0; p < n; p++) {
        if (N[p] % 16) return -2;
        s->N[p] = N[p], s->tiles[p] = tiles[p], s->y[p] = y[p], s->first[p + 1] = s->first[p] + N[p] / 16;
    }
    return 0;
}

/* y[p] (M, N[p]) = the 4-bit 16-row tiles[p]' product with a (+ bias[p], each may be NULL), for
 * p < n, in one parallel loop: N[p] multiples of 16, the input quantized in the WS_QACT_INT4
 * layout; `layout` WS_Q4T_INT4 (groups of G) or one of the GGUF layouts (G 32: their sums of
 * the input are the blocks'; K a multiple of 256 for the k-quants). */
int ws_q4t_projs(const ws_qact *a, int n, const int64_t *N, const uint8_t *const *tiles, int64_t G, int layout,
                 const float *const *bias, float *const *y) {
    tile_set s;
    if ((G != 32 && G != 64 && G != 128) || a->k % G || tile_set_of(&s, n, N, tiles, y)) return -2;
    const int k_quant = layout == WS_Q4T_Q2_K || layout == WS_Q4T_Q3_K || layout == WS_Q4T_Q4_K ||
                        layout == WS_Q4T_Q5_K || layout == WS_Q4T_Q6_K || layout == WS_Q4T_IQ4_XS;
    if (layout < WS_Q4T_INT4 || layout > WS_Q4T_Q2_K || (layout != WS_Q4T_INT4 && G != 32) || (k_quant && a->k % 256))
        return -2;
    /* The input's sums per group: per block of 32 they are the quantized input's own (xs); Q6_K
     * takes 32 times those of each half block instead (its codes' offset). */
    const int halves = layout == WS_Q4T_Q6_K || layout == WS_Q4T_Q3_K || layout == WS_Q4T_Q2_K;
    const int own = halves || G != QB;
    float *gsum = halves ? half_sums32(a) : G != QB ? group_sums(a, G) : a->xs;
    if (!gsum) return -1;
    BY_ISA(q4t_matmul, a, &s, G, gsum, layout);
    if (own) free(gsum);
    for (int p = 0; p < n; p++) add_bias(bias[p], a->m, N[p], y[p]);
    return 0;
}

/* The same for int8 16-row tiles, or Q8_0 tiles where block_scales is set: K a multiple of 32,
 * the input in the WS_QACT_INT8 layout. */
int ws_q8t_projs(const ws_qact *a, int n, const int64_t *N, const uint8_t *const *tiles, int block_scales,
                 const float *const *bias, float *const *y) {
    tile_set s;
    if (a->k % QB || tile_set_of(&s, n, N, tiles, y)) return -2;
    const int64_t nb = a->k / QB;
    int32_t *qsum = malloc(sizeof(int32_t) * (size_t)(a->m * nb)); /* sum(xq) per block: xs / d */
    if (!qsum) return -1;
    for (int64_t i = 0; i < a->m * nb; i++) qsum[i] = a->d[i] > 0 ? (int32_t)nearbyintf(a->xs[i] / a->d[i]) : 0;
    BY_ISA(q8t_matmul, a, &s, qsum, block_scales != 0);
    free(qsum);
    for (int p = 0; p < n; p++) add_bias(bias[p], a->m, N[p], y[p]);
    return 0;
}

void ws_q8_proj(const ws_qact *a, int64_t N, const int8_t *q, const float *scales, const float *bias,
                float *y) {
    BY_ISA(q8_matmul, a, N, q, scales, bias, y);
}

/* q (N, K) as floats and scales (N,) from int8 16-row tiles: the exact path's operands, as
 * Int8Linear's portable qweight and scales give them. */
void ws_int8_tiled_dequantize(const uint8_t *tiles, int64_t N, int64_t K, float *q, float *scales) {
    const int64_t nb = K / QB, tile_bytes = 16 * K + 64;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *tile = tiles + n / 16 * tile_bytes;
        const int64_t r = n % 16;
        for (int64_t b = 0; b < nb; b++)
            for (int j = 0; j < QB; j++) q[n * K + QB * b + j] = (float)((int32_t)tile[b * 512 + 64 * (j / 4) + 4 * r + j % 4] - 128);
        memcpy(scales + n, tile + nb * 512 + 4 * r, 4);
    }
}

/* ---- the matmuls Int4Linear / Int8Linear call (one input, quantized here) ---------------- */

/* y (M, N) = x (M, K) @ W.T (+ bias); q (N, K/2) portable nibbles; scales, zeros fp16 (N, K/G). */
int ws_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *q, const uint16_t *scales,
                   const uint16_t *zeros, int64_t G, const float *bias, float *y) {
    ws_qact a = {0};
    int status = ws_qact_quantize(&a, x, M, K, WS_QACT_INT4);
    if (status == 0) status = ws_q4_proj(&a, N, q, scales, zeros, G, bias, y);
    ws_qact_free(&a);
    return status;
}

/* y (M, N) = x (M, K) @ (q * scale).T (+ bias); q int8 (N, K), scales (N,). */
int ws_int8_matmul(const float *x, int64_t M, int64_t K, int64_t N, const int8_t *q, const float *scales,
                   const float *bias, float *y) {
    ws_qact a = {0};
    int status = ws_qact_quantize(&a, x, M, K, WS_QACT_INT8);
    if (status == 0) ws_q8_proj(&a, N, q, scales, bias, y);
    ws_qact_free(&a);
    return status;
}

/* y[p] (M, N[p]) = x (M, K) @ W[p].T (+ bias[p]) for p < n, each W[p] held as 16-row tiles of
 * `kind` WS_INT4_TILES (groups of G), a GGUF kind (G = 32), or WS_INT8_TILES, all in one
 * parallel loop (ws_q4t_projs, ws_q8t_projs). */
int ws_tiled_matmuls(const float *x, int64_t M, int64_t K, int n, const int64_t *N, int64_t kind,
                     const uint8_t *const *tiles, int64_t G, const float *const *bias, float *const *y) {
    const int layout4 = ws_q4t_layout(kind), bits4 = layout4 >= 0;
    if (!bits4 && kind != WS_INT8_TILES && kind != WS_Q8_0_TILES) return -2;
    ws_qact a = {0};
    int status = ws_qact_quantize(&a, x, M, K, bits4 ? WS_QACT_INT4 : WS_QACT_INT8);
    if (status == 0)
        status = bits4 ? ws_q4t_projs(&a, n, N, tiles, G, layout4, bias, y)
                       : ws_q8t_projs(&a, n, N, tiles, kind == WS_Q8_0_TILES, bias, y);
    ws_qact_free(&a);
    return status;
}

/* w (N, K) float from int4 16-row tiles: the exact path's weight, as ws_int4_dequantize. */
void ws_int4_tiled_dequantize(const uint8_t *tiles, int64_t N, int64_t K, int64_t G, float *w) {
    const int64_t groups = K / G, per_group = G / QB, gbytes = per_group * 256 + 64;
    const int64_t tile_bytes = 16 * (K / 2) + groups * 64;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *tile = tiles + n / 16 * tile_bytes;
        const int64_t r = n % 16;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *gp = tile + g * gbytes;
            uint16_t sb, zb;
            memcpy(&sb, gp + per_group * 256 + 2 * r, 2), memcpy(&zb, gp + per_group * 256 + 32 + 2 * r, 2);
            const float s = ws_f16_to_f32(sb), z = ws_f16_to_f32(zb);
            float *dst = w + n * K + g * G;
            for (int64_t j = 0; j < G / 2; j++) { /* portable byte j of the group: codes 2j, 2j + 1 */
                const uint8_t c = gp[j / 16 * 256 + 64 * (j % 16 / 4) + 4 * r + j % 4];
                dst[2 * j] = (float)(c & 15) * s + z;
                dst[2 * j + 1] = (float)(c >> 4) * s + z;
            }
        }
    }
}

/* w (N, K) float = code * scale + zero from q (N, K/2) portable nibbles, scales and zeros
 * fp16 (N, K/G): the exact path's weight for a long input, made per call (no cached copy). */
void ws_int4_dequantize(const uint8_t *q, const uint16_t *scales, const uint16_t *zeros, int64_t N, int64_t K,
                        int64_t G, float *w) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t g = 0; g < groups; g++) {
            const float s = ws_f16_to_f32(scales[n * groups + g]), z = ws_f16_to_f32(zeros[n * groups + g]);
            const uint8_t *src = q + n * (K / 2) + g * (G / 2);
            float *dst = w + n * K + g * G;
            for (int64_t j = 0; j < G / 2; j++) {
                dst[2 * j] = (float)(src[j] & 15) * s + z;
                dst[2 * j + 1] = (float)(src[j] >> 4) * s + z;
            }
        }
}
