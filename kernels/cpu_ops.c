/* The CPU decode step's small ops in C: RMSNorm, SwiGLU's silu(gate) * up, rotary + KV-cache store, and paged
 * decode attention. Built by kernels/cpu_ops.py (once per machine, into a user cache folder) and called through
 * ctypes on raw pointers; the shapes, strides and dtypes are checked there, not here.
 *
 * Why: a batch-1 decode step of a small model is ~40 tiny tensor ops per layer, each a few microseconds of Python and
 * dispatcher time on a CPU (SmolLM2: 30 layers, ~8 ms a token, as long as the matmuls). These functions do each op's
 * arithmetic in one call. Numerics follow the PyTorch twins (HF's formulas): fp32 arithmetic, and for bf16 the same
 * roundings to bf16 at the same points, so results match the twins up to summation order.
 *
 * Compiled twice, with and without -DACT_BF16: activations are `act_t` (float or bf16 bits), function names end in
 * _f32 or _bf16. KV caches are act_t, or uint8 codes with an fp16 (scale, zero) per (token, head) (kernels/kv_int8.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#ifdef ACT_BF16
typedef uint16_t act_t;
#define FN(name) name##_bf16
#else
typedef float act_t;
#define FN(name) name##_f32
#endif

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xffu) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = 1u << (shift - 1), rest = man & ((1u << shift) - 1);
        uint32_t out = man >> shift;
        if (rest > half || (rest == half && (out & 1u))) out++;
        return (uint16_t)(sign | out);
    }
    uint32_t out = sign | ((uint32_t)exp << 10) | (man >> 13), rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) out++;
    return (uint16_t)out;
}

#ifdef ACT_BF16
static inline float load(const act_t *p) { return bf16_to_f32(*p); }
static inline void store(act_t *p, float v) { *p = f32_to_bf16(v); }
static inline float rnd(float v) { return bf16_to_f32(f32_to_bf16(v)); }
#else
static inline float load(const act_t *p) { return *p; }
static inline void store(act_t *p, float v) { *p = v; }
static inline float rnd(float v) { return v; }
#endif

/* exp(x), |x| < 88: 2^(x log2 e) split into 2^i * 2^f, 2^f by a degree-6 polynomial on [0, 1); relative error
 * < 2e-7 (expf's is < 1e-7), and unlike a call to expf it vectorizes. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.4426950409f;
    float fi = floorf(t), f = t - fi;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)fi + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* y = w * round(x * rsqrt(mean(x^2) + eps)), row by row (HF LlamaRMSNorm). */
void FN(rms_norm)(const act_t *x, int64_t stride_x, const act_t *w, act_t *y, int64_t rows, int64_t H, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const act_t *xr = x + r * stride_x;
        act_t *yr = y + r * H;
        float ss = 0.0f;
        for (int64_t i = 0; i < H; i++) {
            float v = load(xr + i);
            ss += v * v;
        }
        float rstd = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) store(yr + i, rnd(load(xr + i) * rstd) * load(w + i));
    }
}

/* y = round(silu(gate)) * up over a packed (gate | up) row (HF `act_fn(gate) * up`). */
void FN(silu_mul)(const act_t *x, int64_t stride_x, act_t *y, int64_t rows, int64_t I) {
    for (int64_t r = 0; r < rows; r++) {
        const act_t *g = x + r * stride_x, *u = g + I;
        act_t *yr = y + r * I;
        for (int64_t i = 0; i < I; i++) {
            float gv = load(g + i);
            store(yr + i, rnd(gv / (1.0f + exp_fast(-gv))) * load(u + i));
        }
    }
}

/* One head's D values rotated in place (NeoX layout): x1*c - x2*s | x2*c + x1*s, each product rounded. */
static void rotate(act_t *x, const float *cos_sin, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float c = rnd(cos_sin[i]), s = rnd(cos_sin[half + i]);
        float x1 = load(x + i), x2 = load(x + half + i);
        store(x + i, rnd(x1 * c) - rnd(x2 * s));
        store(x + half + i, rnd(x2 * c) + rnd(x1 * s));
    }
}

/* A row of D values as uint8 codes and fp16 (scale, zero): kernels/kv_int8.py's quantize_kv. */
static void quantize_row(const float *x, int64_t D, uint8_t *codes, uint16_t *scale_zero) {
    float lo = x[0], hi = x[0];
    for (int64_t i = 1; i < D; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    uint16_t s16 = f32_to_f16((hi - lo) / 255.0f), z16 = f32_to_f16(lo);
    float s = f16_to_f32(s16), z = f16_to_f32(z16), div = s > 0.0f ? s : 1.0f;
    for (int64_t i = 0; i < D; i++) {
        float q = floorf((x[i] - z) / div + 0.5f);
        codes[i] = (uint8_t)(q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q));
    }
    scale_zero[0] = s16;
    scale_zero[1] = z16;
}

/* Rotate q in place and k on its way into the cache, copy v; slot < 0: a padding row, nothing stored.
 * Caches (slots, Hk, D) dense per slot; with scale_zero (int8) the rows are quantized. k is left as it was. */
void FN(rope_store_kv)(act_t *q, int64_t sqt, int64_t sqh, const act_t *k, int64_t skt, int64_t skh,
                       const act_t *v, int64_t svt, int64_t svh, const int64_t *positions, const float *cos_sin,
                       int64_t stride_cs, void *k_cache, void *v_cache, uint16_t *k_sz, uint16_t *v_sz,
                       const int64_t *slots, int64_t T, int64_t Hq, int64_t Hk, int64_t D) {
    int64_t half = D / 2;
    act_t *row = malloc(sizeof(act_t) * D);
    float *rowf = malloc(sizeof(float) * D);
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_sin + positions[t] * stride_cs;
        for (int64_t h = 0; h < Hq; h++) rotate(q + t * sqt + h * sqh, cs, half);
        int64_t slot = slots[t];
        if (slot < 0) continue;
        for (int64_t h = 0; h < Hk; h++) {
            int64_t at = (slot * Hk + h) * D;
            memcpy(row, k + t * skt + h * skh, sizeof(act_t) * D);
            rotate(row, cs, half);
            const act_t *vr = v + t * svt + h * svh;
            if (k_sz) {
                for (int64_t i = 0; i < D; i++) rowf[i] = load(row + i);
                quantize_row(rowf, D, (uint8_t *)k_cache + at, k_sz + 2 * (slot * Hk + h));
                for (int64_t i = 0; i < D; i++) rowf[i] = load(vr + i);
                quantize_row(rowf, D, (uint8_t *)v_cache + at, v_sz + 2 * (slot * Hk + h));
            } else {
                memcpy((act_t *)k_cache + at, row, sizeof(act_t) * D);
                memcpy((act_t *)v_cache + at, vr, sizeof(act_t) * D);
            }
        }
    }
    free(row);
    free(rowf);
}

/* One key or value row in fp32: act_t as stored, or int8 codes dequantized and rounded to act_t (as the twin). */
static inline void kv_row(const void *cache, const uint16_t *sz, int64_t at, int64_t sz_at, int64_t D,
                          float *restrict out) {
    if (sz) {
        const uint8_t *c = (const uint8_t *)cache + at;
        float s = f16_to_f32(sz[sz_at]), z = f16_to_f32(sz[sz_at + 1]);
        for (int64_t i = 0; i < D; i++) out[i] = rnd((float)c[i] * s + z);
    } else {
        const act_t *c = (const act_t *)cache + at;
        for (int64_t i = 0; i < D; i++) out[i] = load(c + i);
    }
}

static inline float dot(const float *restrict a, const float *restrict b, int64_t D) {
    float s = 0.0f;
    for (int64_t i = 0; i < D; i++) s += a[i] * b[i];
    return s;
}

/* out[b] = softmax(q[b] K^T * scale) V over sequence b's seq_lens[b] keys, read through its block table; each KV
 * head serves its Hq / Hk query heads. A row with no keys (padding) gets zeros. Caches (blocks, page, Hk, D). */
void FN(paged_decode)(const act_t *q, int64_t sqb, int64_t sqh, const void *k_cache, const void *v_cache,
                      const uint16_t *k_sz, const uint16_t *v_sz, int64_t stride_block, const int32_t *block_tables,
                      int64_t stride_bt, const int32_t *seq_lens, act_t *out, int64_t B, int64_t Hq, int64_t Hk,
                      int64_t D, int64_t page, float scale) {
    int64_t group = Hq / Hk, max_n = 0;
    for (int64_t b = 0; b < B; b++) max_n = seq_lens[b] > max_n ? seq_lens[b] : max_n;
    float *scores = malloc(sizeof(float) * (size_t)(group * (max_n > 0 ? max_n : 1)));
    float *acc = malloc(sizeof(float) * (size_t)(group * D));
    float *qf = malloc(sizeof(float) * (size_t)(group * D));
    float *kv = malloc(sizeof(float) * (size_t)D);
    for (int64_t b = 0; b < B; b++) {
        int64_t n = seq_lens[b];
        const int32_t *table = block_tables + b * stride_bt;
        for (int64_t hk = 0; hk < Hk; hk++) {
            for (int64_t g = 0; g < group; g++)  /* the scale folded into q, as SDPA does */
                for (int64_t i = 0; i < D; i++) qf[g * D + i] = load(q + b * sqb + (hk * group + g) * sqh + i) * scale;
            for (int64_t j = 0; j < n; j++) { /* scores, one key row at a time for all the group's heads */
                int64_t block = table[j / page], slot = block * page + j % page;
                kv_row(k_cache, k_sz, block * stride_block + ((j % page) * Hk + hk) * D, 2 * (slot * Hk + hk), D, kv);
                for (int64_t g = 0; g < group; g++) scores[g * n + j] = dot(qf + g * D, kv, D);
            }
            for (int64_t g = 0; g < group; g++) { /* softmax */
                float *s = scores + g * n, m = -INFINITY, l = 0.0f;
                for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
                for (int64_t j = 0; j < n; j++) {
                    s[j] = exp_fast(s[j] - m);
                    l += s[j];
                }
                float inv = l > 0.0f ? 1.0f / l : 0.0f;
                for (int64_t j = 0; j < n; j++) s[j] *= inv;
            }
            memset(acc, 0, sizeof(float) * (size_t)(group * D));
            for (int64_t j = 0; j < n; j++) {
                int64_t block = table[j / page], slot = block * page + j % page;
                kv_row(v_cache, v_sz, block * stride_block + ((j % page) * Hk + hk) * D, 2 * (slot * Hk + hk), D, kv);
                for (int64_t g = 0; g < group; g++) {
                    float p = scores[g * n + j], *restrict a = acc + g * D;
                    for (int64_t i = 0; i < D; i++) a[i] += p * kv[i];
                }
            }
            for (int64_t g = 0; g < group; g++)
                for (int64_t i = 0; i < D; i++) store(out + (b * Hq + hk * group + g) * D + i, acc[g * D + i]);
        }
    }
    free(scores);
    free(acc);
    free(qf);
    free(kv);
}

/* kernels/cpu_qgemv.c: y = [residual +] x W^T for a tiled 4- or 8-bit weight, int8 activations. */
void qgemv(const void *x, int64_t stride_x, int64_t bf16, int64_t M, const uint8_t *tiles, const uint16_t *dm,
           int64_t bits, int64_t N, int64_t K, void *y, const void *residual, int64_t threads);

/* One Llama decoder layer's weights for `decode_layers`: norms (act_t), the four projections as qgemv tiles (qkv,
 * o, gate_up, down) and the layer's KV cache (k_sz, v_sz: an int8 cache's fp16 scales and zeros, else NULL). */
typedef struct {
    const act_t *norm1, *norm2;
    const uint8_t *tiles[4];
    const uint16_t *dm[4];
    int64_t bits[4];
    void *k_cache, *v_cache;
    uint16_t *k_sz, *v_sz;
} layer_t;

/* A decode step's L layers over the residual stream h (M, H), in place: per layer the chain the model runs op by op
 * (engine/models/decoder.py) -- norm, qkv, rotary + KV store, paged attention, o + residual, norm, gate_up, SwiGLU,
 * down + residual -- with the same functions, so the result is that chain's, without ~10 Python calls a layer. */
void FN(decode_layers)(act_t *h, int64_t M, const layer_t *layers, int64_t L, int64_t H, int64_t I, int64_t Hq,
                       int64_t Hk, int64_t D, float eps, const int64_t *positions, const float *cos_sin,
                       int64_t stride_cs, const int64_t *slots, const int32_t *block_tables, int64_t stride_bt,
                       const int32_t *seq_lens, int64_t stride_block, int64_t page, float scale, int64_t threads) {
    int64_t Q = Hq * D, Nqkv = Q + 2 * Hk * D, bf16 = sizeof(act_t) == 2;
    act_t *x = malloc(sizeof(act_t) * (size_t)(M * H)), *qkv = malloc(sizeof(act_t) * (size_t)(M * Nqkv));
    act_t *att = malloc(sizeof(act_t) * (size_t)(M * Q)), *gu = malloc(sizeof(act_t) * (size_t)(M * 2 * I));
    act_t *act = malloc(sizeof(act_t) * (size_t)(M * I));
    for (int64_t l = 0; l < L; l++) {
        const layer_t *w = layers + l;
        FN(rms_norm)(h, H, w->norm1, x, M, H, eps);
        qgemv(x, H, bf16, M, w->tiles[0], w->dm[0], w->bits[0], Nqkv, H, qkv, NULL, threads);
        FN(rope_store_kv)(qkv, Nqkv, D, qkv + Q, Nqkv, D, qkv + Q + Hk * D, Nqkv, D, positions, cos_sin, stride_cs,
                          w->k_cache, w->v_cache, w->k_sz, w->v_sz, slots, M, Hq, Hk, D);
        FN(paged_decode)(qkv, Nqkv, D, w->k_cache, w->v_cache, w->k_sz, w->v_sz, stride_block, block_tables,
                         stride_bt, seq_lens, att, M, Hq, Hk, D, page, scale);
        qgemv(att, Q, bf16, M, w->tiles[1], w->dm[1], w->bits[1], H, Q, h, h, threads);
        FN(rms_norm)(h, H, w->norm2, x, M, H, eps);
        qgemv(x, H, bf16, M, w->tiles[2], w->dm[2], w->bits[2], 2 * I, H, gu, NULL, threads);
        FN(silu_mul)(gu, 2 * I, act, M, I);
        qgemv(act, I, bf16, M, w->tiles[3], w->dm[3], w->bits[3], H, I, h, h, threads);
    }
    free(x);
    free(qkv);
    free(att);
    free(gu);
    free(act);
}
