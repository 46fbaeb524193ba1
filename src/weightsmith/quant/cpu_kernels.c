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
 * bandwidth. Within its range a thread goes KCHUNK rows at a time, across its outputs in
 * register tiles, so it reads KCHUNK nearby streams of memory and stores its accumulators
 * once per KCHUNK rows.
 *
 * Several input rows (a server's decode batch) share each weight vector loaded: a tile holds
 * the sums of up to RB input rows over CV vectors of outputs, so one load of weights feeds RB
 * multiply-adds, and the next tile's weights are prefetched while it runs. One input row takes
 * tiles twice as wide instead (the single-stream case, bound by reading the weights). With many
 * rows the partial sums of a wide matrix (the LM head) would no longer stay in cache between
 * chunks: the outputs are then taken in blocks whose partials fit (about PART_BYTES per thread),
 * each over the thread's whole k range. Measured on the default model's matrices (one thread,
 * AVX-512): 16 rows 69 ms for all of them against 127 ms one row at a time, 1 row unchanged. */
#define KCHUNK 8
/* With several input rows the tiles are bound by multiply-adds, not by reading the weights:
 * longer chunks store the accumulators less often. Measured on the default model's matrices
 * (2 threads, AVX-512, interleaved with MKL's sgemm on the same weights): 32 rows, 16 at
 * 1.15 -> 1.28x MKL's speed, 32 at 0.61 -> 0.80x; 64 and 128 no better. Each output still sums
 * its k in order, so the chunk length changes no result. */
#define KCHUNK_ROWS 32
#define PART_BYTES (128 * 1024)
#if defined(__AVX512F__)
typedef __m512 ws_vf;
#define VL 16
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VFMA _mm512_fmadd_ps
#define VSET1 _mm512_set1_ps
#define RB 4 /* 16 accumulators, 4 weight vectors and a broadcast of 32 registers */
#define CV 4
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 ws_vf;
#define VL 8
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VFMA _mm256_fmadd_ps
#define VSET1 _mm256_set1_ps
/* 12 accumulators, 2 weight vectors and a broadcast of 16 registers. Measured on an AMD EPYC
 * (AVX2 only, 2 threads), the default model's batch of 16 in the decode step: 0.72x the time a
 * step of RB 4 (8 accumulators) took, medians of 6 alternating runs; 1 row unchanged. */
#define RB 6
#define CV 2
#endif

#ifdef VL
#define TILE (VL * CV)
/* part[r * N + n0 ..][C vectors] += sum over k0 <= k < k1 of x[r * K + k] * w[k * ld + n0 ..],
 * r < R. R and C are constants at every call, so the tile lives in registers. */
static inline __attribute__((always_inline)) void cols_tile(const float *x, int64_t K, const float *w, int64_t ld,
                                                            int64_t k0, int64_t k1, int64_t n0, float *part,
                                                            int64_t N, const int R, const int C) {
    ws_vf a[RB][2 * CV];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) a[r][c] = VLOAD(part + r * N + n0 + VL * c);
    for (int64_t k = k0; k < k1; k++) {
        const float *wk = w + k * ld + n0;
        ws_vf wv[2 * CV];
        for (int c = 0; c < C; c++) wv[c] = VLOAD(wk + VL * c);
        for (int r = 0; r < R; r++) {
            const ws_vf xv = VSET1(x[r * K + k]);
            for (int c = 0; c < C; c++) a[r][c] = VFMA(xv, wv[c], a[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) VSTORE(part + r * N + n0 + VL * c, a[r][c]);
}

/* Tiles over outputs n.. of rows k0..k1-1 for all M inputs; returns the first output not done. */
static int64_t cols_tiles(const float *x, int64_t M, int64_t K, int64_t N, const float *w, int64_t ld,
                          int64_t k0, int64_t k1, int64_t n, int64_t n1, float *part) {
    if (M == 1) { /* the same outputs in tiles as with more rows, so a row's sums never depend on M */
        for (; n + 2 * TILE <= n1; n += 2 * TILE) cols_tile(x, K, w, ld, k0, k1, n, part, N, 1, 2 * CV);
        if (n + TILE <= n1) cols_tile(x, K, w, ld, k0, k1, n, part, N, 1, CV), n += TILE;
        return n;
    }
    for (; n + TILE <= n1; n += TILE) {
        if (n + 2 * TILE <= n1) /* the next tile's weights, while this one's multiply */
            for (int64_t k = k0; k < k1; k++)
                for (int64_t c = 0; c < TILE; c += 64 / (int64_t)sizeof(float))
                    _mm_prefetch((const char *)(w + k * ld + n + TILE + c), _MM_HINT_T0);
        int64_t m = 0;
        for (; m + RB <= M; m += RB) cols_tile(x + m * K, K, w, ld, k0, k1, n, part + m * N, N, RB, CV);
        switch (M - m) { /* the last rows: RB - 1 at most */
        case 5: cols_tile(x + m * K, K, w, ld, k0, k1, n, part + m * N, N, 5, CV); break;
        case 4: cols_tile(x + m * K, K, w, ld, k0, k1, n, part + m * N, N, 4, CV); break;
        case 3: cols_tile(x + m * K, K, w, ld, k0, k1, n, part + m * N, N, 3, CV); break;
        case 2: cols_tile(x + m * K, K, w, ld, k0, k1, n, part + m * N, N, 2, CV); break;
        case 1: cols_tile(x + m * K, K, w, ld, k0, k1, n, part + m * N, N, 1, CV); break;
        }
    }
    return n;
}
#else
#define TILE 1
#endif

/* The partial sums of outputs n0..n1-1 over rows k0..k1-1 of W.T, for all M input rows. */
static void cols_chunk(const float *x, int64_t M, int64_t K, int64_t N, const float *w, int64_t ld,
                       int64_t k0, int64_t k1, int64_t n0, int64_t n1, float *part) {
    int64_t n = n0;
#ifdef VL
    n = cols_tiles(x, M, K, N, w, ld, k0, k1, n0, n1, part);
#endif
    for (int64_t m = 0; m < M && n < n1; m++) {
        const float *xm = x + m * K;
        float *pm = part + m * N;
        for (int64_t k = k0; k < k1; k++) {
            const float xv = xm[k], *wk = w + k * ld;
#pragma omp simd
            for (int64_t j = n; j < n1; j++) pm[j] += xv * wk[j];
        }
    }
}

/* Thread `t` of `threads`: its k range, output block by output block, into `part` (zeroed here). */
static void cols_thread(const float *x, int64_t M, int64_t K, int64_t N, const float *w, int64_t ld,
                        int64_t first, int64_t last, float *part) {
    memset(part, 0, sizeof(float) * (size_t)(M * N));
    int64_t block = PART_BYTES / (int64_t)sizeof(float) / M / TILE * TILE;
    if (block < 4 * TILE) block = 4 * TILE;
    const int64_t kchunk = M == 1 ? KCHUNK : KCHUNK_ROWS;
    for (int64_t n0 = 0; n0 < N; n0 += block) {
        const int64_t n1 = n0 + block < N ? n0 + block : N;
        for (int64_t k0 = first; k0 < last; k0 += kchunk)
            cols_chunk(x, M, K, N, w, ld, k0, k0 + kchunk < last ? k0 + kchunk : last, n0, n1, part);
    }
}

/* y[p] = x @ W[p].T (+ bias[p]) for the n projections p of one input (WS_F32_COLS: w[p], ld[p],
 * N[p] outputs), in one parallel region: each thread's partials of every projection, then
 * (after the loop's barrier) their sums. One fork and join of the threads for q, k and v
 * together, where each projection took two (partials, sums). */
static void f32_cols_matmuls(const float *x, int64_t M, int64_t K, int n, const int64_t *N, const float *const *w,
                             const int64_t *ld, const float *const *bias, float *const *y) {
    const int64_t threads = ws_threads;
    int64_t total_n = 0, first[WS_MAX_PROJS + 1] = {0};
    for (int p = 0; p < n; p++) total_n += N[p], first[p + 1] = total_n;
    float *partial = malloc(sizeof(float) * (size_t)(threads * M * total_n));
    if (!partial) { /* no memory for the partials: one thread, straight into y */
        for (int p = 0; p < n; p++) {
            cols_thread(x, M, K, N[p], w[p], ld[p], 0, K, y[p]);
            if (bias[p])
                for (int64_t i = 0; i < M * N[p]; i++) y[p][i] += bias[p][i % N[p]];
        }
        return;
    }
#pragma omp parallel num_threads(ws_threads)
    {
#pragma omp for schedule(static, 1)
        for (int64_t t = 0; t < threads; t++)
            for (int p = 0; p < n; p++)
                cols_thread(x, M, K, N[p], w[p], ld[p], K * t / threads, K * (t + 1) / threads,
                            partial + (t * total_n + first[p]) * M);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * total_n; i++) {
            int p = 0;
            while (i >= M * first[p + 1]) p++;
            const int64_t j = i - M * first[p]; /* output j of projection p's (M, N[p]) */
            float sum = bias[p] ? bias[p][j % N[p]] : 0.0f;
            for (int64_t t = 0; t < threads; t++) sum += partial[(t * total_n + first[p]) * M + j];
            y[p][j] = sum;
        }
    }
    free(partial);
}

int ws_projs_matmul(const ws_proj *const *p, int n, const float *x, int64_t M, float *const *y, ws_qact *act) {
    const int layout4 = ws_q4t_layout(p[0]->kind);
    int together = n <= WS_MAX_PROJS && (layout4 >= 0 || p[0]->kind == WS_INT8_TILES ||
                                         p[0]->kind == WS_Q8_0_TILES || p[0]->kind == WS_F32_COLS);
    for (int i = 1; i < n; i++)
        together &= p[i]->kind == p[0]->kind && p[i]->k == p[0]->k && p[i]->group == p[0]->group;
    if (together && p[0]->kind == WS_F32_COLS) {
        int64_t N[WS_MAX_PROJS], ld[WS_MAX_PROJS];
        const float *w[WS_MAX_PROJS], *bias[WS_MAX_PROJS];
        for (int i = 0; i < n; i++) N[i] = p[i]->n, ld[i] = p[i]->ld, w[i] = p[i]->q, bias[i] = p[i]->bias;
        f32_cols_matmuls(x, M, p[0]->k, n, N, w, ld, bias, y);
        return 0;
    }
    if (!together) {
        int status = 0;
        for (int i = 0; i < n && status == 0; i++) status = ws_proj_matmul(p[i], x, M, y[i], act);
        return status;
    }
    ws_qact own = {0};
    ws_qact *a = act ? act : &own;
    const int bits4 = layout4 >= 0;
    int64_t N[WS_MAX_PROJS];
    const uint8_t *tiles[WS_MAX_PROJS];
    const float *bias[WS_MAX_PROJS];
    for (int i = 0; i < n; i++) N[i] = p[i]->n, tiles[i] = p[i]->q, bias[i] = p[i]->bias;
    int status = ws_qact_quantize(a, x, M, p[0]->k, bits4 ? WS_QACT_INT4 : WS_QACT_INT8);
    if (status == 0)
        status = bits4 ? ws_q4t_projs(a, n, N, tiles, p[0]->group, layout4, bias, y)
                       : ws_q8t_projs(a, n, N, tiles, p[0]->kind == WS_Q8_0_TILES, bias, y);
    if (!act) ws_qact_free(&own);
    return status;
}

int ws_proj_matmul(const ws_proj *p, const float *x, int64_t M, float *y, ws_qact *act) {
    if (ws_q4t_layout(p->kind) >= 0 || p->kind == WS_INT8_TILES || p->kind == WS_Q8_0_TILES || p->kind == WS_F32_COLS)
        return ws_projs_matmul(&p, 1, x, M, &y, act); /* the kinds that run several projections at once */
    ws_qact own = {0};
    ws_qact *a = act ? act : &own;
    int status = 0;
    switch (p->kind) {
    case WS_INT4:
        status = ws_qact_quantize(a, x, M, p->k, WS_QACT_INT4);
        if (status == 0) status = ws_q4_proj(a, p->n, p->q, (const uint16_t *)p->scales, (const uint16_t *)p->zeros, p->group, p->bias, y);
        break;
    case WS_INT8:
        status = ws_qact_quantize(a, x, M, p->k, WS_QACT_INT8);
        if (status == 0) ws_q8_proj(a, p->n, p->q, (const float *)p->scales, p->bias, y);
        break;
    case WS_GGML:
        status = ws_qact_quantize(a, x, M, p->k, WS_QACT_INT8);
        if (status == 0) status = ws_ggml_proj(a, p->n, p->group, p->q, p->bias, y);
        break;
    case WS_F32_ROWS:
        f32_rows_matmul(x, M, p->k, p->n, p->q, p->ld, p->bias, y);
        break;
    case WS_BF16_ROWS:
    case WS_BF16_COLS:
        status = ws_bf16_proj(p, x, M, y, a);
        break;
    }
    if (!act) ws_qact_free(&own);
    return status;
}
