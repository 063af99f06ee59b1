/* A standalone check of the kernels against double-precision references, for platforms where the Python tests
 * cannot run (an aarch64 build under qemu-user, cross-compiled on x86-64): every variant this CPU runs, every weight
 * type (int8 and int4 included), tile shapes and remainders, batch invariance, and attention. Prints one line per
 * variant; exit status 1 on any failure.
 *
 *     cc -O2 -pthread -o selftest selftest.c api.c pool.c quantize.c variant_*.c -lm && ./selftest */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

int tl_isa_usable(int isa);
void tl_matmul(int isa, const float *x, ptrdiff_t ldx, const void *w, ptrdiff_t ldw, int wtype, float *out,
               ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads);
void tl_attention(int isa, const float *q, ptrdiff_t ldq, ptrdiff_t T, ptrdiff_t n_heads, ptrdiff_t head_dim,
                  const float *k, const float *v, ptrdiff_t ldh, ptrdiff_t ldp, ptrdiff_t n_kv_heads, ptrdiff_t start,
                  float scale, float *out, ptrdiff_t ldo, float *probs, int threads);

static const char *names[ISA_COUNT] = {"avx512", "avx2", "portable"};
static uint64_t state = 88172645463325252ull;

static double uniform(void) /* xorshift64: the same inputs on every platform */
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static uint16_t to_bf16(float f)
{
    uint32_t b;
    memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

static double bf16_value(uint16_t h)
{
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static uint16_t to_f16(float f) /* round to nearest, for normal and subnormal fp16 values; the inputs are small */
{
    double a = fabs(f);
    uint16_t sign = f < 0 ? 0x8000 : 0;
    if (a < 6.103515625e-05) return sign | (uint16_t)lrint(a / 5.960464477539063e-08); /* subnormal: 2^-24 units */
    int e;
    double m = frexp(a, &e); /* a = m 2^e, m in [0.5, 1) */
    long mant = lrint((m * 2.0 - 1.0) * 1024.0);
    if (mant == 1024) { mant = 0; e++; }
    return sign | (uint16_t)((e - 1 + 15) << 10) | (uint16_t)mant;
}

static double f16_value(uint16_t h) /* the definition: sign, 5-bit exponent, 10-bit mantissa */
{
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return h & 0x8000 ? -v : v;
}

static int check_matmul(int isa, int wtype, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    float *x = malloc(sizeof(float) * M * K), *out = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N);
    void *w = malloc((size_t)(N * K * (wtype == W_F32 ? 4 : 2)));
    double *wv = malloc(sizeof(double) * N * K);
    for (ptrdiff_t i = 0; i < M * K; i++) x[i] = (float)uniform();
    for (ptrdiff_t i = 0; i < N * K; i++) {
        float f = (float)uniform();
        if (wtype == W_F32) { ((float *)w)[i] = f; wv[i] = f; }
        if (wtype == W_BF16) { ((uint16_t *)w)[i] = to_bf16(f); wv[i] = bf16_value(((uint16_t *)w)[i]); }
        if (wtype == W_F16) { ((uint16_t *)w)[i] = to_f16(f); wv[i] = f16_value(((uint16_t *)w)[i]); }
    }
    tl_matmul(isa, x, K, w, K, wtype, out, N, M, N, K, 2);
    double worst = 0;
    for (ptrdiff_t i = 0; i < M; i++)
        for (ptrdiff_t j = 0; j < N; j++) {
            double ref = 0;
            for (ptrdiff_t k = 0; k < K; k++) ref += (double)x[i * K + k] * wv[j * K + k];
            double err = fabs(out[i * N + j] - ref) / (fabs(ref) > 1 ? fabs(ref) : 1);
            worst = err > worst ? err : worst;
        }
    int ok = worst <= 2e-6 * sqrt((double)K);
    tl_matmul(isa, x + (M - 1) * K, K, w, K, wtype, one, N, 1, N, K, 2); /* the last row alone: the same bits */
    if (memcmp(one, out + (M - 1) * N, sizeof(float) * N) != 0) ok = 0;
    if (!ok) printf("  FAIL matmul %s wtype %d M=%td N=%td K=%td: relative error %.2e\n", names[isa], wtype, M, N, K,
                    worst);
    free(x); free(out); free(one); free(w); free(wv);
    return ok;
}

void tl_qmatmul(int isa, const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads);
void tl_quantize(int kind, const float *w, ptrdiff_t ldw, ptrdiff_t n, ptrdiff_t K, ptrdiff_t row0, void *data,
                 uint16_t *scales, ptrdiff_t G, int threads);

/* Quantized weights (quant.h, quantize.c): the integers and scales read back by the layout's definition
 * (engine/runtime/quant.py), the quantizer's grid checked (int8: every weight within half a step), and the product
 * against float64 within the bound of the format: int16 activations (half a step of max|x_g| / 32767 each), exact
 * integer group sums, G float32 group terms. The last row alone gives the same bits. */
static int check_qmatmul(int isa, int kind, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    const ptrdiff_t G = (K + 31) / 32, blocks = (N + 15) / 16, bytes = kind == W_Q8 ? 512 : 256;
    float *x = malloc(sizeof(float) * M * K), *w = malloc(sizeof(float) * N * K);
    float *out = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N);
    char *data = calloc((size_t)(blocks * G * bytes), 1);
    uint16_t *scales = calloc((size_t)(blocks * G * 16), 2);
    double *wq = malloc(sizeof(double) * N * K);
    for (ptrdiff_t i = 0; i < M * K; i++) x[i] = (float)uniform();
    for (ptrdiff_t i = 0; i < N * K; i++) w[i] = (float)(0.05 * uniform());
    tl_quantize(kind, w, K, N, K, 0, data, scales, G, 2);
    int ok = 1;
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t k = 0; k < K; k++) {
            const ptrdiff_t b = n / 16, r = n % 16, g = k / 32, c = k % 32, p = c / 2, t = c % 2;
            const double sc = f16_value(scales[(b * G + g) * 16 + r]);
            int q;
            if (kind == W_Q8) {
                q = ((const int8_t *)data)[(b * G + g) * 512 + p * 32 + 2 * r + t];
            } else {
                const uint16_t word = ((const uint16_t *)data)[(b * G + g) * 128 + (p / 4) * 32 + 2 * r + t];
                q = (int)((word >> (4 * (p % 4))) & 15) - 8;
            }
            wq[n * K + k] = sc * q;
            if (kind == W_Q8 && fabs(w[n * K + k] - wq[n * K + k]) > fabs(sc) * (0.5 + 1e-6)) ok = 0;
            if (kind == W_Q4 && (q < -8 || q > 7)) ok = 0;
        }
    tl_qmatmul(isa, x, K, data, scales, kind, out, N, M, N, K, 2);
    double worst = 0;
    for (ptrdiff_t i = 0; i < M; i++)
        for (ptrdiff_t j = 0; j < N; j++) {
            double ref = 0, mag = 0, rounding = 0;
            for (ptrdiff_t g = 0; g < G; g++) {
                double amax = 0, wsum = 0;
                for (ptrdiff_t k = g * 32; k < K && k < g * 32 + 32; k++) {
                    amax = fabs(x[i * K + k]) > amax ? fabs(x[i * K + k]) : amax;
                    wsum += fabs(wq[j * K + k]);
                    ref += (double)x[i * K + k] * wq[j * K + k];
                    mag += fabs((double)x[i * K + k] * wq[j * K + k]);
                }
                rounding += amax / 32767 * (0.5 + 1.0 / 1024) * wsum;
            }
            const double err = fabs(out[i * N + j] - ref), bound = rounding + (double)(G + 4) * ldexp(1, -23) * mag;
            worst = err / bound > worst ? err / bound : worst;
        }
    ok &= worst <= 1.0;
    tl_qmatmul(isa, x + (M - 1) * K, K, data, scales, kind, one, N, 1, N, K, 2);
    if (memcmp(one, out + (M - 1) * N, sizeof(float) * N) != 0) ok = 0;
    if (!ok) printf("  FAIL qmatmul %s kind %d M=%td N=%td K=%td: error / bound %.2f\n", names[isa], kind, M, N, K,
                    worst);
    free(x); free(w); free(out); free(one); free(data); free(scales); free(wq);
    return ok;
}

static int check_attention(int isa, ptrdiff_t T, ptrdiff_t H, ptrdiff_t Hkv, ptrdiff_t D, ptrdiff_t start)
{
    ptrdiff_t L = start + T, cap = L + 3;
    float *q = malloc(sizeof(float) * T * H * D), *out = malloc(sizeof(float) * T * H * D);
    float *k = malloc(sizeof(float) * Hkv * cap * D), *v = malloc(sizeof(float) * Hkv * cap * D);
    for (ptrdiff_t i = 0; i < T * H * D; i++) q[i] = (float)(3 * uniform());
    for (ptrdiff_t i = 0; i < Hkv * cap * D; i++) { k[i] = (float)uniform(); v[i] = (float)uniform(); }
    float *probs = malloc(sizeof(float) * H * T * L);
    tl_attention(isa, q, H * D, T, H, D, k, v, cap * D, D, Hkv, start, (float)(1.0 / sqrt((double)D)), out, H * D,
                 probs, 2);
    double worst = 0, *s = malloc(sizeof(double) * L);
    for (ptrdiff_t t = 0; t < T; t++)
        for (ptrdiff_t h = 0; h < H; h++) {
            const float *kh = k + (h / (H / Hkv)) * cap * D, *vh = v + (h / (H / Hkv)) * cap * D;
            double mx = -INFINITY, sum = 0;
            for (ptrdiff_t j = 0; j <= start + t; j++) {
                s[j] = 0;
                for (ptrdiff_t d = 0; d < D; d++) s[j] += (double)q[(t * H + h) * D + d] * kh[j * D + d];
                s[j] /= sqrt((double)D);
                mx = s[j] > mx ? s[j] : mx;
            }
            for (ptrdiff_t j = 0; j <= start + t; j++) sum += (s[j] = exp(s[j] - mx));
            for (ptrdiff_t j = 0; j < L; j++) { /* the probabilities a trace records, zeros above the diagonal */
                double ref = j <= start + t ? s[j] / sum : 0.0, got = probs[(h * T + t) * L + j];
                if (j > start + t ? got != 0.0f : fabs(got - ref) > 1e-6) worst = 1.0;
            }
            for (ptrdiff_t d = 0; d < D; d++) {
                double ref = 0;
                for (ptrdiff_t j = 0; j <= start + t; j++) ref += s[j] / sum * vh[j * D + d];
                double err = fabs(out[(t * H + h) * D + d] - ref);
                worst = err > worst ? err : worst;
            }
        }
    int ok = worst <= 8 * sqrt((double)L) * 5.96e-8;
    if (!ok) printf("  FAIL attention %s T=%td H=%td Hkv=%td D=%td start=%td: error %.2e\n", names[isa], T, H, Hkv,
                    D, start, worst);
    free(q); free(out); free(k); free(v); free(s); free(probs);
    return ok;
}

int main(void)
{
    static const ptrdiff_t shapes[][3] = {{1, 1, 16}, {3, 7, 15}, {5, 25, 17}, {4, 97, 100}, {9, 300, 1024},
                                          {1, 61, 700}, {17, 64, 256}, {70, 33, 65}};
    static const ptrdiff_t att[][5] = {{1, 8, 2, 64, 0}, {1, 8, 2, 64, 300}, {3, 4, 4, 16, 10}, {40, 6, 3, 24, 17},
                                       {70, 4, 1, 36, 0}};
    int failed = 0, ran = 0;
    for (int isa = 0; isa < ISA_COUNT; isa++) {
        if (!tl_isa_usable(isa)) continue;
        int ok = 1, n = 0;
        for (int wtype = W_F32; wtype <= W_F16; wtype++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++, n++)
                ok &= check_matmul(isa, wtype, shapes[s][0], shapes[s][1], shapes[s][2]);
        for (int kind = W_Q8; kind <= W_Q4; kind++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++, n++)
                ok &= check_qmatmul(isa, kind, shapes[s][0], shapes[s][1], shapes[s][2]);
        for (size_t s = 0; s < sizeof att / sizeof att[0]; s++, n++)
            ok &= check_attention(isa, att[s][0], att[s][1], att[s][2], att[s][3], att[s][4]);
        printf("%s: %d checks %s\n", names[isa], n, ok ? "passed" : "FAILED");
        failed |= !ok;
        ran++;
    }
    return failed || !ran;
}
