/* One decode step of a dense model of the supported families (Llama, Mistral, Qwen2/3, Phi-3,
 * SmolLM3, Gemma 2/3, OLMo 2) on the CPU, in C.
 *
 * Decoding one token per row spends most of its time, at small batch, in the hundreds of
 * small tensor operations around the matmuls (norms, RoPE, cache writes, attention,
 * residuals), each a Python call and a dispatch. This runs the same arithmetic as
 * weightsmith.models.model.CausalLM for one token per row, layer after layer, with no
 * Python in between. weightsmith/cpu_decode/ (fused.py, plan.py) decides when it applies;
 * the tests check it against the PyTorch model (logits equal up to float rounding).
 *
 * The embedding rows are scaled by embed_scale (Gemma: sqrt(hidden)). Per layer, for every row
 * b at position pos[b]:
 *   h = rmsnorm(x) * norm1 (x itself where the block has no such norm: OLMo 2)
 *   q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T (+ biases)
 *   q, k = rmsnorm(q) * q_norm, rmsnorm(k) * k_norm where the model has QK-norm: over each
 *          head's D, or over each projection's whole output (qk_whole: OLMo 2)
 *   q, k = rope(q), rope(k) over the first rot_dim of each head, with row pos[b] of the caller's
 *          cos/sin tables (halves layout): the model's tables, or the local ones (Gemma 3's
 *          sliding layers, L->rope == 2); not at all in a layer without RoPE (L->rope == 0)
 *   cache[layer, b, :, pos[b]] = k, v  (rounded to bf16 in a bf16 cache, as a bf16 model's is)
 *   attention of each query head over its key/value head's entries lo..pos[b], where
 *   lo = pos[b] - window + 1 for a sliding-window layer (else 0), scores (q . k) * attn_scale
 *   (0: 1/sqrt(D)), capped to cap * tanh(s / cap) where attn_cap is set (Gemma 2)
 *   a = attn @ Wo.T, normed by attn_norm where the block norms its outputs (Gemma, OLMo 2); x += a
 *   h = rmsnorm(x) * norm2 (or x);  f = (act(h @ Wg.T) * (h @ Wu.T)) @ Wd.T, act SiLU or GELU's
 *   tanh form; normed by mlp_norm where set; x += f. A mixture of experts (Mixtral, Qwen-MoE)
 *   instead routes each row to the top_k of softmax(h @ Wrouter.T) (fp32), renormalised where
 *   renorm, and sums the chosen experts' SwiGLU outputs times their weights, in ascending
 *   expert order (the PyTorch model's order). A projection with LoRA adapters adds, to each
 *   row, scale * (x @ A.T) @ B.T of the row's adapter (any layer's projections, the router and
 *   the experts; not the LM head)
 * then logits = (rmsnorm(x) * final_norm) @ Whead.T. Norm weights come as the factors they
 * multiply by (Gemma's 1 + w already added, fused.py); a final soft-cap is the caller's.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__FMA__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* A LoRA adapter on one projection: y += scale * (x @ A.T) @ B.T, A (r, k) and B (n, r) as
 * projections (fp32 or bf16 rows); a.n == 0: this projection does not have it. A DoRA adapter
 * has mag, its g = m / ||W + scale B A|| per output (n floats): y = g * (y - bias + scale * (x @ A.T)
 * @ B.T) + bias instead (y, the projection's output with its bias). */
typedef struct {
    ws_proj a, b;
    double scale;
    const float *mag;
} ws_lora;

typedef struct {
    const float *norm1, *norm2; /* before attention and before the MLP; NULL: none (OLMo 2) */
    ws_proj q, k, v, o, gate, up, down;
    int64_t window; /* 0: the layer attends over the whole prefix */
    int64_t rope;   /* 1: q and k turn with the model's tables, 2: with the local ones; 0: not at all */
    const float *attn_norm, *mlp_norm; /* norms of the attention and MLP outputs; NULL: none */
    const float *q_norm, *k_norm;      /* QK-norm weights; NULL: none */
    int64_t n_experts, top_k, renorm;  /* n_experts > 0: a mixture of experts instead of gate/up/down */
    ws_proj router;
    const ws_proj *experts; /* (n_experts, 3): each expert's gate, up and down */
    const ws_lora *lora[7]; /* the model's adapters (n_adapters each) on q, k, v, o, gate, up, down; NULL: none */
    const ws_lora *router_lora; /* the router's adapters (n_adapters), NULL: none */
    const ws_lora *expert_lora; /* (n_experts, 3, n_adapters): each expert's gate, up, down's; NULL: none */
    const float *sinks;         /* gpt-oss: a logit per query head in each softmax; NULL: none */
} ws_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, inter; /* inter: the widest MLP or expert */
    double eps;
    const ws_layer *layers;
    const float *final_norm;
    ws_proj head;
    void *k_cache, *v_cache; /* (L, B, Hkv, S, D) with these element strides: */
    int64_t s_layer, s_row, s_head, s_pos;
    int64_t kv_bf16; /* 0: the cache holds fp32, 1: bf16 (a bf16 model's, computed in fp32 here) */
    const void *embed; /* the token embeddings (vocab, hidden), rows embed_ld elements apart */
    int64_t embed_ld, embed_bf16;
    int64_t rot_dim;  /* the first rot_dim of each head turn (a partial rotary factor); the tables' width */
    int64_t act;      /* 0: SiLU, 1: GELU, tanh approximation (Gemma), 2: gpt-oss's clamped SwiGLU */
    int64_t qk_whole; /* QK-norm over each projection's whole output (OLMo 2), else over each head */
    double attn_scale, attn_cap, embed_scale; /* 0: 1/sqrt(D); 0: no cap; 1: no scale */
    const float *cos_local, *sin_local;       /* the local layers' tables (rope == 2) */
    int64_t lora_rank, n_adapters; /* the largest adapter rank, how many adapters (0: none) */
    const int64_t *row_adapter;    /* per call: each row's adapter, -1: none */
    double swiglu_alpha, swiglu_limit; /* act 2 (gpt-oss): g clamped above, u to +-limit */
    /* kv_i8: the cache holds int8 codes, each (layer, row, head, position)'s D of them times its
     * scale, k_scale / v_scale[at / D] for the entry at element `at` (kv_cache.py's layout). */
    int64_t kv_i8;
    float *k_scale, *v_scale;
} ws_model;

static void rmsnorm(const float *x, const float *w, int64_t B, int64_t H, double eps, float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * H;
        float ss = 0;
        for (int64_t i = 0; i < H; i++) ss += xb[i] * xb[i];
        const float r = 1.0f / sqrtf(ss / (float)H + (float)eps);
        for (int64_t i = 0; i < H; i++) out[b * H + i] = w[i] * (xb[i] * r);
    }
}

/* v (D) <- v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[D/2:], v[:D/2]). */
static void rope(float *v, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], c = v[i + half];
        v[i] = a * cos[i] - c * sin[i];
        v[i + half] = c * cos[i + half] + a * sin[i + half];
    }
}

static void kv_store(const ws_model *m, void *cache, float *scales, int64_t at, const float *src, int64_t D) {
    if (m->kv_i8) { /* absmax / 127, codes rounded half to even: kv_cache.py's quantize_entries */
        float amax = 0.0f;
        for (int64_t i = 0; i < D; i++) amax = fabsf(src[i]) > amax ? fabsf(src[i]) : amax;
        const float sc = amax / 127.0f;
        int8_t *dst = (int8_t *)cache + at;
        scales[at / D] = sc;
        for (int64_t i = 0; i < D; i++) {
            const float c = sc > 0.0f ? nearbyintf(src[i] / sc) : 0.0f;
            dst[i] = (int8_t)(c > 127.0f ? 127.0f : c < -127.0f ? -127.0f : c);
        }
    } else if (m->kv_bf16) {
        for (int64_t i = 0; i < D; i++) ((uint16_t *)cache)[at + i] = ws_f32_to_bf16(src[i]);
    } else {
        memcpy((float *)cache + at, src, sizeof(float) * (size_t)D);
    }
}

/* Attention of one layer, in three parts that each split into independent items:
 *   scores: for row b, key/value head kh and a block of positions, each key is read once for
 *           the G = n_heads / n_kv query heads that share it: s = (q . k) / sqrt(D);
 *   softmax: for row b and query head h, s <- exp(s - max) / sum over the row's positions;
 *   values: for row b, key/value head kh and a slice of head_dim, out = sum over positions of
 *           s * v, the positions summed in order.
 * Every number is computed by one item in the same order however the items are split among
 * threads, so a row's results do not depend on the other rows or the thread count. A step of
 * enough (row, kv head) groups for the threads, or of short rows, runs all three parts of a
 * group (or of one query head, where heads split more evenly) in one item (one pass, no
 * barriers); fewer groups of long rows (one row: 3 kv heads on 2 threads) split the positions
 * and head_dim so every thread gets a share. Sums run over eight
 * lanes (vf8) with FMA where the CPU has it. */
typedef struct {
    const ws_model *m;
    int64_t layer, window, G;
    const int64_t *pos;
    const float *q;
    float *out;
    float *scores; /* (B, n_heads, stride): the step's scratch */
    int64_t stride;
    float scale, cap; /* the scores' scale and soft-cap (0: none) */
    const float *sinks; /* the layer's sink logit per query head (NULL: none) */
} ws_attn;

/* Positions per item of the scores, floats of head_dim per item of the values, query heads that
 * share one pass over the keys or values (their sums held in registers). */
enum { SCORE_BLOCK = 32, VALUE_SLICE = 16, HEADS_AT_ONCE = 4, SPLIT_FROM = 256 };

/* Eight floats (GCC and Clang vector extensions: AVX with -march=native, SSE pairs without). */
typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

static inline vf8 load8(const float *p) {
    vf8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vf8 load8_bf16(const uint16_t *p) {
    vh8 h;
    memcpy(&h, p, sizeof h);
    return (vf8)(__builtin_convertvector(h, vu8) << 16);
}

typedef int8_t vb8 __attribute__((vector_size(8)));

/* Eight int8 codes as floats: one sign extension and one conversion with AVX2 (GCC 12 turns the
 * vector-extension conversion of eight bytes into eight scalar ones). */
static inline vf8 load8_i8(const int8_t *p) {
#ifdef __AVX2__
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    vf8 v;
    memcpy(&v, &x, sizeof v);
    return v;
#else
    vb8 c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(c, vf8);
#endif
}

/* One cache entry's element i as a float: fp32, bf16, or an int8 code (its scale applied by the caller). */
static inline float kv_elem(const void *p, int64_t i, int kind) {
    return kind == 1 ? ws_bf16_to_f32(((const uint16_t *)p)[i]) : kind == 2 ? (float)((const int8_t *)p)[i] : ((const float *)p)[i];
}

static inline vf8 kv_load8(const void *p, int64_t i, int kind) {
    return kind == 1 ? load8_bf16((const uint16_t *)p + i) : kind == 2 ? load8_i8((const int8_t *)p + i) : load8((const float *)p + i);
}

/* a * b + c, fused where the CPU has FMA (one rounding). */
static inline vf8 madd8(vf8 a, vf8 b, vf8 c) {
#ifdef __FMA__
    return _mm256_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
}

/* Lanes of a where the mask (a vector comparison's result) is set, else of b. */
static inline vf8 sel8(vi8 mask, vf8 a, vf8 b) { return (vf8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

/* exp of eight floats (Cody-Waite reduction by ln 2, a degree-7 polynomial on |r| <= ln2/2, the
 * power of two put in the exponent bits): within 1 ulp of exp for x in [-87, 88]; below -87, 0
 * (where expf gives subnormals, then 0); up to ln(FLT_MAX), exp(88); above, infinity; NaN
 * stays NaN. The softmax and SiLU call it on whole vectors: scalar expf made a tenth of a small
 * model's step. */
static inline vf8 vexp8(vf8 x) {
    const vf8 lo = (vf8){0} - 87.0f, hi = (vf8){0} + 88.0f, magic = (vf8){0} + 12582912.0f; /* 1.5 * 2^23 */
    vf8 c = sel8(x < lo, lo, x);
    c = sel8(c > hi, hi, c);
    const vf8 t = madd8(c, (vf8){0} + 1.44269504088896341f, magic); /* round(c / ln2) in the low bits */
    const vf8 n = t - magic;
    vf8 r = madd8(n, (vf8){0} - 0.693359375f, c); /* c - n * ln2, ln2 in two parts */
    r = madd8(n, (vf8){0} + 2.12194440e-4f, r);
    vf8 p = (vf8){0} + 1.0f / 5040.0f;
    p = madd8(p, r, (vf8){0} + 1.0f / 720.0f);
    p = madd8(p, r, (vf8){0} + 1.0f / 120.0f);
    p = madd8(p, r, (vf8){0} + 1.0f / 24.0f);
    p = madd8(p, r, (vf8){0} + 1.0f / 6.0f);
    p = madd8(p, r, (vf8){0} + 0.5f);
    p = madd8(p, r, (vf8){0} + 1.0f);
    p = madd8(p, r, (vf8){0} + 1.0f);
    vu8 bits;
    memcpy(&bits, &t, sizeof bits);
    const vu8 scale = (bits - (vu8){0} - 0x4b400000u + 127u) << 23; /* 2^n as float bits */
    vf8 two_n;
    memcpy(&two_n, &scale, sizeof two_n);
    vf8 e = sel8(x < lo, (vf8){0}, p * two_n);
    e = sel8(x > (vf8){0} + 88.7228f, (vf8){0} + INFINITY, e);
    return sel8(x != x, x, e);
}

static inline float hsum8(vf8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#define ALWAYS_INLINE static inline __attribute__((always_inline))

static int64_t attn_lo(const ws_attn *a, int64_t b) {
    const int64_t p = a->pos[b];
    return a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
}

/* q_j . key for the n (a constant) query heads q + j * D: eight lanes over head_dim, their sum,
 * then the last D % 8 products in order. */
ALWAYS_INLINE void dots(const float *q, const void *key, int kind, int64_t D, int n, float *s) {
    vf8 acc[HEADS_AT_ONCE] = {{0}};
    const int64_t D8 = D & ~(int64_t)7;
    for (int64_t c = 0; c < D8; c += 8) {
        const vf8 k = kv_load8(key, c, kind);
        for (int j = 0; j < n; j++) acc[j] = madd8(load8(q + j * D + c), k, acc[j]);
    }
    for (int j = 0; j < n; j++) {
        s[j] = hsum8(acc[j]);
        for (int64_t i = D8; i < D; i++) s[j] += q[j * D + i] * kv_elem(key, i, kind);
    }
}

static int64_t kv_esize(const ws_model *m) { return m->kv_i8 ? 1 : m->kv_bf16 ? 2 : 4; }

ALWAYS_INLINE void scores_n(const ws_attn *a, const float *q, float *sc, int64_t base, int64_t t0, int64_t t1,
                            int n) {
    const ws_model *m = a->m;
    const int64_t D = m->head_dim, esize = kv_esize(m);
    const float scale = a->scale, cap = a->cap;
    const float *ks = m->kv_i8 ? m->k_scale + base / D : NULL; /* position t's scale: ks[t] */
    float s[HEADS_AT_ONCE];
    for (int64_t t = t0; t < t1; t++) {
        const char *key = (const char *)m->k_cache + (base + t * m->s_pos) * esize;
        if (m->kv_i8) {
            dots(q, key, 2, D, n, s);
            for (int j = 0; j < n; j++) s[j] *= ks[t];
        } else if (m->kv_bf16) {
            dots(q, key, 1, D, n, s);
        } else {
            dots(q, key, 0, D, n, s);
        }
        for (int j = 0; j < n; j++) sc[j * a->stride + t] = cap > 0 ? cap * tanhf(s[j] * scale / cap) : s[j] * scale;
    }
}

/* Scores of positions t0..t1-1 (at most the row's) for query heads g0..g1-1 of the G of (b, kh). */
static void attn_scores(const ws_attn *a, int64_t b, int64_t kh, int64_t g0, int64_t g1, int64_t t0, int64_t t1) {
    const ws_model *m = a->m;
    const int64_t D = m->head_dim, head = b * m->n_heads + kh * a->G, lo = attn_lo(a, b);
    const int64_t base = a->layer * m->s_layer + b * m->s_row + kh * m->s_head;
    for (int64_t g = g0; g < g1; g += HEADS_AT_ONCE) {
        const float *q = a->q + (head + g) * D;
        float *sc = a->scores + (head + g) * a->stride - lo;
        switch (g1 - g < HEADS_AT_ONCE ? g1 - g : HEADS_AT_ONCE) {
        case 1: scores_n(a, q, sc, base, t0, t1, 1); break;
        case 2: scores_n(a, q, sc, base, t0, t1, 2); break;
        case 3: scores_n(a, q, sc, base, t0, t1, 3); break;
        default: scores_n(a, q, sc, base, t0, t1, 4);
        }
    }
}

/* Scores of query head h of row b -> its softmax weights (max subtracted, exact expf); a sink
 * (gpt-oss) is one more logit whose weight goes to no value. */
static void attn_softmax(const ws_attn *a, int64_t b, int64_t h) {
    const int64_t n = a->pos[b] - attn_lo(a, b) + 1;
    float *s = a->scores + (b * a->m->n_heads + h) * a->stride, top = -INFINITY, total = 0;
#pragma omp simd reduction(max : top)
    for (int64_t t = 0; t < n; t++) top = s[t] > top ? s[t] : top;
    if (a->sinks && a->sinks[h] > top) top = a->sinks[h];
    const int64_t n8 = n & ~(int64_t)7;
    vf8 sum = {0};
    for (int64_t t = 0; t < n8; t += 8) {
        const vf8 e = vexp8(load8(s + t) - top);
        memcpy(s + t, &e, sizeof e);
        sum += e;
    }
    total = hsum8(sum);
    for (int64_t t = n8; t < n; t++) total += (s[t] = expf(s[t] - top));
    if (a->sinks) total += expf(a->sinks[h] - top);
#pragma omp simd
    for (int64_t t = 0; t < n; t++) s[t] /= total;
}

/* For the n (a constant) heads whose weights are w + j * stride: out_j[0..8 * nv) = sum over
 * positions lo..p, in order, of weight * value[0..8 * nv), each lane on its own. */
ALWAYS_INLINE void values_loop(const ws_attn *a, const float *w, const void *v, const float *vs, int64_t lo,
                               int64_t p, float *out, int kind, int n, int nv) {
    const int64_t sp = a->m->s_pos;
    vf8 acc[HEADS_AT_ONCE][2] = {{{0}}};
    for (int64_t t = lo; t <= p; t++) {
        vf8 x[2];
        for (int c = 0; c < nv; c++) x[c] = kv_load8(v, t * sp + 8 * c, kind);
        const float f = kind == 2 ? vs[t] : 1.0f; /* an int8 entry's scale, with its weight */
        for (int j = 0; j < n; j++)
            for (int c = 0; c < nv; c++) acc[j][c] = madd8(x[c], (vf8){0} + w[j * a->stride + t] * f, acc[j][c]);
    }
    for (int j = 0; j < n; j++) memcpy(out + j * a->m->head_dim, acc[j], sizeof(float) * 8 * (size_t)nv);
}

ALWAYS_INLINE void values_n(const ws_attn *a, const float *w, const void *v, const float *vs, int64_t lo, int64_t p,
                            float *out, int n, int nv) {
    if (a->m->kv_i8)
        values_loop(a, w, v, vs, lo, p, out, 2, n, nv);
    else if (a->m->kv_bf16)
        values_loop(a, w, v, vs, lo, p, out, 1, n, nv);
    else
        values_loop(a, w, v, vs, lo, p, out, 0, n, nv);
}

/* out[d0..d1) of query heads g0..g1-1 of the G of (b, kh): their weights times the values,
 * summed over the positions in order (eight lanes at a time, the last D % 8 one by one). */
static void attn_values(const ws_attn *a, int64_t b, int64_t kh, int64_t g0, int64_t g1, int64_t d0, int64_t d1) {
    const ws_model *m = a->m;
    const int64_t D = m->head_dim, head = b * m->n_heads + kh * a->G, lo = attn_lo(a, b), p = a->pos[b];
    const int64_t esize = kv_esize(m), nv = (d1 - d0) / 8, d8 = d0 + 8 * nv;
    const int64_t base = a->layer * m->s_layer + b * m->s_row + kh * m->s_head;
    const char *v = (const char *)m->v_cache + base * esize;
    const float *vs = m->kv_i8 ? m->v_scale + base / D : NULL; /* position t's scale: vs[t] */
    const int kind = m->kv_i8 ? 2 : m->kv_bf16 ? 1 : 0;
    for (int64_t g = g0; g < g1; g += HEADS_AT_ONCE) {
        const float *w = a->scores + (head + g) * a->stride - lo;
        float *out = a->out + (head + g) * D;
        const int n = g1 - g < HEADS_AT_ONCE ? (int)(g1 - g) : HEADS_AT_ONCE;
        for (int j = 0; j < n; j++) /* the lanes past the last eight */
            for (int64_t d = d8; d < d1; d++) {
                float acc = 0;
                for (int64_t t = lo; t <= p; t++)
                    acc += w[j * a->stride + t] * (vs ? vs[t] : 1.0f) * kv_elem(v, t * m->s_pos + d, kind);
                out[j * D + d] = acc;
            }
        if (nv == 0) continue;
        const char *vd = v + d0 * esize;
        switch ((n - 1) * 2 + (int)nv - 1) {
        case 0: values_n(a, w, vd, vs, lo, p, out + d0, 1, 1); break;
        case 1: values_n(a, w, vd, vs, lo, p, out + d0, 1, 2); break;
        case 2: values_n(a, w, vd, vs, lo, p, out + d0, 2, 1); break;
        case 3: values_n(a, w, vd, vs, lo, p, out + d0, 2, 2); break;
        case 4: values_n(a, w, vd, vs, lo, p, out + d0, 3, 1); break;
        case 5: values_n(a, w, vd, vs, lo, p, out + d0, 3, 2); break;
        case 6: values_n(a, w, vd, vs, lo, p, out + d0, 4, 1); break;
        default: values_n(a, w, vd, vs, lo, p, out + d0, 4, 2);
        }
    }
}

/* All three parts for query heads g0..g1-1 of (b, kh). */
static void attn_heads(const ws_attn *a, int64_t b, int64_t kh, int64_t g0, int64_t g1) {
    const int64_t D = a->m->head_dim;
    attn_scores(a, b, kh, g0, g1, attn_lo(a, b), a->pos[b] + 1);
    for (int64_t g = g0; g < g1; g++) attn_softmax(a, b, kh * a->G + g);
    for (int64_t d = 0; d < D; d += VALUE_SLICE)
        attn_values(a, b, kh, g0, g1, d, d + VALUE_SLICE < D ? d + VALUE_SLICE : D);
}

static void attention(const ws_attn *a, int64_t B) {
    const ws_model *m = a->m;
    const int64_t groups = B * m->n_kv, blocks = (a->stride + SCORE_BLOCK - 1) / SCORE_BLOCK;
    const int64_t slices = (m->head_dim + VALUE_SLICE - 1) / VALUE_SLICE;
    /* Three parts with a barrier after each pay off from a few hundred positions (measured). */
    const int one_pass = ws_threads <= 1 || groups % ws_threads == 0 || groups >= 4 * ws_threads ||
                         a->stride < SPLIT_FROM;
    /* In one pass, single query heads where they split more evenly among the threads than the
     * groups do (one row of 3 kv heads, 9 query heads, on 2 threads: 5 and 4 heads, not 6 and 3).
     * A head's numbers are the same either way: its sums run on their own. */
    const int64_t T = ws_threads, heads = B * m->n_heads;
    const int by_head = one_pass && (groups + T - 1) / T * heads > (heads + T - 1) / T * groups;
#pragma omp parallel num_threads(ws_threads)
    {
        if (by_head) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < heads; i++) {
                const int64_t b = i / m->n_heads, kh = i % m->n_heads / a->G, g = i % a->G;
                attn_heads(a, b, kh, g, g + 1);
            }
        } else if (one_pass) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < groups; i++) attn_heads(a, i / m->n_kv, i % m->n_kv, 0, a->G);
        } else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < groups * blocks; i++) {
                const int64_t b = i / blocks / m->n_kv, kh = i / blocks % m->n_kv;
                const int64_t t0 = attn_lo(a, b) + i % blocks * SCORE_BLOCK, end = a->pos[b] + 1;
                if (t0 < end) attn_scores(a, b, kh, 0, a->G, t0, t0 + SCORE_BLOCK < end ? t0 + SCORE_BLOCK : end);
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < B * m->n_heads; i++) attn_softmax(a, i / m->n_heads, i % m->n_heads);
#pragma omp for schedule(static)
            for (int64_t i = 0; i < groups * slices; i++) {
                const int64_t d0 = i % slices * VALUE_SLICE, d1 = d0 + VALUE_SLICE;
                attn_values(a, i / slices / m->n_kv, i / slices % m->n_kv, 0, a->G, d0, d1 < m->head_dim ? d1 : m->head_dim);
            }
        }
    }
}

/* g <- silu(g) * u = g / (1 + exp(-g)) * u, n floats. */
static void silu_mul(float *g, const float *u, int64_t n) {
    const int64_t n8 = n & ~(int64_t)7;
    for (int64_t i = 0; i < n8; i += 8) {
        const vf8 x = load8(g + i), y = x / ((vf8){0} + 1.0f + vexp8(-x)) * load8(u + i);
        memcpy(g + i, &y, sizeof y);
    }
    for (int64_t i = n8; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* g <- gelu(g) * u, GELU's tanh form 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), n floats;
 * tanh(y) = 1 - 2 / (1 + exp(2y)), which goes to +-1 where exp overflows or vanishes. */
static void gelu_mul(float *g, const float *u, int64_t n) {
    const float k = 0.7978845608028654f, c = 0.044715f;
    const int64_t n8 = n & ~(int64_t)7;
    for (int64_t i = 0; i < n8; i += 8) {
        const vf8 x = load8(g + i), y = k * (x + c * x * x * x);
        const vf8 t = 1.0f - 2.0f / (1.0f + vexp8(y + y)), r = 0.5f * x * (1.0f + t) * load8(u + i);
        memcpy(g + i, &r, sizeof r);
    }
    for (int64_t i = n8; i < n; i++) g[i] = 0.5f * g[i] * (1.0f + tanhf(k * (g[i] + c * g[i] * g[i] * g[i]))) * u[i];
}

/* The adapters' scratch: t (B, rank), d and xg (B, widest), rows (B), its own quantized input
 * (the projections' stays theirs). */
typedef struct {
    float *t, *d, *xg;
    int64_t *rows;
    ws_qact act;
} ws_lora_scratch;

/* y (B, n) += each row's adapter's delta for x (B, k), row b's adapter codes[b] (-1: none): the
 * rows of one adapter gathered and run at once. The sum is the PyTorch layer's addmm:
 * scale * (h @ B.T) added to y; a DoRA adapter's rows are then scaled per output around the
 * projection's bias (lora/dora.py's order: g * (y - bias + scale * d) + bias). */
static int lora_add(const ws_model *m, const ws_lora *l, const float *bias, const float *x, int64_t B, float *y,
                    const int64_t *codes, ws_lora_scratch *s) {
    if (!l) return 0;
    for (int64_t i = 0; i < m->n_adapters; i++) {
        const ws_lora *a = l + i;
        if (a->a.n == 0) continue;
        const int64_t k = a->a.k, n = a->b.n;
        int64_t count = 0;
        for (int64_t b = 0; b < B; b++)
            if (codes[b] == i) s->rows[count++] = b;
        if (count == 0) continue;
        const float *in = x;
        if (count < B) { /* gather the adapter's rows */
            for (int64_t r = 0; r < count; r++)
                memcpy(s->xg + r * k, x + s->rows[r] * k, sizeof(float) * (size_t)k);
            in = s->xg;
        }
        s->act.src = NULL;
        if (ws_proj_matmul(&a->a, in, count, s->t, &s->act)) return -1;
        s->act.src = NULL;
        if (ws_proj_matmul(&a->b, s->t, count, s->d, &s->act)) return -1;
        const float scale = (float)a->scale;
        for (int64_t r = 0; r < count; r++) {
            float *yr = y + s->rows[r] * n;
            const float *dr = s->d + r * n;
            if (a->mag) {
                for (int64_t j = 0; j < n; j++) {
                    const float b0 = bias ? bias[j] : 0.0f;
                    yr[j] = a->mag[j] * ((yr[j] - b0) + scale * dr[j]) + b0;
                }
            } else {
                for (int64_t j = 0; j < n; j++) yr[j] += scale * dr[j];
            }
        }
    }
    return 0;
}

/* g <- c sigmoid(alpha c) (clamp(u, -limit, limit) + 1), c = min(g, limit), n floats: gpt-oss's
 * experts, in the PyTorch model's order (c * sigmoid, then times u + 1). */
static void clamped_swiglu(float *g, const float *u, int64_t n, float alpha, float limit) {
    const int64_t n8 = n & ~(int64_t)7;
    const vf8 lim = (vf8){0} + limit;
    for (int64_t i = 0; i < n8; i += 8) {
        vf8 c = load8(g + i), up = load8(u + i);
        c = sel8(c > lim, lim, c);
        up = sel8(up > lim, lim, up);
        up = sel8(up < -lim, -lim, up);
        const vf8 y = c * (1.0f / ((vf8){0} + 1.0f + vexp8(-(c * alpha)))) * (up + 1.0f);
        memcpy(g + i, &y, sizeof y);
    }
    for (int64_t i = n8; i < n; i++) {
        const float c = g[i] > limit ? limit : g[i];
        const float up = u[i] > limit ? limit : u[i] < -limit ? -limit : u[i];
        g[i] = c * (1.0f / (1.0f + expf(-(c * alpha)))) * (up + 1.0f);
    }
}

/* g <- act(g) * u, n floats: SiLU, GELU's tanh form or gpt-oss's clamped SwiGLU, as the model's
 * MLPs and experts take. */
static void act_mul(const ws_model *m, float *g, const float *u, int64_t n) {
    if (m->act == 2)
        clamped_swiglu(g, u, n, (float)m->swiglu_alpha, (float)m->swiglu_limit);
    else if (m->act == 1)
        gelu_mul(g, u, n);
    else
        silu_mul(g, u, n);
}

/* The scratch of a mixture-of-experts layer: the router's probabilities (B, E), each row's chosen
 * experts and weights (B, top_k), and one expert's rows' inputs and outputs. */
typedef struct {
    float *probs, *weights, *xin, *y;
    int64_t *chosen, *rows, *codes; /* codes: the gathered rows' adapters */
    float *row_w;
} ws_moe;

/* f (B, H) = the mixture of experts of `in` (B, H): each row's softmax over the router's logits
 * (fp32), its top_k largest (the lower expert first among equal ones), renormalised to sum to 1
 * where L->renorm; then expert by expert in ascending order, the rows that chose it gathered and
 * run through its gate/up/down at once, each output times the row's weight added to the row's
 * sum. g and u hold the experts' intermediate values. Returns 0, or -1 when out of memory. */
static int moe(const ws_model *m, const ws_layer *L, const float *in, int64_t B, float *f, float *g, float *u,
               const ws_moe *s, ws_qact *act, ws_lora_scratch *ls) {
    const int64_t E = L->n_experts, K = L->top_k, H = m->hidden, A = m->n_adapters;
    act->src = NULL;
    if (ws_proj_matmul(&L->router, in, B, s->probs, act)) return -1;
    if (lora_add(m, L->router_lora, L->router.bias, in, B, s->probs, m->row_adapter, ls)) return -1;
    for (int64_t b = 0; b < B; b++) {
        float *p = s->probs + b * E, top = -INFINITY, total = 0;
        for (int64_t e = 0; e < E; e++) top = p[e] > top ? p[e] : top;
        for (int64_t e = 0; e < E; e++) total += (p[e] = expf(p[e] - top));
        for (int64_t e = 0; e < E; e++) p[e] /= total;
        float sum = 0;
        for (int64_t j = 0; j < K; j++) { /* the j-th largest of those not chosen yet */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= s->chosen[b * K + i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            s->chosen[b * K + j] = best, s->weights[b * K + j] = p[best], sum += p[best];
        }
        if (L->renorm)
            for (int64_t j = 0; j < K; j++) s->weights[b * K + j] /= sum;
    }
    memset(f, 0, sizeof(float) * (size_t)(B * H));
    for (int64_t e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < K; j++)
                if (s->chosen[b * K + j] == e) {
                    memcpy(s->xin + n * H, in + b * H, sizeof(float) * (size_t)H);
                    s->rows[n] = b, s->codes[n] = m->row_adapter[b], s->row_w[n++] = s->weights[b * K + j];
                }
        if (n == 0) continue;
        const ws_proj *x = L->experts + 3 * e, *gate_up[] = {x, x + 1};
        const ws_lora *xl = L->expert_lora ? L->expert_lora + 3 * e * A : NULL;
        float *gate_up_out[] = {g, u};
        act->src = NULL; /* a new input: quantized once for gate and up */
        if (ws_projs_matmul(gate_up, 2, s->xin, n, gate_up_out, act)) return -1;
        if (xl && (lora_add(m, xl, x[0].bias, s->xin, n, g, s->codes, ls) ||
                   lora_add(m, xl + A, x[1].bias, s->xin, n, u, s->codes, ls)))
            return -1;
        act_mul(m, g, u, n * x[0].n);
        act->src = NULL;
        if (ws_proj_matmul(x + 2, g, n, s->y, act)) return -1;
        if (xl && lora_add(m, xl + 2 * A, x[2].bias, g, n, s->y, s->codes, ls)) return -1;
        for (int64_t r = 0; r < n; r++)
            for (int64_t i = 0; i < H; i++) f[s->rows[r] * H + i] += s->y[r * H + i] * s->row_w[r];
    }
    return 0;
}

/* QK-norm of the rows' queries and keys, in place: over each head's D, or each whole projection. */
static void qk_norm(const ws_model *m, const ws_layer *L, int64_t B, float *q, float *k) {
    const int64_t D = m->head_dim;
    if (m->qk_whole) {
        rmsnorm(q, L->q_norm, B, m->n_heads * D, m->eps, q);
        rmsnorm(k, L->k_norm, B, m->n_kv * D, m->eps, k);
    } else {
        rmsnorm(q, L->q_norm, B * m->n_heads, D, m->eps, q);
        rmsnorm(k, L->k_norm, B * m->n_kv, D, m->eps, k);
    }
}

/* x (B, hidden): the rows' token embeddings, overwritten; or NULL: rows tokens[b] of m->embed
 * (in fp32). cos, sin: RoPE tables (positions, rot_dim), row pos[b] row b's; logits (B, vocab).
 * Returns 0, or -1 when out of memory. */
int ws_decode(const ws_model *m, int64_t B, const int64_t *tokens, float *x, const int64_t *pos,
              const float *cos, const float *sin, float *logits) {
    const int64_t H = m->hidden, D = m->head_dim, qn = m->n_heads * D, kvn = m->n_kv * D, I = m->inter;
    const int64_t R = m->rot_dim;
    float *own = x ? NULL : malloc(sizeof(float) * (size_t)(B * H));
    if (!x && own) {
        for (int64_t b = 0; b < B; b++) {
            const int64_t at = tokens[b] * m->embed_ld;
            for (int64_t i = 0; i < H; i++)
                own[b * H + i] = m->embed_bf16 ? ws_bf16_to_f32(((const uint16_t *)m->embed)[at + i])
                                               : ((const float *)m->embed)[at + i];
        }
    }
    x = x ? x : own;
    if (x && m->embed_scale != 1.0)
        for (int64_t i = 0; i < B * H; i++) x[i] *= (float)m->embed_scale;
    float *h = malloc(sizeof(float) * (size_t)(B * H)), *q = malloc(sizeof(float) * (size_t)(B * qn));
    float *k = malloc(sizeof(float) * (size_t)(B * kvn)), *v = malloc(sizeof(float) * (size_t)(B * kvn));
    float *att = malloc(sizeof(float) * (size_t)(B * qn)), *out = malloc(sizeof(float) * (size_t)(B * H));
    float *g = malloc(sizeof(float) * (size_t)(B * I)), *u = malloc(sizeof(float) * (size_t)(B * I));
    int64_t longest = 0; /* positions of the longest row: the attention scores' row length */
    for (int64_t b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
    float *scores = malloc(sizeof(float) * (size_t)(B * m->n_heads * longest));
    int64_t experts = 0, top_k = 0; /* the most of any layer */
    for (int64_t l = 0; l < m->n_layers; l++) {
        experts = m->layers[l].n_experts > experts ? m->layers[l].n_experts : experts;
        top_k = m->layers[l].top_k > top_k ? m->layers[l].top_k : top_k;
    }
    ws_moe mx = {0};
    if (experts) {
        mx.probs = malloc(sizeof(float) * (size_t)(B * experts));
        mx.weights = malloc(sizeof(float) * (size_t)(B * top_k)), mx.chosen = malloc(sizeof(int64_t) * (size_t)(B * top_k));
        mx.xin = malloc(sizeof(float) * (size_t)(B * H)), mx.y = malloc(sizeof(float) * (size_t)(B * H));
        mx.rows = malloc(sizeof(int64_t) * (size_t)B), mx.row_w = malloc(sizeof(float) * (size_t)B);
        mx.codes = malloc(sizeof(int64_t) * (size_t)B);
    }
    const int moe_oom = experts && (!mx.probs || !mx.weights || !mx.chosen || !mx.xin || !mx.y || !mx.rows ||
                                    !mx.row_w || !mx.codes);
    int64_t widest = H > qn ? H : qn; /* the widest projection input or output an adapter has */
    widest = I > widest ? I : widest;
    widest = experts > widest ? experts : widest;
    ws_lora_scratch ls = {0};
    if (m->lora_rank) {
        ls.t = malloc(sizeof(float) * (size_t)(B * m->lora_rank));
        ls.d = malloc(sizeof(float) * (size_t)(B * widest)), ls.xg = malloc(sizeof(float) * (size_t)(B * widest));
        ls.rows = malloc(sizeof(int64_t) * (size_t)B);
    }
    const int lora_oom = m->lora_rank && (!ls.t || !ls.d || !ls.xg || !ls.rows);
    ws_attn attn = {.m = m, .G = m->n_heads / m->n_kv, .pos = pos, .q = q, .out = att, .scores = scores,
                    .stride = longest, .scale = m->attn_scale > 0 ? (float)m->attn_scale : 1.0f / sqrtf((float)D),
                    .cap = (float)m->attn_cap};
    ws_qact act = {0}; /* the int8-quantized input of the int4 / int8 projections */
    int status = 0;
    if (!x || !h || !q || !k || !v || !att || !out || !g || !u || !scores || moe_oom || lora_oom) {
        status = -1;
        goto done;
    }
    for (int64_t l = 0; l < m->n_layers; l++) {
        const ws_layer *L = m->layers + l;
        const float *in = x;
        if (L->norm1) rmsnorm(x, L->norm1, B, H, m->eps, h), in = h;
        act.src = NULL; /* the input is new: quantized once for q, k and v */
        const ws_proj *qkv[] = {&L->q, &L->k, &L->v}, *gate_up[] = {&L->gate, &L->up};
        float *qkv_out[] = {q, k, v}, *gate_up_out[] = {g, u};
        if (ws_projs_matmul(qkv, 3, in, B, qkv_out, &act)) goto oom;
        for (int i = 0; i < 3; i++)
            if (lora_add(m, L->lora[i], qkv[i]->bias, in, B, qkv_out[i], m->row_adapter, &ls)) goto oom;
        if (L->q_norm) qk_norm(m, L, B, q, k);
        const float *ct = L->rope == 2 ? m->cos_local : cos, *st = L->rope == 2 ? m->sin_local : sin;
        for (int64_t b = 0; b < B; b++) {
            const float *cb = ct + pos[b] * R, *sb = st + pos[b] * R;
            if (L->rope)
                for (int64_t i = 0; i < m->n_heads; i++) rope(q + b * qn + i * D, cb, sb, R);
            for (int64_t i = 0; i < m->n_kv; i++) {
                if (L->rope) rope(k + b * kvn + i * D, cb, sb, R);
                const int64_t at = l * m->s_layer + b * m->s_row + i * m->s_head + pos[b] * m->s_pos;
                kv_store(m, m->k_cache, m->k_scale, at, k + b * kvn + i * D, D);
                kv_store(m, m->v_cache, m->v_scale, at, v + b * kvn + i * D, D);
            }
        }
        attn.layer = l, attn.window = L->window, attn.sinks = L->sinks;
        attention(&attn, B);
        act.src = NULL;
        if (ws_proj_matmul(&L->o, att, B, out, &act)) goto oom;
        if (lora_add(m, L->lora[3], L->o.bias, att, B, out, m->row_adapter, &ls)) goto oom;
        if (L->attn_norm) rmsnorm(out, L->attn_norm, B, H, m->eps, out);
        for (int64_t i = 0; i < B * H; i++) x[i] += out[i];
        in = x;
        if (L->norm2) rmsnorm(x, L->norm2, B, H, m->eps, h), in = h;
        if (L->n_experts) {
            if (moe(m, L, in, B, out, g, u, &mx, &act, &ls)) goto oom;
        } else {
            act.src = NULL; /* once for gate and up */
            if (ws_projs_matmul(gate_up, 2, in, B, gate_up_out, &act)) goto oom;
            if (lora_add(m, L->lora[4], L->gate.bias, in, B, g, m->row_adapter, &ls) ||
                lora_add(m, L->lora[5], L->up.bias, in, B, u, m->row_adapter, &ls)) goto oom;
            act_mul(m, g, u, B * L->gate.n);
            act.src = NULL;
            if (ws_proj_matmul(&L->down, g, B, out, &act)) goto oom;
            if (lora_add(m, L->lora[6], L->down.bias, g, B, out, m->row_adapter, &ls)) goto oom;
        }
        if (L->mlp_norm) rmsnorm(out, L->mlp_norm, B, H, m->eps, out);
        for (int64_t i = 0; i < B * H; i++) x[i] += out[i];
    }
    rmsnorm(x, m->final_norm, B, H, m->eps, h);
    act.src = NULL;
    if (ws_proj_matmul(&m->head, h, B, logits, &act)) goto oom;
    goto done;
oom:
    status = -1;
done:
    free(h), free(q), free(k), free(v), free(att), free(out), free(g), free(u), free(scores), free(own);
    free(mx.probs), free(mx.weights), free(mx.chosen), free(mx.xin), free(mx.y), free(mx.rows), free(mx.row_w);
    free(mx.codes), free(ls.t), free(ls.d), free(ls.xg), free(ls.rows);
    ws_qact_free(&act), ws_qact_free(&ls.act);
    return status;
}
