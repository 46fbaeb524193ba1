/* The GGUF block matmul (cpu_ggml.c) for one x86 instruction set.
 *
 * Copied once per instruction set by cpu_x86_isas.h (TARGET adds f16c: the blocks' scales
 * are fp16). Each 32 weights of
 * a row are expanded into one 256-bit vector of codes in natural order (the order the
 * input was quantized in, WS_QACT_INT8):
 *   4-bit codes: 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31
 *   (Q4_0/Q4_1/Q5_0/Q5_1), or 32 bytes whose low or high nibbles are the 32 weights
 *   (Q4_K/Q5_K/Q6_K); high bits: one per weight from a 32-bit word (Q5_0/Q5_1) or from bit
 *   i of 32 bytes (Q5_K, Q3_K), two per weight from a 2-bit field of 32 bytes (Q6_K);
 *   2-bit codes: a 2-bit field of 32 bytes (Q2_K, Q3_K); IQ4_NL / IQ4_XS: 4-bit codes looked
 *   up in their 16 int8 levels with one byte shuffle.
 * Symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K, IQ4_*) give signed codes, multiplied as |c| x
 * (x with c's sign); the others unsigned codes times x plus their zero times the block's input
 * sum. The dot product's 8 int32 lanes hold weights 0..15 in lanes 0-3 and 16..31 in lanes
 * 4-7, so the two scales per 32 weights of Q2_K, Q3_K and Q6_K are one vector of per-lane
 * scales (and Q2_K's two zeros one of per-lane zeros, times the input's sums per lane).
 * cpu_iquant.h's types (g_iq_codes and below) give each 32 weights' magnitudes (grid points
 * read as 8- or 4-byte words, codes looked up or computed) and signs, applied to the input.
 */

KERNEL float FN(g_half)(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 16 bytes -> 32 codes: low nibbles (weights 0..15), then high nibbles (16..31). */
KERNEL __m256i FN(g_nib16)(const uint8_t *p) {
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi64(b, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
}

/* A 32-bit word -> byte l is 0xff where bit l is set, else 0. */
KERNEL __m256i FN(g_mask32)(uint32_t w) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)w), _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2,
                                                    2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3)); /* byte l <- byte l / 8 */
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);     /* byte l tests bit l % 8 */
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

/* The little-endian 32-bit word at p -> byte l is 16 where bit l is set, else 0. */
KERNEL __m256i FN(g_bits16)(const uint8_t *p) {
    uint32_t w;
    memcpy(&w, p, 4);
    return _mm256_and_si256(FN(g_mask32)(w), _mm256_set1_epi8(16));
}

/* Two floats as the lanes of weights 0..15 (lanes 0-3) and 16..31 (lanes 4-7). */
KERNEL __m256 FN(g_halves)(float lo, float hi) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(lo)), _mm_set1_ps(hi), 1);
}

/* f[k] = d * v[k] for 16 int8 v. */
KERNEL void FN(g_scale16)(const int8_t *v, float d, float *f) {
    const __m128i b = _mm_loadu_si128((const __m128i *)v);
    const __m256 dv = _mm256_set1_ps(d);
    _mm256_storeu_ps(f, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))));
    _mm256_storeu_ps(f + 8, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))));
}

/* f[2i], f[2i + 1] as g_halves does. */
KERNEL __m256 FN(g_pair)(const float *f) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(f)), _mm_broadcast_ss(f + 1), 1);
}

/* 32 4-bit IQ4 codes (g_nib16 order) -> their int8 levels. */
KERNEL __m256i FN(g_iq4)(const uint8_t *p) {
    const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)WS_IQ4_LEVELS));
    return _mm256_shuffle_epi8(levels, FN(g_nib16)(p));
}

/* 2-bit field f (0..3) of 32 bytes at p: codes 0..3. */
KERNEL __m256i FN(g_bits2)(const uint8_t *p, int f) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * f)), _mm256_set1_epi8(3));
}

/* Unsigned codes u of block b with lane scales sv and lane zeros zv (Q2_K), against mc input
 * rows: the zeros multiply the input's quantized sums per lane. */
KERNEL void FN(g_acc_u2)(const ws_qact *a, const int64_t mc, int64_t b, __m256i u, __m256 sv, __m256 zv,
                         __m256 *acc) {
    const __m256i ones = _mm256_set1_epi8(1);
    for (int64_t m = 0; m < mc; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + m * a->kp + QB * b));
        const __m256i p = DOTU8S8(_mm256_setzero_si256(), u, xq);
        const __m256i px = DOTU8S8(_mm256_setzero_si256(), ones, xq);
        const __m256 d = _mm256_set1_ps(a->d[m * a->nb + b]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv, d), acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(px), _mm256_mul_ps(zv, d), acc[m]);
    }
}

/* Signed codes s of block b with lane scales sv, against mc input rows. */
KERNEL void FN(g_acc_s)(const ws_qact *a, const int64_t mc, int64_t b, __m256i s, __m256 sv, __m256 *acc) {
    const __m256i sabs = _mm256_abs_epi8(s); /* -128 becomes 0x80: 128 as the unsigned operand */
    for (int64_t m = 0; m < mc; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + m * a->kp + QB * b));
        const __m256i p = DOTU8S8(_mm256_setzero_si256(), sabs, _mm256_sign_epi8(xq, s));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv, _mm256_set1_ps(a->d[m * a->nb + b])),
                                 acc[m]);
    }
}

/* Unsigned codes u of block b with scale sv and zero z, against mc input rows. */
KERNEL void FN(g_acc_u)(const ws_qact *a, const int64_t mc, int64_t b, __m256i u, __m256 sv, float z, __m256 *acc,
                        float *zacc) {
    for (int64_t m = 0; m < mc; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + m * a->kp + QB * b));
        const __m256i p = DOTU8S8(_mm256_setzero_si256(), u, xq);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(sv, _mm256_set1_ps(a->d[m * a->nb + b])),
                                 acc[m]);
        zacc[m] += z * a->xs[m * a->nb + b];
    }
}

/* The k-quants (256 weights a block, 8 sub-blocks of 32). */
KERNEL void FN(g_row_k)(const ws_qact *a, const int64_t mc, int64_t type, const uint8_t *row, __m256 *acc,
                        float *zacc) {
    const __m256i low4 = _mm256_set1_epi8(15);
    for (int64_t sb = 0; sb < a->nb / 8; sb++) {
        const uint8_t *blk = row + sb * block_bytes(type);
        if (type == T_Q6_K) {
            const float d = FN(g_half)(blk + 208);
            for (int i = 0; i < 8; i++) {
                const int h = i / 4, k = i % 4;
                const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (k & 1)));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
                const __m256i lo = _mm256_and_si256(k >> 1 ? _mm256_srli_epi16(ql, 4) : ql, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
                const __m256i s = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
                const __m256 sv = FN(g_halves)(d * (float)(int8_t)blk[192 + 2 * i], d * (float)(int8_t)blk[193 + 2 * i]);
                FN(g_acc_s)(a, mc, 8 * sb + i, s, sv, acc);
            }
            continue;
        }
        if (type == T_Q3_K) { /* 2-bit codes, minus 4 where the high-mask bit i is clear */
            const float d = FN(g_half)(blk + 108);
            float sf[16];
            int8_t sc[16];
            q3k_scales(blk + 96, sc);
            FN(g_scale16)(sc, d, sf);
            const __m256i hm = _mm256_loadu_si256((const __m256i *)blk);
            for (int i = 0; i < 8; i++) {
                const __m256i bit = _mm256_set1_epi8((char)(1 << i));
                const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                const __m256i s = _mm256_sub_epi8(FN(g_bits2)(blk + 32 + 32 * (i / 4), i % 4),
                                                  _mm256_andnot_si256(set, _mm256_set1_epi8(4)));
                FN(g_acc_s)(a, mc, 8 * sb + i, s, FN(g_pair)(sf + 2 * i), acc);
            }
            continue;
        }
        if (type == T_Q2_K) {
            const float d = FN(g_half)(blk + 80), dmin = FN(g_half)(blk + 82);
            float sf[16], zf[16];
            int8_t sc[16], mn[16];
            for (int k = 0; k < 16; k++) sc[k] = (int8_t)(blk[k] & 15), mn[k] = (int8_t)(blk[k] >> 4);
            FN(g_scale16)(sc, d, sf);
            FN(g_scale16)(mn, -dmin, zf);
            for (int i = 0; i < 8; i++)
                FN(g_acc_u2)(a, mc, 8 * sb + i, FN(g_bits2)(blk + 16 + 32 * (i / 4), i % 4), FN(g_pair)(sf + 2 * i),
                             FN(g_pair)(zf + 2 * i), acc);
            continue;
        }
        if (type == T_IQ4_XS) {
            const float d = FN(g_half)(blk);
            for (int i = 0; i < 8; i++)
                FN(g_acc_s)(a, mc, 8 * sb + i, FN(g_iq4)(blk + 8 + 16 * i), _mm256_set1_ps(d * (float)iq4xs_scale(blk, i)), acc);
            continue;
        }
        const float d = FN(g_half)(blk), dmin = FN(g_half)(blk + 2);
        const int five = type == T_Q5_K;
        const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
        for (int i = 0; i < 8; i++) {
            int sc, mn;
            ws_k_scale_min(blk + 4, 1, i, &sc, &mn);
            const __m256i qs = _mm256_loadu_si256((const __m256i *)(blk + (five ? 48 : 16) + 32 * (i / 2)));
            __m256i u = _mm256_and_si256(i % 2 ? _mm256_srli_epi16(qs, 4) : qs, low4);
            if (five) {
                const __m256i bit = _mm256_set1_epi8((char)(1 << i));
                u = _mm256_or_si256(u, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                        _mm256_set1_epi8(16)));
            }
            FN(g_acc_u)(a, mc, 8 * sb + i, u, _mm256_set1_ps(d * (float)sc), -(dmin * (float)mn), acc, zacc);
        }
    }
}

/* Four 8-byte grid points (i0: weights 0..7, ..., i3: 24..31) from the grid at `base`. */
KERNEL __m256i FN(g_grid8)(int64_t base, int i0, int i1, int i2, int i3) {
    int64_t p0, p1, p2, p3;
    memcpy(&p0, iq_grid + base + 8 * (int64_t)i0, 8), memcpy(&p1, iq_grid + base + 8 * (int64_t)i1, 8);
    memcpy(&p2, iq_grid + base + 8 * (int64_t)i2, 8), memcpy(&p3, iq_grid + base + 8 * (int64_t)i3, 8);
    return _mm256_setr_epi64x(p0, p1, p2, p3);
}

/* Eight 4-byte grid points (IQ3) from the grid at `base`, indices idx[0..7]. */
KERNEL __m256i FN(g_grid4)(int64_t base, const int idx[8]) {
    int32_t p[8];
    for (int j = 0; j < 8; j++) memcpy(p + j, iq_grid + base + 4 * (int64_t)idx[j], 4);
    return _mm256_setr_epi32(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
}

/* Byte masks (0xff: negative) of four 7-bit sign indices at bits 0, 7, 14, 21 of v. */
KERNEL __m256i FN(g_ksigns4)(uint32_t v) {
    return _mm256_setr_epi64x((long long)iq_sign_masks[v & 127], (long long)iq_sign_masks[v >> 7 & 127],
                              (long long)iq_sign_masks[v >> 14 & 127], (long long)iq_sign_masks[v >> 21 & 127]);
}

/* Codes 8 point +- 1 of IQ1_S / IQ1_M from four grid indices and a delta sign per 8 weights
 * (byte l / 8 of `neg` is 0xff where that group's delta is negative). */
KERNEL __m256i FN(g_iq1)(int i0, int i1, int i2, int i3, __m256i neg) {
    const __m256i g = FN(g_grid8)(G_IQ1_S, i0, i1, i2, i3);
    const __m256i eight = _mm256_sign_epi8(_mm256_set1_epi8(8), g); /* 8 sign(point) = 8 point */
    return _mm256_add_epi8(eight, _mm256_or_si256(neg, _mm256_set1_epi8(1)));
}

/* TQ1_0 digits of 32 bytes b times 3^p (per byte: pw), as codes -1..1: with v = b 3^p mod 256
 * the digit is (v 3) >> 8, 1 where v >= 86 and 2 where v >= 171. */
KERNEL __m256i FN(g_tq1)(__m256i b, __m256i pw) {
    const __m256i lo = _mm256_set1_epi16(0xff);
    const __m256i even = _mm256_and_si256(_mm256_mullo_epi16(_mm256_and_si256(b, lo), _mm256_and_si256(pw, lo)), lo);
    const __m256i odd = _mm256_mullo_epi16(_mm256_andnot_si256(lo, b), _mm256_srli_epi16(pw, 8)); /* high byte */
    const __m256i v = _mm256_or_si256(even, _mm256_andnot_si256(lo, odd));
    const __m256i ge86 = _mm256_cmpeq_epi8(_mm256_max_epu8(v, _mm256_set1_epi8(86)), v);
    const __m256i ge171 = _mm256_cmpeq_epi8(_mm256_max_epu8(v, _mm256_set1_epi8((char)171)), v);
    return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_set1_epi8(-1), ge86), ge171);
}

/* TQ1_0's sub-block i: weights 32i + l are digit i of byte l (i < 5); then digits 2(i - 5) and
 * 2(i - 5) + 1 of bytes 32..47 (i = 5, 6); digit 4 of those and digits 0..3 of bytes 48..51. */
KERNEL __m256i FN(g_tq1_sub)(const uint8_t *blk, int i) {
    static const char pow3[5] = {1, 3, 9, 27, 81};
    if (i < 5) return FN(g_tq1)(_mm256_loadu_si256((const __m256i *)blk), _mm256_set1_epi8(pow3[i]));
    const __m128i mid = _mm_loadu_si128((const __m128i *)(blk + 32));
    if (i < 7)
        return FN(g_tq1)(_mm256_broadcastsi128_si256(mid),
                         _mm256_setr_m128i(_mm_set1_epi8(pow3[2 * i - 10]), _mm_set1_epi8(pow3[2 * i - 9])));
    uint32_t qh;
    memcpy(&qh, blk + 48, 4);
    const __m128i tail = _mm_set1_epi32((int)qh); /* byte 4p + j: byte j, digit p */
    const __m128i pw = _mm_setr_epi8(1, 1, 1, 1, 3, 3, 3, 3, 9, 9, 9, 9, 27, 27, 27, 27);
    return FN(g_tq1)(_mm256_setr_m128i(mid, tail), _mm256_setr_m128i(_mm_set1_epi8(81), pw));
}

/* IQ1_M's sub-block i: four groups of 8 with their own grid index high bits and delta signs
 * (a nibble each of bytes 32 + 2i, 33 + 2i), two 3-bit scales, d from four nibbles. */
KERNEL __m256i FN(g_iq1m)(const uint8_t *blk, int i, float s[2]) {
    uint64_t w;
    memcpy(&w, blk + 48, 8); /* four halves: 3-bit scales in bits 0-11, d's nibbles in 12-15 */
    const uint16_t dbits = (uint16_t)((w >> 12 & 0xf) | (w >> 24 & 0xf0) | (w >> 36 & 0xf00) | (w >> 48 & 0xf000));
    const float d = _cvtsh_ss(dbits);
    const uint32_t sw = (uint32_t)(w >> 16 * (i / 2)) >> 6 * (i % 2);
    s[0] = d * (float)(2 * (int)(sw & 7) + 1) * 0.125f, s[1] = d * (float)(2 * (int)(sw >> 3 & 7) + 1) * 0.125f;
    const uint8_t *qs = blk + 4 * i, h0 = blk[32 + 2 * i], h1 = blk[33 + 2 * i];
    const __m256i neg = _mm256_setr_epi64x(-(long long)(h0 >> 3 & 1), -(long long)(h0 >> 7), -(long long)(h1 >> 3 & 1),
                                           -(long long)(h1 >> 7));
    return FN(g_iq1)(qs[0] | (h0 & 7) << 8, qs[1] | (h0 >> 4 & 7) << 8, qs[2] | (h1 & 7) << 8, qs[3] | (h1 >> 4 & 7) << 8,
                     neg);
}

/* Sub-block i of a block of cpu_iquant.h's types (iq_sub_block, vectorised): the codes'
 * magnitudes, returned, their signs in *sg (a byte < 0 where the weight is negative, as
 * _mm256_sign_epi8 reads it, applied to the input), and the scales of its halves in s. */
KERNEL __m256i FN(g_iq_codes)(int64_t type, const uint8_t *blk, int i, float s[2], __m256i *sg) {
    const __m256i one = _mm256_set1_epi8(1);
    switch (type) {
    case T_IQ2_XXS: {
        const uint32_t a0 = iq_u32(blk + 2 + 8 * i), a1 = iq_u32(blk + 6 + 8 * i);
        s[0] = s[1] = FN(g_half)(blk) * (0.5f + (float)(a1 >> 28)) * 0.25f;
        *sg = _mm256_or_si256(FN(g_ksigns4)(a1), one);
        return FN(g_grid8)(G_IQ2_XXS, a0 & 255, a0 >> 8 & 255, a0 >> 16 & 255, a0 >> 24);
    }
    case T_IQ2_XS: {
        uint64_t q;
        memcpy(&q, blk + 2 + 8 * i, 8); /* four halves: 9-bit grid index, 7-bit sign index */
        const float d = FN(g_half)(blk);
        const uint8_t sc = blk[66 + i];
        s[0] = d * (0.5f + (float)(sc & 15)) * 0.25f, s[1] = d * (0.5f + (float)(sc >> 4)) * 0.25f;
        const __m256i m = _mm256_setr_epi64x((long long)iq_sign_masks[q >> 9 & 127], (long long)iq_sign_masks[q >> 25 & 127],
                                             (long long)iq_sign_masks[q >> 41 & 127], (long long)iq_sign_masks[q >> 57]);
        const __m256i g = FN(g_grid8)(G_IQ2_XS, (int)(q & 511), (int)(q >> 16 & 511), (int)(q >> 32 & 511), (int)(q >> 48 & 511));
        *sg = _mm256_or_si256(m, one);
        return g;
    }
    case T_IQ2_S: {
        const float d = FN(g_half)(blk);
        const uint8_t sc = blk[74 + i], qh = blk[66 + i], *qs = blk + 2 + 4 * i;
        s[0] = d * (0.5f + (float)(sc & 15)) * 0.25f, s[1] = d * (0.5f + (float)(sc >> 4)) * 0.25f;
        const __m256i g = FN(g_grid8)(G_IQ2_S, qs[0] | (qh & 3) << 8, qs[1] | (qh >> 2 & 3) << 8,
                                      qs[2] | (qh >> 4 & 3) << 8, qs[3] | (qh >> 6 & 3) << 8);
        *sg = _mm256_or_si256(FN(g_mask32)(iq_u32(blk + 34 + 4 * i)), one);
        return g;
    }
    case T_IQ3_XXS: {
        const uint32_t aux = iq_u32(blk + 66 + 4 * i);
        const uint8_t *qs = blk + 2 + 8 * i;
        s[0] = s[1] = FN(g_half)(blk) * (0.5f + (float)(aux >> 28)) * 0.5f;
        const int idx[8] = {qs[0], qs[1], qs[2], qs[3], qs[4], qs[5], qs[6], qs[7]};
        *sg = _mm256_or_si256(FN(g_ksigns4)(aux), one);
        return FN(g_grid4)(G_IQ3_XXS, idx);
    }
    case T_IQ3_S: {
        const uint8_t *qs = blk + 2 + 8 * i, qh = blk[66 + i];
        s[0] = s[1] = FN(g_half)(blk) * (float)(1 + 2 * (blk[106 + i / 2] >> 4 * (i % 2) & 15));
        int idx[8];
        for (int j = 0; j < 8; j++) idx[j] = qs[j] | (qh >> j & 1) << 8;
        *sg = _mm256_or_si256(FN(g_mask32)(iq_u32(blk + 74 + 4 * i)), one);
        return FN(g_grid4)(G_IQ3_S, idx);
    }
    case T_IQ1_S: {
        const uint32_t qh = iq_u16(blk + 34 + 2 * i);
        const uint8_t *qs = blk + 2 + 4 * i;
        s[0] = s[1] = FN(g_half)(blk) * (float)(2 * (qh >> 12 & 7) + 1) * 0.125f;
        const __m256i neg = _mm256_set1_epi8(qh & 0x8000 ? -1 : 0);
        *sg = FN(g_iq1)(qs[0] | (qh & 7) << 8, qs[1] | (qh >> 3 & 7) << 8, qs[2] | (qh >> 6 & 7) << 8,
                        qs[3] | (qh >> 9 & 7) << 8, neg);
        return _mm256_abs_epi8(*sg);
    }
    case T_TQ2_0:
        s[0] = s[1] = FN(g_half)(blk + 64);
        *sg = _mm256_sub_epi8(FN(g_bits2)(blk + 32 * (i / 4), i % 4), one);
        return _mm256_abs_epi8(*sg);
    case T_TQ1_0:
        s[0] = s[1] = FN(g_half)(blk + 52);
        *sg = FN(g_tq1_sub)(blk, i);
        return _mm256_abs_epi8(*sg);
    case T_IQ1_M:
        *sg = FN(g_iq1m)(blk, i, s);
        return _mm256_abs_epi8(*sg);
    case T_MXFP4: {
        s[0] = s[1] = e8m0_half(blk[0]);
        const __m256i levels = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)MXFP4_LEVELS));
        *sg = _mm256_shuffle_epi8(levels, FN(g_nib16)(blk + 1));
        return _mm256_abs_epi8(*sg);
    }
    default: break;
    }
    int8_t g[QB];
    const uint32_t sign = iq_sub_block(type, blk, i, g, s);
    *sg = _mm256_or_si256(FN(g_mask32)(sign), one);
    return _mm256_loadu_si256((const __m256i *)g);
}

/* One 256-weight block against one input row: the 8 sub-blocks' int32 sums reduced to one
 * vector (two hadd levels: per sub-block j, lane j its weights 0..15, lane 4 + j its 16..31, of
 * sub-blocks 0-3 and 4-7), then one conversion and multiply by (weight scale x input scale). */
KERNEL __m256 FN(g_block_iq)(const ws_qact *a, const int64_t type, const uint8_t *blk, int64_t b, __m256 acc) {
    float s[16];
    __m256i h[4];
    const int8_t *xq = a->q + QB * b;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        __m256i sg0, sg1;
        const __m256i u0 = FN(g_iq_codes)(type, blk, 2 * j, s + 4 * j, &sg0);
        const __m256i u1 = FN(g_iq_codes)(type, blk, 2 * j + 1, s + 4 * j + 2, &sg1);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 64 * j));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 64 * j + QB));
        h[j] = _mm256_hadd_epi32(DOTU8S8(_mm256_setzero_si256(), u0, _mm256_sign_epi8(x0, sg0)),
                                 DOTU8S8(_mm256_setzero_si256(), u1, _mm256_sign_epi8(x1, sg1)));
    }
    const __m256i v0 = _mm256_hadd_epi32(h[0], h[1]), v1 = _mm256_hadd_epi32(h[2], h[3]);
    const __m256i lo = _mm256_permute2x128_si256(v0, v1, 0x20), hi = _mm256_permute2x128_si256(v0, v1, 0x31);
    const __m256 d = _mm256_loadu_ps(a->d + b);
    const __m256 slo = _mm256_setr_ps(s[0], s[2], s[4], s[6], s[8], s[10], s[12], s[14]);
    if (type != T_IQ2_XS && type != T_IQ2_S && type != T_IQ1_M) /* one scale per sub-block */
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_mul_ps(slo, d), acc);
    const __m256 shi = _mm256_setr_ps(s[1], s[3], s[5], s[7], s[9], s[11], s[13], s[15]);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(slo, d), acc);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(shi, d), acc);
}

/* cpu_iquant.h's types, inlined once per type (a constant `type`): one input row a block at a
 * time (g_block_iq); several rows two sub-blocks at a time, their int32 sums folded into one
 * vector (hadd: lanes 0-1 the first's weights 0..15, 2-3 the second's, 4-5 and 6-7 their
 * weights 16..31) so that one conversion and one multiply serve 64 weights. */
KERNEL void FN(g_row_iq_t)(const ws_qact *a, const int64_t mc, const int64_t type, const uint8_t *row, __m256 *acc) {
    const int per = type == T_MXFP4 ? 1 : 8;
    const int64_t bytes = iq_block_bytes(type);
    if (per == 8 && mc == 1) {
        for (int64_t b = 0; b < a->nb; b += 8, row += bytes) acc[0] = FN(g_block_iq)(a, type, row, b, acc[0]);
        return;
    }
    const __m256i lanes = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    float s[2], t[2];
    int64_t b = 0;
    for (; b + 1 < a->nb; b += 2) {
        __m256i sg0, sg1;
        const __m256i u0 = FN(g_iq_codes)(type, row + b / per * bytes, (int)(b % per), s, &sg0);
        const __m256i u1 = FN(g_iq_codes)(type, row + (b + 1) / per * bytes, (int)((b + 1) % per), t, &sg1);
        const __m128 sc = _mm_setr_ps(s[0], s[1], t[0], t[1]); /* from registers: no store-to-load stall */
        for (int64_t m = 0; m < mc; m++) {
            const int8_t *xq = a->q + m * a->kp + QB * b;
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)xq), x1 = _mm256_loadu_si256((const __m256i *)(xq + QB));
            const __m256i p0 = DOTU8S8(_mm256_setzero_si256(), u0, _mm256_sign_epi8(x0, sg0));
            const __m256i p1 = DOTU8S8(_mm256_setzero_si256(), u1, _mm256_sign_epi8(x1, sg1));
            const __m128 d2 = _mm_castpd_ps(_mm_load_sd((const double *)(a->d + m * a->nb + b)));
            const __m128 sd = _mm_mul_ps(sc, _mm_unpacklo_ps(d2, d2)); /* s0 d0, s1 d0, s2 d1, s3 d1 */
            const __m256 f = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(sd), lanes);
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(p0, p1)), f, acc[m]);
        }
    }
    if (b < a->nb) { /* an odd count of MXFP4 blocks */
        __m256i sg;
        const __m256i u = FN(g_iq_codes)(type, row + b / per * bytes, (int)(b % per), s, &sg);
        FN(g_acc_s)(a, mc, b, _mm256_sign_epi8(u, sg), FN(g_halves)(s[0], s[1]), acc);
    }
}

KERNEL void FN(g_row_iq)(const ws_qact *a, const int64_t mc, int64_t type, const uint8_t *row, __m256 *acc) {
    switch (type) {
    case T_IQ2_XXS: FN(g_row_iq_t)(a, mc, T_IQ2_XXS, row, acc); break;
    case T_IQ2_XS: FN(g_row_iq_t)(a, mc, T_IQ2_XS, row, acc); break;
    case T_IQ2_S: FN(g_row_iq_t)(a, mc, T_IQ2_S, row, acc); break;
    case T_IQ3_XXS: FN(g_row_iq_t)(a, mc, T_IQ3_XXS, row, acc); break;
    case T_IQ3_S: FN(g_row_iq_t)(a, mc, T_IQ3_S, row, acc); break;
    case T_IQ1_S: FN(g_row_iq_t)(a, mc, T_IQ1_S, row, acc); break;
    case T_IQ1_M: FN(g_row_iq_t)(a, mc, T_IQ1_M, row, acc); break;
    case T_TQ1_0: FN(g_row_iq_t)(a, mc, T_TQ1_0, row, acc); break;
    case T_TQ2_0: FN(g_row_iq_t)(a, mc, T_TQ2_0, row, acc); break;
    default: FN(g_row_iq_t)(a, mc, T_MXFP4, row, acc); break;
    }
}

/* One weight row against mc input rows: out[m * N] for m < mc. */
KERNEL void FN(g_row)(const ws_qact *a, const int64_t mc, int64_t type, const uint8_t *row, float *out, int64_t N) {
    __m256 acc[QROWS];
    float zacc[QROWS];
    for (int64_t m = 0; m < mc; m++) acc[m] = _mm256_setzero_ps(), zacc[m] = 0;
    const int64_t bytes = block_bytes(type);
    switch (type) {
    case T_Q8_0:
        for (int64_t b = 0; b < a->nb; b++) {
            const uint8_t *blk = row + bytes * b;
            const __m256i s = _mm256_loadu_si256((const __m256i *)(blk + 2));
            FN(g_acc_s)(a, mc, b, s, _mm256_set1_ps(FN(g_half)(blk)), acc);
        }
        break;
    case T_Q4_0: case T_Q5_0: case T_IQ4_NL:
        for (int64_t b = 0; b < a->nb; b++) {
            const uint8_t *blk = row + bytes * b;
            __m256i s;
            if (type == T_IQ4_NL)
                s = FN(g_iq4)(blk + 2);
            else if (type == T_Q4_0)
                s = _mm256_sub_epi8(FN(g_nib16)(blk + 2), _mm256_set1_epi8(8));
            else
                s = _mm256_sub_epi8(_mm256_or_si256(FN(g_nib16)(blk + 6), FN(g_bits16)(blk + 2)), _mm256_set1_epi8(16));
            FN(g_acc_s)(a, mc, b, s, _mm256_set1_ps(FN(g_half)(blk)), acc);
        }
        break;
    case T_Q4_1: case T_Q5_1:
        for (int64_t b = 0; b < a->nb; b++) {
            const uint8_t *blk = row + bytes * b;
            __m256i u;
            if (type == T_Q4_1)
                u = FN(g_nib16)(blk + 4);
            else
                u = _mm256_or_si256(FN(g_nib16)(blk + 8), FN(g_bits16)(blk + 4));
            FN(g_acc_u)(a, mc, b, u, _mm256_set1_ps(FN(g_half)(blk)), FN(g_half)(blk + 2), acc, zacc);
        }
        break;
    default:
        if (iq_type(type))
            FN(g_row_iq)(a, mc, type, row, acc);
        else
            FN(g_row_k)(a, mc, type, row, acc, zacc);
        break;
    }
    for (int64_t m = 0; m < mc; m++) out[m * N] = FN(hsum)(acc[m]) + zacc[m];
}

__attribute__((target(TARGET))) static void FN(ggml_matmul)(const ws_qact *a, int64_t N, int64_t type,
                                                            const uint8_t *q, int64_t row_bytes, const float *bias,
                                                            float *y) {
    const int64_t M = a->m;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            ws_qact rows = *a; /* rows m0.. of the input */
            rows.m = M - m0, rows.q = a->q + m0 * a->kp, rows.d = a->d + m0 * a->nb, rows.xs = a->xs + m0 * a->nb;
            const uint8_t *qrow = q + n * row_bytes;
            float *out = y + m0 * N + n;
            switch (mc) { /* a constant row count per case: accumulators stay in registers */
            case 1: FN(g_row)(&rows, 1, type, qrow, out, N); break;
            case 2: FN(g_row)(&rows, 2, type, qrow, out, N); break;
            case 3: FN(g_row)(&rows, 3, type, qrow, out, N); break;
            default: FN(g_row)(&rows, 4, type, qrow, out, N); break;
            }
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
}

