/* A standalone check of every kernel the library exports (api.c) against double-precision references, for any
 * target, including those where the Python tests cannot run (an aarch64 build under qemu-user, cross-compiled on
 * x86-64): matmul (every weight type, tile shapes and remainders, batch invariance), widening (exact, special values),
 * SwiGLU, RMSNorm (with and without the residual add), the rotary embedding, attention (one sequence, with the
 * probabilities a trace records), the attention of many sequences (their keys and values stored), and the one-call
 * decoder layers (a two-layer stack against a float64 forward), int8/int4 quantizing and the quantized matmul (against
 * the format and a bound from the activations' int16 rounding). Every variant this CPU runs; one line per variant;
 * exit status 1 on any failure.
 *
 *     python -m engine.runtime.native.selftest [--cc CC] [--target TRIPLE] [--run 'qemu-aarch64 -L SYSROOT']
 *
 * builds it as the engine builds the library (a variant that does not compile is left out) and runs it; by hand:
 *
 *     cc -O2 -std=gnu11 -pthread -o selftest selftest.c api.c pool.c variant_*.c -lm && ./selftest */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "kquant_layout.h"

/* The entry points of api.c. */
int tl_abi_version(void);
int tl_isa_usable(int isa);
int tl_isa_compiled(int isa);
void tl_matmul(int isa, const float *x, ptrdiff_t ldx, const void *w, ptrdiff_t ldw, int wtype, float *out,
               ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads);
void tl_attention(int isa, const float *q, ptrdiff_t ldq, ptrdiff_t T, ptrdiff_t n_heads, ptrdiff_t head_dim,
                  const float *k, const float *v, ptrdiff_t ldh, ptrdiff_t ldp, ptrdiff_t n_kv_heads, ptrdiff_t start,
                  float scale, float *out, ptrdiff_t ldo, float *probs, int threads);
void tl_widen(int isa, const void *w, ptrdiff_t ldw, int wtype, float *out, ptrdiff_t ldo, ptrdiff_t N, ptrdiff_t K,
              int threads);
void tl_swiglu(int isa, const float *gate_up, ptrdiff_t ld, float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t inter,
               int threads);
void tl_rms_norm(int isa, const float *x, ptrdiff_t ldx, const float *res, ptrdiff_t ldr, const float *w, float eps,
                 float *out_x, float *out_h, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t H, int threads);
void tl_rotary(int isa, float *x, ptrdiff_t ldx, const long long *pos, const float *cos, const float *sin, ptrdiff_t M,
               ptrdiff_t heads, ptrdiff_t head_dim, int threads);
void tl_attention_seqs(int isa, const float *qkv, ptrdiff_t ld_qkv, ptrdiff_t n_heads, ptrdiff_t n_kv_heads,
                       ptrdiff_t head_dim, ptrdiff_t n_seq, const long long *row, const long long *count,
                       const long long *start, float *const *k_cache, float *const *v_cache, const long long *capacity,
                       ptrdiff_t layer, float scale, float *out, ptrdiff_t ldo, int threads);
void tl_decoder_layers(int isa, const tl_stack *c, const tl_layer *layers, ptrdiff_t n_layers, float *x, float *h,
                       ptrdiff_t N, const long long *pos, ptrdiff_t n_seq, const long long *row, const long long *count,
                       const long long *start, float *const *k_cache, float *const *v_cache, const long long *capacity,
                       float *scratch, int threads);

void tl_qmatmul(int isa, const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads);
int tl_qmatmul_on(int build, const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                  float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads);
void tl_quantize(int kind, const float *w, ptrdiff_t ldw, ptrdiff_t n, ptrdiff_t K, ptrdiff_t row0, void *data,
                 uint16_t *scales, ptrdiff_t G, int threads);
void tl_matmul_parts(int isa, const float *x, ptrdiff_t ldx, const tl_wpart *parts, ptrdiff_t n_parts, float *out,
                     ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t K, int threads);
void tl_kpack(int kind, const uint8_t *src, ptrdiff_t n, ptrdiff_t K, ptrdiff_t row0, uint8_t *dst, int threads);
void tl_kdequant(int kind, const uint8_t *src, ptrdiff_t K, const long long *rows, ptrdiff_t n, float *out,
                 int threads);
ptrdiff_t tl_kggml_row_bytes(int kind, ptrdiff_t K);
int tl_kquantize(int kind, const float *w, ptrdiff_t ldw, ptrdiff_t n, ptrdiff_t K, const float *iw, uint8_t *dst,
                 int threads);
int tl_kmatmul_build(int isa);
int tl_kmatmul_avx512_madd(const float *x, ptrdiff_t ldx, const tl_wpart *parts, ptrdiff_t n_parts, float *out,
                           ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t K, int threads);
void tl_repack_ggml(int kind, const void *src, ptrdiff_t lds, ptrdiff_t n, ptrdiff_t row0, void *data,
                    uint16_t *scales, ptrdiff_t G, int threads);

#define ULP 5.960464477539063e-08 /* 2^-24: float32's unit roundoff */
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
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
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

/* Causal attention in double of one query row q (D) over keys/values 0..n_keys-1 (rows at stride ldp) -> out (D);
 * s (n_keys) receives the probabilities. */
static void attention_ref(const float *q, const float *kh, const float *vh, ptrdiff_t ldp, ptrdiff_t n_keys,
                          ptrdiff_t D, double *s, double *out)
{
    double mx = -INFINITY, sum = 0;
    for (ptrdiff_t j = 0; j < n_keys; j++) {
        s[j] = 0;
        for (ptrdiff_t d = 0; d < D; d++) s[j] += (double)q[d] * kh[j * ldp + d];
        s[j] /= sqrt((double)D);
        mx = s[j] > mx ? s[j] : mx;
    }
    for (ptrdiff_t j = 0; j < n_keys; j++) sum += (s[j] = exp(s[j] - mx));
    for (ptrdiff_t j = 0; j < n_keys; j++) s[j] /= sum;
    for (ptrdiff_t d = 0; d < D; d++) {
        out[d] = 0;
        for (ptrdiff_t j = 0; j < n_keys; j++) out[d] += s[j] * vh[j * ldp + d];
    }
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
    double worst = 0, *s = malloc(sizeof(double) * L), *ref = malloc(sizeof(double) * D);
    for (ptrdiff_t t = 0; t < T; t++)
        for (ptrdiff_t h = 0; h < H; h++) {
            const float *kh = k + (h / (H / Hkv)) * cap * D, *vh = v + (h / (H / Hkv)) * cap * D;
            attention_ref(q + (t * H + h) * D, kh, vh, D, start + t + 1, D, s, ref);
            for (ptrdiff_t j = 0; j < L; j++) { /* the probabilities a trace records, zeros above the diagonal */
                double got = probs[(h * T + t) * L + j];
                if (j > start + t ? got != 0.0f : fabs(got - s[j]) > 1e-6) worst = 1.0;
            }
            for (ptrdiff_t d = 0; d < D; d++) {
                double err = fabs(out[(t * H + h) * D + d] - ref[d]);
                worst = err > worst ? err : worst;
            }
        }
    int ok = worst <= 8 * sqrt((double)L) * ULP;
    if (!ok) printf("  FAIL attention %s T=%td H=%td Hkv=%td D=%td start=%td: error %.2e\n", names[isa], T, H, Hkv,
                    D, start, worst);
    free(q); free(out); free(k); free(v); free(s); free(ref); free(probs);
    return ok;
}

/* Widening is exact: every bf16 / fp16 value (subnormals, signed zero, inf, NaN, the largest) becomes the same float32;
 * rows at strides wider than K, nothing written beyond them. */
static int check_widen(int isa, int wtype, ptrdiff_t N, ptrdiff_t K)
{
    static const uint16_t bf16_special[] = {0x0001, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7F7F, 0x007F, 0x3F80};
    static const uint16_t f16_special[] = {0x0001, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0x03FF, 0x3C00};
    const uint16_t *special = wtype == W_BF16 ? bf16_special : f16_special;
    ptrdiff_t ldw = K + 3, ldo = K + 5;
    uint16_t *w = malloc(sizeof(uint16_t) * N * ldw);
    float *out = malloc(sizeof(float) * N * ldo);
    for (ptrdiff_t i = 0; i < N * ldw; i++) {
        float f = (float)(4 * uniform());
        w[i] = wtype == W_BF16 ? to_bf16(f) : to_f16(f);
    }
    for (ptrdiff_t i = 0; i < 8 && i < N * K; i++) w[(i / K) * ldw + i % K] = special[i];
    for (ptrdiff_t i = 0; i < N * ldo; i++) out[i] = 12345.0f;
    tl_widen(isa, w, ldw, wtype, out, ldo, N, K, 2);
    int ok = 1;
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t k = 0; k < ldo; k++) {
            float got = out[n * ldo + k];
            if (k >= K) { ok &= got == 12345.0f; continue; }
            double want = wtype == W_BF16 ? bf16_value(w[n * ldw + k]) : f16_value(w[n * ldw + k]);
            int good = isnan(want) ? isnan(got) : (got == (float)want && !signbit(got) == !signbit(want));
            ok &= good;
        }
    if (!ok) printf("  FAIL widen %s wtype %d N=%td K=%td\n", names[isa], wtype, N, K);
    free(w); free(out);
    return ok;
}

/* silu(gate) * up against exp in double, over the sigmoid's whole range (its saturated ends too). */
static int check_swiglu(int isa, ptrdiff_t M, ptrdiff_t I)
{
    static const float ends[] = {-200, -90, -87, 88, 100, 0};
    ptrdiff_t ld = 2 * I + 1, ldo = I + 2;
    float *gu = malloc(sizeof(float) * M * ld), *out = malloc(sizeof(float) * M * ldo);
    for (ptrdiff_t i = 0; i < M * ld; i++) gu[i] = (float)(6 * uniform());
    for (ptrdiff_t i = 0; i < 6 && i < I; i++) gu[i] = ends[i];
    tl_swiglu(isa, gu, ld, out, ldo, M, I, 2);
    double worst = 0, scale = 0;
    for (ptrdiff_t m = 0; m < M; m++)
        for (ptrdiff_t i = 0; i < I; i++) {
            double g = gu[m * ld + i], ref = g / (1 + exp(-g)) * gu[m * ld + I + i];
            double err = fabs(out[m * ldo + i] - ref);
            worst = err > worst ? err : worst;
            scale = fabs(ref) > scale ? fabs(ref) : scale;
        }
    int ok = worst <= 4 * ULP * scale + 1e-37; /* (+ what float32 cannot hold: silu(-200) underflows) */
    if (!ok) printf("  FAIL swiglu %s M=%td I=%td: error %.2e of %.2e\n", names[isa], M, I, worst, scale);
    free(gu); free(out);
    return ok;
}

/* h = w * v / sqrt(mean(v^2) + eps) of v = x (+ res) against double; v itself (the residual stream) exactly x + res. */
static int check_rms_norm(int isa, ptrdiff_t M, ptrdiff_t H, int with_res)
{
    ptrdiff_t ldx = H + 1, ldr = H + 2, ldo = H + 3;
    float *x = malloc(sizeof(float) * M * ldx), *r = malloc(sizeof(float) * M * ldr), *w = malloc(sizeof(float) * H);
    float *out_x = malloc(sizeof(float) * M * ldo), *out_h = malloc(sizeof(float) * M * ldo);
    for (ptrdiff_t i = 0; i < M * ldx; i++) x[i] = (float)(2 * uniform());
    for (ptrdiff_t i = 0; i < M * ldr; i++) r[i] = (float)uniform();
    for (ptrdiff_t i = 0; i < H; i++) w[i] = (float)(1 + 0.2 * uniform());
    tl_rms_norm(isa, x, ldx, with_res ? r : NULL, ldr, w, 1e-5f, with_res ? out_x : NULL, out_h, ldo, M, H, 2);
    double worst = 0, scale = 0;
    int exact = 1;
    for (ptrdiff_t m = 0; m < M; m++) {
        double ms = 0;
        for (ptrdiff_t i = 0; i < H; i++) {
            float v = with_res ? x[m * ldx + i] + r[m * ldr + i] : x[m * ldx + i];
            if (with_res) exact &= out_x[m * ldo + i] == v;
            ms += (double)v * v;
        }
        double inv = 1 / sqrt(ms / H + (double)1e-5f);
        for (ptrdiff_t i = 0; i < H; i++) {
            double v = with_res ? (double)(x[m * ldx + i] + r[m * ldr + i]) : x[m * ldx + i];
            double ref = w[i] * v * inv, err = fabs(out_h[m * ldo + i] - ref);
            worst = err > worst ? err : worst;
            scale = fabs(ref) > scale ? fabs(ref) : scale;
        }
    }
    int ok = exact && worst <= 2e-6 * scale;
    if (!ok) printf("  FAIL rms_norm %s M=%td H=%td residual %d: error %.2e of %.2e, sum exact %d\n", names[isa], M, H,
                    with_res, worst, scale, exact);
    free(x); free(r); free(w); free(out_x); free(out_h);
    return ok;
}

/* Rotary tables as Hugging Face builds them: (P, D), angle p * base^(-2i/D) for i < D/2, the halves equal. */
static void rope_tables(ptrdiff_t P, ptrdiff_t D, float *cos_t, float *sin_t)
{
    for (ptrdiff_t p = 0; p < P; p++)
        for (ptrdiff_t i = 0; i < D; i++) {
            double angle = (double)p * pow(10000.0, -2.0 * (double)(i % (D / 2)) / (double)D);
            cos_t[p * D + i] = (float)cos(angle);
            sin_t[p * D + i] = (float)sin(angle);
        }
}

/* x1 c - x2 s, x2 c + x1 s on the first `heads` heads of each row at its position; the other heads untouched. */
static int check_rotary(int isa, ptrdiff_t M, ptrdiff_t heads, ptrdiff_t extra, ptrdiff_t D, ptrdiff_t P)
{
    ptrdiff_t ldx = (heads + extra) * D + 1, half = D / 2;
    float *x = malloc(sizeof(float) * M * ldx), *x0 = malloc(sizeof(float) * M * ldx);
    float *cos_t = malloc(sizeof(float) * P * D), *sin_t = malloc(sizeof(float) * P * D);
    long long *pos = malloc(sizeof(long long) * M);
    rope_tables(P, D, cos_t, sin_t);
    for (ptrdiff_t i = 0; i < M * ldx; i++) x0[i] = x[i] = (float)uniform();
    for (ptrdiff_t m = 0; m < M; m++) pos[m] = m == 0 ? P - 1 : (long long)((uniform() + 1) / 2 * (double)(P - 1));
    tl_rotary(isa, x, ldx, pos, cos_t, sin_t, M, heads, D, 2);
    double worst = 0;
    int untouched = 1;
    for (ptrdiff_t m = 0; m < M; m++) {
        const float *c = cos_t + pos[m] * D, *s = sin_t + pos[m] * D;
        for (ptrdiff_t h = 0; h < heads; h++)
            for (ptrdiff_t i = 0; i < half; i++) {
                const float *a = x0 + m * ldx + h * D;
                double r1 = (double)a[i] * c[i] - (double)a[half + i] * s[i];
                double r2 = (double)a[half + i] * c[i] + (double)a[i] * s[i];
                double e1 = fabs(x[m * ldx + h * D + i] - r1), e2 = fabs(x[m * ldx + h * D + half + i] - r2);
                worst = e1 > worst ? e1 : worst;
                worst = e2 > worst ? e2 : worst;
            }
        for (ptrdiff_t i = heads * D; i < ldx; i++) untouched &= x[m * ldx + i] == x0[m * ldx + i];
    }
    int ok = untouched && worst <= 8 * ULP;
    if (!ok) printf("  FAIL rotary %s M=%td heads=%td D=%td: error %.2e, others untouched %d\n", names[isa], M, heads,
                    D, worst, untouched);
    free(x); free(x0); free(cos_t); free(sin_t); free(pos);
    return ok;
}

/* Sequences of one step as the engine builds them: decoding rows at several depths, a prompt chunk, a verification */
#define N_SEQ 4
static const long long seq_start[N_SEQ] = {5, 0, 40, 17}, seq_count[N_SEQ] = {1, 30, 3, 1};
static const long long seq_spare[N_SEQ] = {2, 7, 0, 33}; /* capacity beyond start + count */

/* tl_attention_seqs stores each sequence's new keys and values at `layer` of its cache (nothing else changes), and
 * each sequence's output is the same bits as its own tl_attention call and within float32 rounding of double. */
static int check_attention_seqs(int isa, ptrdiff_t H, ptrdiff_t Hkv, ptrdiff_t D)
{
    const ptrdiff_t n_layers = 2, layer = 1, Q = H * D, KV = Hkv * D, ld = Q + 2 * KV + 3, ldo = Q + 1;
    long long row[N_SEQ], cap[N_SEQ], rows = 0;
    float *kc[N_SEQ], *vc[N_SEQ], *k0[N_SEQ], *v0[N_SEQ];
    for (int s = 0; s < N_SEQ; s++) {
        row[s] = rows;
        rows += seq_count[s];
        cap[s] = seq_start[s] + seq_count[s] + seq_spare[s];
        size_t n = (size_t)(n_layers * KV * cap[s]);
        kc[s] = malloc(sizeof(float) * n); vc[s] = malloc(sizeof(float) * n);
        k0[s] = malloc(sizeof(float) * n); v0[s] = malloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) {
            k0[s][i] = kc[s][i] = (float)uniform();
            v0[s][i] = vc[s][i] = (float)uniform();
        }
    }
    float *qkv = malloc(sizeof(float) * rows * ld), *out = malloc(sizeof(float) * rows * ldo);
    float *alone = malloc(sizeof(float) * rows * ldo);
    for (ptrdiff_t i = 0; i < rows * ld; i++) qkv[i] = (float)(2 * uniform());
    const float scale = (float)(1.0 / sqrt((double)D));
    tl_attention_seqs(isa, qkv, ld, H, Hkv, D, N_SEQ, row, seq_count, seq_start, kc, vc, cap, layer, scale, out, ldo,
                      2);
    int stored = 1, same = 1;
    double worst = 0, tol = 0, *sc = malloc(sizeof(double) * 200), *ref = malloc(sizeof(double) * D);
    for (int s = 0; s < N_SEQ; s++) {
        const ptrdiff_t ldh = cap[s] * D, base = layer * Hkv * ldh;
        /* the cache after: the new rows at `layer`, the old values elsewhere */
        for (ptrdiff_t l = 0; l < n_layers; l++)
            for (ptrdiff_t h = 0; h < Hkv; h++)
                for (ptrdiff_t p = 0; p < cap[s]; p++)
                    for (ptrdiff_t d = 0; d < D; d++) {
                        ptrdiff_t i = (l * Hkv + h) * ldh + p * D + d, t = p - seq_start[s];
                        int fresh = l == layer && t >= 0 && t < seq_count[s];
                        const float *src = qkv + (row[s] + t) * ld + Q + h * D + d;
                        stored &= kc[s][i] == (fresh ? src[0] : k0[s][i]) && vc[s][i] == (fresh ? src[KV] : v0[s][i]);
                    }
        tl_attention(isa, qkv + row[s] * ld, ld, seq_count[s], H, D, kc[s] + base, vc[s] + base, ldh, D, Hkv,
                     seq_start[s], scale, alone + row[s] * ldo, ldo, NULL, 2);
        for (ptrdiff_t t = 0; t < seq_count[s]; t++) {
            same &= memcmp(out + (row[s] + t) * ldo, alone + (row[s] + t) * ldo, sizeof(float) * Q) == 0;
            const ptrdiff_t L = seq_start[s] + t + 1;
            tol = 8 * sqrt((double)L) * ULP > tol ? 8 * sqrt((double)L) * ULP : tol;
            for (ptrdiff_t h = 0; h < H; h++) {
                const ptrdiff_t g = h / (H / Hkv);
                attention_ref(qkv + (row[s] + t) * ld + h * D, kc[s] + base + g * ldh, vc[s] + base + g * ldh, D, L,
                              D, sc, ref);
                for (ptrdiff_t d = 0; d < D; d++) {
                    double err = fabs(out[(row[s] + t) * ldo + h * D + d] - ref[d]);
                    worst = err > worst ? err : worst;
                }
            }
        }
    }
    int ok = stored && same && worst <= tol;
    if (!ok) printf("  FAIL attention_seqs %s H=%td Hkv=%td D=%td: stored %d, same bits as alone %d, error %.2e\n",
                    names[isa], H, Hkv, D, stored, same, worst);
    for (int s = 0; s < N_SEQ; s++) { free(kc[s]); free(vc[s]); free(k0[s]); free(v0[s]); }
    free(qkv); free(out); free(alone); free(sc); free(ref);
    return ok;
}

/* out (N, O) = a (N, I) @ w (O, I).T in double. */
static void matmul_ref(const double *a, const double *w, ptrdiff_t N, ptrdiff_t O, ptrdiff_t I, double *out)
{
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t o = 0; o < O; o++) {
            double acc = 0;
            for (ptrdiff_t i = 0; i < I; i++) acc += a[n * I + i] * w[o * I + i];
            out[n * O + o] = acc;
        }
}

/* h (N, H) = rms_norm(x) * w in double. */
static void rms_ref(const double *x, const float *w, ptrdiff_t N, ptrdiff_t H, double eps, double *h)
{
    for (ptrdiff_t n = 0; n < N; n++) {
        double ms = 0;
        for (ptrdiff_t i = 0; i < H; i++) ms += x[n * H + i] * x[n * H + i];
        double inv = 1 / sqrt(ms / H + eps);
        for (ptrdiff_t i = 0; i < H; i++) h[n * H + i] = w[i] * x[n * H + i] * inv;
    }
}

/* A weight (O, I) of random values scaled by 1/sqrt(I), stored as wtype; its exact values in `exact`. */
static void *weight(int wtype, ptrdiff_t O, ptrdiff_t I, double *exact)
{
    void *w = malloc((size_t)(O * I * (wtype == W_F32 ? 4 : 2)));
    for (ptrdiff_t i = 0; i < O * I; i++) {
        float f = (float)(1.5 * uniform() / sqrt((double)I));
        if (wtype == W_F32) { ((float *)w)[i] = f; exact[i] = f; }
        if (wtype == W_BF16) { ((uint16_t *)w)[i] = to_bf16(f); exact[i] = bf16_value(((uint16_t *)w)[i]); }
        if (wtype == W_F16) { ((uint16_t *)w)[i] = to_f16(f); exact[i] = f16_value(((uint16_t *)w)[i]); }
    }
    return w;
}

/* tl_decoder_layers: two layers over the step's sequences against a float64 forward of the same weights (Hugging
 * Face's Llama decoder layer), the residual stream, its final norm and the keys and values left in the caches. */
static int check_decoder_layers(int isa, int wtype)
{
    enum { LAYERS = 2, H = 48, I = 40, NH = 4, NKV = 2, D = 12, Q = NH * D, KV = NKV * D, W = Q + 2 * KV, P = 64 };
    const double eps = (double)1e-5f;
    long long row[N_SEQ], cap[N_SEQ], N = 0;
    for (int s = 0; s < N_SEQ; s++) {
        row[s] = N;
        N += seq_count[s];
        cap[s] = seq_start[s] + seq_count[s] + seq_spare[s];
    }
    tl_layer layers[LAYERS];
    double *wd[LAYERS][4];
    float *norms = malloc(sizeof(float) * LAYERS * 2 * H);
    const ptrdiff_t shape[4][2] = {{W, H}, {H, Q}, {2 * I, H}, {H, I}};
    void *wmem[LAYERS][4];
    for (int l = 0; l < LAYERS; l++) {
        for (int m = 0; m < 4; m++) {
            wd[l][m] = malloc(sizeof(double) * shape[m][0] * shape[m][1]);
            wmem[l][m] = weight(wtype, shape[m][0], shape[m][1], wd[l][m]);
        }
        for (int i = 0; i < 2 * H; i++) norms[(l * 2) * H + i] = (float)(1 + 0.2 * uniform());
        tl_layer one = {wmem[l][0], wmem[l][1], wmem[l][2], wmem[l][3], norms + 2 * l * H, norms + (2 * l + 1) * H,
                        0, 0, 0, 0, {0}, {0}};
        layers[l] = one;
    }
    float *cos_t = malloc(sizeof(float) * P * D), *sin_t = malloc(sizeof(float) * P * D);
    rope_tables(P, D, cos_t, sin_t);
    tl_stack stack = {H, I, NH, NKV, D, wtype, 1e-5f, (float)(1.0 / sqrt((double)D)), cos_t, sin_t};
    float *kc[N_SEQ], *vc[N_SEQ];
    double *kr[N_SEQ], *vr[N_SEQ];
    long long *pos = malloc(sizeof(long long) * N);
    for (int s = 0; s < N_SEQ; s++) {
        size_t n = (size_t)(LAYERS * KV * cap[s]);
        kc[s] = malloc(sizeof(float) * n); vc[s] = malloc(sizeof(float) * n);
        kr[s] = malloc(sizeof(double) * n); vr[s] = malloc(sizeof(double) * n);
        for (size_t i = 0; i < n; i++) {
            kr[s][i] = kc[s][i] = (float)uniform();
            vr[s][i] = vc[s][i] = (float)uniform();
        }
        for (long long t = 0; t < seq_count[s]; t++) pos[row[s] + t] = seq_start[s] + t;
    }
    float *x = malloc(sizeof(float) * N * H), *h = malloc(sizeof(float) * N * H);
    double *xr = malloc(sizeof(double) * N * H), *hr = malloc(sizeof(double) * N * H);
    for (ptrdiff_t i = 0; i < N * H; i++) { xr[i] = x[i] = (float)uniform(); hr[i] = h[i] = (float)(2 * uniform()); }
    float *scratch = malloc(sizeof(float) * N * (Q + 2 * KV + Q + H + 3 * I));
    tl_decoder_layers(isa, &stack, layers, LAYERS, x, h, N, pos, N_SEQ, row, seq_count, seq_start, kc, vc, cap,
                      scratch, 2);

    double *qkv = malloc(sizeof(double) * N * W), *attn = malloc(sizeof(double) * N * Q);
    double *proj = malloc(sizeof(double) * N * H), *gu = malloc(sizeof(double) * N * 2 * I);
    double *act = malloc(sizeof(double) * N * I);
    for (int l = 0; l < LAYERS; l++) {
        matmul_ref(hr, wd[l][0], N, W, H, qkv);
        for (ptrdiff_t n = 0; n < N; n++) /* rotary on the query and key heads */
            for (ptrdiff_t hd = 0; hd < NH + NKV; hd++)
                for (ptrdiff_t i = 0; i < D / 2; i++) {
                    double *a = qkv + n * W + hd * D, c = cos_t[pos[n] * D + i], s = sin_t[pos[n] * D + i];
                    double a1 = a[i], a2 = a[D / 2 + i];
                    a[i] = a1 * c - a2 * s;
                    a[D / 2 + i] = a2 * c + a1 * s;
                }
        for (int s = 0; s < N_SEQ; s++) {
            const ptrdiff_t ldh = cap[s] * D, base = l * NKV * ldh;
            for (long long t = 0; t < seq_count[s]; t++)
                for (ptrdiff_t g = 0; g < NKV; g++)
                    for (ptrdiff_t d = 0; d < D; d++) {
                        kr[s][base + g * ldh + (seq_start[s] + t) * D + d] = qkv[(row[s] + t) * W + Q + g * D + d];
                        vr[s][base + g * ldh + (seq_start[s] + t) * D + d] = qkv[(row[s] + t) * W + Q + KV + g * D + d];
                    }
            for (long long t = 0; t < seq_count[s]; t++) {
                const ptrdiff_t L = seq_start[s] + t + 1;
                for (ptrdiff_t hd = 0; hd < NH; hd++) { /* the definition, on the double values */
                    const ptrdiff_t g = hd / (NH / NKV);
                    double exact_scores[P], o[D];
                    for (ptrdiff_t j = 0; j < L; j++) {
                        exact_scores[j] = 0;
                        for (ptrdiff_t d = 0; d < D; d++)
                            exact_scores[j] += qkv[(row[s] + t) * W + hd * D + d] * kr[s][base + g * ldh + j * D + d];
                        exact_scores[j] /= sqrt((double)D);
                    }
                    double mx = -INFINITY, sum = 0;
                    for (ptrdiff_t j = 0; j < L; j++) mx = exact_scores[j] > mx ? exact_scores[j] : mx;
                    for (ptrdiff_t j = 0; j < L; j++) sum += (exact_scores[j] = exp(exact_scores[j] - mx));
                    for (ptrdiff_t d = 0; d < D; d++) {
                        o[d] = 0;
                        for (ptrdiff_t j = 0; j < L; j++)
                            o[d] += exact_scores[j] / sum * vr[s][base + g * ldh + j * D + d];
                        attn[(row[s] + t) * Q + hd * D + d] = o[d];
                    }
                }
            }
        }
        matmul_ref(attn, wd[l][1], N, H, Q, proj);
        for (ptrdiff_t i = 0; i < N * H; i++) xr[i] += proj[i];
        rms_ref(xr, layers[l].mlp_norm, N, H, eps, hr);
        matmul_ref(hr, wd[l][2], N, 2 * I, H, gu);
        for (ptrdiff_t n = 0; n < N; n++)
            for (ptrdiff_t i = 0; i < I; i++) {
                double g = gu[n * 2 * I + i];
                act[n * I + i] = g / (1 + exp(-g)) * gu[n * 2 * I + I + i];
            }
        matmul_ref(act, wd[l][3], N, H, I, proj);
        for (ptrdiff_t i = 0; i < N * H; i++) xr[i] += proj[i];
        rms_ref(xr, layers[l].next_norm, N, H, eps, hr);
    }
    /* Two layers of float32 rounding (sums of <= 48 terms, exp, sqrt), relative to the values' scale. */
    double worst = 0, scale = 1;
    for (ptrdiff_t i = 0; i < N * H; i++) {
        double ex = fabs(x[i] - xr[i]), eh = fabs(h[i] - hr[i]);
        worst = ex > worst ? ex : worst;
        worst = eh > worst ? eh : worst;
        scale = fabs(hr[i]) > scale ? fabs(hr[i]) : scale;
    }
    for (int s = 0; s < N_SEQ; s++)
        for (ptrdiff_t i = 0; i < LAYERS * KV * cap[s]; i++) {
            double ek = fabs(kc[s][i] - kr[s][i]), ev = fabs(vc[s][i] - vr[s][i]);
            worst = ek > worst ? ek : worst;
            worst = ev > worst ? ev : worst;
        }
    int ok = worst <= 32 * ULP * scale;
#ifdef SHOW_ERRORS
    printf("    decoder_layers %s wtype %d: error %.2e (%.1f ulp of the scale %.2f)\n", names[isa], wtype, worst,
           worst / ULP / scale, scale);
#endif
    if (!ok) printf("  FAIL decoder_layers %s wtype %d: error %.2e of %.2e\n", names[isa], wtype, worst, scale);
    for (int l = 0; l < LAYERS; l++)
        for (int m = 0; m < 4; m++) { free(wd[l][m]); free(wmem[l][m]); }
    for (int s = 0; s < N_SEQ; s++) { free(kc[s]); free(vc[s]); free(kr[s]); free(vr[s]); }
    free(norms); free(cos_t); free(sin_t); free(pos); free(x); free(h); free(xr); free(hr); free(scratch);
    free(qkv); free(attn); free(proj); free(gu); free(act);
    return ok;
}

/* Quantized weights (quant.h, quantize.c): the integers and scales read back by the layout's definition
 * (engine/runtime/quant.py: offset bytes, 4 columns of 16 rows per 64 bytes), the quantizer's grid checked (int8:
 * every weight within half a step), and the product against float64 within the bound of the format: int16
 * activations (half a step of max|x_g| / 32639 each), exact integer group sums, G float32 group terms. The last row
 * alone gives the same bits, and on x86 every build with a hardware FMA (avx512 VNNI and vpmaddwd, avx2) the same bits
 * as the variant's own. */
static int check_qmatmul(int isa, int kind, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K)
{
    const ptrdiff_t G = (K + 31) / 32, blocks = (N + 15) / 16, bytes = kind == W_Q8 ? 512 : 256;
    float *x = malloc(sizeof(float) * M * K), *w = malloc(sizeof(float) * N * K);
    float *out = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N), *other = malloc(sizeof(float) * M * N);
    uint8_t *data = calloc((size_t)(blocks * G * bytes), 1);
    uint16_t *scales = calloc((size_t)(blocks * G * 16), 2);
    double *wq = malloc(sizeof(double) * N * K);
    for (ptrdiff_t i = 0; i < M * K; i++) x[i] = (float)uniform();
    for (ptrdiff_t i = 0; i < N * K; i++) w[i] = (float)(0.05 * uniform());
    tl_quantize(kind, w, K, N, K, 0, data, scales, G, 2);
    int ok = 1;
    for (ptrdiff_t n = 0; n < N; n++)
        for (ptrdiff_t k = 0; k < K; k++) {
            const ptrdiff_t b = n / 16, r = n % 16, g = k / 32, c = k % 32;
            const double sc = f16_value(scales[(b * G + g) * 16 + r]);
            int q;
            if (kind == W_Q8) {
                q = data[(b * G + g) * 512 + (c / 4) * 64 + 4 * r + c % 4] - 128;
            } else {
                const int byte = data[(b * G + g) * 256 + (c / 8) * 64 + 4 * r + c % 4];
                q = (c % 8 < 4 ? byte & 15 : byte >> 4) - 8;
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
                rounding += amax / 32639 * (0.5 + 1.0 / 1024) * wsum;
            }
            const double err = fabs(out[i * N + j] - ref), bound = rounding + (double)(G + 4) * ldexp(1, -23) * mag;
            worst = err / bound > worst ? err / bound : worst;
        }
    ok &= worst <= 1.0;
    tl_qmatmul(isa, x + (M - 1) * K, K, data, scales, kind, one, N, 1, N, K, 2);
    if (memcmp(one, out + (M - 1) * N, sizeof(float) * N) != 0) ok = 0;
#if defined(__x86_64__) || defined(_M_X64)
    for (int build = 1; build <= 3 && isa != ISA_PORTABLE; build++) /* avx2, avx512 vpmaddwd, avx512 VNNI */
        if (tl_qmatmul_on(build, x, K, data, scales, kind, other, N, M, N, K, 2) == 0 &&
            memcmp(other, out, sizeof(float) * M * N) != 0) {
            printf("  FAIL qmatmul build %d differs from %s's\n", build, names[isa]);
            ok = 0;
        }
#endif
    if (!ok) printf("  FAIL qmatmul %s kind %d M=%td N=%td K=%td: error / bound %.2f\n", names[isa], kind, M, N, K,
                    worst);
    free(x); free(w); free(out); free(one); free(other); free(data); free(scales); free(wq);
    return ok;
}

/* llama.cpp's block formats (kquant.h, kquant_pack.c, kquant_quantize.c). The reference reads ggml's blocks by
 * ggml's own definitions (the loops of ggml-quants.c's dequantize_row_*, written out here on their own), in double:
 * value = A_j u - B_j; the layout read back (tl_kdequant) must give the same float32 values as ggml's float32
 * arithmetic, and the product lies within the format's bound: int16 activations (half a step of max|x_g| / 32639
 * each), exact integer sums, a few float32 roundings per sub-block of the terms A u x and B x. */
static const int kq_kinds[] = {W_Q4_1, W_Q5_0, W_Q5_1, W_Q2_K, W_Q3_K, W_Q4_K, W_Q5_K, W_Q6_K};
static const int kq_block_cols[] = {32, 32, 32, 256, 256, 256, 256, 256};
static const int kq_block_size[] = {20, 22, 24, 84, 110, 144, 176, 210};

static int kq_index(int kind)
{
    for (int i = 0; i < 8; i++)
        if (kq_kinds[i] == kind) return i;
    return 0;
}

/* One ggml block -> per column its value as float32 arithmetic gives it (out) and A u, B (a, b: double, exact). */
static void ggml_reference(int kind, const uint8_t *p, float *out, double *a, double *b)
{
#define F16(q) ((float)f16_value((uint16_t)((q)[0] | (q)[1] << 8)))
    if (kind == W_Q4_1 || kind == W_Q5_0 || kind == W_Q5_1) {
        const int has_m = kind != W_Q5_0, five = kind != W_Q4_1;
        const float d = F16(p), m = has_m ? F16(p + 2) : 0.0f;
        const uint8_t *q = p + 2 + 2 * has_m;
        const uint32_t qh = five ? (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24 : 0;
        const uint8_t *qs = q + 4 * five;
        for (int j = 0; j < 16; j++) {
            const int x0 = (qs[j] & 0x0F) | (int)(((qh >> j) << 4) & 0x10);
            const int x1 = (qs[j] >> 4) | (int)((qh >> (j + 12)) & 0x10);
            const int u[2] = {x0, x1};
            for (int t = 0; t < 2; t++) {
                const int k = j + 16 * t;
                if (kind == W_Q5_0) {
                    out[k] = (float)(u[t] - 16) * d;
                    a[k] = (double)d * u[t];
                    b[k] = 16.0 * d;
                } else {
                    out[k] = (float)u[t] * d + m;
                    a[k] = (double)d * u[t];
                    b[k] = -(double)m;
                }
            }
        }
        return;
    }
    if (kind == W_Q4_K || kind == W_Q5_K) {
        const float d = F16(p), dmin = F16(p + 2);
        const uint8_t *scales = p + 4, *qh = p + 16, *ql = p + 16 + 32 * (kind == W_Q5_K);
        int is = 0;
        uint8_t u1 = 1, u2 = 2;
        for (int j = 0; j < 256; j += 64) {
            int sc[2], m[2];
            for (int h = 0; h < 2; h++, is++) { /* ggml's get_scale_min_k4 */
                if (is < 4) {
                    sc[h] = scales[is] & 63;
                    m[h] = scales[is + 4] & 63;
                } else {
                    sc[h] = (scales[is + 4] & 0xF) | ((scales[is - 4] >> 6) << 4);
                    m[h] = (scales[is + 4] >> 4) | ((scales[is] >> 6) << 4);
                }
            }
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 32; l++) {
                    int u = h == 0 ? ql[l] & 0xF : ql[l] >> 4;
                    if (kind == W_Q5_K) u += (qh[l] & (h == 0 ? u1 : u2)) ? 16 : 0;
                    const float d1 = d * (float)sc[h], m1 = dmin * (float)m[h];
                    out[j + 32 * h + l] = d1 * (float)u - m1;
                    a[j + 32 * h + l] = (double)d1 * u;
                    b[j + 32 * h + l] = m1;
                }
            ql += 32;
            u1 = (uint8_t)(u1 << 2);
            u2 = (uint8_t)(u2 << 2);
        }
        return;
    }
    if (kind == W_Q6_K) {
        const uint8_t *ql = p, *qh = p + 128;
        const int8_t *sc = (const int8_t *)(p + 192);
        const float d = F16(p + 208);
        for (int n = 0; n < 256; n += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q[4] = {(ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4, (ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4,
                                  (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4, (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4};
                for (int i = 0; i < 4; i++) {
                    const float ds = d * (float)sc[is + 2 * i];
                    out[n + l + 32 * i] = ds * (float)(q[i] - 32);
                    a[n + l + 32 * i] = (double)ds * q[i];
                    b[n + l + 32 * i] = 32.0 * ds;
                }
            }
            ql += 64;
            qh += 32;
            sc += 8;
        }
        return;
    }
    if (kind == W_Q2_K) {
        const uint8_t *scales = p, *q = p + 16;
        const float d = F16(p + 80), dmin = F16(p + 82);
        int is = 0, k = 0;
        for (int n = 0; n < 256; n += 128) {
            for (int shift = 0; shift < 8; shift += 2)
                for (int half = 0; half < 2; half++, is++) {
                    const float dl = d * (float)(scales[is] & 0xF), ml = dmin * (float)(scales[is] >> 4);
                    for (int l = 0; l < 16; l++, k++) {
                        const int u = (q[l + 16 * half] >> shift) & 3;
                        out[k] = dl * (float)u - ml;
                        a[k] = (double)dl * u;
                        b[k] = ml;
                    }
                }
            q += 32;
        }
        return;
    }
    /* Q3_K: ggml's 12 bytes of 6-bit scales, hmask bit set = no subtraction of 4 */
    const uint8_t *hm = p, *q = p + 32, *raw = p + 96;
    const float d = F16(p + 108);
    int sc[16];
    for (int i = 0; i < 16; i++) {
        const int lo = i < 8 ? raw[i] & 0xF : raw[i - 8] >> 4, hi = (raw[8 + i % 4] >> (2 * (i / 4))) & 3;
        sc[i] = (lo | hi << 4) - 32;
    }
    int is = 0, k = 0;
    uint8_t bit = 1;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2, bit = (uint8_t)(bit << 1))
            for (int half = 0; half < 2; half++, is++) {
                const float dl = d * (float)sc[is];
                for (int l = 0; l < 16; l++, k++) {
                    const int u = ((q[l + 16 * half] >> shift) & 3) + ((hm[l + 16 * half] & bit) ? 4 : 0);
                    out[k] = dl * (float)(u - 4);
                    a[k] = (double)dl * u;
                    b[k] = 4.0 * dl;
                }
            }
        q += 32;
    }
#undef F16
}

/* Random but well-formed ggml blocks: random bytes, float16 d / dmin / m set to small finite values. */
static void random_blocks(int kind, uint8_t *p, ptrdiff_t n_blocks)
{
    const int bytes = kq_block_size[kq_index(kind)];
    for (ptrdiff_t i = 0; i < n_blocks * bytes; i++) p[i] = (uint8_t)(uniform() * 128 + 128);
    for (ptrdiff_t i = 0; i < n_blocks; i++) {
        uint8_t *b = p + i * bytes;
        const uint16_t d = to_f16((float)(0.001 + 0.01 * fabs(uniform()))), m = to_f16((float)(-0.05 * fabs(uniform())));
        const int at = kind == W_Q2_K ? 80 : kind == W_Q3_K ? 108 : kind == W_Q6_K ? 208 : 0;
        memcpy(b + at, &d, 2);
        if (kind == W_Q4_1 || kind == W_Q5_1) memcpy(b + 2, &m, 2);
        if (kind == W_Q4_K || kind == W_Q5_K || kind == W_Q2_K) memcpy(b + at + 2, &d, 2);
    }
}

/* The block-format matmul of one kind against the reference; the last row alone the same bits; the layout read back
 * exactly; `build` 0: the dispatch's (tl_matmul_parts), 1: the avx512 build without VNNI called directly. */
static int check_kmatmul(int isa, int kind, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int build)
{
    const ptrdiff_t row_bytes = tl_kggml_row_bytes(kind, K), bb = kq_block_bytes(kind, K), blocks = (N + 15) / 16;
    const int cols = kq_block_cols[kq_index(kind)];
    uint8_t *raw = malloc((size_t)(N * row_bytes)), *data = calloc((size_t)(blocks * bb), 1);
    float *x = malloc(sizeof(float) * M * K), *out = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N);
    float *wf = malloc(sizeof(float) * N * K), *back = malloc(sizeof(float) * N * K);
    double *wa = malloc(sizeof(double) * N * K), *wb = malloc(sizeof(double) * N * K);
    long long *rows = malloc(sizeof(long long) * N);
    random_blocks(kind, raw, N * K / cols);
    for (ptrdiff_t i = 0; i < M * K; i++) x[i] = (float)uniform();
    for (ptrdiff_t n = 0; n < N; n++) {
        rows[n] = n;
        for (ptrdiff_t c = 0; c < K; c += cols)
            ggml_reference(kind, raw + n * row_bytes + c / cols * kq_block_size[kq_index(kind)], wf + n * K + c,
                           wa + n * K + c, wb + n * K + c);
    }
    tl_kpack(kind, raw, N, K, 0, data, 2);
    tl_kdequant(kind, data, K, rows, N, back, 2);
    int ok = memcmp(back, wf, sizeof(float) * N * K) == 0;
    tl_wpart part = {kind, N, data, NULL};
    if (build == 1) tl_kmatmul_avx512_madd(x, K, &part, 1, out, N, M, K, 2);
    else tl_matmul_parts(isa, x, K, &part, 1, out, N, M, K, 2);
    double worst = 0;
    for (ptrdiff_t i = 0; i < M; i++)
        for (ptrdiff_t j = 0; j < N; j++) {
            double ref = 0, mag = 0, rounding = 0;
            for (ptrdiff_t g = 0; g < K / 32; g++) {
                double amax = 0, wsum = 0;
                for (ptrdiff_t k = 32 * g; k < 32 * g + 32; k++) {
                    const double xv = x[i * K + k], w = wa[j * K + k] - wb[j * K + k];
                    amax = fabs(xv) > amax ? fabs(xv) : amax;
                    wsum += fabs(w);
                    ref += xv * w;
                    mag += fabs(xv) * (fabs(wa[j * K + k]) + fabs(wb[j * K + k]));
                }
                rounding += amax / KQ_XMAX * (0.5 + 1.0 / 1024) * wsum;
            }
            const double err = fabs(out[i * N + j] - ref), bound = rounding + (double)(K / 16 + 8) * ldexp(1, -23) * mag;
            worst = err / bound > worst ? err / bound : worst;
        }
    ok &= worst <= 1.0;
    if (build == 1) tl_kmatmul_avx512_madd(x + (M - 1) * K, K, &part, 1, one, N, 1, K, 2);
    else tl_matmul_parts(isa, x + (M - 1) * K, K, &part, 1, one, N, 1, K, 2);
    if (memcmp(one, out + (M - 1) * N, sizeof(float) * N) != 0) ok = 0;
    if (!ok) printf("  FAIL kmatmul %s%s kind %d M=%td N=%td K=%td: error / bound %.2f\n", names[isa],
                    build ? " (no VNNI)" : "", kind, M, N, K, worst);
    free(raw); free(data); free(x); free(out); free(one); free(wf); free(back); free(wa); free(wb); free(rows);
    return ok;
}

/* A matrix given as parts (a Q4_K part of 23 rows, a Q6_K one of 9, a dense float32 one of 5): each part's columns of
 * the output the same bits as the part alone. */
static int check_matmul_parts(int isa)
{
    enum { M = 3, K = 512, N0 = 23, N1 = 9, N2 = 5, N = N0 + N1 + N2 };
    uint8_t *raw0 = malloc((size_t)(N0 * tl_kggml_row_bytes(W_Q4_K, K))), *raw1 = malloc((size_t)(N1 * tl_kggml_row_bytes(W_Q6_K, K)));
    uint8_t *d0 = calloc(2, (size_t)kq_block_bytes(W_Q4_K, K)), *d1 = calloc(1, (size_t)kq_block_bytes(W_Q6_K, K));
    float *dense = malloc(sizeof(float) * N2 * K), *x = malloc(sizeof(float) * M * K);
    float *out = malloc(sizeof(float) * M * N), *alone = malloc(sizeof(float) * M * N0);
    random_blocks(W_Q4_K, raw0, N0 * K / 256);
    random_blocks(W_Q6_K, raw1, N1 * K / 256);
    tl_kpack(W_Q4_K, raw0, N0, K, 0, d0, 2);
    tl_kpack(W_Q6_K, raw1, N1, K, 0, d1, 2);
    for (ptrdiff_t i = 0; i < N2 * K; i++) dense[i] = (float)uniform();
    for (ptrdiff_t i = 0; i < M * K; i++) x[i] = (float)uniform();
    const tl_wpart parts[3] = {{W_Q4_K, N0, d0, NULL}, {W_Q6_K, N1, d1, NULL}, {W_F32, N2, dense, NULL}};
    tl_matmul_parts(isa, x, K, parts, 3, out, N, M, K, 2);
    int ok = 1;
    for (int p = 0; p < 3; p++) {
        const ptrdiff_t rows = parts[p].rows, col = p == 0 ? 0 : p == 1 ? N0 : N0 + N1;
        tl_matmul_parts(isa, x, K, &parts[p], 1, alone, rows, M, K, 2);
        for (ptrdiff_t i = 0; i < M; i++) ok &= memcmp(alone + i * rows, out + i * N + col, sizeof(float) * rows) == 0;
    }
    if (!ok) printf("  FAIL matmul_parts %s\n", names[isa]);
    free(raw0); free(raw1); free(d0); free(d1); free(dense); free(x); free(out); free(alone);
    return ok;
}

/* Our quantizer: its blocks read by ggml's definition are within the format's reach of the weights (every value
 * nearer than half a step of its sub-block's scale, plus the minimum's rounding), and never worse in squared error
 * than the plain rounding llama.cpp's reference quantizer starts from (max|w| on the grid's end). */
static int check_kquantize(int kind)
{
    enum { N = 5, K = 512 };
    const ptrdiff_t row_bytes = tl_kggml_row_bytes(kind, K);
    const int cols = kq_block_cols[kq_index(kind)];
    float *w = malloc(sizeof(float) * N * K), *v = malloc(sizeof(float) * K);
    double *a = malloc(sizeof(double) * K), *b = malloc(sizeof(double) * K);
    uint8_t *raw = malloc((size_t)(N * row_bytes));
    for (ptrdiff_t i = 0; i < N * K; i++) w[i] = (float)(0.02 * uniform() * (1 + 3 * (i % 97 == 0)));
    for (ptrdiff_t k = 0; k < 32; k++) w[K + k] = 0.0f; /* a group of zeros */
    int ok = tl_kquantize(kind, w, K, N, K, NULL, raw, 2) == 0;
    double err = 0, naive = 0;
    for (ptrdiff_t n = 0; n < N; n++) {
        for (ptrdiff_t c = 0; c < K; c += cols)
            ggml_reference(kind, raw + n * row_bytes + c / cols * kq_block_size[kq_index(kind)], v + c, a + c, b + c);
        for (ptrdiff_t k = 0; k < K; k++) err += ((double)w[n * K + k] - v[k]) * ((double)w[n * K + k] - v[k]);
        if (n == 1)
            for (ptrdiff_t k = 0; k < 32; k++) ok &= v[k] == 0.0f;
        /* plain symmetric rounding per 32 at the format's bits, max|w| at the grid's end: a loose yardstick */
        const int levels = kind == W_Q6_K ? 32 : kind == W_Q5_0 || kind == W_Q5_K ? 16 : 8;
        for (ptrdiff_t g = 0; g < K / 32; g++) {
            double amax = 0;
            for (ptrdiff_t k = 32 * g; k < 32 * g + 32; k++) amax = fabs(w[n * K + k]) > amax ? fabs(w[n * K + k]) : amax;
            const double s = amax / levels;
            for (ptrdiff_t k = 32 * g; k < 32 * g + 32; k++) {
                const double q = s > 0 ? fmin(levels - 1, fmax(-levels, nearbyint(w[n * K + k] / s))) * s : 0;
                naive += (w[n * K + k] - q) * (w[n * K + k] - q);
            }
        }
    }
    ok &= err < naive;
    if (!ok) printf("  FAIL kquantize kind %d: squared error %.3e, plain rounding %.3e\n", kind, err, naive);
    free(w); free(v); free(a); free(b); free(raw);
    return ok;
}

/* GGUF Q8_0 / Q4_0 rows repacked (quantize.c's tl_repack_ggml), read back by the layout's definition (as
 * check_qmatmul reads it) against ggml's block definition: Q8_0 = float16 d then 32 int8 q, value d q; Q4_0 = float16
 * d then 16 bytes, column k < 16 the low nibble of byte k, k >= 16 the high nibble of byte k - 16, value d (u - 8).
 * Random bytes (every int8 including -128, every nibble, any float16 bits), rows at an offset in the matrix and a
 * source stride past the row (the file's rows are read in pieces into a fused matrix). */
static int check_repack_ggml(int kind, ptrdiff_t N, ptrdiff_t K, ptrdiff_t row0)
{
    const ptrdiff_t G = K / 32, bb = kind == W_Q8 ? 34 : 18, lds = G * bb + 5, rows = row0 + N;
    const ptrdiff_t blocks = (rows + 15) / 16, bytes = kind == W_Q8 ? 512 : 256;
    uint8_t *src = malloc((size_t)(N * lds)), *data = calloc((size_t)(blocks * G * bytes), 1);
    uint16_t *scales = calloc((size_t)(blocks * G * 16), 2);
    for (ptrdiff_t i = 0; i < N * lds; i++) src[i] = (uint8_t)(128.0 + 128.0 * uniform());
    tl_repack_ggml(kind, src, lds, N, row0, data, scales, G, 2);
    int ok = 1;
    for (ptrdiff_t i = 0; i < N; i++)
        for (ptrdiff_t k = 0; k < K; k++) {
            const ptrdiff_t n = row0 + i, b = n / 16, r = n % 16, g = k / 32, c = k % 32;
            const uint8_t *blk = src + i * lds + g * bb;
            const uint16_t d = (uint16_t)(blk[0] | blk[1] << 8);
            int q, want;
            if (kind == W_Q8) {
                q = data[(b * G + g) * 512 + (c / 4) * 64 + 4 * r + c % 4] - 128;
                want = (int8_t)blk[2 + c];
            } else {
                const int byte = data[(b * G + g) * 256 + (c / 8) * 64 + 4 * r + c % 4];
                q = (c % 8 < 4 ? byte & 15 : byte >> 4) - 8;
                want = (c < 16 ? blk[2 + c] & 15 : blk[2 + c - 16] >> 4) - 8;
            }
            if (q != want || scales[(b * G + g) * 16 + r] != d) ok = 0;
        }
    if (!ok) printf("  FAIL repack_ggml kind %d N=%td K=%td row0=%td\n", kind, N, K, row0);
    free(src); free(data); free(scales);
    return ok;
}

int main(void)
{
    static const ptrdiff_t shapes[][3] = {{1, 1, 16}, {3, 7, 15}, {5, 25, 17}, {4, 97, 100}, {9, 300, 1024},
                                          {1, 61, 700}, {17, 64, 256}, {70, 33, 65}};
    static const ptrdiff_t att[][5] = {{1, 8, 2, 64, 0}, {1, 8, 2, 64, 300}, {3, 4, 4, 16, 10}, {40, 6, 3, 24, 17},
                                       {70, 4, 1, 36, 0}};
    static const ptrdiff_t widen_shapes[][2] = {{1, 8}, {3, 7}, {5, 33}, {37, 203}};
    static const ptrdiff_t swiglu_shapes[][2] = {{1, 1}, {3, 7}, {9, 203}, {70, 1000}};
    static const ptrdiff_t rms_shapes[][3] = {{1, 7, 0}, {3, 100, 1}, {7, 100, 0}, {40, 2048, 1}};
    static const ptrdiff_t rot_shapes[][5] = {{1, 2, 1, 8, 10}, {5, 9, 3, 12, 50}, {7, 4, 2, 64, 100},
                                              {40, 40, 8, 64, 64}};
    static const ptrdiff_t seqs_shapes[][3] = {{4, 2, 16}, {6, 3, 24}, {8, 1, 64}};
    if (tl_abi_version() <= 0) return 1;
    int failed = 0, ran = 0;
    for (int isa = 0; isa < ISA_COUNT; isa++) {
        if (!tl_isa_usable(isa)) {
#if defined(__x86_64__) || defined(_M_X64)
            if (!tl_isa_compiled(isa)) printf("%s: not compiled in\n", names[isa]); /* (elsewhere only portable is) */
#else
            if (isa == ISA_PORTABLE) printf("%s: not compiled in\n", names[isa]);
#endif
            continue;
        }
        int ok = 1, n = 0;
        for (int wtype = W_F32; wtype <= W_F16; wtype++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++, n++)
                ok &= check_matmul(isa, wtype, shapes[s][0], shapes[s][1], shapes[s][2]);
        for (size_t s = 0; s < sizeof att / sizeof att[0]; s++, n++)
            ok &= check_attention(isa, att[s][0], att[s][1], att[s][2], att[s][3], att[s][4]);
        for (int wtype = W_BF16; wtype <= W_F16; wtype++)
            for (size_t s = 0; s < sizeof widen_shapes / sizeof widen_shapes[0]; s++, n++)
                ok &= check_widen(isa, wtype, widen_shapes[s][0], widen_shapes[s][1]);
        for (size_t s = 0; s < sizeof swiglu_shapes / sizeof swiglu_shapes[0]; s++, n++)
            ok &= check_swiglu(isa, swiglu_shapes[s][0], swiglu_shapes[s][1]);
        for (size_t s = 0; s < sizeof rms_shapes / sizeof rms_shapes[0]; s++, n++)
            ok &= check_rms_norm(isa, rms_shapes[s][0], rms_shapes[s][1], (int)rms_shapes[s][2]);
        for (size_t s = 0; s < sizeof rot_shapes / sizeof rot_shapes[0]; s++, n++)
            ok &= check_rotary(isa, rot_shapes[s][0], rot_shapes[s][1], rot_shapes[s][2], rot_shapes[s][3],
                               rot_shapes[s][4]);
        for (size_t s = 0; s < sizeof seqs_shapes / sizeof seqs_shapes[0]; s++, n++)
            ok &= check_attention_seqs(isa, seqs_shapes[s][0], seqs_shapes[s][1], seqs_shapes[s][2]);
        for (int wtype = W_F32; wtype <= W_F16; wtype++, n++) ok &= check_decoder_layers(isa, wtype);
        for (int kind = W_Q8; kind <= W_Q4; kind++)
            for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++, n++)
                ok &= check_qmatmul(isa, kind, shapes[s][0], shapes[s][1], shapes[s][2]);
        for (int kind = W_Q8; kind <= W_Q4; kind++, n++) /* plain C, the same in every variant's library */
            ok &= check_repack_ggml(kind, 37, 96, 21) & check_repack_ggml(kind, 300, 2048, 0);
        printf("%s: %d checks %s\n", names[isa], n, ok ? "passed" : "FAILED");
        failed |= !ok;
        ran++;
    }
    /* llama.cpp's block formats (after the others, whose inputs stay those of the random sequence they had) */
    static const ptrdiff_t kshapes[][3] = {{1, 37, 512}, {4, 64, 256}, {9, 50, 768}, {1, 16, 256}, {17, 33, 256}};
    for (int isa = 0; isa < ISA_COUNT; isa++) {
        if (!tl_isa_usable(isa)) continue;
        int ok = 1, n = 0;
        for (int kk = 0; kk < 8; kk++)
            for (size_t s = 0; s < sizeof kshapes / sizeof kshapes[0]; s++, n++)
                ok &= check_kmatmul(isa, kq_kinds[kk], kshapes[s][0], kshapes[s][1], kshapes[s][2], 0);
        if (isa == ISA_AVX512 && tl_kmatmul_build(isa) == 3) /* the build for AVX-512 CPUs without VNNI, here too */
            for (int kk = 0; kk < 8; kk++, n++) ok &= check_kmatmul(isa, kq_kinds[kk], 5, 40, 512, 1);
        ok &= check_matmul_parts(isa);
        n++;
        printf("%s block formats: %d checks %s\n", names[isa], n, ok ? "passed" : "FAILED");
        failed |= !ok;
    }
    static const int made[] = {W_Q4_K, W_Q5_K, W_Q6_K, W_Q5_0};
    int ok = 1;
    for (int i = 0; i < 4; i++) ok &= check_kquantize(made[i]);
    printf("block-format quantizer: 4 checks %s\n", ok ? "passed" : "FAILED");
    failed |= !ok;
    return failed || !ran;
}
