/* k-quant blocks (Q2_K to Q6_K) and IQ4_NL / IQ4_XS blocks from float weights: the fast path
 * of quant/kquants.py and quant/iq4.py. Also the 32-weight types Q4_0 to Q8_0 (at the end),
 * bit for bit as ggml's reference quantizers write them.
 *
 * The algorithms and the byte layouts are those modules' (their docstrings say what and why); this
 * file runs the same steps one super-block at a time, in registers and L1 instead of whole-matrix
 * tensor passes, with super-blocks split between threads. Sums are fp32 in another order than
 * PyTorch's, so a near tie between two candidate scales can go the other way: the tests hold the
 * two paths to the same error, not to the same bytes.
 *
 * Built and loaded with the other kernels (cpu_kernels.py); `tries` are kquants.py's.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

enum { QK = 256, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ4_NL = 20, T_IQ4_XS = 23 };

/* float -> IEEE half bits, rounding to nearest even (as torch's .to(float16)); finite f, and
 * infinity from 65520 up (what numpy's and torch's conversions give). */
static uint16_t to_f16(float f) {
    union { float f; uint32_t u; } v = {f};
    const uint16_t sign = (uint16_t)(v.u >> 16 & 0x8000);
    const uint32_t a = v.u & 0x7fffffffu;
    if (a >= 0x47800000u) return sign | 0x7c00u; /* 2^16 and up; 65520 to 65536 rounds there below */
    if (a < 0x38800000u) /* below 2^-14: a subnormal half, round(|f| * 2^24) (1024 is 2^-14) */
        return sign | (uint16_t)nearbyintf(fabsf(f) * 16777216.0f);
    const uint32_t h = a - 0x38000000u; /* exponent rebiased 127 -> 15, mantissa still 23 bits */
    return sign | (uint16_t)((h + 0xfffu + (h >> 13 & 1)) >> 13);
}

/* min / max written as comparisons: libm's fminf / fmaxf are calls (NaN rules) that keep the
 * loops from vectorizing, and no NaN reaches here (the caller checks the weights). */
static inline float lesser(float a, float b) { return a < b ? a : b; }
static inline float greater(float a, float b) { return a > b ? a : b; }

static float clamp_f16(float v) { return ws_f16_to_f32(to_f16(lesser(greater(v, -65504.0f), 65504.0f))); }

static inline float level(float x, float lo, float hi) { return lesser(greater(nearbyintf(x), lo), hi); }

/* The refinements' candidate levels, in kquants.py's order: the level, one down, one up. */
static const int STEP[3] = {0, -1, 1};

/* ---- sub-block fits ------------------------------------------------------------------------ */

/* Loops run element by element with the tries (or candidate levels) as the vector lanes: each
 * lane's sums are plain sequential fp32 sums, and no horizontal reduction is needed per try. */
enum { MAX_TRIES = 32 };

/* x ~ scale * q + low, q in [0, nmax], low <= 0: kquants._fit_affine for one sub-block. Lane 0
 * is the plain min/max fit, lanes 1.. the tries. */
static void fit_affine(const float *x, const float *w, int n, int nmax, const double *tries, int n_tries,
                       float *scale_out, float *low_out) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < n; i++) lo = lesser(lo, x[i]), hi = greater(hi, x[i]);
    lo = lesser(lo, 0.0f);
    const float span = hi - lo, inv = span > 0 ? 1.0f / span : 0.0f, top = (float)nmax;
    const int lanes = n_tries + 1;
    float f[MAX_TRIES + 1], aq[MAX_TRIES + 1] = {0}, aqq[MAX_TRIES + 1] = {0}, aqx[MAX_TRIES + 1] = {0};
    for (int t = 0; t < lanes; t++) f[t] = (float)(nmax + (t ? tries[t - 1] : 0.0)) * inv;
    float fw = 0, fx = 0, fxx = 0;
    for (int i = 0; i < n; i++) {
        const float xi = x[i] - lo, wi = w[i], wx = w[i] * x[i];
        fw += wi, fx += wx, fxx += wx * x[i];
#pragma omp simd
        for (int t = 0; t < lanes; t++) {
            const float q = level(xi * f[t], 0, top), wq = wi * q;
            aq[t] += wq, aqq[t] += wq * q, aqx[t] += wx * q;
        }
    }
    const double sw = fw, sx = fx, sxx = fxx;
    float best_scale = span / top, best_low = lo;
    double best_err = 0;
    for (int t = 0; t < lanes; t++) {
        const double sq = aq[t], sqq = aqq[t], sqx = aqx[t];
        double s = best_scale, b = best_low;
        int ok = 1;
        if (t > 0) {
            const double det = sw * sqq - sq * sq;
            ok = det > 0;
            const double safe = ok ? det : 1.0;
            s = (sw * sqx - sq * sx) / safe, b = (sqq * sx - sq * sqx) / safe;
            if (b > 0) s = sqx / (sqq > 1e-30 ? sqq : 1e-30), b = 0; /* an offset above zero: scale alone */
            ok = ok && s > 0;
            s = (float)s, b = (float)b;
        }
        const double err = s * s * sqq + 2 * s * b * sq + b * b * sw - 2 * s * sqx - 2 * b * sx + sxx;
        if (t == 0 || (ok && err < best_err)) best_scale = (float)s, best_low = (float)b, best_err = err;
    }
    *scale_out = best_scale, *low_out = best_low;
}

/* x ~ scale * q, q in [-nmax, nmax - 1], least squares weighted by w: fits.fit_symmetric. */
static float fit_symmetric(const float *x, const float *w, int n, int nmax, const double *tries, int n_tries) {
    float big = x[0];
    for (int i = 1; i < n; i++)
        if (fabsf(x[i]) > fabsf(big)) big = x[i];
    const float inv = big != 0 ? -1.0f / big : 0.0f, lo = (float)-nmax, hi = (float)(nmax - 1);
    const int lanes = n_tries + 1;
    float f[MAX_TRIES + 1], aqx[MAX_TRIES + 1] = {0}, aqq[MAX_TRIES + 1] = {0};
    for (int t = 0; t < lanes; t++) f[t] = (float)(nmax + (t ? tries[t - 1] : 0.0)) * inv;
    for (int i = 0; i < n; i++) {
        const float xi = x[i], wi = w[i], wx = wi * x[i];
#pragma omp simd
        for (int t = 0; t < lanes; t++) {
            const float q = level(xi * f[t], lo, hi);
            aqx[t] += wx * q, aqq[t] += wi * q * q;
        }
    }
    float best_scale = 0;
    double best_gain = 0;
    for (int t = 0; t < lanes; t++) {
        const double sqx = aqx[t], sqq = aqq[t];
        const double gain = sqq > 0 ? sqx * sqx / sqq : 0.0;
        if (gain > best_gain) best_scale = (float)(sqx / sqq), best_gain = gain;
    }
    return best_scale;
}

/* Of the candidate (step, offset) pairs, the first with the least weighted squared error of
 * x ~ step * q - offset, q = round((x + offset) / step) in [lo, hi] (0 where step is 0). */
static int best_candidate(const float *x, const float *w, int n, const float *step, const float *offset, int count,
                          float lo, float hi) {
    float is[9], err[9] = {0};
    for (int c = 0; c < count; c++) is[c] = step[c] != 0 ? 1 / step[c] : 0;
    for (int i = 0; i < n; i++) {
        const float xi = x[i], wi = w[i];
#pragma omp simd
        for (int c = 0; c < count; c++) {
            const float e = step[c] * level((xi + offset[c]) * is[c], lo, hi) - offset[c] - xi;
            err[c] += wi * (e * e);
        }
    }
    int best = 0;
    for (int c = 1; c < count; c++)
        if (err[c] < err[best]) best = c;
    return best;
}

/* ---- super-blocks ---------------------------------------------------------------------------- */

/* With an importance matrix (qw, one value a weight): ggml's weights qw * sqrt(sigma2 + x^2),
 * sigma2 twice the mean square of the n weights of the (super-)block; qw NULL: importance 1. */
static void importance_weights(const float *x, const float *qw, int n, float *w) {
    float sum = 0;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float sigma2 = 2 * sum / (float)n;
    for (int i = 0; i < n; i++) w[i] = (qw ? qw[i] : 1.0f) * sqrtf(sigma2 + x[i] * x[i]);
}

/* `count` sub-blocks of `sub` weights: codes q[256] and the header (d, dmin, sc, m on a 0..levels
 * grid) of a Q4_K / Q5_K (8 x 32, levels 63, weights rms + |x| without qw) or Q2_K (16 x 16,
 * levels 15, `flat`: importance_weights with or without qw) block. */
static void affine_block(const float *x, const float *qw, int sub, int nmax, int levels, int flat,
                         const double *tries, int n_tries, uint8_t *q, uint16_t *d16, uint16_t *dmin16, uint8_t *sc,
                         uint8_t *m) {
    const int count = QK / sub;
    float sum = 0, w[QK], scale[16], low[16], max_scale = 0, max_min = 0;
    for (int i = 0; i < QK; i++) sum += x[i] * x[i];
    const float rms = sqrtf(sum / QK), top = (float)levels;
    if (qw || flat)
        importance_weights(x, qw, QK, w);
    else
        for (int i = 0; i < QK; i++) w[i] = rms + fabsf(x[i]);
    for (int j = 0; j < count; j++) {
        fit_affine(x + sub * j, w + sub * j, sub, nmax, tries, n_tries, &scale[j], &low[j]);
        max_scale = greater(max_scale, scale[j]), max_min = greater(max_min, -low[j]);
    }
    const float d = clamp_f16(max_scale / top), dmin = clamp_f16(max_min / top);
    const float inv = d > 0 ? 1 / d : 0, inv_min = dmin > 0 ? 1 / dmin : 0;
    for (int j = 0; j < count; j++) {
        const float *xs = x + sub * j, *ws = w + sub * j;
        const int sc0 = (int)level(scale[j] * inv, 0, top), m0 = (int)level(-low[j] * inv_min, 0, top);
        int lv[9], mins[9];
        float steps[9], offsets[9];
        for (int c = 0; c < 9; c++) { /* the level and the ones beside it, clamped (repeats lose ties) */
            lv[c] = (int)level((float)(sc0 + STEP[c / 3]), 0, top), mins[c] = (int)level((float)(m0 + STEP[c % 3]), 0, top);
            steps[c] = d * (float)lv[c], offsets[c] = dmin * (float)mins[c];
        }
        const int best = best_candidate(xs, ws, sub, steps, offsets, 9, 0, (float)nmax);
        sc[j] = (uint8_t)lv[best], m[j] = (uint8_t)mins[best];
        const float step = steps[best], offset = offsets[best], is = step != 0 ? 1 / step : 0;
        for (int i = 0; i < sub; i++) q[sub * j + i] = (uint8_t)level((xs[i] + offset) * is, 0, (float)nmax);
    }
    *d16 = to_f16(d), *dmin16 = to_f16(dmin);
}

/* Sixteen sub-blocks of 16, x ~ d * sc * q with q in [-nmax, nmax - 1] and sc in [-smax, smax - 1]
 * (Q6_K: 32, 128; Q3_K: 4, 32): codes q + nmax, the scales and d (as a half). */
static void symmetric_block(const float *x, const float *qw, int nmax, int smax, const double *tries, int n_tries,
                            uint8_t *q, int8_t sc[16], uint16_t *d16) {
    float scale[16], big = 0, w[QK];
    importance_weights(x, qw, QK, w);
    for (int j = 0; j < 16; j++) {
        scale[j] = fit_symmetric(x + 16 * j, w + 16 * j, 16, nmax, tries, n_tries);
        if (fabsf(scale[j]) > fabsf(big)) big = scale[j];
    }
    /* The scale of largest magnitude maps to -smax (the extra negative level), so d may be negative. */
    const float inv = big != 0 ? -(float)smax / big : 0, d = clamp_f16(inv != 0 ? 1 / inv : 0);
    const float lo = (float)-nmax, hi = (float)(nmax - 1), slo = (float)-smax, shi = (float)(smax - 1);
    for (int j = 0; j < 16; j++) {
        const float *xs = x + 16 * j;
        const int s0 = (int)level(scale[j] * inv, slo, shi);
        int lv[3];
        float steps[3], zeros[3] = {0, 0, 0};
        for (int c = 0; c < 3; c++) lv[c] = (int)level((float)(s0 + STEP[c]), slo, shi), steps[c] = d * (float)lv[c];
        const int best = best_candidate(xs, w + 16 * j, 16, steps, zeros, 3, lo, hi);
        sc[j] = (int8_t)lv[best];
        const float step = steps[best], is = step != 0 ? 1 / step : 0;
        for (int i = 0; i < 16; i++) q[16 * j + i] = (uint8_t)(level(xs[i] * is, lo, hi) + (float)nmax);
    }
    *d16 = to_f16(d);
}

/* Two bits of each code, Q2_K's and Q3_K's 64 bytes: per half h of 128, byte 32h + l holds the
 * codes 128h + 32j + l (j = 0..3) at bits 2j. */
static void crumbs(uint8_t *out, const uint8_t *q) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *qh = q + 128 * h + l;
            out[32 * h + l] = (uint8_t)((qh[0] & 3) | (qh[32] & 3) << 2 | (qh[64] & 3) << 4 | (qh[96] & 3) << 6);
        }
}

static void q2_k(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    uint8_t q[QK], sc[16], m[16];
    uint16_t d, dmin;
    affine_block(x, qw, 16, 3, 15, 1, tries, n_tries, q, &d, &dmin, sc, m);
    for (int j = 0; j < 16; j++) out[j] = (uint8_t)(sc[j] | m[j] << 4);
    crumbs(out + 16, q);
    memcpy(out + 80, &d, 2), memcpy(out + 82, &dmin, 2);
}

static void q3_k(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    uint8_t q[QK], u[16];
    int8_t sc[16];
    uint16_t d;
    symmetric_block(x, qw, 4, 32, tries, n_tries, q, sc, &d);
    for (int l = 0; l < 32; l++) { /* hmask: bit 4h + j of byte l is code 128h + 32j + l's third bit */
        uint8_t bits = 0;
        for (int k = 0; k < 8; k++) bits |= (uint8_t)((q[32 * k + l] >> 2 & 1) << k);
        out[l] = bits;
    }
    crumbs(out + 32, q);
    for (int j = 0; j < 16; j++) u[j] = (uint8_t)(sc[j] + 32);
    for (int k = 0; k < 4; k++) { /* low nibbles of 0-3 | 8-11, of 4-7 | 12-15, then the high pairs */
        out[96 + k] = (uint8_t)((u[k] & 15) | (u[k + 8] & 15) << 4);
        out[100 + k] = (uint8_t)((u[k + 4] & 15) | (u[k + 12] & 15) << 4);
        out[104 + k] = (uint8_t)(u[k] >> 4 | (u[k + 4] >> 4) << 2 | (u[k + 8] >> 4) << 4 | (u[k + 12] >> 4) << 6);
    }
    memcpy(out + 108, &d, 2);
}

static void header(uint8_t *out, uint16_t d, uint16_t dmin, const uint8_t sc[8], const uint8_t m[8]) {
    memcpy(out, &d, 2), memcpy(out + 2, &dmin, 2);
    for (int j = 0; j < 4; j++) {
        out[4 + j] = (uint8_t)(sc[j] | (sc[j + 4] >> 4) << 6);
        out[8 + j] = (uint8_t)(m[j] | (m[j + 4] >> 4) << 6);
        out[12 + j] = (uint8_t)((sc[j + 4] & 15) | (m[j + 4] & 15) << 4);
    }
}

static void nibbles(uint8_t *out, const uint8_t *q) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) out[32 * c + l] = (uint8_t)((q[64 * c + l] & 15) | (q[64 * c + 32 + l] & 15) << 4);
}

static void q4_k(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    uint8_t q[QK], sc[8], m[8];
    uint16_t d, dmin;
    affine_block(x, qw, 32, 15, 63, 0, tries, n_tries, q, &d, &dmin, sc, m);
    header(out, d, dmin, sc, m);
    nibbles(out + 16, q);
}

static void q5_k(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    uint8_t q[QK], sc[8], m[8];
    uint16_t d, dmin;
    affine_block(x, qw, 32, 31, 63, 0, tries, n_tries, q, &d, &dmin, sc, m);
    header(out, d, dmin, sc, m);
    for (int l = 0; l < 32; l++) {
        uint8_t bits = 0;
        for (int j = 0; j < 8; j++) bits |= (uint8_t)((q[32 * j + l] >> 4) << j);
        out[16 + l] = bits;
    }
    nibbles(out + 48, q);
}

static void q6_k(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    uint8_t q[QK];
    int8_t sc[16];
    uint16_t d16;
    symmetric_block(x, qw, 32, 128, tries, n_tries, q, sc, &d16);
    for (int h = 0; h < 2; h++) { /* per half of 128: see kquants._q6_k */
        const uint8_t *qh = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            out[64 * h + l] = (uint8_t)((qh[l] & 15) | (qh[64 + l] & 15) << 4);
            out[64 * h + 32 + l] = (uint8_t)((qh[32 + l] & 15) | (qh[96 + l] & 15) << 4);
            out[128 + 32 * h + l] =
                (uint8_t)(qh[l] >> 4 | (qh[32 + l] >> 4) << 2 | (qh[64 + l] >> 4) << 4 | (qh[96 + l] >> 4) << 6);
        }
    }
    memcpy(out + 192, sc, 16);
    memcpy(out + 208, &d16, 2);
}

/* ---- IQ4_NL / IQ4_XS (iq4.py) ------------------------------------------------------------- */

/* The levels as floats and the midpoints between them, set by iq4_tables before any block. */
static float IQ4_LEVEL[16], IQ4_MID[15];

static void iq4_tables(void) {
    for (int k = 0; k < 16; k++) IQ4_LEVEL[k] = (float)WS_IQ4_LEVELS[k];
    for (int k = 0; k < 15; k++) IQ4_MID[k] = 0.5f * (IQ4_LEVEL[k] + IQ4_LEVEL[k + 1]);
}

/* The index of the level nearest v, a tie going up (iq4.nearest): the midpoints at or below v,
 * found in 4 halvings (the midpoints are sorted). */
static inline int iq4_nearest(float v) {
    int i = v >= IQ4_MID[7] ? 8 : 0;
    i += v >= IQ4_MID[i + 3] ? 4 : 0;
    i += v >= IQ4_MID[i + 1] ? 2 : 0;
    return i + (v >= IQ4_MID[i]); /* i <= 14 here */
}

/* The codes of 32 weights for a step (0: the level nearest 0), packed as iq4._pack: 16 bytes. */
static void iq4_codes(const float *x, float step, uint8_t *out) {
    const float inv = step != 0 ? 1 / step : 0;
    for (int l = 0; l < 16; l++) out[l] = (uint8_t)(iq4_nearest(x[l] * inv) | iq4_nearest(x[l + 16] * inv) << 4);
}

/* iq4.fit_levels for one sub-block of 32 weights x with fit weights w; `tries` are iq4.TRIES. */
static float iq4_fit(const float *x, const float *w, const double *tries, int n_tries) {
    float big = x[0], best_scale = 0;
    for (int i = 1; i < 32; i++)
        if (fabsf(x[i]) > fabsf(big)) big = x[i];
    const float inv = big != 0 ? 1 / big : 0;
    double best_gain = 0;
    float f[MAX_TRIES], aqx[MAX_TRIES] = {0}, aqq[MAX_TRIES] = {0};
    for (int t = 0; t < n_tries; t++) f[t] = (float)tries[t] * inv;
    for (int i = 0; i < 32; i++) { /* the tries as the vector lanes: each level built from the steps */
        const float xi = x[i], wi = w[i], wx = wi * xi;
#pragma omp simd
        for (int t = 0; t < n_tries; t++) {
            const float v = xi * f[t];
            float q = IQ4_LEVEL[0];
            for (int k = 0; k < 15; k++) q += v >= IQ4_MID[k] ? IQ4_LEVEL[k + 1] - IQ4_LEVEL[k] : 0.0f;
            aqx[t] += wx * q, aqq[t] += wi * q * q;
        }
    }
    for (int t = 0; t < n_tries; t++) {
        const double sqx = aqx[t], sqq = aqq[t];
        const double gain = sqq > 0 ? sqx * sqx / sqq : 0.0;
        if (gain > best_gain) best_scale = (float)(sqx / sqq), best_gain = gain;
    }
    return best_scale;
}

static void iq4_nl(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    float w[32];
    importance_weights(x, qw, 32, w); /* fits.importance_weights */
    const uint16_t d16 = to_f16(lesser(greater(iq4_fit(x, w, tries, n_tries), -65504.0f), 65504.0f));
    memcpy(out, &d16, 2);
    iq4_codes(x, ws_f16_to_f32(d16), out + 2);
}

static void iq4_xs(const float *x, const float *qw, const double *tries, int n_tries, uint8_t *out) {
    float w[QK], scale[8], big = 0;
    importance_weights(x, qw, QK, w);
    for (int j = 0; j < 8; j++) {
        scale[j] = iq4_fit(x + 32 * j, w + 32 * j, tries, n_tries);
        if (fabsf(scale[j]) > fabsf(big)) big = scale[j];
    }
    const float d = clamp_f16(big / -32.0f), inv = d != 0 ? 1 / d : 0; /* the largest scale: -32 steps */
    uint16_t high = 0;
    memset(out + 4, 0, 4);
    for (int j = 0; j < 8; j++) {
        const float *xs = x + 32 * j;
        const int l0 = (int)level(scale[j] * inv, -32, 31);
        int lv[3];
        float steps[3], err[3] = {0, 0, 0};
        for (int c = 0; c < 3; c++) lv[c] = (int)level((float)(l0 + STEP[c]), -32, 31), steps[c] = d * (float)lv[c];
        for (int c = 0; c < 3; c++) {
            const float is = steps[c] != 0 ? 1 / steps[c] : 0;
            for (int i = 0; i < 32; i++) {
                const float e = steps[c] * IQ4_LEVEL[iq4_nearest(xs[i] * is)] - xs[i];
                err[c] += w[32 * j + i] * (e * e);
            }
        }
        int best = 0;
        for (int c = 1; c < 3; c++)
            if (err[c] < err[best]) best = c;
        const int u = lv[best] + 32;
        high |= (uint16_t)((u >> 4) << 2 * j);
        out[4 + j / 2] |= (uint8_t)((u & 15) << 4 * (j % 2));
        iq4_codes(xs, steps[best], out + 8 + 16 * j);
    }
    const uint16_t d16 = to_f16(d);
    memcpy(out, &d16, 2), memcpy(out + 2, &high, 2);
}

/* ---- the 32-weight types, bit for bit ggml's reference quantizers ------------------------
 * Q4_0, Q5_0 (d = the weight of largest magnitude / -8 or -16, codes trunc(x / d + 8.5 or 16.5)),
 * Q4_1, Q5_1 (d = (max - min) / 15 or 31, m = min, codes trunc((x - m) / d + 0.5)) and Q8_0
 * (d = max |x| / 127, codes round(x / d)), as ggml-quants.c's `quantize_row_*_ref` compute them
 * (gguf-py's numpy ports differ in one case: a Q4_0 / Q5_0 block of zeros whose first is -0.0,
 * where they store d = +0.0): the same float32 operations in the same order, one a statement so
 * that no compiler fuses a multiply and an add, and x / d taken as x * (1 / d). Nibbles: weight j
 * in the low half of byte j, weight j + 16 in the high half; Q5's fifth bits: bit j of a
 * little-endian 32-bit word. qw and the tries are not used (the importance-weighted fits of these
 * types are legacy_blocks.py's). */

static inline float inverse(float d) { return d == 0.0f ? 0.0f : 1.0f / d; }

/* roundf(t) (halves away from zero) in steps that are exact and vectorize, as gguf-py's
 * np_roundf: floor(|t|) + floor(2 * (|t| - floor(|t|))), with t's sign. */
static inline float half_away(float t) {
    const float a = fabsf(t), f = floorf(a);
    return copysignf(f + floorf(2.0f * (a - f)), t);
}

static void put_f16(uint8_t *p, float f) {
    const uint16_t h = to_f16(f);
    memcpy(p, &h, 2);
}

static void pack_codes(const uint8_t *q, uint8_t *qs, uint8_t *qh) {
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((q[j] & 15) | (q[j + 16] & 15) << 4);
    if (qh == NULL) return;
    uint32_t h = 0;
    for (int j = 0; j < 32; j++) h |= (uint32_t)(q[j] >> 4) << j;
    memcpy(qh, &h, 4);
}

/* trunc(t), clipped to [0, top]: numpy's trunc, astype(uint8) and clip on values >= -1. */
static inline uint8_t truncated_code(float t, int top) {
    const float c = truncf(t);
    return c <= 0.0f ? 0 : c >= (float)top ? (uint8_t)top : (uint8_t)c;
}

/* Q4_0 (levels 16) and Q5_0 (32): d = signed max / -(levels / 2). */
static void symmetric_legacy(const float *x, int levels, uint8_t *out) {
    float mx = 0.0f, amax = 0.0f; /* ggml's start: a block of zeros gets d = +0 / -8 = -0 */
    for (int i = 0; i < 32; i++)
        if (fabsf(x[i]) > amax) amax = fabsf(x[i]), mx = x[i]; /* the first of equal magnitudes */
    const float d = mx / (float)(-levels / 2), id = inverse(d), offset = (float)(levels / 2) + 0.5f;
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float t = x[i] * id;
        t = t + offset;
        q[i] = truncated_code(t, levels - 1);
    }
    put_f16(out, d);
    pack_codes(q, out + (levels == 32 ? 6 : 2), levels == 32 ? out + 2 : NULL);
}

/* Q4_1 (levels 16) and Q5_1 (32). */
static void affine_legacy(const float *x, int levels, uint8_t *out) {
    float mn = x[0], mx = x[0]; /* the first of equal values (+0 or -0), as ggml's loop keeps */
    for (int i = 1; i < 32; i++) mn = x[i] < mn ? x[i] : mn, mx = x[i] > mx ? x[i] : mx;
    const float d = (mx - mn) / (float)(levels - 1), id = inverse(d);
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float t = x[i] - mn;
        t = t * id;
        t = t + 0.5f;
        q[i] = truncated_code(t, levels - 1);
    }
    put_f16(out, d), put_f16(out + 2, mn);
    pack_codes(q, out + (levels == 32 ? 8 : 4), levels == 32 ? out + 4 : NULL);
}

/* The table's signature for each: the fit's inputs (importance, tries) are not used. */
#define LEGACY_ENCODER(name, fit, levels)                                                          \
    static void name(const float *x, const float *qw, const double *tries, int n, uint8_t *out) { \
        (void)qw, (void)tries, (void)n;                                                            \
        fit(x, levels, out);                                                                       \
    }
LEGACY_ENCODER(q4_0, symmetric_legacy, 16)
LEGACY_ENCODER(q5_0, symmetric_legacy, 32)
LEGACY_ENCODER(q4_1, affine_legacy, 16)
LEGACY_ENCODER(q5_1, affine_legacy, 32)

static void q8_0(const float *x, const float *qw, const double *tries, int n, uint8_t *out) {
    (void)qw, (void)tries, (void)n;
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = greater(amax, fabsf(x[i]));
    const float d = amax / 127.0f, id = inverse(d);
    put_f16(out, d);
    for (int i = 0; i < 32; i++) out[2 + i] = (uint8_t)(int8_t)half_away(x[i] * id);
}

/* n_blocks blocks of `type` (ggml's numbering: 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0, 10 Q2_K,
 * 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K, 20 IQ4_NL, 23 IQ4_XS) from the floats at x, 256 a block
 * (32 for IQ4_NL and the first five), written one after another at out, with kquants.py's
 * (iq4.py's) `tries` for the type; qw, NULL or one importance value a weight (laid out as x),
 * weighs the fits. Returns 0; 1 for a type it does not write or more tries than MAX_TRIES; 2 where
 * a weight is NaN or infinite (out is then incomplete). */
int ws_quantize_blocks(int64_t type, const float *x, const float *qw, int64_t n_blocks, const double *tries,
                       int64_t n_tries, uint8_t *out) {
    static const struct {
        int64_t type, weights, bytes;
        void (*encode)(const float *, const float *, const double *, int, uint8_t *);
    } kinds[] = {
        {T_Q2_K, QK, 84, q2_k}, {T_Q3_K, QK, 110, q3_k}, {T_Q4_K, QK, 144, q4_k},
        {T_Q5_K, QK, 176, q5_k}, {T_Q6_K, QK, 210, q6_k}, {T_IQ4_NL, 32, 18, iq4_nl}, {T_IQ4_XS, QK, 136, iq4_xs},
        {T_Q4_0, 32, 18, q4_0}, {T_Q4_1, 32, 20, q4_1}, {T_Q5_0, 32, 22, q5_0}, {T_Q5_1, 32, 24, q5_1},
        {T_Q8_0, 32, 34, q8_0},
    };
    if (n_tries < 0 || n_tries > MAX_TRIES) return 1; /* the fits' lane arrays hold MAX_TRIES + 1 */
    if (type == T_IQ4_NL || type == T_IQ4_XS) iq4_tables(); /* the same values every time */
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        if (kinds[k].type != type) continue;
        const int64_t weights = kinds[k].weights, bytes = kinds[k].bytes;
        int bad = 0;
#pragma omp parallel for schedule(dynamic, 64) num_threads(ws_threads) reduction(| : bad)
        for (int64_t b = 0; b < n_blocks; b++) {
            const float *xb = x + b * weights;
            int finite = 1;
            for (int64_t i = 0; i < weights; i++) finite &= fabsf(xb[i]) <= FLT_MAX;
            if (finite)
                kinds[k].encode(xb, qw ? qw + b * weights : NULL, tries, (int)n_tries, out + b * bytes);
            bad |= !finite;
        }
        return bad ? 2 : 0;
    }
    return 1;
}
