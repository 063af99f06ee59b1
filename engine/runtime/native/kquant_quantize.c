/* Our quantizer for llama.cpp's block formats (Q4_K, Q5_K, Q6_K, Q5_0): float32 rows -> ggml's blocks, byte for byte
 * the file format (gguf.quants.dequantize reads them), which kquant_pack.c then repacks for the kernels. Used for
 * `weights_dtype="q4_k_m"` on a safetensors checkpoint (engine/runtime/kquant_mix.py). Plain C (it runs once per
 * checkpoint: the result is cached on disk); rows are shared among the pool's threads.
 *
 * Every choice minimises the weighted squared error sum_k iw_k (w_k - v_k)^2 of the values v the file will hold
 * (iw: per-column importance, e.g. the mean square of the activations that meet the column, else 1), with every
 * float16 rounded first and the integers rounded against the rounded values:
 *   1. per sub-block, the best grid: for 4+ candidate steps around the range, the integers u rounded, then the scale
 *      (and minimum) refitted by weighted least squares for those u, the best kept and refined by re-rounding;
 *   2. per super-block, the sub-blocks' scales (and minimums) rounded to their 6 / 8-bit integers on a float16 d
 *      (and dmin): each sub-block tries the integers on either side of its ideal value (u re-rounded each time);
 *      then d and dmin are refitted by least squares over the super-block for those integers, rounded to float16,
 *      and the integers chosen again, while the error falls (at most KQ_PASSES times).
 * (Q5_0: step 1 with a float16 scale.) llama.cpp's quantizer does step 1 with a heuristic weight and rounds the
 * scales once (make_qkx2_quants, make_qx_quants); this search is never worse than its first guess. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "kquant_layout.h"

uint16_t tl_f32_to_f16(float f);
float tl_f16_to_f32(uint16_t h);
void tl_kq_encode_block(int kind, const kq_block *b, uint8_t *p);
ptrdiff_t tl_kq_ggml_block_bytes(int kind);

#define KQ_PASSES 4
#ifndef KQ_AFFINE_STEPS
#define KQ_AFFINE_STEPS 8
#define KQ_AFFINE_STEP 0.125f
#endif

static float f16r(float v) { return tl_f16_to_f32(tl_f32_to_f16(v)); }

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* 4 floats (GCC / Clang vector extensions: SSE2 on baseline x86-64, NEON on ARM) */
typedef float v8 __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(16)));
#define VW 4 /* lanes */
static inline v8 v8_load(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline v8 v8_set(float a) { return (v8){a, a, a, a}; }
/* rint for |v| < 2^22 by adding and subtracting 1.5 * 2^23 (ties to even, as rintf) */
static inline v8 v8_round(v8 v) { return (v + v8_set(12582912.0f)) - v8_set(12582912.0f); }
static inline v8 v8_clamp(v8 v, float lo, float hi)
{
    const v8 l = v8_set(lo), h = v8_set(hi);
    v8i below = (v8i)(v < l), above = (v8i)(v > h);
    v = (v8)((below & (v8i)l) | (~below & (v8i)v));
    return (v8)((above & (v8i)h) | (~above & (v8i)v));
}
static inline double v8_sum(v8 v)
{
    double s = 0.0;
    for (int l = 0; l < VW; l++) s += v[l];
    return s;
}

/* sum iw (w - (a u - b))^2 over n (16 or 32) values for u = clamp(rint((w + b) / a), 0, nmax), a > 0; and, when u is
 * not NULL, those u. */
static double round_affine(const float *w, const float *iw, int n, int nmax, float a, float b, uint8_t *u)
{
    const v8 inv = v8_set(1.0f / a), va = v8_set(a), vb = v8_set(b);
    v8 err = v8_set(0.0f);
    for (int k = 0; k < n; k += VW) {
        const v8 x = v8_load(w + k);
        const v8 q = v8_clamp(v8_round(v8_clamp((x + vb) * inv, -1.0f, (float)nmax + 1.0f)), 0.0f, (float)nmax);
        const v8 e = x - (va * q - vb);
        err += v8_load(iw + k) * e * e;
        if (u)
            for (int l = 0; l < VW; l++) u[k + l] = (uint8_t)q[l];
    }
    return v8_sum(err);
}

/* Step 1 for the formats with a minimum: the best (a >= 0, b >= 0) with w ~ a u - b, u in 0..nmax (n = 32). For
 * each candidate step the integers are rounded and (a, b) refitted by weighted least squares; the candidates are
 * ranked by the error of that fit (closed form), and the best is re-rounded once. */
static double fit_affine(const float *w, const float *iw, int n, int nmax, float *pa, float *pb, uint8_t *u)
{
    float lo = w[0], hi = w[0];
    for (int k = 1; k < n; k++) {
        lo = w[k] < lo ? w[k] : lo;
        hi = w[k] > hi ? w[k] : hi;
    }
    lo = lo < 0.0f ? lo : 0.0f;
    v8 vs = v8_set(0), vsw = v8_set(0), vsww = v8_set(0);
    for (int k = 0; k < n; k += VW) {
        const v8 x = v8_load(w + k), i = v8_load(iw + k);
        vs += i;
        vsw += i * x;
        vsww += i * x * x;
    }
    const double s = v8_sum(vs), sw = v8_sum(vsw), sww = v8_sum(vsww);
    *pa = 0.0f;
    *pb = 0.0f;
    memset(u, 0, (size_t)n);
    if (hi <= lo) { /* all equal to lo <= 0: the minimum alone */
        *pb = -lo;
        double err = 0.0;
        for (int k = 0; k < n; k++) err += iw[k] * ((double)w[k] + *pb) * ((double)w[k] + *pb);
        return err;
    }
    double best_fit = sww; /* the all-zero grid */
    float best_a = 0.0f, best_c = 0.0f;
    const v8 vlo = v8_set(lo);
    for (int step = -KQ_AFFINE_STEPS; step <= KQ_AFFINE_STEPS; step++) {
        const v8 iscale = v8_set(((float)nmax + KQ_AFFINE_STEP * (float)step) / (hi - lo));
        v8 su = v8_set(0), suu = v8_set(0), suw = v8_set(0);
        for (int k = 0; k < n; k += VW) {
            const v8 x = v8_load(w + k), i = v8_load(iw + k);
            const v8 q = v8_clamp(v8_round(iscale * (x - vlo)), 0.0f, (float)nmax);
            su += i * q;
            suu += i * q * q;
            suw += i * q * x;
        }
        const double Su = v8_sum(su), Suu = v8_sum(suu), Suw = v8_sum(suw);
        /* least squares w ~ a u + c (c = -b <= 0) */
        const double det = s * Suu - Su * Su;
        if (det <= 0) continue;
        double a = (s * Suw - Su * sw) / det, c = (Suu * sw - Su * Suw) / det;
        if (c > 0) { /* the minimum may not be negative: c = 0 */
            c = 0;
            a = Suu > 0 ? Suw / Suu : 0;
        }
        if (a <= 0) continue;
        /* sum iw (a u + c - w)^2 for these u */
        const double fit = sww + a * a * Suu + c * c * s + 2 * a * c * Su - 2 * a * Suw - 2 * c * sw;
        if (fit < best_fit) {
            best_fit = fit;
            best_a = (float)a;
            best_c = (float)c;
        }
    }
    if (best_a <= 0.0f) return sww;
    *pa = best_a;
    *pb = -best_c;
    return round_affine(w, iw, n, nmax, best_a, -best_c, u);
}

/* sum iw (w - a q)^2 over n (16 or 32) values for q = clamp(rint(w / a), lo, hi), a != 0; and those q when q is not
 * NULL. */
static double round_symmetric(const float *w, const float *iw, int n, int lo, int hi, float a, int *q)
{
    const v8 inv = v8_set(1.0f / a), va = v8_set(a);
    v8 err = v8_set(0.0f);
    for (int k = 0; k < n; k += VW) {
        const v8 x = v8_load(w + k);
        const v8 t = v8_clamp(v8_round(v8_clamp(x * inv, (float)lo - 1.0f, (float)hi + 1.0f)), (float)lo, (float)hi);
        const v8 e = x - va * t;
        err += v8_load(iw + k) * e * e;
        if (q)
            for (int l = 0; l < VW; l++) q[k + l] = (int)t[l];
    }
    return v8_sum(err);
}

/* Step 1 for the symmetric formats: the best a (any sign) with w ~ a q, q = u - off in -off..nmax-off (n = 16 or
 * 32): for candidate steps putting the largest |w| near either end of the grid, q rounded and a refitted by least
 * squares, ranked by that fit's error (closed form); the best re-rounded once. */
static double fit_symmetric(const float *w, const float *iw, int n, int nmax, int off, float *pa, int *q)
{
    float mx = 0.0f, amax = 0.0f;
    for (int k = 0; k < n; k++)
        if (fabsf(w[k]) > amax) {
            amax = fabsf(w[k]);
            mx = w[k];
        }
    v8 vsww = v8_set(0);
    for (int k = 0; k < n; k += VW) vsww += v8_load(iw + k) * v8_load(w + k) * v8_load(w + k);
    const double sww = v8_sum(vsww);
    *pa = 0.0f;
    for (int k = 0; k < n; k++) q[k] = 0;
    if (amax == 0.0f) return sww;
    double best_fit = sww;
    float best_a = 0.0f;
    const float lo = (float)-off, hi = (float)(nmax - off);
    for (int side = 0; side < 2; side++)
        for (int step = -4; step <= 4; step++) { /* mx at -off (the negative end) or at nmax - off, +- steps of 1/4 */
            const float div = (side == 0 ? lo : hi) + 0.25f * (float)step;
            if (div == 0.0f) continue;
            const v8 inv = v8_set(div / mx);
            v8 sqq = v8_set(0), sqw = v8_set(0);
            for (int k = 0; k < n; k += VW) {
                const v8 x = v8_load(w + k), i = v8_load(iw + k);
                const v8 t = v8_clamp(v8_round(v8_clamp(x * inv, lo - 1.0f, hi + 1.0f)), lo, hi);
                sqq += i * t * t;
                sqw += i * t * x;
            }
            const double Sqq = v8_sum(sqq), Sqw = v8_sum(sqw);
            if (Sqq <= 0) continue;
            const double fit = sww - Sqw * Sqw / Sqq; /* the least-squares a = Sqw / Sqq for these q */
            if (fit < best_fit) {
                best_fit = fit;
                best_a = (float)(Sqw / Sqq);
            }
        }
    if (best_a == 0.0f) return sww;
    *pa = best_a;
    return round_symmetric(w, iw, n, -off, nmax - off, best_a, q);
}

/* Given the float16 d (and dmin), the best integer scale sc (and minimum m) of one sub-block near its ideal a (b):
 * the integers on either side, u re-rounded for each; returns the error and sets sc, m, u. */
static double choose_affine(const float *w, const float *iw, int n, int nmax, int smax, float d, float dmin, float a,
                            float b, int *psc, int *pm, uint8_t *u)
{
    double best = INFINITY;
    const int sc0 = d > 0 ? (int)floorf(a / d) : 0, m0 = dmin > 0 ? (int)floorf(b / dmin) : 0;
    *psc = 0;
    *pm = 0;
    for (int i = 0; i <= 1; i++)
        for (int jm = 0; jm <= 1; jm++) {
            const int sc = clampi(sc0 + i, 0, smax), m = clampi(m0 + jm, 0, smax);
            const float A = d * (float)sc, B = dmin * (float)m;
            double err = 0.0;
            if (A > 0) {
                err = round_affine(w, iw, n, nmax, A, B, NULL);
            } else {
                for (int k = 0; k < n; k++) err += iw[k] * ((double)w[k] + B) * ((double)w[k] + B);
            }
            if (err < best) {
                best = err;
                *psc = sc;
                *pm = m;
            }
        }
    const float A = d * (float)*psc, B = dmin * (float)*pm;
    if (A > 0) round_affine(w, iw, n, nmax, A, B, u);
    else memset(u, 0, (size_t)n);
    return best;
}

/* Q4_K / Q5_K: one super-block of 256 (8 x 32). */
static void quantize_k4(int kind, const float *w, const float *iw, kq_block *blk)
{
    const int nmax = kind == W_Q5_K ? 31 : 15;
    float a[8], b[8];
    uint8_t u[256];
    for (int j = 0; j < 8; j++) fit_affine(w + 32 * j, iw + 32 * j, 32, nmax, &a[j], &b[j], u + 32 * j);
    float amax = 0, bmax = 0;
    for (int j = 0; j < 8; j++) {
        amax = a[j] > amax ? a[j] : amax;
        bmax = b[j] > bmax ? b[j] : bmax;
    }
    float d = f16r(amax / 63.0f), dmin = f16r(bmax / 63.0f);
    double best = INFINITY;
    kq_block cand;
    for (int pass = 0; pass < KQ_PASSES; pass++) {
        double err = 0.0;
        for (int j = 0; j < 8; j++)
            err += choose_affine(w + 32 * j, iw + 32 * j, 32, nmax, 63, d, dmin, a[j], b[j], &cand.sc[j], &cand.m[j],
                                 cand.u + 32 * j);
        if (err >= best) break;
        best = err;
        cand.d = tl_f32_to_f16(d);
        cand.dmin = tl_f32_to_f16(dmin);
        *blk = cand;
        /* least squares for d, dmin given the integers: w ~ d (sc u) - dmin m */
        double s11 = 0, s12 = 0, s22 = 0, s1w = 0, s2w = 0;
        for (int k = 0; k < 256; k++) {
            const double x1 = (double)cand.sc[k / 32] * cand.u[k], x2 = -(double)cand.m[k / 32];
            s11 += iw[k] * x1 * x1;
            s12 += iw[k] * x1 * x2;
            s22 += iw[k] * x2 * x2;
            s1w += iw[k] * x1 * w[k];
            s2w += iw[k] * x2 * w[k];
        }
        const double det = s11 * s22 - s12 * s12;
        double nd, nm;
        if (det > 1e-30 * s11 * s22 && s22 > 0) {
            nd = (s1w * s22 - s2w * s12) / det;
            nm = (s2w * s11 - s1w * s12) / det;
        } else {
            nd = s11 > 0 ? s1w / s11 : 0;
            nm = 0;
        }
        if (nd < 0) nd = 0;
        if (nm < 0) nm = 0;
        /* the ideal per-sub-block values follow the refitted d, dmin: a_j = d sc_j, b_j = dmin m_j */
        for (int j = 0; j < 8; j++) {
            a[j] = (float)(nd * cand.sc[j]);
            b[j] = (float)(nm * cand.m[j]);
        }
        d = f16r((float)nd);
        dmin = f16r((float)nm);
    }
}

/* Q6_K: one super-block of 256 (16 x 16), q = u - 32 in -32..31, int8 scales. */
static void quantize_q6k(const float *w, const float *iw, kq_block *blk)
{
    float a[16];
    int q[256];
    for (int j = 0; j < 16; j++) fit_symmetric(w + 16 * j, iw + 16 * j, 16, 63, 32, &a[j], q + 16 * j);
    float amax = 0, am = 0;
    for (int j = 0; j < 16; j++)
        if (fabsf(a[j]) > amax) {
            amax = fabsf(a[j]);
            am = a[j];
        }
    float d = f16r(am / -128.0f); /* the largest scale at the int8 grid's -128 end (d may be negative) */
    double best = INFINITY;
    kq_block cand;
    for (int pass = 0; pass < KQ_PASSES && d != 0.0f; pass++) {
        double err = 0.0;
        for (int j = 0; j < 16; j++) {
            const int s0 = (int)floorf(a[j] / d);
            double bj = INFINITY;
            for (int i = 0; i <= 1; i++) {
                const int sc = clampi(s0 + i, -128, 127);
                const float A = d * (float)sc;
                double e = 0.0;
                if (A != 0.0f) e = round_symmetric(w + 16 * j, iw + 16 * j, 16, -32, 31, A, NULL);
                else
                    for (int k = 0; k < 16; k++) e += iw[16 * j + k] * (double)w[16 * j + k] * w[16 * j + k];
                if (e < bj) {
                    bj = e;
                    cand.sc[j] = sc;
                }
            }
            int t[16] = {0};
            const float A = d * (float)cand.sc[j];
            if (A != 0.0f) round_symmetric(w + 16 * j, iw + 16 * j, 16, -32, 31, A, t);
            for (int k = 0; k < 16; k++) cand.u[16 * j + k] = (uint8_t)(t[k] + 32);
            err += bj;
        }
        if (err >= best) break;
        best = err;
        cand.d = tl_f32_to_f16(d);
        cand.dmin = 0;
        *blk = cand;
        double sxx = 0, sxw = 0;
        for (int k = 0; k < 256; k++) {
            const double x = (double)cand.sc[k / 16] * ((int)cand.u[k] - 32);
            sxx += iw[k] * x * x;
            sxw += iw[k] * x * w[k];
        }
        if (sxx <= 0) break;
        const double nd = sxw / sxx;
        for (int j = 0; j < 16; j++) a[j] = (float)(nd * cand.sc[j]);
        d = f16r((float)nd);
    }
    if (best == INFINITY) { /* all zero */
        memset(blk, 0, sizeof *blk);
        for (int k = 0; k < 256; k++) blk->u[k] = 32;
    }
}

/* Q5_0: one block of 32, q = u - 16 in -16..15, a float16 scale. */
static void quantize_q50(const float *w, const float *iw, kq_block *blk)
{
    float a;
    int q[32];
    fit_symmetric(w, iw, 32, 31, 16, &a, q);
    memset(blk, 0, sizeof *blk);
    blk->sc[0] = 1;
    const float cands[3] = {f16r(a), f16r(a * (1.0f + 1.0f / 1024)), f16r(a * (1.0f - 1.0f / 1024))};
    double best = INFINITY;
    for (int c = 0; c < 3; c++) {
        const float d = cands[c];
        if (d == 0.0f) continue;
        const double e = round_symmetric(w, iw, 32, -16, 15, d, NULL);
        if (e < best) {
            best = e;
            blk->d = tl_f32_to_f16(d);
        }
    }
    if (best < INFINITY) {
        int t[32];
        round_symmetric(w, iw, 32, -16, 15, tl_f16_to_f32(blk->d), t);
        for (int k = 0; k < 32; k++) blk->u[k] = (uint8_t)(t[k] + 16);
    } else {
        for (int k = 0; k < 32; k++) blk->u[k] = 16;
    }
}

typedef struct {
    int kind;
    const float *w, *iw;
    ptrdiff_t ldw, n, K, per;
    uint8_t *dst;
} kq_quant_job;

static void quantize_rows(void *arg, ptrdiff_t t)
{
    const kq_quant_job *j = (const kq_quant_job *)arg;
    const ptrdiff_t end = (t + 1) * j->per < j->n ? (t + 1) * j->per : j->n, sb = KQ_SB(j->kind);
    const ptrdiff_t gb = tl_kq_ggml_block_bytes(j->kind), row_bytes = j->K / sb * gb;
    float ones[256];
    for (int k = 0; k < 256; k++) ones[k] = 1.0f;
    kq_block blk;
    for (ptrdiff_t i = t * j->per; i < end; i++)
        for (ptrdiff_t s = 0; s < j->K / sb; s++) {
            const float *w = j->w + i * j->ldw + s * sb, *iw = j->iw ? j->iw + s * sb : ones;
            if (j->kind == W_Q6_K) quantize_q6k(w, iw, &blk);
            else if (j->kind == W_Q5_0) quantize_q50(w, iw, &blk);
            else quantize_k4(j->kind, w, iw, &blk);
            tl_kq_encode_block(j->kind, &blk, j->dst + i * row_bytes + s * gb);
        }
}

/* n rows of float32 w (K columns, row stride ldw) -> ggml blocks of `kind` (W_Q4_K, W_Q5_K, W_Q6_K, W_Q5_0) at dst,
 * row i at dst + i * (K / block columns) * block bytes; iw: K per-column importances (> 0), or NULL for 1. Returns
 * 0, or -1 for a kind it does not make. */
int tl_kquantize(int kind, const float *w, ptrdiff_t ldw, ptrdiff_t n, ptrdiff_t K, const float *iw, uint8_t *dst,
                 int threads)
{
    if (kind != W_Q4_K && kind != W_Q5_K && kind != W_Q6_K && kind != W_Q5_0) return -1;
    if (n <= 0) return 0;
    ptrdiff_t per = (n + 8 * threads - 1) / (8 * threads);
    kq_quant_job job = {kind, w, iw, ldw, n, K, per < 1 ? 1 : per, dst};
    tl_parallel(quantize_rows, &job, (n + job.per - 1) / job.per, threads);
    return 0;
}
