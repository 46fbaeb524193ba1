/* GGUF's grid-coded, ternary and microscaling types for cpu_ggml.c (included there once).
 *
 * Every 32 weights of these types decode, as the other GGUF types do in cpu_ggml.c, to int8
 * codes c times a scale per 16 weights, exactly as gguf-py's dequantize computes them:
 * - IQ2_XXS, IQ2_XS, IQ2_S (256 a block): each 8 weights are a point of a grid of 8-vectors
 *   with values 8, 25, 43 (256, 512 or 1024 points) and 8 sign bits; the scale is
 *   d (0.5 + s) / 4 for a 4-bit s per 32 (IQ2_XXS) or per 16 weights.
 * - IQ3_XXS, IQ3_S: 4 weights a point (values 4..62 in 256 points; 1..15 odd in 512), 8 sign
 *   bits per 8 weights; scale d (0.5 + s) / 2 (IQ3_XXS), d (1 + 2 s) (IQ3_S) per 32.
 * - IQ1_S, IQ1_M: 8 weights a point of a grid of 2048 with values -1, 0, 1, shifted by a delta
 *   of +-1/8 (per 32 weights in IQ1_S, per 8 in IQ1_M), scale d (2 s + 1) per 32 (IQ1_S) or 16
 *   (IQ1_M, whose fp16 d is spread over the top nibbles of its four 16-bit scale words). The
 *   codes are 8 (point + delta) = 8 point +- 1 and the scale d (2 s + 1) / 8: the same product,
 *   rounded once.
 * - TQ1_0 (five ternary digits a byte: digit p of byte b is (b 3^p mod 256) 3 >> 8) and TQ2_0
 *   (2-bit fields), codes 0..2 minus 1, one fp16 d a block.
 * - MXFP4 (32 a block): an e8m0 exponent (the scale 2^(e - 128), as ggml's "half" table) and
 *   16 bytes of 4-bit e2m1 codes doubled to integers (weight j: byte j low nibble, j + 16 high).
 * The grids are not written here: Python hands them over once (iq_tables.py: gguf-py's copy of
 * llama.cpp's tables) with ws_iq_set_tables; until then these types are not taken (-1/-2).
 */

enum {
    T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ3_XXS = 18, T_IQ1_S = 19, T_IQ3_S = 21, T_IQ2_S = 22, T_IQ1_M = 29,
    T_TQ1_0 = 34, T_TQ2_0 = 35, T_MXFP4 = 39
};

/* The grids in iq_tables.GRID_ORDER: IQ2_XXS 256 x 8, IQ2_XS 512 x 8, IQ2_S 1024 x 8, IQ3_XXS
 * 256 x 4, IQ3_S 512 x 4, IQ1_S (and IQ1_M) 2048 x 8. */
enum { G_IQ2_XXS = 0, G_IQ2_XS = 2048, G_IQ2_S = 6144, G_IQ3_XXS = 14336, G_IQ3_S = 15360, G_IQ1_S = 17408,
       G_BYTES = 33792 };
static int8_t iq_grid[G_BYTES];
/* Byte l of entry v is 0xff where weight l is negative, for the 7-bit sign index v. */
static uint64_t iq_sign_masks[128];
static int iq_ready;

/* The 8 sign bits of a 7-bit sign index (the eighth makes the count of set bits even). */
static uint32_t iq_ksigns(uint32_t v) { return v | (uint32_t)__builtin_parity(v) << 7; }

/* The grids, copied; 0, or -1 when n is not their size. Called once, before any matmul. */
int ws_iq_set_tables(const int8_t *grids, int64_t n) {
    if (n != G_BYTES) return -1;
    memcpy(iq_grid, grids, G_BYTES);
    for (uint32_t v = 0; v < 128; v++) {
        iq_sign_masks[v] = 0;
        for (int l = 0; l < 8; l++) iq_sign_masks[v] |= (uint64_t)(iq_ksigns(v) >> l & 1 ? 0xff : 0) << 8 * l;
    }
    iq_ready = 1;
    return 0;
}

/* MXFP4's scale for the e8m0 byte e: 2^(e - 128) (subnormal for e < 2), ggml's "half" value. */
static float e8m0_half(uint32_t e) {
    union { uint32_t u; float f; } v = {e < 2 ? 0x00200000u << e : (e - 1) << 23};
    return v.f;
}

/* The MXFP4 e2m1 values, doubled. */
static const int8_t MXFP4_LEVELS[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static int iq_type(int64_t type) {
    switch (type) {
    case T_IQ2_XXS: case T_IQ2_XS: case T_IQ2_S: case T_IQ3_XXS: case T_IQ3_S: case T_IQ1_S: case T_IQ1_M:
        return iq_ready;
    case T_TQ1_0: case T_TQ2_0: case T_MXFP4: return 1;
    default: return 0;
    }
}

static int64_t iq_block_bytes(int64_t type) {
    switch (type) {
    case T_IQ2_XXS: return 66;
    case T_IQ2_XS: return 74;
    case T_IQ2_S: return 82;
    case T_IQ3_XXS: return 98;
    case T_IQ3_S: return 110;
    case T_IQ1_S: return 50;
    case T_IQ1_M: return 56;
    case T_TQ1_0: return 54;
    case T_TQ2_0: return 66;
    case T_MXFP4: return 17;
    default: return 0;
    }
}

static uint32_t iq_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint32_t iq_u16(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }

/* 8 weights from grid point `at` (of `width` 8 or 4; two width-4 points when idx2 >= 0). */
static void iq_points(int8_t *g, int64_t base, int width, int idx, int idx2) {
    memcpy(g, iq_grid + base + (int64_t)width * idx, (size_t)width);
    if (width == 4) memcpy(g + 4, iq_grid + base + 4 * (int64_t)idx2, 4);
}

/* The IQ2 / IQ3 half of iq_sub_block: grid magnitudes g and the sign word. */
static uint32_t iq23_sub_block(int64_t type, const uint8_t *blk, int i, int8_t g[32], float s[2], float d) {
    uint32_t sign = 0;
    switch (type) {
    case T_IQ2_XXS: {
        const uint32_t a0 = iq_u32(blk + 2 + 8 * i), a1 = iq_u32(blk + 6 + 8 * i);
        s[0] = s[1] = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
        for (int l = 0; l < 4; l++)
            iq_points(g + 8 * l, G_IQ2_XXS, 8, a0 >> 8 * l & 255, -1), sign |= iq_ksigns(a1 >> 7 * l & 127) << 8 * l;
        break;
    }
    case T_IQ2_XS: case T_IQ2_S: {
        const int xs = type == T_IQ2_XS;
        const uint8_t sc = blk[xs ? 66 + i : 74 + i];
        s[0] = d * (0.5f + (float)(sc & 15)) * 0.25f, s[1] = d * (0.5f + (float)(sc >> 4)) * 0.25f;
        for (int l = 0; l < 4; l++) {
            if (xs) {
                const uint32_t q = iq_u16(blk + 2 + 8 * i + 2 * l);
                iq_points(g + 8 * l, G_IQ2_XS, 8, q & 511, -1), sign |= iq_ksigns(q >> 9) << 8 * l;
            } else {
                iq_points(g + 8 * l, G_IQ2_S, 8, blk[2 + 4 * i + l] | (blk[66 + i] >> 2 * l & 3) << 8, -1);
                sign |= (uint32_t)blk[34 + 4 * i + l] << 8 * l;
            }
        }
        break;
    }
    case T_IQ3_XXS: {
        const uint32_t aux = iq_u32(blk + 66 + 4 * i);
        const uint8_t *qs = blk + 2 + 8 * i;
        s[0] = s[1] = d * (0.5f + (float)(aux >> 28)) * 0.5f;
        for (int l = 0; l < 4; l++)
            iq_points(g + 8 * l, G_IQ3_XXS, 4, qs[2 * l], qs[2 * l + 1]), sign |= iq_ksigns(aux >> 7 * l & 127) << 8 * l;
        break;
    }
    case T_IQ3_S: {
        const uint8_t *qs = blk + 2 + 8 * i, qh = blk[66 + i];
        s[0] = s[1] = d * (float)(1 + 2 * (blk[106 + i / 2] >> 4 * (i % 2) & 15));
        for (int l = 0; l < 4; l++)
            iq_points(g + 8 * l, G_IQ3_S, 4, qs[2 * l] | (qh >> 2 * l & 1) << 8, qs[2 * l + 1] | (qh >> (2 * l + 1) & 1) << 8);
        sign = iq_u32(blk + 74 + 4 * i);
        break;
    }
    }
    return sign;
}

/* IQ1_S / IQ1_M: codes 8 point +- 1 (the delta's sign per 32 or 8 weights), scales / 8. */
static void iq1_sub_block(int64_t type, const uint8_t *blk, int i, int8_t g[32], float s[2]) {
    int8_t pts[8];
    if (type == T_IQ1_S) {
        const uint32_t qh = iq_u16(blk + 34 + 2 * i);
        const int delta = qh & 0x8000 ? -1 : 1;
        s[0] = s[1] = half_to_float(blk) * (float)(2 * (qh >> 12 & 7) + 1) * 0.125f;
        for (int l = 0; l < 4; l++) {
            iq_points(pts, G_IQ1_S, 8, blk[2 + 4 * i + l] | (qh >> 3 * l & 7) << 8, -1);
            for (int j = 0; j < 8; j++) g[8 * l + j] = (int8_t)(8 * pts[j] + delta);
        }
        return;
    }
    const uint32_t w0 = iq_u16(blk + 48), w1 = iq_u16(blk + 50), w2 = iq_u16(blk + 52), w3 = iq_u16(blk + 54);
    const uint32_t dbits = w0 >> 12 | (w1 >> 8 & 0xf0) | (w2 >> 4 & 0xf00) | (w3 & 0xf000);
    const uint8_t dh[2] = {(uint8_t)dbits, (uint8_t)(dbits >> 8)};
    const float d = half_to_float(dh);
    for (int h = 0; h < 2; h++) {
        const int t = 2 * i + h; /* the 3-bit scale of weights 16t.. */
        s[h] = d * (float)(2 * (int)(iq_u16(blk + 48 + 2 * (t / 4)) >> 3 * (t % 4) & 7) + 1) * 0.125f;
    }
    for (int l = 0; l < 4; l++) {
        const int grp = 4 * i + l, nib = blk[32 + grp / 2] >> 4 * (grp % 2) & 15;
        iq_points(pts, G_IQ1_S, 8, blk[grp] | (nib & 7) << 8, -1);
        for (int j = 0; j < 8; j++) g[8 * l + j] = (int8_t)(8 * pts[j] + (nib & 8 ? -1 : 1));
    }
}

/* TQ1_0's ternary digit p (0..4) of byte b, as a code -1..1. */
static int8_t tq1_digit(uint8_t b, int p) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    return (int8_t)((((uint32_t)(uint8_t)(b * pow3[p])) * 3 >> 8) - 1);
}

/* Sub-block i (weights 32i..32i + 31) of a block of these types: codes (or, with a non-zero
 * sign word returned, magnitudes whose weight l is negative where bit l is set) and the scales
 * of its two halves. */
static uint32_t iq_sub_block(int64_t type, const uint8_t *blk, int i, int8_t g[32], float s[2]) {
    switch (type) {
    case T_IQ1_S: case T_IQ1_M: iq1_sub_block(type, blk, i, g, s); return 0;
    case T_TQ1_0:
        s[0] = s[1] = half_to_float(blk + 52);
        for (int l = 0; l < 32; l++) {
            if (i < 5)
                g[l] = tq1_digit(blk[l], i);
            else if (i < 7 || l < 16)
                g[l] = tq1_digit(blk[32 + l % 16], 2 * (i - 5) + l / 16);
            else
                g[l] = tq1_digit(blk[48 + (l - 16) % 4], (l - 16) / 4);
        }
        return 0;
    case T_TQ2_0:
        s[0] = s[1] = half_to_float(blk + 64);
        for (int l = 0; l < 32; l++) g[l] = (int8_t)((blk[32 * (i / 4) + l] >> 2 * (i % 4) & 3) - 1);
        return 0;
    case T_MXFP4: {
        s[0] = s[1] = e8m0_half(blk[0]);
        for (int l = 0; l < 16; l++) g[l] = MXFP4_LEVELS[blk[1 + l] & 15], g[l + 16] = MXFP4_LEVELS[blk[1 + l] >> 4];
        return 0;
    }
    default: return iq23_sub_block(type, blk, i, g, s, half_to_float(blk));
    }
}
