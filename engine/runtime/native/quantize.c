/* Quantizing weights at load (engine/runtime/quant.py's formats, written straight into quant.h's layout): rows of a
 * float32 matrix -> int8 or int4 integers (stored offset: q + 128, q + 8) and a float16 scale per group of 32 columns. Plain C for the platform's
 * baseline (it runs once per load); rows are shared among the pool's threads.
 *
 * int8: s = f16(max|w| / 127), q = clip(rint(w * (1 / s)), -127, 127) (1 / s and the product in float32).
 * int4: for the group's value of largest magnitude m and each divisor d of INT4_DIVISORS, s = f16(m / d) (a scale
 * may be negative: d < 0 puts m at the grid's -8 end, as q4_0 does), q = clip(rint(w * (1 / s)), -8, 7); the
 * candidate with the least sum of (w - q s)^2 (in column order, in double) is kept, the first on ties (q4_0's
 * s = m / -8 comes first). q is always rounded against the stored float16 scale, so dequantizing is exactly s * q. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#define GROUP 32
#define ROWS 16

static const float INT4_DIVISORS[] = {-8.0f, -7.5f, -8.5f}; /* engine/runtime/quant.py says why */

/* float32 -> float16 bits, rounded to nearest even (subnormals included; >= 65520 -> inf). */
uint16_t tl_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* rounds to >= 65536: inf */
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal float16, round(v / 2^-24) (2^-14 itself is 1024) */
        float v;
        memcpy(&v, &ax, 4);
        return (uint16_t)(sign | (uint32_t)rintf(v * 16777216.0f));
    }
    uint32_t r = ax - ((127u - 15u) << 23);
    r += 0xFFFu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

/* float16 bits -> float32 (exact). */
float tl_f16_to_f32(uint16_t h)
{
    const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    float v;
    if (e == 0) {
        v = (float)m * 5.9604644775390625e-8f;
    } else if (e == 31) {
        v = m ? NAN : INFINITY;
    } else {
        uint32_t b = ((e + 112u) << 23) | (m << 13);
        memcpy(&v, &b, 4);
    }
    return (h & 0x8000u) ? -v : v;
}

/* q[k] = clip(rint(w[k] * (1 / s)), lo, hi) for a group; returns the sum of (w - q s)^2 in column order, in double
 * (each difference and square is exact there, so fused or separate multiply-adds give the same sum). The first loop
 * vectorises: a multiply, a clamp to +-256 (which clips the same) and rounding to the nearest even integer by adding
 * and subtracting 1.5 * 2^23 (exact in float32 below 2^22; no libm call). */
static double round_group(const float *w, float s, int lo, int hi, int8_t *q)
{
    const float inv = s != 0.0f ? 1.0f / s : 0.0f, flo = (float)lo, fhi = (float)hi;
    float t[GROUP];
    for (int k = 0; k < GROUP; k++) {
        float v = w[k] * inv;
        v = v < -256.0f ? -256.0f : v > 256.0f ? 256.0f : v;
        v = (v + 12582912.0f) - 12582912.0f;
        t[k] = v < flo ? flo : v > fhi ? fhi : v;
    }
    double err = 0.0;
    for (int k = 0; k < GROUP; k++) {
        q[k] = (int8_t)t[k];
        const double d = (double)w[k] - (double)t[k] * (double)s;
        err += d * d;
    }
    return err;
}

/* One group: its integers into q and its float16 scale (see the top). */
static uint16_t quantize_group(const float *w, int kind, int8_t *q)
{
    float amax = 0.0f, m = 0.0f;
    for (int k = 0; k < GROUP; k++)
        if (fabsf(w[k]) > amax) { /* the first of largest magnitude, as NumPy's argmax */
            amax = fabsf(w[k]);
            m = w[k];
        }
    if (kind == W_Q8) {
        const uint16_t s16 = tl_f32_to_f16(amax / 127.0f);
        round_group(w, tl_f16_to_f32(s16), -127, 127, q);
        return s16;
    }
    uint16_t best = 0;
    double best_err = INFINITY;
    int8_t trial[GROUP];
    uint16_t tried[sizeof INT4_DIVISORS / sizeof INT4_DIVISORS[0]];
    for (size_t i = 0; i < sizeof INT4_DIVISORS / sizeof INT4_DIVISORS[0]; i++) {
        uint16_t s16 = tl_f32_to_f16(m / INT4_DIVISORS[i]);
        if (s16 == 0x8000u) s16 = 0; /* -0: 0 */
        tried[i] = s16;
        int seen = 0; /* a scale already tried gives the same error: not better */
        for (size_t e = 0; e < i; e++) seen |= tried[e] == s16;
        if (seen) continue;
        const double err = round_group(w, tl_f16_to_f32(s16), -8, 7, trial);
        if (err < best_err) {
            best_err = err;
            best = s16;
            memcpy(q, trial, GROUP);
        }
    }
    if (best_err == INFINITY) { /* not reached: every candidate's error is finite */
        memset(q, 0, GROUP);
        best = 0;
    }
    return best;
}

typedef struct {
    const float *w;
    ptrdiff_t ldw, n, K, row0, G, rows;
    int kind;
    char *data;
    uint16_t *scales;
} quant_job;

static void quantize_rows(void *arg, ptrdiff_t t)
{
    const quant_job *j = (const quant_job *)arg;
    const ptrdiff_t end = (t + 1) * j->rows < j->n ? (t + 1) * j->rows : j->n;
    for (ptrdiff_t i = t * j->rows; i < end; i++) {
        const ptrdiff_t row = j->row0 + i, b = row / ROWS, r = row % ROWS;
        for (ptrdiff_t g = 0; g < j->G; g++) {
            float w[GROUP];
            int8_t q[GROUP];
            const ptrdiff_t k0 = g * GROUP, n = j->K - k0 < GROUP ? j->K - k0 : GROUP;
            memcpy(w, j->w + i * j->ldw + k0, (size_t)n * sizeof(float));
            for (ptrdiff_t k = n; k < GROUP; k++) w[k] = 0.0f;
            j->scales[(b * j->G + g) * ROWS + r] = quantize_group(w, j->kind, q);
            uint8_t *dst = (uint8_t *)j->data + (b * j->G + g) * (j->kind == W_Q8 ? 512 : 256) + 4 * r;
            if (j->kind == W_Q8) { /* [p, r, e] = q[4 p + e] + 128 */
                for (int k = 0; k < GROUP; k++) dst[(k / 4) * 64 + k % 4] = (uint8_t)(q[k] + 128);
            } else { /* [c, r, e] = (q[8 c + e] + 8) | (q[8 c + 4 + e] + 8) << 4 */
                for (int c = 0; c < 4; c++)
                    for (int e = 0; e < 4; e++)
                        dst[c * 64 + e] = (uint8_t)((q[8 * c + e] + 8) | (q[8 * c + 4 + e] + 8) << 4);
            }
        }
    }
}

/* Rows row0..row0+n of a quantized matrix (kind W_Q8 | W_Q4, G groups, quant.h's layout in data and scales) from
 * the float32 rows w (n, K) at row stride ldw. */
void tl_quantize(int kind, const float *w, ptrdiff_t ldw, ptrdiff_t n, ptrdiff_t K, ptrdiff_t row0, void *data,
                 uint16_t *scales, ptrdiff_t G, int threads)
{
    if (n <= 0) return;
    ptrdiff_t rows = (n + 8 * threads - 1) / (8 * threads);
    quant_job job = {w, ldw, n, K, row0, G, rows, kind, (char *)data, scales};
    tl_parallel(quantize_rows, &job, (n + rows - 1) / rows, threads);
}

/* ---- GGUF Q8_0 / Q4_0 rows repacked into the same layout (engine/runtime/ggml_formats.py), bytes moved, no
 * arithmetic: the file's float16 d is the scale, bit for bit, and its integers are ours offset to unsigned.
 * Q8_0 block (34 bytes): d, then 32 int8 q (column k at 2 + k): u = q + 128.
 * Q4_0 block (18 bytes): d, then 16 bytes: column k < 16 in byte k's low nibble, k >= 16 in byte k - 16's high
 * nibble, each u = q + 8 already (value d * (u - 8)). Our byte [c, r, e] holds column 8 c + e low and 8 c + 4 + e
 * high. Rows are shared among the pool's threads; NumPy's repack (ggml_formats._QuantFormat) writes the same bytes. */
typedef struct {
    const uint8_t *src;
    ptrdiff_t lds, n, row0, G, rows;
    int kind;
    uint8_t *data;
    uint16_t *scales;
} repack_job;

static void repack_rows(void *arg, ptrdiff_t t)
{
    const repack_job *j = (const repack_job *)arg;
    const ptrdiff_t end = (t + 1) * j->rows < j->n ? (t + 1) * j->rows : j->n;
    const ptrdiff_t block_bytes = j->kind == W_Q8 ? 34 : 18;
    for (ptrdiff_t i = t * j->rows; i < end; i++) {
        const ptrdiff_t row = j->row0 + i, b = row / ROWS, r = row % ROWS;
        const uint8_t *blk = j->src + i * j->lds;
        for (ptrdiff_t g = 0; g < j->G; g++, blk += block_bytes) {
            uint16_t d;
            memcpy(&d, blk, 2); /* little-endian file, little-endian host (the library builds for x86-64 / arm64) */
            j->scales[(b * j->G + g) * ROWS + r] = d;
            uint8_t *dst = j->data + (b * j->G + g) * (j->kind == W_Q8 ? 512 : 256) + 4 * r;
            const uint8_t *qs = blk + 2;
            if (j->kind == W_Q8) { /* [p, r, e] = q[4 p + e] + 128 */
                for (int p = 0; p < 8; p++)
                    for (int e = 0; e < 4; e++) dst[p * 64 + e] = (uint8_t)(qs[4 * p + e] ^ 0x80u);
            } else {
                uint8_t u[GROUP];
                for (int k = 0; k < 16; k++) {
                    u[k] = qs[k] & 0x0Fu;
                    u[k + 16] = qs[k] >> 4;
                }
                for (int c = 0; c < 4; c++)
                    for (int e = 0; e < 4; e++) dst[c * 64 + e] = (uint8_t)(u[8 * c + e] | u[8 * c + 4 + e] << 4);
            }
        }
    }
}

/* Rows row0..row0+n of a quantized matrix (kind W_Q8 from Q8_0, W_Q4 from Q4_0; G groups, quant.h's layout in data
 * and scales) from n rows of the file's blocks at src, lds bytes apart (G blocks each). */
void tl_repack_ggml(int kind, const void *src, ptrdiff_t lds, ptrdiff_t n, ptrdiff_t row0, void *data,
                    uint16_t *scales, ptrdiff_t G, int threads)
{
    if (n <= 0) return;
    ptrdiff_t rows = (n + 8 * threads - 1) / (8 * threads);
    repack_job job = {(const uint8_t *)src, lds, n, row0, G, rows, kind, (uint8_t *)data, scales};
    tl_parallel(repack_rows, &job, (n + rows - 1) / rows, n * G > 4096 ? threads : 1);
}
