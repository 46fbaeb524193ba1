/* The fp32 matmuls of the fused decode step, and the projection dispatch it calls.
 *
 * Built on first use by weightsmith/quant/cpu_kernels.py with the system C compiler
 * (-O3 -march=native, OpenMP when available) and called through ctypes, with cpu_decode.c
 * and cpu_qdot.c (the int4 / int8 weight matmuls, which choose their instruction set at
 * run time and quantize the input to int8 per block: see there) and cpu_bf16.c (the bf16
 * weight matmuls, chosen the same way).
 *
 * fp32 weights are here, in either layout a model holds them in: rows (W (N, K), the
 * checkpoint's) or columns (W.T (K, N), the decode layout of weightsmith.models.linear,
 * where q/k/v or gate/up share one buffer), for the fused decode step (cpu_decode.c).
 * Output rows n (rows layout) or input ranges k (columns layout) are split between threads.
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

int ws_proj_matmul(const ws_proj *p, const float *x, int64_t M, float *y, ws_qact *act) {
    ws_qact own = {0};
    ws_qact *a = act ? act : &own;
    int status = 0;
    switch (p->kind) {
    case WS_INT4:
        status = ws_qact_quantize(a, x, M, p->k, WS_QACT_INT4);
        if (status == 0) status = ws_q4_proj(a, p->n, p->q, p->scales, p->zeros, p->group, p->bias, y);
        break;
    case WS_INT8:
        status = ws_qact_quantize(a, x, M, p->k, WS_QACT_INT8);
        if (status == 0) ws_q8_proj(a, p->n, p->q, p->scales, p->bias, y);
        break;
    case WS_GGML:
        status = ws_qact_quantize(a, x, M, p->k, WS_QACT_INT8);
        if (status == 0) status = ws_ggml_proj(a, p->n, p->group, p->q, p->bias, y);
        break;
    case WS_F32_ROWS:
        f32_rows_matmul(x, M, p->k, p->n, p->q, p->ld, p->bias, y);
        break;
    case WS_F32_COLS:
        f32_cols_matmul(x, M, p->k, p->n, p->q, p->ld, p->bias, y);
        break;
    case WS_BF16_ROWS:
    case WS_BF16_COLS:
        status = ws_bf16_proj(p, x, M, y, a);
        break;
    }
    if (!act) ws_qact_free(&own);
    return status;
}
