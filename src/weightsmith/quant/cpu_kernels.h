/* Shared declarations of cpu_kernels.c and cpu_decode.c (see those files). */
#ifndef WEIGHTSMITH_CPU_KERNELS_H
#define WEIGHTSMITH_CPU_KERNELS_H

#include <stdint.h>

enum { WS_INT4 = 4, WS_INT8 = 8, WS_F32_ROWS = 32, WS_F32_COLS = 33 };

/* One projection y = x @ W.T (+ bias), W (n, k). kind WS_INT4: q uint8 (n, k/2) in chunk
 * layout, scales and zeros (n, k/group); WS_INT8: q int8 (n, k), scales (n,); WS_F32_ROWS:
 * W[i, j] = q[i * ld + j]; WS_F32_COLS: W[i, j] = q[j * ld + i]. bias may be NULL. */
typedef struct {
    int64_t kind, n, k, group, ld;
    const void *q;
    const float *scales, *zeros, *bias;
} ws_proj;

extern int ws_threads;

void ws_int4_matmul(const float *x, int64_t M, int64_t K, int64_t N, const uint8_t *q,
                    const float *scales, const float *zeros, int64_t G, const float *bias, float *y);
void ws_int8_matmul(const float *x, int64_t M, int64_t K, int64_t N, const int8_t *q,
                    const float *scales, const float *bias, float *y);
void ws_proj_matmul(const ws_proj *p, const float *x, int64_t M, float *y);

#endif
