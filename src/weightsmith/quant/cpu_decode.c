/* One decode step of a dense Llama-family model (Llama, Mistral, Qwen2) on the CPU, in C.
 *
 * Decoding one token per row spends most of its time, at small batch, in the hundreds of
 * small tensor operations around the matmuls (norms, RoPE, cache writes, attention,
 * residuals), each a Python call and a dispatch. This runs the same arithmetic as
 * weightsmith.models.model.CausalLM for one token per row, layer after layer, with no
 * Python in between. weightsmith/cpu_decode/ (fused.py, plan.py) decides when it applies;
 * the tests check it against the PyTorch model (logits equal up to float rounding).
 *
 * Per layer, for every row b at position pos[b]:
 *   h = rmsnorm(x) * norm1;  q, k, v = h @ Wq.T, h @ Wk.T, h @ Wv.T (+ biases)
 *   q, k = rope(q), rope(k) with the caller's cos/sin for pos[b] (halves layout)
 *   cache[layer, b, :, pos[b]] = k, v  (rounded to bf16 in a bf16 cache, as a bf16 model's is)
 *   attention of each query head over its key/value head's entries lo..pos[b], where
 *   lo = pos[b] - window + 1 for a sliding-window layer (else 0), scale 1/sqrt(D)
 *   x += attn @ Wo.T;  h = rmsnorm(x) * norm2;  x += (silu(h @ Wg.T) * (h @ Wu.T)) @ Wd.T
 * then logits = (rmsnorm(x) * final_norm) @ Whead.T.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

typedef struct {
    const float *norm1, *norm2;
    ws_proj q, k, v, o, gate, up, down;
    int64_t window; /* 0: the layer attends over the whole prefix */
} ws_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, inter;
    double eps;
    const ws_layer *layers;
    const float *final_norm;
    ws_proj head;
    void *k_cache, *v_cache; /* (L, B, Hkv, S, D) with these element strides: */
    int64_t s_layer, s_row, s_head, s_pos;
    int64_t kv_bf16; /* 0: the cache holds fp32, 1: bf16 (a bf16 model's, computed in fp32 here) */
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

/* q . key t (D values), and out += w * value t, for an fp32 or a bf16 cache. */
static float kv_dot(const ws_model *m, const float *q, int64_t at, int64_t D) {
    float s = 0;
    if (m->kv_bf16) {
        const uint16_t *kt = (const uint16_t *)m->k_cache + at;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; i++) s += q[i] * ws_bf16_to_f32(kt[i]);
    } else {
        const float *kt = (const float *)m->k_cache + at;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < D; i++) s += q[i] * kt[i];
    }
    return s;
}

static void kv_add(const ws_model *m, float w, int64_t at, int64_t D, float *out) {
    if (m->kv_bf16) {
        const uint16_t *vt = (const uint16_t *)m->v_cache + at;
        for (int64_t i = 0; i < D; i++) out[i] += w * ws_bf16_to_f32(vt[i]);
    } else {
        const float *vt = (const float *)m->v_cache + at;
        for (int64_t i = 0; i < D; i++) out[i] += w * vt[i];
    }
}

static void kv_store(const ws_model *m, void *cache, int64_t at, const float *src, int64_t D) {
    if (m->kv_bf16) {
        for (int64_t i = 0; i < D; i++) ((uint16_t *)cache)[at + i] = ws_f32_to_bf16(src[i]);
    } else {
        memcpy((float *)cache + at, src, sizeof(float) * (size_t)D);
    }
}

static void attention(const ws_model *m, int64_t layer, int64_t window, int64_t B, const int64_t *pos,
                      const float *q, float *out) {
    const int64_t H = m->n_heads, D = m->head_dim, per_kv = m->n_heads / m->n_kv;
    const float scale = 1.0f / sqrtf((float)D);
    int64_t longest = 0;
    for (int64_t b = 0; b < B; b++) longest = pos[b] + 1 > longest ? pos[b] + 1 : longest;
#pragma omp parallel num_threads(ws_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)longest);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H, kh = h / per_kv, p = pos[b];
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int64_t base = layer * m->s_layer + b * m->s_row + kh * m->s_head;
            const float *qv = q + (b * H + h) * D;
            float top = -INFINITY;
            for (int64_t t = lo; t <= p; t++) {
                scores[t] = kv_dot(m, qv, base + t * m->s_pos, D) * scale;
                top = scores[t] > top ? scores[t] : top;
            }
            float total = 0;
            for (int64_t t = lo; t <= p; t++) total += (scores[t] = expf(scores[t] - top));
            float *o = out + (b * H + h) * D;
            memset(o, 0, sizeof(float) * (size_t)D);
            for (int64_t t = lo; t <= p; t++) kv_add(m, scores[t] / total, base + t * m->s_pos, D, o);
        }
        free(scores);
    }
}

/* x (B, hidden): the rows' token embeddings, overwritten; cos, sin (B, D); logits (B, vocab).
 * Returns 0, or -1 when out of memory. */
int ws_decode(const ws_model *m, int64_t B, float *x, const int64_t *pos, const float *cos,
              const float *sin, float *logits) {
    const int64_t H = m->hidden, D = m->head_dim, qn = m->n_heads * D, kvn = m->n_kv * D, I = m->inter;
    float *h = malloc(sizeof(float) * (size_t)(B * H)), *q = malloc(sizeof(float) * (size_t)(B * qn));
    float *k = malloc(sizeof(float) * (size_t)(B * kvn)), *v = malloc(sizeof(float) * (size_t)(B * kvn));
    float *att = malloc(sizeof(float) * (size_t)(B * qn)), *out = malloc(sizeof(float) * (size_t)(B * H));
    float *g = malloc(sizeof(float) * (size_t)(B * I)), *u = malloc(sizeof(float) * (size_t)(B * I));
    ws_qact act = {0}; /* the int8-quantized input of the int4 / int8 projections */
    int status = 0;
    if (!h || !q || !k || !v || !att || !out || !g || !u) {
        status = -1;
        goto done;
    }
    for (int64_t l = 0; l < m->n_layers; l++) {
        const ws_layer *L = m->layers + l;
        rmsnorm(x, L->norm1, B, H, m->eps, h);
        act.src = NULL; /* h is new: quantized once for q, k and v */
        if (ws_proj_matmul(&L->q, h, B, q, &act) || ws_proj_matmul(&L->k, h, B, k, &act) ||
            ws_proj_matmul(&L->v, h, B, v, &act))
            goto oom;
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < m->n_heads; i++) rope(q + b * qn + i * D, cos + b * D, sin + b * D, D);
            for (int64_t i = 0; i < m->n_kv; i++) {
                rope(k + b * kvn + i * D, cos + b * D, sin + b * D, D);
                const int64_t at = l * m->s_layer + b * m->s_row + i * m->s_head + pos[b] * m->s_pos;
                kv_store(m, m->k_cache, at, k + b * kvn + i * D, D);
                kv_store(m, m->v_cache, at, v + b * kvn + i * D, D);
            }
        }
        attention(m, l, L->window, B, pos, q, att);
        act.src = NULL;
        if (ws_proj_matmul(&L->o, att, B, out, &act)) goto oom;
        for (int64_t i = 0; i < B * H; i++) x[i] += out[i];
        rmsnorm(x, L->norm2, B, H, m->eps, h);
        act.src = NULL; /* once for gate and up */
        if (ws_proj_matmul(&L->gate, h, B, g, &act) || ws_proj_matmul(&L->up, h, B, u, &act)) goto oom;
        for (int64_t i = 0; i < B * I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        act.src = NULL;
        if (ws_proj_matmul(&L->down, g, B, out, &act)) goto oom;
        for (int64_t i = 0; i < B * H; i++) x[i] += out[i];
    }
    rmsnorm(x, m->final_norm, B, H, m->eps, h);
    act.src = NULL;
    if (ws_proj_matmul(&m->head, h, B, logits, &act)) goto oom;
    goto done;
oom:
    status = -1;
done:
    free(h), free(q), free(k), free(v), free(att), free(out), free(g), free(u);
    ws_qact_free(&act);
    return status;
}
