/* Weight-only int4 / int8 matrix-vector products for decoding on the CPU.
 *
 * Built on first use by weightsmith/quant/cpu_kernels.py with the system C compiler
 * (-O3 -march=native, OpenMP when available) and called through ctypes. Decoding
 * multiplies a few activation rows by every weight matrix; PyTorch's packed int4/int8
 * kernels take bf16 activations only and are slow at one row, and the fp32 path has to
 * dequantize the whole matrix first. Here each weight row is dequantized in registers
 * and used at once, so a matrix is read from memory once, at 4 or 8 bits a weight.
 *
 * Arithmetic (the same values the Python reference computes, up to summation order):
 *   int4: w[n, k] = q[n, k] * scale[n, g] + zero[n, g], g = k / G; y[m, n] = sum_k x[m, k] w[n, k]
 *   int8: y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
 * then + bias[n] when a bias is given.
 *
 * int4 code layout ("chunk" layout, built once from the portable one): each row is K/32
 * chunks of 16 bytes; byte j of a chunk holds code j of the chunk in its low nibble and
 * code j + 16 in its high nibble (GGUF's Q4_0/Q4_1 block order), so the low nibbles of a
 * chunk line up with x[0:16] and the high nibbles with x[16:32].
 *
 * Rows of x are processed in blocks of up to ROWS, each weight chunk being dequantized
 * once per block. Output rows n are split between threads.
 *
 * fp32 weights are here too, in either layout a model holds them in: rows (W (N, K), the
 * checkpoint's) or columns (W.T (K, N), the decode layout of weightsmith.models.linear,
 * where q/k/v or gate/up share one buffer), for the fused decode step (cpu_decode.c).
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define WS_VEC "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WS_VEC "avx2"
#else
#define WS_VEC "scalar"
#endif

#define ROWS 8

const char *ws_kernels_isa(void) { return WS_VEC; }

/* Threads for every parallel loop here. Set by the caller (from torch.get_num_threads()):
 * OpenMP's own setting is per calling thread, and a server decodes on a worker thread. */
int ws_threads = 1;

void ws_set_threads(int n) { ws_threads = n > 0 ? n : 1; }

int ws_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---- int4 ---------------------------------------------------------------------------- */

#define INLINE static inline __attribute__((always_inline))

INLINE void int4_rows_n(const float *x, const int64_t m_count, int64_t K, const uint8_t *qrow,
                      const float *srow, const float *zrow, int64_t G, float *out, int64_t N) {
    /* out[m * N] = dot(x[m], dequantized row) for m < m_count <= ROWS */
    const int64_t groups = K / G, per_group = G / 32;
#if defined(__AVX512F__)
    /* Per group a 16-entry table of its dequantized values (code * scale + zero); vpermps
     * looks the codes up (it reads the low 4 bits of each index, so the low nibble needs no
     * mask). Two accumulators per row keep the FMA chains short. */
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc0[ROWS], acc1[ROWS];
    for (int64_t m = 0; m < m_count; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const __m512 lut = _mm512_fmadd_ps(iota, _mm512_set1_ps(srow[g]), _mm512_set1_ps(zrow[g]));
        for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qrow + 16 * c)));
            const __m512 w0 = _mm512_permutexvar_ps(b, lut);
            const __m512 w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
            const float *xc = x + 32 * c;
            for (int64_t m = 0; m < m_count; m++) {
                acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xc + m * K), acc0[m]);
                acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xc + m * K + 16), acc1[m]);
            }
        }
    }
    for (int64_t m = 0; m < m_count; m++) out[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc0[ROWS], acc1[ROWS];
    for (int64_t m = 0; m < m_count; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < groups; g++) {
        const __m256 s = _mm256_set1_ps(srow[g]), z = _mm256_set1_ps(zrow[g]);
        for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
            const float *xc = x + 32 * c;
            for (int half = 0; half < 2; half++) {
                const __m256i b =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + 16 * c + 8 * half)));
                const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, low4)), s, z);
                const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s, z);
                for (int64_t m = 0; m < m_count; m++) {
                    acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xc + m * K + 8 * half), acc0[m]);
                    acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xc + m * K + 16 + 8 * half), acc1[m]);
                }
            }
        }
    }
    for (int64_t m = 0; m < m_count; m++) {
        const __m256 a = _mm256_add_ps(acc0[m], acc1[m]);
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        out[m * N] = _mm_cvtss_f32(v);
    }
#else
    float acc[ROWS] = {0};
    for (int64_t g = 0; g < groups; g++) {
        const float s = srow[g], z = zrow[g];
        for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
            const float *xc = x + 32 * c;
            for (int j = 0; j < 16; j++) {
                const uint8_t b = qrow[16 * c + j];
                const float w0 = (float)(b & 15) * s + z, w1 = (float)(b >> 4) * s + z;
                for (int64_t m = 0; m < m_count; m++) acc[m] += w0 * xc[m * K + j] + w1 * xc[m * K + 16 + j];
            }
        }
    }
    for (int64_t m = 0; m < m_count; m++) out[m * N] = acc[m];
#endif
}

/* m_count as a constant, so each row count gets its own unrolled loop with its accumulators
 * in registers. */
static void int4_rows(const float *x, int64_t m_count, int64_t K, const uint8_t *qrow, const float *srow,
                      const float *zrow, int64_t G, float *out, int64_t N) {
    switch (m_count) {
#define CASE(R) \
    case R: int4_rows_n(x, R, K, qrow, srow, zrow, G, out, N); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

/* y (M, N) = x (M, K) @ W.T (+ bias); q (N, K/2) chunk layout; scales, zeros (N, K/G). */
void ws_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *q,
                    const float *scales, const float *zeros, int64_t G, const float *bias, float *y) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int64_t mc = M - m0 < ROWS ? M - m0 : ROWS;
            int4_rows(x + m0 * K, mc, K, q + n * (K / 2), scales + n * groups, zeros + n * groups, G,
                      y + m0 * N + n, N);
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
}

/* ---- int8 ---------------------------------------------------------------------------- */

INLINE void int8_rows_n(const float *x, const int64_t m_count, int64_t K, const int8_t *qrow, float scale,
                      float *out, int64_t N) {
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc0[ROWS], acc1[ROWS];
    for (int64_t m = 0; m < m_count; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        const __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qrow + k)));
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(b)));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(b, 1)));
        for (int64_t m = 0; m < m_count; m++) {
            acc0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), acc0[m]);
            acc1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), acc1[m]);
        }
    }
    float total[ROWS];
    for (int64_t m = 0; m < m_count; m++) total[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc0[ROWS], acc1[ROWS];
    for (int64_t m = 0; m < m_count; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + k))));
        const __m256 w1 =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + k + 8))));
        for (int64_t m = 0; m < m_count; m++) {
            acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc0[m]);
            acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc1[m]);
        }
    }
    float total[ROWS];
    for (int64_t m = 0; m < m_count; m++) {
        const __m256 a = _mm256_add_ps(acc0[m], acc1[m]);
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        total[m] = _mm_cvtss_f32(v);
    }
#else
    float total[ROWS] = {0};
#endif
    for (; k < K; k++)
        for (int64_t m = 0; m < m_count; m++) total[m] += (float)qrow[k] * x[m * K + k];
    for (int64_t m = 0; m < m_count; m++) out[m * N] = total[m] * scale;
}

static void int8_rows(const float *x, int64_t m_count, int64_t K, const int8_t *qrow, float scale,
                      float *out, int64_t N) {
    switch (m_count) {
#define CASE(R) \
    case R: int8_rows_n(x, R, K, qrow, scale, out, N); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

/* y (M, N) = x (M, K) @ (q * scale).T (+ bias); q int8 (N, K), scales (N,). */
void ws_int8_matmul(const float *x, int64_t M, int64_t K, int64_t N, const int8_t *q,
                    const float *scales, const float *bias, float *y) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int64_t mc = M - m0 < ROWS ? M - m0 : ROWS;
            int8_rows(x + m0 * K, mc, K, q + n * K, scales[n], y + m0 * N + n, N);
        }
        if (bias)
            for (int64_t m = 0; m < M; m++) y[m * N + n] += bias[n];
    }
}

/* ---- fp32 ---------------------------------------------------------------------------- */

/* Rows: W[n, k] = w[n * ld + k]. */
static void f32_rows_matmul(const float *x, int64_t M, int64_t K, int64_t N, const float *w, int64_t ld,
                            const float *bias, float *y) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
    for (int64_t n = 0; n < N; n++) {
        const float *wr = w + n * ld;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            int64_t k = 0;
            float total = 0;
#if defined(__AVX512F__)
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (; k + 32 <= K; k += 32) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(xm + k), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 16), _mm512_loadu_ps(xm + k + 16), a1);
            }
            total = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
            for (; k < K; k++) total += wr[k] * xm[k];
            y[m * N + n] = total + (bias ? bias[n] : 0.0f);
        }
    }
}

/* Columns: W[n, k] = w[k * ld + n], the rows of W.T contiguous. Each thread takes a
 * contiguous range of k (rows of W.T) and sums into its own partial outputs; the partials
 * are added at the end. Splitting the outputs between threads instead would make each
 * thread read short strided segments of every row, which streams at about half the
 * bandwidth. Within its range a thread goes KCHUNK rows at a time, across all outputs in
 * register tiles of 128 (8 vectors), so it reads KCHUNK nearby streams of memory and
 * stores its accumulators once per KCHUNK rows. */
#define KCHUNK 8
#define CTILE 128
static void cols_chunk(const float *x, int64_t M, int64_t K, int64_t N, const float *w, int64_t ld,
                       int64_t k0, int64_t k1, float *part) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *pm = part + m * N;
        int64_t n0 = 0;
#if defined(__AVX512F__)
        for (; n0 + CTILE <= N; n0 += CTILE) {
            __m512 a[8];
            for (int r = 0; r < 8; r++) a[r] = _mm512_loadu_ps(pm + n0 + 16 * r);
            for (int64_t k = k0; k < k1; k++) {
                const float *wk = w + k * ld + n0;
                const __m512 xv = _mm512_set1_ps(xm[k]);
                for (int r = 0; r < 8; r++) a[r] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wk + 16 * r), a[r]);
            }
            for (int r = 0; r < 8; r++) _mm512_storeu_ps(pm + n0 + 16 * r, a[r]);
        }
#endif
        for (int64_t k = k0; k < k1; k++) {
            const float xv = xm[k], *wk = w + k * ld;
#pragma omp simd
            for (int64_t n = n0; n < N; n++) pm[n] += xv * wk[n];
        }
    }
}

static void f32_cols_matmul(const float *x, int64_t M, int64_t K, int64_t N, const float *w, int64_t ld,
                            const float *bias, float *y) {
    int64_t threads = ws_threads;
    float *partial = calloc((size_t)(threads * M * N), sizeof(float));
    if (!partial) { /* no memory for the partials: one thread, straight into y */
        memset(y, 0, sizeof(float) * (size_t)(M * N));
        for (int64_t k0 = 0; k0 < K; k0 += KCHUNK)
            cols_chunk(x, M, K, N, w, ld, k0, k0 + KCHUNK < K ? k0 + KCHUNK : K, y);
        threads = 0;
    } else {
#pragma omp parallel for schedule(static, 1) num_threads(ws_threads)
        for (int64_t t = 0; t < threads; t++) {
            const int64_t first = K * t / threads, last = K * (t + 1) / threads;
            for (int64_t k0 = first; k0 < last; k0 += KCHUNK)
                cols_chunk(x, M, K, N, w, ld, k0, k0 + KCHUNK < last ? k0 + KCHUNK : last, partial + t * M * N);
        }
    }
    if (threads || bias) {
#pragma omp parallel for schedule(static) num_threads(ws_threads)
        for (int64_t i = 0; i < M * N; i++) {
            float total = bias ? bias[i % N] : 0.0f;
            if (threads == 0) total += y[i];
            for (int64_t t = 0; t < threads; t++) total += partial[t * M * N + i];
            y[i] = total;
        }
    }
    free(partial);
}

void ws_proj_matmul(const ws_proj *p, const float *x, int64_t M, float *y) {
    switch (p->kind) {
    case WS_INT4:
        ws_int4_matmul(x, M, p->k, p->n, p->q, p->scales, p->zeros, p->group, p->bias, y);
        break;
    case WS_INT8:
        ws_int8_matmul(x, M, p->k, p->n, p->q, p->scales, p->bias, y);
        break;
    case WS_F32_ROWS:
        f32_rows_matmul(x, M, p->k, p->n, p->q, p->ld, p->bias, y);
        break;
    case WS_F32_COLS:
        f32_cols_matmul(x, M, p->k, p->n, p->q, p->ld, p->bias, y);
        break;
    }
}
