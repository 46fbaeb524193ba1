/* The int4 / int8 integer dot-product kernels for one x86 instruction set.
 *
 * Included by cpu_qdot.c once per instruction set, with these defined:
 *   SUFFIX    the function-name suffix (avx2, avxvnni, avx512vnni)
 *   TARGET    the gcc/clang target string the functions are compiled for
 *   DOTU8S8   (acc, u, s): acc (8 x int32) + the sums of 4 adjacent u8 x s8 products
 * cpu_qdot.c is compiled without -march=native, so each copy uses exactly its TARGET's
 * instructions and the dispatcher there chooses one at run time from CPUID.
 *
 * 256-bit vectors, one 32-value block per vector:
 *   int4: 16 bytes of a row (portable layout: byte j holds codes 2j and 2j+1) are loaded
 *   into both halves of a vector, the upper half shifted by 4 bits, and masked: the lower
 *   16 bytes are the even codes, the upper 16 the odd ones, which is the order the
 *   activations were quantized in (WS_QACT_INT4). Codes 0..15 are the unsigned operand.
 *   int8: signed x signed via |w| (unsigned) times x with w's sign.
 * Rows of x are taken QROWS at a time, each weight block being expanded once for all.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUFFIX)
#define KERNEL static inline __attribute__((always_inline, target(TARGET)))

KERNEL float FN(hsum)(__m256 a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

/* Block b of an int4 row (weight scale `scale`) against mc input rows, summed into acc. */
KERNEL void FN(q4_block)(const ws_qact *a, const int64_t mc, const uint8_t *qrow, int64_t b, const float *scale,
                         __m256 *acc) {
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4), low4 = _mm256_set1_epi8(15);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)(qrow + 16 * b));
    const __m256i w = _mm256_and_si256(_mm256_srlv_epi64(_mm256_broadcastsi128_si256(bytes), shift), low4);
    const __m256 s = _mm256_broadcast_ss(scale);
    for (int64_t m = 0; m < mc; m++) {
        const __m256i xq = _mm256_loadu_si256((const __m256i *)(a->q + m * a->kp + QB * b));
        const __m256i p = DOTU8S8(_mm256_setzero_si256(), w, xq);
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(a->d + m * a->nb + b));
        acc[m] = _mm256_fmadd_ps(f, s, acc[m]);
    }
}

/* sum_g z[g] * gsum[g] over n values. */
KERNEL float FN(dot)(const float *z, const float *gsum, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= n; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(z + g), _mm256_loadu_ps(gsum + g), acc);
    float total = FN(hsum)(acc);
    for (; g < n; g++) total += z[g] * gsum[g];
    return total;
}

KERNEL void FN(q4_rows_n)(const ws_qact *a, const int64_t mc, const uint8_t *qrow, const float *srow,
                          const float *zrow, int64_t G, const float *gsum, float *out, int64_t N) {
    const int64_t groups = a->k / G, nb = a->nb;
    const int sh = G == 32 ? 0 : (G == 64 ? 1 : 2); /* block b is in group b >> sh (G is 32, 64 or 128) */
    __m256 acc0[QROWS], acc1[QROWS]; /* alternate blocks: two FMA chains */
    for (int64_t m = 0; m < mc; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        FN(q4_block)(a, mc, qrow, b, srow + (b >> sh), acc0);
        FN(q4_block)(a, mc, qrow, b + 1, srow + ((b + 1) >> sh), acc1);
    }
    if (b < nb) FN(q4_block)(a, mc, qrow, b, srow + (b >> sh), acc0);
    for (int64_t m = 0; m < mc; m++)
        out[m * N] = FN(hsum)(_mm256_add_ps(acc0[m], acc1[m])) + FN(dot)(zrow, gsum + m * groups, groups);
}

__attribute__((target(TARGET))) static void FN(q4_matmul)(const ws_qact *a, int64_t N, const uint8_t *q,
                                                          const float *scales, const float *zeros,
                                                          int64_t G, const float *gsum, const float *bias,
                                                          float *y) {
    const int64_t K = a->k, M = a->m, groups = K / G;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            const ws_qact rows = ws_qact_rows(a, m0);
            const uint8_t *qrow = q + n * (K / 2);
            const float *s = scales + n * groups, *z = zeros + n * groups, *gs = gsum + m0 * groups;
            float *out = y + m0 * N + n;
            switch (mc) { /* a constant row count per case: accumulators stay in registers */
            case 1: FN(q4_rows_n)(&rows, 1, qrow, s, z, G, gs, out, N); break;
            case 2: FN(q4_rows_n)(&rows, 2, qrow, s, z, G, gs, out, N); break;
            case 3: FN(q4_rows_n)(&rows, 3, qrow, s, z, G, gs, out, N); break;
            default: FN(q4_rows_n)(&rows, 4, qrow, s, z, G, gs, out, N); break;
            }
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
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
        if (full < a->nb) { /* the last, partial block: past the row's end there is no weight to load */
            int32_t isum = 0;
            for (int64_t k = QB * full; k < a->k; k++) isum += (int32_t)qrow[k] * a->q[m * a->kp + k];
            total += (float)isum * a->d[m * a->nb + full];
        }
        out[m * N] = total * scale;
    }
}

__attribute__((target(TARGET))) static void FN(q8_matmul)(const ws_qact *a, int64_t N, const int8_t *q,
                                                          const float *scales, const float *bias, float *y) {
    const int64_t K = a->k, M = a->m;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += QROWS) {
            const int64_t mc = M - m0 < QROWS ? M - m0 : QROWS;
            const ws_qact rows = ws_qact_rows(a, m0);
            const int8_t *qrow = q + n * K;
            float *out = y + m0 * N + n;
            switch (mc) {
            case 1: FN(q8_rows_n)(&rows, 1, qrow, scales[n], out, N); break;
            case 2: FN(q8_rows_n)(&rows, 2, qrow, scales[n], out, N); break;
            case 3: FN(q8_rows_n)(&rows, 3, qrow, scales[n], out, N); break;
            default: FN(q8_rows_n)(&rows, 4, qrow, scales[n], out, N); break;
            }
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
}

#undef KERNEL
#undef FN
#undef CAT
#undef CAT_
