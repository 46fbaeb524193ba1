/* bf16 weight matmuls of the fused decode step, chosen at run time from CPUID.
 *
 * Decoding reads every weight once per token: a bf16 model moves half the bytes of an fp32
 * one, so at batch 1 it should decode up to twice as fast. The weights are read where the
 * model holds them (no fp32 copy) and the products are summed in fp32:
 *   y[m, n] = sum_k bf16(x[m, k]) * W[n, k]  (+ bias[n])
 * The input is rounded to bf16 once per layer input (ws_qact with layout WS_QACT_BF16, shared
 * by q/k/v and by gate/up), in every instruction set, so that all of them compute the same
 * sums up to float summation order.
 *
 * Instruction sets (this file is built without -march=native; each function carries its own
 * target): AVX512-BF16 (vdpbf16ps: pairs of bf16 products summed into fp32 lanes), AVX-512
 * and AVX2 converted loads (bf16 -> fp32 by a 16-bit shift, then FMA), and portable C. The
 * rows layout (W (N, K), the checkpoint's) uses vdpbf16ps where the CPU has it; the columns
 * layout (W.T (K, N)) pairs nothing along k, and takes the AVX-512 converted loads there.
 * By default the choice follows the int4/int8 kernels' (cpu_kernels.select_isa: avx2 and
 * avxvnni give the AVX2 path, scalar the portable one, avx512vnni the best AVX-512 one);
 * `ws_bf16_select` forces one (tests).
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#define RB 4 /* input rows per weight row read (rows layout) */
#define KCHUNK 8 /* rows of W.T a thread reads at a time (columns layout) */
/* Weight rows read side by side (rows layout), each 64-byte line of the next NR prefetched while
 * these are read: without it one thread streamed a 265 MB model at 6-8 GB/s, with it at 11
 * (PyTorch's fp32 GEMV: 11-13 GB/s on the same machine). */
#define NR 4

enum { BF_SCALAR, BF_AVX2, BF_AVX512, BF_AVX512BF16, BF_COUNT };
static const char *const bf_names[BF_COUNT] = {"scalar", "avx2", "avx512", "avx512bf16"};

/* ---- the input, rounded to bf16 ------------------------------------------------------- */

static int grow(void **buf, int64_t *cap, int64_t need, size_t size) {
    if (*cap >= need) return 0;
    void *p = realloc(*buf, (size_t)need * size);
    if (!p) return -1;
    *buf = p, *cap = need;
    return 0;
}

static int round_input(ws_qact *a, const float *x, int64_t M, int64_t K) {
    if (a->src == x && a->m == M && a->k == K && a->layout == WS_QACT_BF16) return 0;
    const int64_t kp = (K + 31) / 32 * 32;
    if (grow((void **)&a->q, &a->cap_q, 2 * M * kp, 1) || grow((void **)&a->d, &a->cap_d, M * kp, 4)) return -1;
    uint16_t *h = (uint16_t *)a->q;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < kp; k++) {
            h[m * kp + k] = k < K ? ws_f32_to_bf16(x[m * K + k]) : 0;
            a->d[m * kp + k] = ws_bf16_to_f32(h[m * kp + k]);
        }
    a->m = M, a->k = K, a->kp = kp, a->nb = kp / 32, a->layout = WS_QACT_BF16, a->src = x;
    return 0;
}

/* ---- portable C ---------------------------------------------------------------------- */

static void rows_scalar(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, const float *bias, float *y) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < a->m; m++) {
            const float *x = a->d + m * a->kp;
            float total = 0;
            for (int64_t k = 0; k < a->k; k++) total += x[k] * ws_bf16_to_f32(w[n * ld + k]);
            y[m * N + n] = total + (bias ? bias[n] : 0.0f);
        }
}

/* W.T rows k0..k1 into part (M, N), across all outputs. */
static void cols_chunk_scalar(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, int64_t k0, int64_t k1,
                              float *part) {
    for (int64_t m = 0; m < a->m; m++)
        for (int64_t k = k0; k < k1; k++) {
            const float xv = a->d[m * a->kp + k];
            for (int64_t n = 0; n < N; n++) part[m * N + n] += xv * ws_bf16_to_f32(w[k * ld + n]);
        }
}

/* ---- x86 ------------------------------------------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define WS_BF16_X86 1
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#define AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
#define INLINE static inline __attribute__((always_inline))

AVX2 INLINE __m256 load8_avx2(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* nr weight rows (one stream each, read side by side) against mc input rows; both constant per
 * call site, so the nr x mc accumulators stay in registers. */
AVX2 INLINE void row_avx2(const ws_qact *a, int64_t m0, const int mc, const uint16_t *wr, int64_t ld, const int nr,
                          float *out, int64_t N) {
    const int64_t K = a->k, kp = a->kp;
    const float *xf = a->d + m0 * kp;
    __m256 acc[NR][RB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int r = 0; r < nr; r++) {
            if (!(k & 31)) _mm_prefetch((const char *)(wr + (r + NR) * ld + k), _MM_HINT_T0);
            const __m256 w = load8_avx2(wr + r * ld + k);
            for (int m = 0; m < mc; m++) acc[r][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xf + m * kp + k), acc[r][m]);
        }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) {
            float total = hsum_avx2(acc[r][m]);
            for (int64_t j = k; j < K; j++) total += xf[m * kp + j] * ws_bf16_to_f32(wr[r * ld + j]);
            out[m * N + r] = total;
        }
}

AVX512 INLINE __m512 load16_avx512(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

AVX512 INLINE void row_avx512(const ws_qact *a, int64_t m0, const int mc, const uint16_t *wr, int64_t ld,
                              const int nr, float *out, int64_t N) {
    const int64_t K = a->k, kp = a->kp;
    const float *xf = a->d + m0 * kp;
    __m512 acc[NR][RB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) { /* past the row's end: masked weight loads, zero-padded input */
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        for (int r = 0; r < nr; r++) {
            if (!(k & 31)) _mm_prefetch((const char *)(wr + (r + NR) * ld + k), _MM_HINT_T0);
            const __m256i raw = _mm256_maskz_loadu_epi16(mask, wr + r * ld + k);
            const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (int m = 0; m < mc; m++) acc[r][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + m * kp + k), acc[r][m]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) out[m * N + r] = _mm512_reduce_add_ps(acc[r][m]);
}

/* vdpbf16ps: lane i of acc += w[2i] * x[2i] + w[2i + 1] * x[2i + 1], 32 products a vector. nr
 * weight rows (constant per call site) at once: one stream each, read side by side. */
AVX512BF16 INLINE void row_avx512bf16(const ws_qact *a, int64_t m0, const int mc, const uint16_t *wr, int64_t ld,
                                      const int nr, float *out, int64_t N) {
    const int64_t K = a->k, kp = a->kp;
    const uint16_t *xh = (const uint16_t *)a->q + m0 * kp;
    __m512 acc[NR][RB];
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) { /* past the row's end: masked weight loads, zero-padded input */
        const __mmask32 mask = K - k >= 32 ? (__mmask32)~0u : (__mmask32)((1u << (K - k)) - 1);
        __m512bh x[RB];
        for (int m = 0; m < mc; m++) x[m] = (__m512bh)_mm512_loadu_si512(xh + m * kp + k);
        for (int r = 0; r < nr; r++) {
            _mm_prefetch((const char *)(wr + (r + NR) * ld + k), _MM_HINT_T0); /* the next block's */
            const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + r * ld + k);
            for (int m = 0; m < mc; m++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w, x[m]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int m = 0; m < mc; m++) out[m * N + r] = _mm512_reduce_add_ps(acc[r][m]);
}

#define ROW_CASES(ISA, NRC)                                                                                 \
    switch (a->m - m0) { /* constant counts per call: accumulators in registers */                          \
    case 1: row_##ISA(a, m0, 1, wr, ld, NRC, out, N); break;                                                \
    case 2: row_##ISA(a, m0, 2, wr, ld, NRC, out, N); break;                                                \
    case 3: row_##ISA(a, m0, 3, wr, ld, NRC, out, N); break;                                                \
    default: row_##ISA(a, m0, 4, wr, ld, NRC, out, N); break;                                               \
    }

/* The rows layout for one instruction set: output rows split between threads NR at a time, input
 * rows RB at a time for each weight block read. */
#define ROWS_MATMUL(ISA, ATTR)                                                                              \
    ATTR static void rows_##ISA(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, const float *bias, \
                                float *y) {                                                                 \
        _Pragma("omp parallel for schedule(static) num_threads(ws_threads)") for (int64_t nb = 0;          \
                                                                                  nb < (N + NR - 1) / NR; nb++) { \
            const int64_t n0 = nb * NR, n1 = n0 + NR < N ? n0 + NR : N;                                     \
            for (int64_t m0 = 0; m0 < a->m; m0 += RB) {                                                     \
                if (n1 - n0 == NR) {                                                                        \
                    const uint16_t *wr = w + n0 * ld;                                                       \
                    float *out = y + m0 * N + n0;                                                           \
                    ROW_CASES(ISA, NR)                                                                      \
                } else {                                                                                    \
                    for (int64_t n = n0; n < n1; n++) {                                                     \
                        const uint16_t *wr = w + n * ld;                                                    \
                        float *out = y + m0 * N + n;                                                        \
                        ROW_CASES(ISA, 1)                                                                   \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            if (bias)                                                                                       \
                for (int64_t n = n0; n < n1; n++)                                                           \
                    for (int64_t m = 0; m < a->m; m++) y[m * N + n] += bias[n];                             \
        }                                                                                                   \
    }
ROWS_MATMUL(avx2, AVX2)
ROWS_MATMUL(avx512, AVX512)
ROWS_MATMUL(avx512bf16, AVX512BF16)

/* W.T rows k0..k1 into part (M, N): outputs in register tiles of 8 vectors of L floats (64 for
 * AVX2, 128 for AVX-512); V the vector type, P the intrinsics' prefix, LOAD the bf16 loader. */
#define COLS_CHUNK(ISA, ATTR, V, L, P, LOAD)                                                                 \
    ATTR static void cols_chunk_##ISA(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, int64_t k0, \
                                      int64_t k1, float *part) {                                             \
        for (int64_t m = 0; m < a->m; m++) {                                                                 \
            const float *x = a->d + m * a->kp;                                                               \
            float *pm = part + m * N;                                                                        \
            int64_t n0 = 0;                                                                                  \
            for (; n0 + 8 * L <= N; n0 += 8 * L) {                                                           \
                V acc[8];                                                                                    \
                for (int r = 0; r < 8; r++) acc[r] = P##_loadu_ps(pm + n0 + L * r);                          \
                for (int64_t k = k0; k < k1; k++) {                                                          \
                    const V xv = P##_set1_ps(x[k]);                                                          \
                    for (int r = 0; r < 8; r++) acc[r] = P##_fmadd_ps(xv, LOAD(w + k * ld + n0 + L * r), acc[r]); \
                }                                                                                            \
                for (int r = 0; r < 8; r++) P##_storeu_ps(pm + n0 + L * r, acc[r]);                          \
            }                                                                                                \
            for (int64_t k = k0; k < k1; k++)                                                                \
                for (int64_t n = n0; n < N; n++) pm[n] += x[k] * ws_bf16_to_f32(w[k * ld + n]);              \
        }                                                                                                    \
    }
COLS_CHUNK(avx2, AVX2, __m256, 8, _mm256, load8_avx2)
COLS_CHUNK(avx512, AVX512, __m512, 16, _mm512, load16_avx512)
#endif

/* ---- dispatch ------------------------------------------------------------------------ */

static int bf_forced = -1, bf_mask = -1, bf_best = -1;

/* Bit i: bf_names[i] runs here. (CPUID is slow, and in a VM a trap: asked once.) */
int ws_bf16_supported(void) {
    if (bf_mask >= 0) return bf_mask;
    const int f = ws_x86_features();
    int mask = 1 << BF_SCALAR;
#ifdef WS_BF16_X86
    if (f & WS_CPU_AVX2) mask |= 1 << BF_AVX2;
    if (f & WS_CPU_AVX512) mask |= 1 << BF_AVX512;
    if (f & WS_CPU_BF16_512) mask |= 1 << BF_AVX512BF16;
#else
    (void)f;
#endif
    return bf_mask = mask;
}

static int bf_current(void) {
    if (bf_forced >= 0) return bf_forced;
    if (bf_best < 0) {
        const int mask = ws_bf16_supported();
        int best = BF_SCALAR;
        for (int i = BF_COUNT - 1; i > 0 && best == BF_SCALAR; i--)
            if (mask >> i & 1) best = i;
        bf_best = best;
    }
    return bf_best;
}

const char *ws_bf16_isa(void) { return bf_names[bf_current()]; }

/* Use instruction set `name` ("" or NULL: the best this CPU has). Returns 0, or -1 (nothing
 * changed) when it is unknown or this CPU lacks it. */
int ws_bf16_select(const char *name) {
    if (!name || !*name) {
        bf_forced = -1;
        return 0;
    }
    for (int i = 0; i < BF_COUNT; i++)
        if (!strcmp(name, bf_names[i])) {
            if (!(ws_bf16_supported() >> i & 1)) return -1;
            bf_forced = i;
            return 0;
        }
    return -1;
}

static void rows_matmul(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, const float *bias, float *y) {
    switch (bf_current()) {
#ifdef WS_BF16_X86
    case BF_AVX512BF16: rows_avx512bf16(a, N, w, ld, bias, y); break;
    case BF_AVX512: rows_avx512(a, N, w, ld, bias, y); break;
    case BF_AVX2: rows_avx2(a, N, w, ld, bias, y); break;
#endif
    default: rows_scalar(a, N, w, ld, bias, y); break;
    }
}

static void cols_chunk(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, int64_t k0, int64_t k1,
                       float *part) {
    switch (bf_current()) {
#ifdef WS_BF16_X86
    case BF_AVX512BF16: /* nothing to pair along k here: the converted loads */
    case BF_AVX512: cols_chunk_avx512(a, N, w, ld, k0, k1, part); break;
    case BF_AVX2: cols_chunk_avx2(a, N, w, ld, k0, k1, part); break;
#endif
    default: cols_chunk_scalar(a, N, w, ld, k0, k1, part); break;
    }
}

/* Columns: each thread sums a contiguous range of k into its own partial outputs (as the fp32
 * columns matmul in cpu_kernels.c does), then the partials are added. */
static int cols_matmul(const ws_qact *a, int64_t N, const uint16_t *w, int64_t ld, const float *bias, float *y) {
    const int64_t threads = ws_threads, M = a->m, K = a->k;
    float *partial = calloc((size_t)(threads * M * N), sizeof(float));
    if (!partial) return -1;
#pragma omp parallel for schedule(static, 1) num_threads(ws_threads)
    for (int64_t t = 0; t < threads; t++) {
        const int64_t first = K * t / threads, last = K * (t + 1) / threads;
        for (int64_t k0 = first; k0 < last; k0 += KCHUNK)
            cols_chunk(a, N, w, ld, k0, k0 + KCHUNK < last ? k0 + KCHUNK : last, partial + t * M * N);
    }
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t i = 0; i < M * N; i++) {
        float total = bias ? bias[i % N] : 0.0f;
        for (int64_t t = 0; t < threads; t++) total += partial[t * M * N + i];
        y[i] = total;
    }
    free(partial);
    return 0;
}

/* y (M, N) = bf16(x) @ W.T (+ bias) for a WS_BF16_ROWS / WS_BF16_COLS projection; `a` holds the
 * rounded input (reused while its src is x). Returns 0, or -1 when out of memory. */
int ws_bf16_proj(const ws_proj *p, const float *x, int64_t M, float *y, ws_qact *a) {
    if (round_input(a, x, M, p->k)) return -1;
    if (p->kind == WS_BF16_COLS) return cols_matmul(a, p->n, p->q, p->ld, p->bias, y);
    rows_matmul(a, p->n, p->q, p->ld, p->bias, y);
    return 0;
}

/* The same for one input (the kernel tests): W (N, K) rows ld apart, or W.T (K, N) when cols. */
int ws_bf16_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint16_t *w, int64_t ld, int64_t cols,
                   const float *bias, float *y) {
    const ws_proj p = {.kind = cols ? WS_BF16_COLS : WS_BF16_ROWS, .n = N, .k = K, .ld = ld, .q = w, .bias = bias};
    ws_qact a = {0};
    const int status = ws_bf16_proj(&p, x, M, y, &a);
    ws_qact_free(&a);
    return status;
}
