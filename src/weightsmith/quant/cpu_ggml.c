/* Matmuls on GGUF quantized blocks as the file stores them (GGMLLinear), chosen at run time.
 *
 * A GGUF file's matrices are rows of ggml blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (32
 * weights a block) and the k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS (256 a block, in
 * sub-blocks of 32 or 16 with their own 4-, 6- or 8-bit scales), and the grid-coded, ternary and
 * MXFP4 types of cpu_iquant.h (included below). GGMLLinear keeps those bytes
 * unchanged (resident memory = the file's), and these kernels read them in place. Every 32
 * weights of a block decode to
 *   w[l] = s[l / 16] * c[l] + z[l / 16]
 * with integer codes c (signed for the symmetric types, 0..2^bits - 1 for the others; IQ4's
 * are the 16 int8 levels of its non-linear table), two scales s (equal except in Q2_K, Q3_K
 * and Q6_K) and two zeros z (0 for the symmetric types, equal except in Q2_K), in the float
 * arithmetic gguf-py's dequantize uses (every product of an fp16 and a small integer here is
 * exact in fp32, so the result is bit for bit its dequantization).
 *
 * The matmul takes the layer input quantized to int8 per block of 32 in natural order
 * (ws_qact, WS_QACT_INT8, shared by the projections that read it, as cpu_qdot.c's int8
 * kernel does) and sums each block's codes x inputs in int32 with the CPU's integer
 * dot-product instructions:
 *   y[m, n] = sum_b d[m, b] * sum_h s[b, h] * sum_{l in h} c[l] xq[m, l]  +  sum_b z[b] * xs[m, b]
 * (Q2_K, whose 16-weight halves have their own zeros, takes each half's d * sum xq instead of xs,
 * as llama.cpp's sums of the quantized input per 16).
 * Against the float product this adds the activations' rounding only (as llama.cpp's
 * decoding has). One copy of cpu_ggml_x86.h per instruction set (AVX2, AVX-VNNI,
 * AVX512-VNNI, each with F16C), chosen with cpu_qdot.c's selection (ws_qdot_select), and
 * portable C. Block layouts: ggml-common.h in llama.cpp, as gguf-py's quants.py reads them.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#define QB 32
#define QROWS 4

/* ggml type ids (GGMLQuantizationType) */
enum {
    T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12,
    T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23
};

/* IEEE half (two bytes at p, little-endian) to float. */
static float half_to_float(const uint8_t *p) { return ws_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

#include "cpu_iquant.h"

/* Weights and bytes per block of a type; 0 for a type these kernels do not run. */
static int64_t block_weights(int64_t type) {
    switch (type) {
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: case T_IQ4_NL: return 32;
    case T_Q2_K: case T_Q3_K: case T_Q4_K: case T_Q5_K: case T_Q6_K: case T_IQ4_XS: return 256;
    case T_MXFP4: return iq_type(type) ? 32 : 0;
    default: return iq_type(type) ? 256 : 0;
    }
}

static int64_t block_bytes(int64_t type) {
    switch (type) {
    case T_Q4_0: case T_IQ4_NL: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q2_K: return 84;
    case T_Q3_K: return 110;
    case T_IQ4_XS: return 136;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return iq_block_bytes(type);
    }
}

/* Bytes of one row of k weights, or -1 when the type is not run here or k is not whole blocks. */
int64_t ws_ggml_row_bytes(int64_t type, int64_t k) {
    const int64_t qk = block_weights(type);
    if (!qk || k % qk) return -1;
    return k / qk * block_bytes(type);
}

/* Q3_K's 16 6-bit scales, minus 32, from their 12 packed bytes sc: scale k has its low 4 bits
 * in byte k % 8 (the low nibble for k < 8) and its high 2 bits in byte 8 + k % 4 (bits 2 (k / 4));
 * computed four scales to a 32-bit word. */
static void q3k_scales(const uint8_t *sc, int8_t out[16]) {
    uint32_t word[3], res[4];
    uint8_t bytes[16];
    memcpy(word, sc, 12);
    for (int w = 0; w < 4; w++) /* scales 4w..4w+3 */
        res[w] = (word[w % 2] >> 4 * (w / 2) & 0x0f0f0f0fu) | (word[2] >> 2 * w & 0x03030303u) << 4;
    memcpy(bytes, res, 16);
    for (int k = 0; k < 16; k++) out[k] = (int8_t)(bytes[k] - 32);
}

/* IQ4_XS's 6-bit scale of sub-block i: low 4 bits from scales_l (blk + 4), high 2 from the
 * 16-bit scales_h (blk + 2); minus 32. */
static int iq4xs_scale(const uint8_t *blk, int i) {
    const int hi = (blk[2] | blk[3] << 8) >> 2 * i & 3;
    return ((blk[4 + i / 2] >> 4 * (i % 2) & 15) | hi << 4) - 32;
}

/* Sub-block j (32 weights) of a row: codes c, scales s (first, last 16), zeros z (first, last
 * 16); returns 0 without zeros, 1 with one zero (z[0] = z[1]), 2 with two (Q2_K). */
static int sub_block(int64_t type, const uint8_t *row, int64_t j, int32_t c[QB], float s[2], float z[2]) {
    const int64_t per = block_weights(type) / QB; /* sub-blocks per block */
    const uint8_t *blk = row + j / per * block_bytes(type);
    const int i = (int)(j % per);
    int has_zero = 0;
    z[0] = z[1] = 0;
    switch (type) {
    case T_Q4_0: case T_Q4_1: {
        const uint8_t *qs = blk + (type == T_Q4_1 ? 4 : 2);
        for (int l = 0; l < 16; l++) c[l] = qs[l] & 15, c[l + 16] = qs[l] >> 4;
        s[0] = half_to_float(blk);
        if (type == T_Q4_0) {
            for (int l = 0; l < QB; l++) c[l] -= 8;
        } else {
            z[0] = half_to_float(blk + 2), has_zero = 1;
        }
        break;
    }
    case T_IQ4_NL: case T_IQ4_XS: {
        const uint8_t *qs = type == T_IQ4_NL ? blk + 2 : blk + 8 + 16 * i;
        for (int l = 0; l < 16; l++) c[l] = WS_IQ4_LEVELS[qs[l] & 15], c[l + 16] = WS_IQ4_LEVELS[qs[l] >> 4];
        s[0] = type == T_IQ4_NL ? half_to_float(blk) : half_to_float(blk) * (float)iq4xs_scale(blk, i);
        break;
    }
    case T_Q5_0: case T_Q5_1: {
        const int one = type == T_Q5_1;
        const uint8_t *qh = blk + (one ? 4 : 2), *qs = qh + 4;
        const uint32_t hi = (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
        for (int l = 0; l < 16; l++) c[l] = qs[l] & 15, c[l + 16] = qs[l] >> 4;
        for (int l = 0; l < QB; l++) c[l] |= (int32_t)(hi >> l & 1) << 4;
        s[0] = half_to_float(blk);
        if (one) {
            z[0] = half_to_float(blk + 2), has_zero = 1;
        } else {
            for (int l = 0; l < QB; l++) c[l] -= 16;
        }
        break;
    }
    case T_Q8_0:
        for (int l = 0; l < QB; l++) c[l] = (int8_t)blk[2 + l];
        s[0] = half_to_float(blk);
        break;
    case T_Q4_K: case T_Q5_K: {
        int sc, mn;
        ws_k_scale_min(blk + 4, 1, i, &sc, &mn);
        const uint8_t *qs = blk + (type == T_Q5_K ? 48 : 16) + 32 * (i / 2);
        for (int l = 0; l < QB; l++) c[l] = i % 2 ? qs[l] >> 4 : qs[l] & 15;
        if (type == T_Q5_K)
            for (int l = 0; l < QB; l++) c[l] |= (blk[16 + l] >> i & 1) << 4;
        s[0] = half_to_float(blk) * (float)sc;
        z[0] = -(half_to_float(blk + 2) * (float)mn), has_zero = 1;
        break;
    }
    case T_Q2_K: case T_Q3_K: { /* sub-block i: 2-bit field i % 4 of 32 bytes at 32 (i / 4) */
        const uint8_t *qs = blk + (type == T_Q2_K ? 16 : 32) + 32 * (i / 4);
        for (int l = 0; l < QB; l++) c[l] = qs[l] >> 2 * (i % 4) & 3;
        const float d = half_to_float(blk + (type == T_Q2_K ? 80 : 108));
        if (type == T_Q3_K) { /* codes - 4 where the high-mask bit i is clear */
            for (int l = 0; l < QB; l++) c[l] -= blk[l] >> i & 1 ? 0 : 4;
            int8_t sc[16];
            q3k_scales(blk + 96, sc);
            s[0] = d * (float)sc[2 * i], s[1] = d * (float)sc[2 * i + 1];
            return 0;
        }
        const float dmin = half_to_float(blk + 82);
        for (int h = 0; h < 2; h++) s[h] = d * (float)(blk[2 * i + h] & 15), z[h] = -(dmin * (float)(blk[2 * i + h] >> 4));
        return 2;
    }
    case T_Q6_K: {
        const int h = i / 4, k = i % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (k & 1), *qh = blk + 128 + 32 * h;
        for (int l = 0; l < QB; l++) c[l] = ((ql[l] >> 4 * (k >> 1) & 15) | (qh[l] >> 2 * k & 3) << 4) - 32;
        const float d = half_to_float(blk + 208);
        s[0] = d * (float)(int8_t)blk[192 + 2 * i], s[1] = d * (float)(int8_t)blk[192 + 2 * i + 1];
        return 0;
    }
    default: { /* cpu_iquant.h's types */
        int8_t g[QB];
        const uint32_t sign = iq_sub_block(type, blk, i, g, s);
        for (int l = 0; l < QB; l++) c[l] = sign >> l & 1 ? -g[l] : g[l];
        return 0;
    }
    }
    s[1] = s[0], z[1] = z[0];
    return has_zero;
}

/* w (N, K) float, each row dequantized from q (N rows of row_bytes): bit for bit gguf-py's
 * dequantize. Returns 0, or -1 for a type or K these kernels do not take. */
int ws_ggml_dequantize(int64_t type, const uint8_t *q, int64_t N, int64_t K, float *w) {
    const int64_t row_bytes = ws_ggml_row_bytes(type, K);
    if (row_bytes < 0) return -1;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        int32_t c[QB];
        float s[2], z[2];
        for (int64_t j = 0; j < K / QB; j++) {
            float *out = w + n * K + j * QB;
            if (sub_block(type, q + n * row_bytes, j, c, s, z)) {
                for (int l = 0; l < QB; l++) out[l] = s[l / 16] * (float)c[l] + z[l / 16];
            } else { /* no zero added: keeps gguf-py's -0.0 for a negative scale times 0 */
                for (int l = 0; l < QB; l++) out[l] = s[l / 16] * (float)c[l];
            }
        }
    }
    return 0;
}

/* ---- portable C ---------------------------------------------------------------------- */

static void ggml_matmul_scalar(const ws_qact *a, int64_t N, int64_t type, const uint8_t *q, int64_t row_bytes,
                               const float *bias, float *y) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < a->m; m++) y[m * N + n] = 0;
        int32_t c[QB];
        float s[2], z[2];
        for (int64_t b = 0; b < a->nb; b++) {
            const int zero = sub_block(type, q + n * row_bytes, b, c, s, z);
            for (int64_t m = 0; m < a->m; m++) {
                const int8_t *xq = a->q + m * a->kp + QB * b;
                int32_t lo = 0, hi = 0, xlo = 0, xhi = 0;
                for (int l = 0; l < 16; l++) lo += c[l] * xq[l], hi += c[l + 16] * xq[l + 16];
                const float d = a->d[m * a->nb + b];
                float acc = d * (s[0] * (float)lo + s[1] * (float)hi);
                if (zero == 1) acc += z[0] * a->xs[m * a->nb + b];
                if (zero == 2) {
                    for (int l = 0; l < 16; l++) xlo += xq[l], xhi += xq[l + 16];
                    acc += d * (z[0] * (float)xlo + z[1] * (float)xhi);
                }
                y[m * N + n] += acc;
            }
        }
        for (int64_t m = 0; m < a->m; m++) y[m * N + n] += bias ? bias[n] : 0.0f;
    }
}

/* ---- x86 ------------------------------------------------------------------------------- */

#define WS_X86_KERNELS "cpu_ggml_x86.h"
#define WS_X86_EXTRA ",f16c"
#include "cpu_x86_isas.h"

#ifdef WS_X86
static int has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1);
}
#endif

/* y (M, N) = x @ W.T (+ bias) for the input a (quantized WS_QACT_INT8) and W in ggml blocks
 * q (N rows of ws_ggml_row_bytes(type, K) bytes). Returns 0, or -2 for a type or K not taken. */
int ws_ggml_proj(const ws_qact *a, int64_t N, int64_t type, const uint8_t *q, const float *bias, float *y) {
    const int64_t row_bytes = ws_ggml_row_bytes(type, a->k);
    if (row_bytes < 0 || a->layout != WS_QACT_INT8) return -2;
#ifdef WS_X86
    static int f16c = -1;
    if (f16c < 0) f16c = has_f16c();
    switch (f16c ? ws_qdot_isa_index() : 0) {
    case 3: ggml_matmul_avx512vnni(a, N, type, q, row_bytes, bias, y); return 0;
#ifdef WS_X86_AVXVNNI
    case 2: ggml_matmul_avxvnni(a, N, type, q, row_bytes, bias, y); return 0;
#endif
    case 1: ggml_matmul_avx2(a, N, type, q, row_bytes, bias, y); return 0;
    default: break;
    }
#endif
    ggml_matmul_scalar(a, N, type, q, row_bytes, bias, y);
    return 0;
}

/* y (M, N) = x (M, K) @ W.T (+ bias), one input quantized here. */
int ws_ggml_matmul(const float *x, int64_t M, int64_t K, int64_t N, int64_t type, const uint8_t *q,
                   const float *bias, float *y) {
    if (ws_ggml_row_bytes(type, K) < 0) return -2;
    ws_qact a = {0};
    int status = ws_qact_quantize(&a, x, M, K, WS_QACT_INT8);
    if (status == 0) status = ws_ggml_proj(&a, N, type, q, bias, y);
    ws_qact_free(&a);
    return status;
}
