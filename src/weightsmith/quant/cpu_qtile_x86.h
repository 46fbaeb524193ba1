/* The int4 kernels for 16-row tiles (Int4Linear's decode layout, see cpu_qdot.c) for one x86
 * instruction set: included at the end of cpu_qdot_x86.h, so once per set (cpu_x86_isas.h).
 *
 * A tile holds 16 rows. For each of its groups, each block of 32 codes is four 64-byte chunks:
 * chunk c holds, for row r, the row's portable bytes 4c..4c+3 of the block at bytes 4r..4r+3
 * (low nibbles: the block's even elements 4c..4c+3 in the WS_QACT_INT4 order, high nibbles
 * its odd ones, at 16 + 4c). The group's 16 fp16 scales, then its 16 fp16 zeros, follow its
 * blocks. So one integer dot product instruction multiplies 4 codes of 16 rows by the same
 * 4 broadcast input bytes, and a tile's 16 sums leave in one vector: no horizontal sums, and
 * the weights are read as one stream. Q4_0 tiles (sym set: a GGUF Q4_0 matrix, groups of 32)
 * hold no zeros: each row's zero is -8 times its scale (exact in fp32), as Q4_0 reads d (q - 8).
 */

/* The `bytes` of a tile about to be read, asked for PF_AHEAD bytes ahead, by the 256-bit kernels:
 * they read each block's both halves (rows 0-7, 8-15) before the next block, so the weights
 * stream at one pace. Without this, an AMD EPYC (AVX2) read a Q4_K matrix from memory at half
 * the speed it reads one from its cache (README, benchmarks: gguf_types.py). Past the weights'
 * end it asks for nothing useful; a prefetch does not fault. The 512-bit kernels ask for
 * nothing: not measured there. */
#define PF_AHEAD 16384
KERNEL void FN(prefetch_ahead)(const uint8_t *p, int64_t bytes) {
#ifdef WS_WIDE512
    (void)p, (void)bytes;
#else
    FN(prefetch)(p + PF_AHEAD, bytes);
#endif
}

/* The 16 rows of tile `tile` against mc (<= QROWS) input rows; out[m * N + r] = row r of input m. */
KERNEL void FN(q4t_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, int64_t G, const float *gsum,
                         float *out, int64_t N, const int sym) {
    const int64_t groups = a->k / G, per_group = G / QB, gbytes = per_group * 256 + (sym ? 32 : 64);
#ifdef WS_WIDE512
    __m512 acc[QROWS];
    for (int64_t m = 0; m < mc; m++) acc[m] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(15), high4 = _mm512_set1_epi8((char)0xf0);
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *gp = tile + g * gbytes;
        __m512 gacc[QROWS];
        for (int64_t m = 0; m < mc; m++) gacc[m] = _mm512_setzero_ps();
        for (int64_t i = 0; i < per_group; i++) {
            const int64_t b = g * per_group + i;
            __m512i lo[4], hi[4]; /* hi: the high nibbles in place, 16 times the code */
            for (int c = 0; c < 4; c++) {
                const __m512i w = _mm512_loadu_si512((const void *)(gp + i * 256 + 64 * c));
                lo[c] = _mm512_and_si512(w, low4), hi[c] = _mm512_and_si512(w, high4);
            }
            for (int64_t m = 0; m < mc; m++) {
                const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b); /* 8 dwords */
                __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_set1_epi32(xd[0]));
                __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], _mm512_set1_epi32(xd[4]));
                for (int c = 1; c < 4; c++) {
                    s = _mm512_dpbusd_epi32(s, lo[c], _mm512_set1_epi32(xd[c]));
                    h = _mm512_dpbusd_epi32(h, hi[c], _mm512_set1_epi32(xd[4 + c]));
                }
                /* the high nibbles' sums are multiples of 16: the shift is exact */
                const __m512i isum = _mm512_add_epi32(s, _mm512_srai_epi32(h, 4));
                gacc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(a->d[m * a->nb + b]), gacc[m]);
            }
        }
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gp + per_group * 256)));
        const __m512 z = sym ? _mm512_mul_ps(s, _mm512_set1_ps(-8.0f))
                             : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(gp + per_group * 256 + 32)));
        for (int64_t m = 0; m < mc; m++)
            acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(gsum[m * groups + g]), _mm512_fmadd_ps(gacc[m], s, acc[m]));
    }
    for (int64_t m = 0; m < mc; m++) _mm512_storeu_ps(out + m * N, acc[m]);
#else
    /* 256-bit vectors: rows 0-7 (half 0) and 8-15 (half 1) of each chunk in turn */
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256 acc[2][QROWS];
    for (int h = 0; h < 2; h++)
        for (int64_t m = 0; m < mc; m++) acc[h][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *gp = tile + g * gbytes;
        FN(prefetch_ahead)(gp, gbytes);
        for (int h = 0; h < 2; h++) {
            __m256 gacc[QROWS];
            for (int64_t m = 0; m < mc; m++) gacc[m] = _mm256_setzero_ps();
            for (int64_t i = 0; i < per_group; i++) {
                const int64_t b = g * per_group + i;
                __m256i lo[4], hi[4];
                for (int c = 0; c < 4; c++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(gp + i * 256 + 64 * c + 32 * h));
                    lo[c] = _mm256_and_si256(w, low4), hi[c] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
                }
                for (int64_t m = 0; m < mc; m++) {
                    const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                    __m256i s0 = DOTU8S8(_mm256_setzero_si256(), lo[0], _mm256_set1_epi32(xd[0]));
                    __m256i s1 = DOTU8S8(_mm256_setzero_si256(), lo[1], _mm256_set1_epi32(xd[1]));
                    s0 = DOTU8S8(s0, lo[2], _mm256_set1_epi32(xd[2]));
                    s1 = DOTU8S8(s1, lo[3], _mm256_set1_epi32(xd[3]));
                    s0 = DOTU8S8(s0, hi[0], _mm256_set1_epi32(xd[4]));
                    s1 = DOTU8S8(s1, hi[1], _mm256_set1_epi32(xd[5]));
                    s0 = DOTU8S8(s0, hi[2], _mm256_set1_epi32(xd[6]));
                    s1 = DOTU8S8(s1, hi[3], _mm256_set1_epi32(xd[7]));
                    const __m256i isum = _mm256_add_epi32(s0, s1);
                    gacc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(a->d[m * a->nb + b]), gacc[m]);
                }
            }
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gp + per_group * 256 + 16 * h)));
            const __m256 z = sym ? _mm256_mul_ps(s, _mm256_set1_ps(-8.0f))
                                 : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(gp + per_group * 256 + 32 + 16 * h)));
            for (int64_t m = 0; m < mc; m++)
                acc[h][m] = _mm256_fmadd_ps(z, _mm256_set1_ps(gsum[m * groups + g]), _mm256_fmadd_ps(gacc[m], s, acc[h][m]));
        }
    }
    for (int h = 0; h < 2; h++)
        for (int64_t m = 0; m < mc; m++) _mm256_storeu_ps(out + m * N + 8 * h, acc[h][m]);
#endif
}

/* The GGUF tiles' kernels below are written once for both widths: a vector holds 16 rows
 * (WS_WIDE512) or 8, each block's two halves h then taken in turn; half h of a chunk starts at byte
 * 32 h, of a row of fp16 at 16 h, of a row of bytes at 8 h. */
#ifdef WS_WIDE512
#define vr_i __m512i
#define vr_f __m512
#define VR_HALVES 1
#define VR_ODD16 1 /* 16 times a 4-bit code fits vpdpbusd's 32-bit sums */
#define VR_SRA32 _mm512_srai_epi32
#define VR_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define VR_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VR_U8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VR_U16(p) _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define VR_BCAST16(p) _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p)))
#define VR_SHUF _mm512_shuffle_epi8
#define VR_XOR _mm512_xor_si512
#define VR_SUB32 _mm512_sub_epi32
#define VR_SRLC32(v, n) _mm512_srl_epi32(v, _mm_cvtsi32_si128(n))
#define VR_SRLC16(v, n) _mm512_srl_epi16(v, _mm_cvtsi32_si128(n))
#define VR_SLLC16(v, n) _mm512_sll_epi16(v, _mm_cvtsi32_si128(n))
#define VR_I8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VR_SET8(v) _mm512_set1_epi8((char)(v))
#define VR_SET32 _mm512_set1_epi32
#define VR_SETF _mm512_set1_ps
#define VR_ZERO_I _mm512_setzero_si512
#define VR_ZERO_F _mm512_setzero_ps
#define VR_AND _mm512_and_si512
#define VR_OR _mm512_or_si512
#define VR_SLL16 _mm512_slli_epi16
#define VR_SRL16 _mm512_srli_epi16
#define VR_SLL32 _mm512_slli_epi32
#define VR_SRL32 _mm512_srli_epi32
#define VR_ADD32 _mm512_add_epi32
#define VR_DOT _mm512_dpbusd_epi32
#define VR_CVT _mm512_cvtepi32_ps
#define VR_MUL _mm512_mul_ps
#define VR_SUB _mm512_sub_ps
#define VR_ADD _mm512_add_ps
#define VR_FMA _mm512_fmadd_ps
#define VR_FNMA _mm512_fnmadd_ps
#define VR_STORE _mm512_storeu_ps
#else
#define vr_i __m256i
#define vr_f __m256
#define VR_HALVES 2
#define VR_ODD16 0 /* vpmaddubsw's 16-bit pair sums would saturate */
#define VR_SRA32 _mm256_srai_epi32
#define VR_LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define VR_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VR_U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VR_U16(p) _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VR_BCAST16(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p)))
#define VR_SHUF _mm256_shuffle_epi8
#define VR_XOR _mm256_xor_si256
#define VR_SUB32 _mm256_sub_epi32
#define VR_SRLC32(v, n) _mm256_srl_epi32(v, _mm_cvtsi32_si128(n))
#define VR_SRLC16(v, n) _mm256_srl_epi16(v, _mm_cvtsi32_si128(n))
#define VR_SLLC16(v, n) _mm256_sll_epi16(v, _mm_cvtsi32_si128(n))
#define VR_I8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VR_SET8(v) _mm256_set1_epi8((char)(v))
#define VR_SET32 _mm256_set1_epi32
#define VR_SETF _mm256_set1_ps
#define VR_ZERO_I _mm256_setzero_si256
#define VR_ZERO_F _mm256_setzero_ps
#define VR_AND _mm256_and_si256
#define VR_OR _mm256_or_si256
#define VR_SLL16 _mm256_slli_epi16
#define VR_SRL16 _mm256_srli_epi16
#define VR_SLL32 _mm256_slli_epi32
#define VR_SRL32 _mm256_srli_epi32
#define VR_ADD32 _mm256_add_epi32
#define VR_DOT DOTU8S8
#define VR_CVT _mm256_cvtepi32_ps
#define VR_MUL _mm256_mul_ps
#define VR_SUB _mm256_sub_ps
#define VR_ADD _mm256_add_ps
#define VR_FMA _mm256_fmadd_ps
#define VR_FNMA _mm256_fnmadd_ps
#define VR_STORE _mm256_storeu_ps
#endif

/* Zero the accumulators acc[h][m] of mc input rows, and store them: a tile's 16 sums of input
 * row m, half h's acc[h][m] (8 rows each with 256 bits). */
#define VR_ZERO_ACC(acc, mc)                                                                           \
    for (int h_ = 0; h_ < VR_HALVES; h_++)                                                             \
        for (int64_t m_ = 0; m_ < (mc); m_++) (acc)[h_][m_] = VR_ZERO_F()
#define VR_STORE_ACC(acc, mc, out, N)                                                                  \
    for (int h_ = 0; h_ < VR_HALVES; h_++)                                                             \
        for (int64_t m_ = 0; m_ < (mc); m_++) VR_STORE((out) + m_ * (N) + 8 * h_, (acc)[h_][m_])


/* The even and odd codes of a block's 4 chunks at w (half h), whole: the low nibbles, with the
 * fifth bits from the 64 bytes at fifth (Q5_* tiles: byte 4r + b holds chunk c's at bits c and
 * 4 + c) moved to bit 4 where fifth is not NULL. odd16 (4-bit codes, 32-bit dot products only):
 * the odd codes left in the high nibble, 16 times the code (gguf_dot4 shifts their sum back). */
KERNEL void FN(gguf_codes)(const uint8_t *w, const uint8_t *fifth, int h, vr_i ev[4], vr_i od[4], const int odd16) {
    const vr_i low4 = VR_SET8(15), bit4 = VR_SET8(0x10);
    for (int c = 0; c < 4; c++) {
        const vr_i v = VR_LOAD(w + 64 * c + 32 * h);
        ev[c] = VR_AND(v, low4), od[c] = odd16 ? VR_AND(v, VR_SET8(0xf0)) : VR_AND(VR_SRL16(v, 4), low4);
    }
    if (fifth) {
        const vr_i hb = VR_LOAD(fifth + 32 * h);
        const vr_i he[4] = {VR_SLL16(hb, 4), VR_SLL16(hb, 3), VR_SLL16(hb, 2), VR_SLL16(hb, 1)};
        const vr_i ho[4] = {hb, VR_SRL16(hb, 1), VR_SRL16(hb, 2), VR_SRL16(hb, 3)};
        for (int c = 0; c < 4; c++)
            ev[c] = VR_OR(ev[c], VR_AND(he[c], bit4)), od[c] = VR_OR(od[c], VR_AND(ho[c], bit4));
    }
}

/* The sums of all 4 chunks' codes times the input's dwords (xd[c], odds xd[4 + c]), in two
 * chains; odd16: the odd codes are 16 times theirs (their sum's shift back is exact). */
KERNEL vr_i FN(gguf_dot4)(const vr_i ev[4], const vr_i od[4], const int32_t *xd, const int odd16) {
    vr_i s = VR_DOT(VR_ZERO_I(), ev[0], VR_SET32(xd[0])), o = VR_DOT(VR_ZERO_I(), od[0], VR_SET32(xd[4]));
    for (int c = 1; c < 4; c++) s = VR_DOT(s, ev[c], VR_SET32(xd[c])), o = VR_DOT(o, od[c], VR_SET32(xd[4 + c]));
    return VR_ADD32(s, odd16 ? VR_SRA32(o, 4) : o);
}

/* The sums of the codes ev/od of chunks c0, c0 + 1 times the input's dwords (xd[c], odds xd[4 + c]). */
KERNEL vr_i FN(gguf_dot2)(const vr_i ev[4], const vr_i od[4], const int32_t *xd, int c0) {
    vr_i s = VR_DOT(VR_ZERO_I(), ev[c0], VR_SET32(xd[c0]));
    s = VR_DOT(s, od[c0], VR_SET32(xd[4 + c0]));
    s = VR_DOT(s, ev[c0 + 1], VR_SET32(xd[c0 + 1]));
    return VR_DOT(s, od[c0 + 1], VR_SET32(xd[5 + c0]));
}

/* Q4_K tiles (a GGUF Q4_K matrix): for each super-block of 256 inputs, its 8 sub-blocks' codes as
 * the int4 tiles' blocks (4 chunks of 64 bytes each), then the 16 rows' headers in 256 bytes:
 * their fp16 d, their fp16 dmin, then the 12 packed scale bytes with byte i of row r at
 * 64 + 16 i + r, so that one vector load holds a byte of 16 (or 8) rows. Sub-block j of a row
 * weighs d sc_j q - dmin m_j (6-bit sc_j, m_j as ws_k_scale_min unpacks them); bsum holds the
 * input's sums per block of 32 (the minima's term). Q5_K tiles (five) follow each sub-block's
 * 256 bytes with 64 bytes of its codes' fifth bits. */
KERNEL void FN(q4kt_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const float *bsum, float *out,
                          int64_t N, const int five) {
    const int64_t nsb = a->k / 256, sub = five ? 320 : 256;
    const vr_i six = VR_SET32(63), four = VR_SET32(15);
    vr_f acc[VR_HALVES][QROWS];
    VR_ZERO_ACC(acc, mc);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sp = tile + sb * 8 * (sub + 32), *hp = sp + 8 * sub;
        FN(prefetch_ahead)(sp, 8 * (sub + 32));
        for (int h = 0; h < VR_HALVES; h++) {
#define KSB(i) VR_U8(hp + 64 + 16 * (i) + 8 * h)
            const vr_f d = VR_F16(hp + 16 * h), dmin = VR_F16(hp + 32 + 16 * h);
            for (int j = 0; j < 8; j++) {
                vr_i sc, mn;
                if (j < 4) {
                    sc = VR_AND(KSB(j), six), mn = VR_AND(KSB(j + 4), six);
                } else {
                    const vr_i lo = KSB(j + 4);
                    sc = VR_OR(VR_AND(lo, four), VR_SLL32(VR_SRL32(KSB(j - 4), 6), 4));
                    mn = VR_OR(VR_SRL32(lo, 4), VR_SLL32(VR_SRL32(KSB(j), 6), 4));
                }
                const vr_f ds = VR_MUL(d, VR_CVT(sc)), dm = VR_MUL(dmin, VR_CVT(mn));
                vr_i ev[4], od[4];
                const int odd16 = VR_ODD16 && !five;
                FN(gguf_codes)(sp + j * sub, five ? sp + j * sub + 256 : NULL, h, ev, od, odd16);
                const int64_t b = sb * 8 + j;
                for (int64_t m = 0; m < mc; m++) {
                    const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                    const vr_i isum = FN(gguf_dot4)(ev, od, xd, odd16);
                    const vr_f sum = VR_MUL(VR_CVT(isum), VR_SETF(a->d[m * a->nb + b]));
                    acc[h][m] = VR_FNMA(dm, VR_SETF(bsum[m * a->nb + b]), VR_FMA(sum, ds, acc[h][m]));
                }
            }
#undef KSB
        }
    }
    VR_STORE_ACC(acc, mc, out, N);
}

/* Q6_K tiles (a GGUF Q6_K matrix; the layout: cpu_qdot.c's q6kt_dot): each chunk's codes are
 * rebuilt whole (0..63: low nibble, then the top 2 bits moved to bits 4-5) for its even and its
 * odd codes, multiplied unsigned, and 32 times the input's sum over each half of the block
 * (hs32) comes off each half's sum before its scale. */
KERNEL void FN(q6kt_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const float *hs32, float *out,
                          int64_t N) {
    const int64_t nsb = a->k / 256;
    const vr_i low4 = VR_SET8(15), top2 = VR_SET8(0x30);
    vr_f acc[VR_HALVES][QROWS];
    VR_ZERO_ACC(acc, mc);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sp = tile + sb * 3360, *hp = sp + 3072;
        FN(prefetch_ahead)(sp, 3360);
        for (int h = 0; h < VR_HALVES; h++) {
            const vr_f d = VR_F16(hp + 16 * h);
            for (int j = 0; j < 8; j++) {
                const vr_f ds0 = VR_MUL(d, VR_CVT(VR_I8(hp + 32 + 16 * (2 * j) + 8 * h)));
                const vr_f ds1 = VR_MUL(d, VR_CVT(VR_I8(hp + 32 + 16 * (2 * j + 1) + 8 * h)));
                const uint8_t *wp = sp + j * 384;
                vr_i ev[4], od[4];
                for (int c = 0; c < 4; c++) {
                    const vr_i w = VR_LOAD(wp + 64 * c + 32 * h), t = VR_LOAD(wp + 256 + 64 * (c / 2) + 32 * h);
                    const vr_i te = c % 2 ? VR_SLL16(t, 2) : VR_SLL16(t, 4), to = c % 2 ? VR_SRL16(t, 2) : t;
                    ev[c] = VR_OR(VR_AND(w, low4), VR_AND(te, top2));
                    od[c] = VR_OR(VR_AND(VR_SRL16(w, 4), low4), VR_AND(to, top2));
                }
                const int64_t b = sb * 8 + j;
                for (int64_t m = 0; m < mc; m++) {
                    const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                    const float *h32 = hs32 + (m * a->nb + b) * 2;
                    const vr_f xs = VR_SETF(a->d[m * a->nb + b]);
                    const vr_f f0 = VR_SUB(VR_CVT(FN(gguf_dot2)(ev, od, xd, 0)), VR_SETF(h32[0]));
                    const vr_f f1 = VR_SUB(VR_CVT(FN(gguf_dot2)(ev, od, xd, 2)), VR_SETF(h32[1]));
                    acc[h][m] = VR_FMA(f1, VR_MUL(ds1, xs), VR_FMA(f0, VR_MUL(ds0, xs), acc[h][m]));
                }
            }
        }
    }
    VR_STORE_ACC(acc, mc, out, N);
}

/* Q5_0 / Q5_1 tiles (one: Q5_1; the layout: cpu_qdot.c's q5t_dot): each chunk's even and odd
 * codes rebuilt whole (gguf_codes) and multiplied unsigned; Q5_0's zero is -16 times the
 * scale, as it reads d (q - 16). */
KERNEL void FN(q5t_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const float *gsum, float *out,
                         int64_t N, const int one) {
    const int64_t nb = a->k / QB, stride = one ? 384 : 352;
    vr_f acc[VR_HALVES][QROWS];
    VR_ZERO_ACC(acc, mc);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *bp = tile + b * stride;
        FN(prefetch_ahead)(bp, stride);
        for (int h = 0; h < VR_HALVES; h++) {
            vr_i ev[4], od[4];
            FN(gguf_codes)(bp, bp + 256, h, ev, od, 0);
            const vr_f s = VR_F16(bp + 320 + 16 * h);
            const vr_f z = one ? VR_F16(bp + 352 + 16 * h) : VR_MUL(s, VR_SETF(-16.0f));
            for (int64_t m = 0; m < mc; m++) {
                const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                const vr_f sum = VR_MUL(VR_CVT(FN(gguf_dot4)(ev, od, xd, 0)), VR_SETF(a->d[m * a->nb + b]));
                acc[h][m] = VR_FMA(z, VR_SETF(gsum[m * nb + b]), VR_FMA(sum, s, acc[h][m]));
            }
        }
    }
    VR_STORE_ACC(acc, mc, out, N);
}

/* IQ4_NL / IQ4_XS tiles (xs: IQ4_XS; the layouts: cpu_qdot.c's iq4t_dot): each chunk's codes
 * looked up in WS_IQ4_LEVELS with one byte shuffle. With 32-bit dot products (VNNI) the levels
 * are taken + 128, unsigned, and the block's input sum (bsum) times 128 comes off as a zero of
 * -128 times the scale; AVX2's 16-bit pair sums would saturate on that, so there |level| times
 * the input with the level's sign is summed instead. */
KERNEL void FN(iq4t_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const float *bsum, float *out,
                          int64_t N, const int xs) {
    const int64_t nb = a->k / QB;
#ifdef WS_DOT32
    const vr_i lut = VR_XOR(VR_BCAST16(WS_IQ4_LEVELS), VR_SET8(0x80)); /* level + 128 */
#else
    const vr_i lut = VR_BCAST16(WS_IQ4_LEVELS);
    (void)bsum;
#endif
    vr_f acc[VR_HALVES][QROWS], d[VR_HALVES];
    vr_i high[VR_HALVES];
    VR_ZERO_ACC(acc, mc);
    for (int64_t b = 0; b < nb; b++) {
        const int j = (int)(b % 8);
        const uint8_t *sp = tile + b / 8 * 2176, *hp = sp + 2048;
        if (!xs) FN(prefetch_ahead)(tile + b * 288, 288);
        else if (j == 0) FN(prefetch_ahead)(sp, 2176);
        for (int h = 0; h < VR_HALVES; h++) {
            const uint8_t *cp;
            vr_f s;
            if (xs) {
                if (j == 0) d[h] = VR_F16(hp + 16 * h), high[h] = VR_U16(hp + 32 + 16 * h);
                const vr_i lo = VR_AND(VR_SRLC32(VR_U8(hp + 64 + 16 * (j / 2) + 8 * h), 4 * (j % 2)), VR_SET32(15));
                const vr_i ls = VR_OR(lo, VR_SLL32(VR_AND(VR_SRLC32(high[h], 2 * j), VR_SET32(3)), 4));
                s = VR_MUL(d[h], VR_CVT(VR_SUB32(ls, VR_SET32(32)))), cp = sp + 256 * j;
            } else {
                cp = tile + b * 288, s = VR_F16(cp + 256 + 16 * h);
            }
            vr_i ev[4], od[4];
            FN(gguf_codes)(cp, NULL, h, ev, od, 0);
            for (int c = 0; c < 4; c++) ev[c] = VR_SHUF(lut, ev[c]), od[c] = VR_SHUF(lut, od[c]);
#ifdef WS_DOT32
            const vr_f z = VR_MUL(s, VR_SETF(-128.0f));
            for (int64_t m = 0; m < mc; m++) {
                const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                const vr_f sum = VR_MUL(VR_CVT(FN(gguf_dot4)(ev, od, xd, 0)), VR_SETF(a->d[m * a->nb + b]));
                acc[h][m] = VR_FMA(z, VR_SETF(bsum[m * nb + b]), VR_FMA(sum, s, acc[h][m]));
            }
#else
            vr_i ea[4], oa[4];
            for (int c = 0; c < 4; c++) ea[c] = _mm256_abs_epi8(ev[c]), oa[c] = _mm256_abs_epi8(od[c]);
            for (int64_t m = 0; m < mc; m++) {
                const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                vr_i isum = VR_ZERO_I();
                for (int c = 0; c < 4; c++) {
                    isum = VR_DOT(isum, ea[c], _mm256_sign_epi8(VR_SET32(xd[c]), ev[c]));
                    isum = VR_DOT(isum, oa[c], _mm256_sign_epi8(VR_SET32(xd[4 + c]), od[c]));
                }
                acc[h][m] = VR_FMA(VR_MUL(VR_CVT(isum), VR_SETF(a->d[m * a->nb + b])), s, acc[h][m]);
            }
#endif
        }
    }
    VR_STORE_ACC(acc, mc, out, N);
}

/* Q3_K tiles (the layout: cpu_qdot.c's crumbt_dot): each operand's codes 0..7 rebuilt (the low 2
 * bits, then the third moved to bit 2), multiplied unsigned, and 4 times the input's sum over
 * each half of the block (an eighth of hs32) comes off each half's sum before its scale. */
KERNEL void FN(q3kt_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const float *hs32, float *out,
                          int64_t N) {
    const int64_t nsb = a->k / 256;
    const vr_i three = VR_SET8(3), four = VR_SET8(4), low4 = VR_SET32(15), low2 = VR_SET32(3);
    vr_f acc[VR_HALVES][QROWS];
    VR_ZERO_ACC(acc, mc);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sp = tile + sb * 1760, *hp = sp + 1536;
        FN(prefetch_ahead)(sp, 1760);
        for (int h = 0; h < VR_HALVES; h++) {
            const vr_f d = VR_F16(hp + 16 * h);
            for (int j = 0; j < 8; j++) {
                vr_f ds[2];
                for (int e = 0; e < 2; e++) { /* scale s: low bits in byte s % 8, high in byte 8 + s % 4 */
                    const int s = 2 * j + e;
                    const vr_i lo = VR_AND(VR_SRLC32(VR_U8(hp + 32 + 16 * (s % 8) + 8 * h), 4 * (s / 8)), low4);
                    const vr_i hi = VR_AND(VR_SRLC32(VR_U8(hp + 32 + 16 * (8 + s % 4) + 8 * h), 2 * (s / 4)), low2);
                    ds[e] = VR_MUL(d, VR_CVT(VR_SUB32(VR_OR(lo, VR_SLL32(hi, 4)), VR_SET32(32))));
                }
                const uint8_t *wp = sp + 192 * j;
                const vr_i v[2] = {VR_LOAD(wp + 32 * h), VR_LOAD(wp + 64 + 32 * h)}, hb = VR_LOAD(wp + 128 + 32 * h);
                vr_i op[8];
                for (int k = 0; k < 8; k++) {
                    const vr_i third = k < 2 ? VR_SLLC16(hb, 2 - k) : VR_SRLC16(hb, k - 2); /* bit k to bit 2 */
                    op[k] = VR_OR(VR_AND(VR_SRLC16(v[k / 4], 2 * (k % 4)), three), VR_AND(third, four));
                }
                const int64_t b = sb * 8 + j;
                for (int64_t m = 0; m < mc; m++) {
                    const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                    const float *h32 = hs32 + (m * a->nb + b) * 2;
                    const vr_f xs = VR_SETF(a->d[m * a->nb + b]);
                    const vr_f f0 = VR_SUB(VR_CVT(FN(gguf_dot2)(op, op + 4, xd, 0)), VR_SETF(0.125f * h32[0]));
                    const vr_f f1 = VR_SUB(VR_CVT(FN(gguf_dot2)(op, op + 4, xd, 2)), VR_SETF(0.125f * h32[1]));
                    acc[h][m] = VR_FMA(f1, VR_MUL(ds[1], xs), VR_FMA(f0, VR_MUL(ds[0], xs), acc[h][m]));
                }
            }
        }
    }
    VR_STORE_ACC(acc, mc, out, N);
}

/* Q2_K tiles (the layout: cpu_qdot.c's crumbt_dot): Q3_K's 2-bit planes, multiplied unsigned; each
 * half's minimum times the input's sum over the half (a 32nd of hs32) comes off its scaled sum. */
KERNEL void FN(q2kt_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const float *hs32, float *out,
                          int64_t N) {
    const int64_t nsb = a->k / 256;
    const vr_i three = VR_SET8(3), low4 = VR_SET32(15);
    vr_f acc[VR_HALVES][QROWS];
    VR_ZERO_ACC(acc, mc);
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *sp = tile + sb * 1344, *hp = sp + 1024;
        FN(prefetch_ahead)(sp, 1344);
        for (int h = 0; h < VR_HALVES; h++) {
            const vr_f d = VR_F16(hp + 16 * h), dmin = VR_F16(hp + 32 + 16 * h);
            for (int j = 0; j < 8; j++) {
                vr_f ds[2], dm[2];
                for (int e = 0; e < 2; e++) {
                    const vr_i s = VR_U8(hp + 64 + 16 * (2 * j + e) + 8 * h);
                    ds[e] = VR_MUL(d, VR_CVT(VR_AND(s, low4))), dm[e] = VR_MUL(dmin, VR_CVT(VR_SRL32(s, 4)));
                }
                const uint8_t *wp = sp + 128 * j;
                const vr_i v[2] = {VR_LOAD(wp + 32 * h), VR_LOAD(wp + 64 + 32 * h)};
                vr_i op[8];
                for (int k = 0; k < 8; k++) op[k] = VR_AND(VR_SRLC16(v[k / 4], 2 * (k % 4)), three);
                const int64_t b = sb * 8 + j;
                for (int64_t m = 0; m < mc; m++) {
                    const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
                    const float *h32 = hs32 + (m * a->nb + b) * 2;
                    const vr_f xs = VR_SETF(a->d[m * a->nb + b]);
                    const vr_f f0 = VR_FNMA(dm[0], VR_SETF(h32[0] / 32), VR_MUL(VR_CVT(FN(gguf_dot2)(op, op + 4, xd, 0)), ds[0]));
                    const vr_f f1 = VR_FNMA(dm[1], VR_SETF(h32[1] / 32), VR_MUL(VR_CVT(FN(gguf_dot2)(op, op + 4, xd, 2)), ds[1]));
                    acc[h][m] = VR_FMA(VR_ADD(f0, f1), xs, acc[h][m]);
                }
            }
        }
    }
    VR_STORE_ACC(acc, mc, out, N);
}

/* Every tile of the set (its projections' tiles one after another), split among the threads;
 * `layout` one of WS_Q4T_* (for WS_Q4T_Q6_K gsum holds the half sums). */
__attribute__((target(TARGET))) static void FN(q4t_matmul)(const ws_qact *a, const tile_set *set, int64_t G,
                                                           const float *gsum, int layout) {
    const int64_t M = a->m, groups = a->k / G, tile_bytes = q4t_tile_bytes(a->k, G, layout);
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t i = 0; i < set->first[set->np]; i++) {
        const int p = tile_owner(set, i);
        const int64_t N = set->N[p], t = i - set->first[p];
        float *y = set->y[p];
        const uint8_t *tile = set->tiles[p] + t * tile_bytes;
        if (t + 1 < N / 16) FN(prefetch)(tile + tile_bytes, tile_bytes < 1024 ? tile_bytes : 1024);
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            const ws_qact rows = ws_qact_rows(a, m0);
            const float *gs = gsum + m0 * groups, *hs = gsum + m0 * 2 * groups; /* Q6_K: 2 a block */
            float *out = y + m0 * N + 16 * t;
/* constant row counts and layout: accumulators in registers */
#define Q4T_ROWS(MC)                                                            \
    (layout == WS_Q4T_Q5_0   ? FN(q5t_rows)(&rows, MC, tile, gs, out, N, 0)    \
     : layout == WS_Q4T_Q5_1 ? FN(q5t_rows)(&rows, MC, tile, gs, out, N, 1)    \
     : layout == WS_Q4T_Q6_K ? FN(q6kt_rows)(&rows, MC, tile, hs, out, N)      \
     : layout == WS_Q4T_Q4_K ? FN(q4kt_rows)(&rows, MC, tile, gs, out, N, 0)   \
     : layout == WS_Q4T_Q5_K ? FN(q4kt_rows)(&rows, MC, tile, gs, out, N, 1)   \
     : layout == WS_Q4T_IQ4_NL ? FN(iq4t_rows)(&rows, MC, tile, gs, out, N, 0) \
     : layout == WS_Q4T_IQ4_XS ? FN(iq4t_rows)(&rows, MC, tile, gs, out, N, 1) \
     : layout == WS_Q4T_Q3_K ? FN(q3kt_rows)(&rows, MC, tile, hs, out, N)      \
     : layout == WS_Q4T_Q2_K ? FN(q2kt_rows)(&rows, MC, tile, hs, out, N)      \
     : layout == WS_Q4T_Q4_0 ? FN(q4t_rows)(&rows, MC, tile, G, gs, out, N, 1) \
                             : FN(q4t_rows)(&rows, MC, tile, G, gs, out, N, 0))
            switch (mc) {
            case 1: Q4T_ROWS(1); break;
            case 2: Q4T_ROWS(2); break;
            case 3: Q4T_ROWS(3); break;
            default: Q4T_ROWS(4); break;
            }
#undef Q4T_ROWS
        }
    }
}

/* int8 tiles: for each block of 32, chunk c (0..7) holds row r's bytes 4c..4c+3 at 4r..4r+3,
 * stored as w + 128; after all blocks, the tile's 16 fp32 row scales. With 32-bit dot products
 * (VNNI) the unsigned operand is w + 128 as stored, and 128 * sum(xq) of the block (qsum) comes
 * off each sum, in integers; AVX2's 16-bit pair sums would saturate on that, so there |w|
 * times x with w's sign is summed instead. Q8_0 tiles (bs set) hold the same chunks with each
 * block's 16 fp16 row scales after them (544 bytes a block) and no row scales at the end: each
 * block's sums are scaled by its row scales times the input's block scale, as ggml's Q8_0
 * kernels scale them. */
KERNEL void FN(q8t_rows)(const ws_qact *a, const int64_t mc, const uint8_t *tile, const int32_t *qsum,
                         float *out, int64_t N, const int bs) {
    const int64_t nb = a->k / QB, stride = bs ? 544 : 512;
#ifdef WS_WIDE512
    __m512 acc[QROWS];
    for (int64_t m = 0; m < mc; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i w[8];
        for (int c = 0; c < 8; c++) w[c] = _mm512_loadu_si512((const void *)(tile + b * stride + 64 * c));
        const __m512 rs = bs ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tile + b * stride + 512)))
                             : _mm512_setzero_ps();
        for (int64_t m = 0; m < mc; m++) {
            const int32_t *xd = (const int32_t *)(a->q + m * a->kp + QB * b);
            __m512i s[4];
            for (int j = 0; j < 4; j++) s[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[j], _mm512_set1_epi32(xd[j]));
            for (int j = 0; j < 4; j++) s[j] = _mm512_dpbusd_epi32(s[j], w[4 + j], _mm512_set1_epi32(xd[4 + j]));
            __m512i isum = _mm512_add_epi32(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(s[2], s[3]));
            isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * qsum[m * nb + b]));
            const __m512 d = _mm512_set1_ps(a->d[m * a->nb + b]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), bs ? _mm512_mul_ps(rs, d) : d, acc[m]);
        }
    }
    const __m512 scale = bs ? _mm512_set1_ps(1.0f) : _mm512_loadu_ps((const float *)(tile + nb * 512));
    for (int64_t m = 0; m < mc; m++) _mm512_storeu_ps(out + m * N, bs ? acc[m] : _mm512_mul_ps(acc[m], scale));
#else
#ifndef WS_DOT32
    (void)qsum; /* signed products: no correction */
#endif
    __m256 acc[2][QROWS];
    for (int h = 0; h < 2; h++)
        for (int64_t m = 0; m < mc; m++) acc[h][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        FN(prefetch_ahead)(tile + b * stride, stride);
        for (int h = 0; h < 2; h++) {
            __m256i isum[QROWS]; /* chunk by chunk (16 registers: no room to hold a block's 8) */
            for (int64_t m = 0; m < mc; m++) isum[m] = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(tile + b * stride + 64 * c + 32 * h));
#ifdef WS_DOT32
                for (int64_t m = 0; m < mc; m++)
                    isum[m] = DOTU8S8(isum[m], w, _mm256_set1_epi32(((const int32_t *)(a->q + m * a->kp + QB * b))[c]));
#else
                w = _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)); /* the signed weight back */
                const __m256i wabs = _mm256_abs_epi8(w);
                for (int64_t m = 0; m < mc; m++) {
                    const __m256i x = _mm256_set1_epi32(((const int32_t *)(a->q + m * a->kp + QB * b))[c]);
                    isum[m] = DOTU8S8(isum[m], wabs, _mm256_sign_epi8(x, w));
                }
#endif
            }
            const __m256 rs = bs ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tile + b * stride + 512 + 16 * h)))
                                 : _mm256_setzero_ps();
            for (int64_t m = 0; m < mc; m++) {
#ifdef WS_DOT32
                isum[m] = _mm256_sub_epi32(isum[m], _mm256_set1_epi32(128 * qsum[m * nb + b]));
#endif
                const __m256 d = _mm256_set1_ps(a->d[m * a->nb + b]);
                acc[h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), bs ? _mm256_mul_ps(rs, d) : d, acc[h][m]);
            }
        }
    }
    for (int h = 0; h < 2; h++) {
        const __m256 scale = bs ? _mm256_set1_ps(1.0f) : _mm256_loadu_ps((const float *)(tile + nb * 512 + 32 * h));
        for (int64_t m = 0; m < mc; m++) _mm256_storeu_ps(out + m * N + 8 * h, bs ? acc[h][m] : _mm256_mul_ps(acc[h][m], scale));
    }
#endif
}

/* Every tile of the set; bs: Q8_0 tiles (per-block fp16 scales), else int8 tiles. */
__attribute__((target(TARGET))) static void FN(q8t_matmul)(const ws_qact *a, const tile_set *set,
                                                           const int32_t *qsum, int bs) {
    const int64_t M = a->m, tile_bytes = bs ? a->k / QB * 544 : 16 * a->k + 64;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t i = 0; i < set->first[set->np]; i++) {
        const int p = tile_owner(set, i);
        const int64_t N = set->N[p], t = i - set->first[p];
        float *y = set->y[p];
        const uint8_t *tile = set->tiles[p] + t * tile_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            const ws_qact rows = ws_qact_rows(a, m0);
            const int32_t *qs = qsum + m0 * (a->k / QB);
            float *out = y + m0 * N + 16 * t;
            switch (mc * 2 + (bs != 0)) { /* constant row counts and layout: accumulators in registers */
            case 2: FN(q8t_rows)(&rows, 1, tile, qs, out, N, 0); break;
            case 3: FN(q8t_rows)(&rows, 1, tile, qs, out, N, 1); break;
            case 4: FN(q8t_rows)(&rows, 2, tile, qs, out, N, 0); break;
            case 5: FN(q8t_rows)(&rows, 2, tile, qs, out, N, 1); break;
            case 6: FN(q8t_rows)(&rows, 3, tile, qs, out, N, 0); break;
            case 7: FN(q8t_rows)(&rows, 3, tile, qs, out, N, 1); break;
            case 8: FN(q8t_rows)(&rows, 4, tile, qs, out, N, 0); break;
            default: FN(q8t_rows)(&rows, 4, tile, qs, out, N, 1); break;
            }
        }
    }
}

/* This file is included once per instruction set: its vector names go with it. */
#undef vr_i
#undef vr_f
#undef VR_HALVES
#undef VR_ODD16
#undef VR_SRA32
#undef VR_LOAD
#undef VR_F16
#undef VR_U8
#undef VR_U16
#undef VR_BCAST16
#undef VR_SHUF
#undef VR_XOR
#undef VR_SUB32
#undef VR_SRLC32
#undef VR_SRLC16
#undef VR_SLLC16
#undef VR_I8
#undef VR_SET8
#undef VR_SET32
#undef VR_SETF
#undef VR_ZERO_I
#undef VR_ZERO_F
#undef VR_AND
#undef VR_OR
#undef VR_SLL16
#undef VR_SRL16
#undef VR_SLL32
#undef VR_SRL32
#undef VR_ADD32
#undef VR_DOT
#undef VR_CVT
#undef VR_MUL
#undef VR_SUB
#undef VR_ADD
#undef VR_FMA
#undef VR_FNMA
#undef VR_STORE
#undef VR_STORE_ACC
#undef VR_ZERO_ACC
#undef PF_AHEAD
