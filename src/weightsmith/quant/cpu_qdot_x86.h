/* The int4 / int8 integer dot-product kernels for one x86 instruction set.
 *
 * Copied once per instruction set by cpu_x86_isas.h (SUFFIX, TARGET, DOTU8S8 and
 * WS_WIDE512 are described there); cpu_qdot.c's dispatcher chooses one at run time.
 *
 * 256-bit vectors, one 32-value block per vector (512-bit, two blocks, under WS_WIDE512):
 *   int4: 16 bytes of a row (portable layout: byte j holds codes 2j and 2j+1) are loaded
 *   into both halves of a vector, the upper half shifted by 4 bits, and masked: the lower
 *   16 bytes are the even codes, the upper 16 the odd ones, which is the order the
 *   activations were quantized in (WS_QACT_INT4). Codes 0..15 are the unsigned operand.
 *   int8: signed x signed via |w| (unsigned) times x with w's sign.
 * Rows of x are taken QROWS at a time, each weight block being expanded once for all.
 */

/* One whole block of 32 inputs to int8 (ws_qact_quantize's quantize_block, vectorized: the same
 * float operations, so the same codes): d = max |x| / 127, q = round(x / d) ties to even,
 * stored in natural order or (int4 layout) even elements first; xs = d * sum(q). */
KERNEL void FN(quantize_block)(const float *x, int64_t layout, int8_t *q, float *d, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i), top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    const float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
    const float scale = amax / 127.0f, inv = scale > 0 ? 1.0f / scale : 0.0f;
    __m256i c[4];
    __m256 total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_max_ps(_mm256_min_ps(r, _mm256_set1_ps(127)), _mm256_set1_ps(-127));
        total = _mm256_add_ps(total, r), c[i] = _mm256_cvtps_epi32(r);
    }
    /* packs work per 128-bit lane: dwords come out as elements 0-3, 8-11, 16-19, 24-27, 4-7, ... */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (layout == WS_QACT_INT4) {
        const __m256i evens_first = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6,
                                                     8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, evens_first), 0xd8); /* quads 0, 2, 1, 3 */
    }
    _mm256_storeu_si256((__m256i *)q, b);
    *d = scale, *xs = scale * FN(hsum)(total); /* the sum of small integers: exact */
}

/* Ask for the `bytes` at p ahead of use (a weight row PF_ROWS ahead: the hardware prefetchers
 * ramp up slowly on rows this short, read as three streams). */
KERNEL void FN(prefetch)(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* Block b of an int4 row (weight scale `scale`) against mc input rows, summed into acc. */
KERNEL void FN(q4_block)(const ws_qact *a, const int64_t mc, const uint8_t *qrow, int64_t b, float scale,
                         __m256 *acc) {
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4), low4 = _mm256_set1_epi8(15);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(qrow + 16 * b));
    const __m256i w = _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(bytes), shift), low4);
    const __m256 s = _mm256_set1_ps(scale);
    for (int64_t m = 0; m < mc; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + m * a->kp + QB * b));
        const __m256i p = DOTU8S8(_mm256_setzero_si256(), w, xq);
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(a->d + m * a->nb + b));
        acc[m] = _mm256_fmadd_ps(f, s, acc[m]);
    }
}

/* sum_g z[g] * gsum[g] over n values, z fp16. */
KERNEL float FN(dot)(const uint16_t *z, const float *gsum, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + g))), _mm256_loadu_ps(gsum + g), acc);
    float total = FN(hsum)(acc);
    for (; g < n; g++) total += _cvtsh_ss(z[g]) * gsum[g];
    return total;
}

KERNEL void FN(q4_rows_n)(const ws_qact *a, const int64_t mc, const uint8_t *qrow, const uint16_t *srow,
                          const uint16_t *zrow, int64_t G, const float *gsum, float *out, int64_t N) {
    const int64_t groups = a->k / G, nb = a->nb;
    const int sh = G == 32 ? 0 : (G == 64 ? 1 : 2); /* block b is in group b >> sh (G is 32, 64 or 128) */
    __m256 acc0[QROWS], acc1[QROWS]; /* alternate blocks: two FMA chains */
    for (int64_t m = 0; m < mc; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        FN(q4_block)(a, mc, qrow, b, _cvtsh_ss(srow[b >> sh]), acc0);
        FN(q4_block)(a, mc, qrow, b + 1, _cvtsh_ss(srow[(b + 1) >> sh]), acc1);
    }
    if (b < nb) FN(q4_block)(a, mc, qrow, b, _cvtsh_ss(srow[b >> sh]), acc0);
    for (int64_t m = 0; m < mc; m++)
        out[m * N] = FN(hsum)(_mm256_add_ps(acc0[m], acc1[m])) + FN(dot)(zrow, gsum + m * groups, groups);
}

KERNEL void FN(q8_block)(const ws_qact *a, const int64_t mc, const int8_t *qrow, int64_t b, __m256 *acc) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)(qrow + QB * b));
    const __m256i wabs = _mm256_abs_epi8(w); /* -128 becomes 0x80: 128 as the unsigned operand */
    for (int64_t m = 0; m < mc; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + m * a->kp + QB * b));
        const __m256i p = DOTU8S8(_mm256_setzero_si256(), wabs, _mm256_sign_epi8(xq, w));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a->d[m * a->nb + b]), acc[m]);
    }
}

/* The last, partial block of an int8 row (k not a multiple of 32) against input row m. */
KERNEL float FN(q8_partial)(const ws_qact *a, int64_t m, const int8_t *qrow, int64_t full) {
    int32_t isum = 0;
    for (int64_t k = QB * full; k < a->k; k++) isum += (int32_t)qrow[k] * a->q[m * a->kp + k];
    return (float)isum * a->d[m * a->nb + full];
}

#ifdef WS_WIDE512
/* 512-bit vectors (AVX512-VNNI), two 32-value blocks per vector: half the instructions a
 * weight byte of the 256-bit kernels. Lanes 0-7 of a dot product are block b's, 8-15 block
 * b + 1's, so each block's scale is spread over its 8 lanes (`pair`: two floats -> 8 + 8 lanes). */
KERNEL __m512 FN(pair)(__m128 two) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(two));
}

KERNEL __m128 FN(two)(const float *p) { return _mm_castpd_ps(_mm_load_sd((const double *)p)); }

/* Two fp16 values at p as floats (lanes 0, 1). */
KERNEL __m128 FN(two16)(const uint16_t *p) {
    int32_t bits;
    memcpy(&bits, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
}

/* Blocks b, b + 1 of an int4 row (weight scales s2: theirs) against mc input rows. */
KERNEL void FN(q4_pair)(const ws_qact *a, const int64_t mc, const uint8_t *qrow, int64_t b, __m128 s2, __m512 *acc) {
    const __m512i bytes = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(qrow + 16 * b)));
    const __m512i w = _mm512_and_si512(
        _mm512_srlv_epi64(_mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), bytes),
                          _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
        _mm512_set1_epi8(15)); /* block b's even codes, its odd ones, then block b + 1's */
    for (int64_t m = 0; m < mc; m++) {
        const __m512i xq = _mm512_loadu_si512((const void *)(a->q + m * a->kp + QB * b));
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xq);
        const __m512 sd = FN(pair)(_mm_mul_ps(s2, FN(two)(a->d + m * a->nb + b)));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sd, acc[m]);
    }
}

KERNEL void FN(q4_rows_w)(const ws_qact *a, const int64_t mc, const uint8_t *qrow, const uint16_t *srow,
                          const uint16_t *zrow, int64_t G, const float *gsum, float *out, int64_t N) {
    const int64_t groups = a->k / G, nb = a->nb;
    const int sh = G == 32 ? 0 : (G == 64 ? 1 : 2);
    __m512 acc0[QROWS], acc1[QROWS];
    __m256 tail[QROWS];
    for (int64_t m = 0; m < mc; m++) acc0[m] = acc1[m] = _mm512_setzero_ps(), tail[m] = _mm256_setzero_ps();
    int64_t b = 0;
    if (sh == 0) { /* a scale a block: two adjacent */
        for (; b + 4 <= nb; b += 4) {
            FN(q4_pair)(a, mc, qrow, b, FN(two16)(srow + b), acc0);
            FN(q4_pair)(a, mc, qrow, b + 2, FN(two16)(srow + b + 2), acc1);
        }
    } else { /* blocks b, b + 1 (b even) share a group */
        for (; b + 4 <= nb; b += 4) {
            FN(q4_pair)(a, mc, qrow, b, _mm_set1_ps(_cvtsh_ss(srow[b >> sh])), acc0);
            FN(q4_pair)(a, mc, qrow, b + 2, _mm_set1_ps(_cvtsh_ss(srow[(b + 2) >> sh])), acc1);
        }
    }
    for (; b + 2 <= nb; b += 2) {
        const __m128 s2 = _mm_setr_ps(_cvtsh_ss(srow[b >> sh]), _cvtsh_ss(srow[(b + 1) >> sh]), 0, 0);
        FN(q4_pair)(a, mc, qrow, b, s2, acc0);
    }
    if (b < nb) FN(q4_block)(a, mc, qrow, b, _cvtsh_ss(srow[b >> sh]), tail);
    for (int64_t m = 0; m < mc; m++)
        out[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + FN(hsum)(tail[m]) +
                     FN(dot)(zrow, gsum + m * groups, groups);
}

/* Blocks b, b + 1 of an int8 row against mc input rows: |w| times x with w's sign. */
KERNEL void FN(q8_pair)(const ws_qact *a, const int64_t mc, const int8_t *qrow, int64_t b, __m512 *acc) {
    const __m512i w = _mm512_loadu_si512((const void *)(qrow + QB * b));
    const __m512i wabs = _mm512_abs_epi8(w);
    const __mmask64 neg = _mm512_movepi8_mask(w);
    for (int64_t m = 0; m < mc; m++) {
        const __m512i xq = _mm512_loadu_si512((const void *)(a->q + m * a->kp + QB * b));
        const __m512i xs = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wabs, xs);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), FN(pair)(FN(two)(a->d + m * a->nb + b)), acc[m]);
    }
}

KERNEL void FN(q8_rows_w)(const ws_qact *a, const int64_t mc, const int8_t *qrow, float scale, float *out,
                          int64_t N) {
    const int64_t full = a->k / QB;
    __m512 acc0[QROWS], acc1[QROWS];
    __m256 tail[QROWS];
    for (int64_t m = 0; m < mc; m++) acc0[m] = acc1[m] = _mm512_setzero_ps(), tail[m] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= full; b += 4) {
        FN(q8_pair)(a, mc, qrow, b, acc0);
        FN(q8_pair)(a, mc, qrow, b + 2, acc1);
    }
    if (b + 2 <= full) FN(q8_pair)(a, mc, qrow, b, acc0), b += 2;
    if (b < full) FN(q8_block)(a, mc, qrow, b, tail), b++;
    for (int64_t m = 0; m < mc; m++) {
        float total = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + FN(hsum)(tail[m]);
        if (full < a->nb) /* the last, partial block: past the row's end there is no weight to load */
            total += FN(q8_partial)(a, m, qrow, full);
        out[m * N] = total * scale;
    }
}
#define Q4_ROWS FN(q4_rows_w)
#define Q8_ROWS FN(q8_rows_w)
#else
#define Q4_ROWS FN(q4_rows_n)
#define Q8_ROWS FN(q8_rows_n)
#endif

__attribute__((target(TARGET))) static void FN(q4_matmul)(const ws_qact *a, int64_t N, const uint8_t *q,
                                                          const uint16_t *scales, const uint16_t *zeros,
                                                          int64_t G, const float *gsum, const float *bias,
                                                          float *y) {
    const int64_t K = a->k, M = a->m, groups = K / G;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        if (n + PF_ROWS < N) {
            FN(prefetch)(q + (n + PF_ROWS) * (K / 2), K / 2);
            FN(prefetch)(scales + (n + PF_ROWS) * groups, 2 * groups);
            FN(prefetch)(zeros + (n + PF_ROWS) * groups, 2 * groups);
        }
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            const ws_qact rows = ws_qact_rows(a, m0);
            const uint8_t *qrow = q + n * (K / 2);
            const uint16_t *s = scales + n * groups, *z = zeros + n * groups;
            const float *gs = gsum + m0 * groups;
            float *out = y + m0 * N + n;
            switch (mc) { /* a constant row count per case: accumulators stay in registers */
            case 1: Q4_ROWS(&rows, 1, qrow, s, z, G, gs, out, N); break;
            case 2: Q4_ROWS(&rows, 2, qrow, s, z, G, gs, out, N); break;
            case 3: Q4_ROWS(&rows, 3, qrow, s, z, G, gs, out, N); break;
            default: Q4_ROWS(&rows, 4, qrow, s, z, G, gs, out, N); break;
            }
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
}

KERNEL void FN(q8_rows_n)(const ws_qact *a, const int64_t mc, const int8_t *qrow, float scale, float *out,
                          int64_t N) {
    const int64_t full = a->k / QB;
    __m256 acc0[QROWS], acc1[QROWS]; /* alternate blocks: two FMA chains */
    for (int64_t m = 0; m < mc; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= full; b += 2) {
        FN(q8_block)(a, mc, qrow, b, acc0);
        FN(q8_block)(a, mc, qrow, b + 1, acc1);
    }
    if (b < full) FN(q8_block)(a, mc, qrow, b, acc0);
    for (int64_t m = 0; m < mc; m++) {
        float total = FN(hsum)(_mm256_add_ps(acc0[m], acc1[m]));
        if (full < a->nb) /* the last, partial block: past the row's end there is no weight to load */
            total += FN(q8_partial)(a, m, qrow, full);
        out[m * N] = total * scale;
    }
}

__attribute__((target(TARGET))) static void FN(q8_matmul)(const ws_qact *a, int64_t N, const int8_t *q,
                                                          const float *scales, const float *bias, float *y) {
    const int64_t K = a->k, M = a->m;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        if (n + PF_ROWS < N) FN(prefetch)(q + (n + PF_ROWS) * K, K);
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            const ws_qact rows = ws_qact_rows(a, m0);
            const int8_t *qrow = q + n * K;
            float *out = y + m0 * N + n;
            switch (mc) {
            case 1: Q8_ROWS(&rows, 1, qrow, scales[n], out, N); break;
            case 2: Q8_ROWS(&rows, 2, qrow, scales[n], out, N); break;
            case 3: Q8_ROWS(&rows, 3, qrow, scales[n], out, N); break;
            default: Q8_ROWS(&rows, 4, qrow, scales[n], out, N); break;
            }
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
}

#undef Q4_ROWS
#undef Q8_ROWS
#include "cpu_qtile_x86.h"
