/* Template: y = x @ w.T for the activations of a step (float32) against a weight kept in its checkpoint's dtype.
 * Included by each variant_*.c after its simd_*.h (VL lanes, vf vectors, TILE_MB x tile_nr register tiles).
 *
 * x:   (M, K) float32, row stride ldx      the step's activations (any M: decode, batches, drafts, prefill)
 * w:   (N, K) float32 | bf16 | fp16, row stride ldw (elements)   a weight in Hugging Face's [out, in] layout
 * out: (M, N) float32, row stride ldo
 *
 * Every weight value is widened exactly to float32 in registers right before an fp32 FMA (bf16: a shift or a mask of
 * the raw bits; fp16: vcvtph2ps), so the products are those of the float32 weights. Each output is a dot product:
 * VL lane partial sums over K in a fixed order, reduced once at the end. That order does not depend on M, on the tile
 * a row lands in, on the block sizes or on the thread count, so a sequence's logits are bit-identical whatever else is
 * in its batch (a prefill chunk, other sequences, speculative drafts).
 *
 * x is first packed: each row zero-padded to whole chunks, and for bf16 weights each chunk of 2*VL columns reordered
 * as its VL even then its VL odd columns (one 2*VL-element load of bf16 yields the even elements by a shift and the
 * odd ones by a mask, in place). The weight's rows are cut into blocks of ~256 KB that the threads take in turn; a
 * block stays in L2 while every TILE_MB rows of x run over its register tiles, so it is read from memory once. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Tile heights per number of rows of x: TILE_NR_1 at one row, TILE_NR_<mb> (default TILE_NR_N) above. */
#ifndef TILE_NR_N
#define TILE_NR_N TILE_NR_1
#endif
#ifndef TILE_NR_2
#define TILE_NR_2 TILE_NR_N
#endif
#ifndef TILE_NR_3
#define TILE_NR_3 TILE_NR_N
#endif
#ifndef TILE_NR_4
#define TILE_NR_4 TILE_NR_N
#endif
#ifndef TILE_NR_5
#define TILE_NR_5 TILE_NR_N
#endif
#ifndef TILE_NR_6
#define TILE_NR_6 TILE_NR_N
#endif
#ifndef TILE_NR_7
#define TILE_NR_7 TILE_NR_N
#endif
#ifndef TILE_NR_8
#define TILE_NR_8 TILE_NR_N
#endif
#define TILE_NR_MAX_(a, b) ((a) > (b) ? (a) : (b))
#define TILE_NR_MAX TILE_NR_MAX_(TILE_NR_MAX_(TILE_NR_MAX_(TILE_NR_1, TILE_NR_2), TILE_NR_MAX_(TILE_NR_3, TILE_NR_4)), \
                                 TILE_NR_MAX_(TILE_NR_MAX_(TILE_NR_5, TILE_NR_6), TILE_NR_MAX_(TILE_NR_7, TILE_NR_8)))
static const int tile_nr[9] = {0, TILE_NR_1, TILE_NR_2, TILE_NR_3, TILE_NR_4, TILE_NR_5, TILE_NR_6, TILE_NR_7, TILE_NR_8};

/* Software prefetch of the weight, by the number of rows of x (M): below PF_NEXT_TILE_BELOW rows each chunk of a tile
 * prefetches the same chunk of the next tile's rows into L2 (PF_NEXT_TILE), so a tile's rows are in cache when it
 * starts; below PF_MAX_ROWS, each row's own chunk PF_BYTES ahead into L1 (PF_AHEAD); from PF_MAX_ROWS rows none
 * (the tiles are bound by arithmetic and the hardware prefetchers keep up). Measured A/B in one process over
 * TinyLlama's bf16 matrices (2 threads, Zen 4): next-tile against ahead-in-row gave avx512 +5% at M=1, +16-18% at
 * M=4-8, +9-10% at M=16-32, nothing at M=128-512; avx2 +13% at M=1-4 but -6% at M=8 and -35% at M=32 (its smaller
 * tiles issue more prefetches per FMA), hence its own threshold; portable +23% at M=1, +9% at M=8. */
#ifndef PF_BYTES
#define PF_BYTES 512
#endif
#ifndef PF_MAX_ROWS
#define PF_MAX_ROWS 64
#endif
#ifndef PF_NEXT_TILE_BELOW
#define PF_NEXT_TILE_BELOW PF_MAX_ROWS
#endif
enum { PF_NONE = 0, PF_AHEAD = 1, PF_NEXT_TILE = 2 };
/* Weight bytes per block: a block stays in L2 (1 MB per core here) while every TILE_MB rows of x run over its tiles.
 * Where x is at most one tile high (decode, small batches) nothing is re-used and longer blocks keep each thread on
 * one run of rows longer, fewer restarts of the hardware prefetchers' streams. Measured A/B in one process over
 * TinyLlama's bf16 matrices (2 threads, Zen 4): at batch 1 in a fast-memory spell 256 KB blocks read 35-39 GB/s,
 * 1 MB 41-45, 4 MB 41-45, a plain read of the same bytes 46-48 (+3-6% in slower spells); above one tile, 512 KB
 * against 256 KB gave +6% at 8 rows, +3% at 16, +1.5% at 32, nothing at 128-512. */
#ifndef BLOCK_BYTES
#define BLOCK_BYTES 524288
#endif
#ifndef BLOCK_BYTES_ONE_PASS
#define BLOCK_BYTES_ONE_PASS 1048576
#endif

#define CHUNK(wt) ((wt) == W_BF16 ? 2 * VL : VL)
#define ELEM(wt) ((wt) == W_F32 ? 4 : 2)
#define W_ROW(w, wt, j, ldw) ((const char *)(w) + (ptrdiff_t)(j) * (ldw) * ELEM(wt))

/* One chunk of the tile: acc[i][j] += x[i, k:k+CHUNK] . w[j, k:k+CHUNK]. */
TARGET INLINE void chunk_step(vf acc[TILE_MB][TILE_NR_MAX], const float *xp, ptrdiff_t ldxp, const char *w,
                              ptrdiff_t ldw_bytes, ptrdiff_t k, const int mb, const int nr, const int wt, const int pf)
{
    vf wv[TILE_NR_MAX];
    const ptrdiff_t off = k * ELEM(wt);
    if (pf == PF_NEXT_TILE) /* the same chunk of the next tile's rows, into L2 (a prefetch past the end never faults) */
        for (int j = 0; j < nr; j++) __builtin_prefetch(w + (nr + j) * ldw_bytes + off, 0, 2);
    else if (pf == PF_AHEAD) /* this row's chunk PF_BYTES ahead, into L1 */
        for (int j = 0; j < nr; j++) __builtin_prefetch(w + j * ldw_bytes + off + PF_BYTES, 0, 3);
    if (wt == W_BF16) {
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) wv[j] = bf16_even((const uint16_t *)(w + j * ldw_bytes + off));
#pragma GCC unroll 4
        for (int i = 0; i < mb; i++) {
            vf xv = vf_load(xp + i * ldxp + k);
            KEEP(xv);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[i][j] = vf_fmadd(xv, wv[j], acc[i][j]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) wv[j] = bf16_odd((const uint16_t *)(w + j * ldw_bytes + off));
#pragma GCC unroll 4
        for (int i = 0; i < mb; i++) {
            vf xv = vf_load(xp + i * ldxp + k + VL);
            KEEP(xv);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[i][j] = vf_fmadd(xv, wv[j], acc[i][j]);
        }
    } else {
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++)
            wv[j] = wt == W_F32 ? vf_load((const float *)(w + j * ldw_bytes + off))
                                : f16_load((const uint16_t *)(w + j * ldw_bytes + off));
#pragma GCC unroll 4
        for (int i = 0; i < mb; i++) {
            vf xv = vf_load(xp + i * ldxp + k);
            KEEP(xv);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[i][j] = vf_fmadd(xv, wv[j], acc[i][j]);
        }
    }
}

/* One register tile: out[i, j] = x[i] . w[j] for i < mb, j < nr (constants after inlining); K > 0 columns. */
TARGET INLINE void tile(const float *xp, ptrdiff_t ldxp, const char *w, ptrdiff_t ldw, float *out, ptrdiff_t ldo,
                        ptrdiff_t K, const int mb, const int nr, const int wt, const int pf)
{
    vf acc[TILE_MB][TILE_NR_MAX];
#pragma GCC unroll 4
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) acc[i][j] = vf_zero();
    const ptrdiff_t ldw_bytes = ldw * ELEM(wt), full = K - K % CHUNK(wt);
    ptrdiff_t k = 0;
    for (; k < full; k += CHUNK(wt)) chunk_step(acc, xp, ldxp, w, ldw_bytes, k, mb, nr, wt, pf);
    if (k < K) { /* the last partial chunk: the weight rows' tails copied into zero padding (x is padded already) */
        float pad[TILE_NR_MAX][2 * VL];
        memset(pad, 0, sizeof pad);
        for (int j = 0; j < nr; j++) memcpy(pad[j], w + j * ldw_bytes + k * ELEM(wt), (size_t)(K - k) * ELEM(wt));
        chunk_step(acc, xp + k, ldxp, (const char *)pad, (ptrdiff_t)sizeof pad[0], 0, mb, nr, wt, 0);
    }
#pragma GCC unroll 4
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) out[i * ldo + j] = vf_sum(acc[i][j]);
}

#define TILE_CASE(mb, nr, wt) \
    case ((mb) * 32 + (nr)) * 4 + (wt): \
        if (pf == PF_NEXT_TILE) tile(xp, ldxp, w, ldw, out, ldo, K, mb, nr, wt, PF_NEXT_TILE); \
        else if (pf == PF_AHEAD) tile(xp, ldxp, w, ldw, out, ldo, K, mb, nr, wt, PF_AHEAD); \
        else tile(xp, ldxp, w, ldw, out, ldo, K, mb, nr, wt, PF_NONE); \
        return;
#define TILE_CASES_W(mb, nr) TILE_CASE(mb, nr, W_F32) TILE_CASE(mb, nr, W_BF16) TILE_CASE(mb, nr, W_F16)

/* A full tile, mb <= TILE_MB rows of x by tile_nr[mb] weight rows, each shape compiled with its constants; any
 * other shape (the last weight rows of a matrix) one output at a time, with the same order of sums. */
TARGET static void tile_any(const float *xp, ptrdiff_t ldxp, const char *w, ptrdiff_t ldw, float *out, ptrdiff_t ldo,
                            ptrdiff_t K, int mb, int nr, int wt, int pf)
{
    switch ((mb * 32 + nr) * 4 + wt) {
        TILE_CASES_W(1, TILE_NR_1)
        TILE_CASES_W(1, 1)
#if TILE_MB >= 2
        TILE_CASES_W(2, TILE_NR_2)
#endif
#if TILE_MB >= 3
        TILE_CASES_W(3, TILE_NR_3)
#endif
#if TILE_MB >= 4
        TILE_CASES_W(4, TILE_NR_4)
#endif
#if TILE_MB >= 5
        TILE_CASES_W(5, TILE_NR_5)
#endif
#if TILE_MB >= 6
        TILE_CASES_W(6, TILE_NR_6)
#endif
#if TILE_MB >= 7
        TILE_CASES_W(7, TILE_NR_7)
#endif
#if TILE_MB >= 8
        TILE_CASES_W(8, TILE_NR_8)
#endif
    default:
        break;
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nr; j++)
            tile_any(xp + i * ldxp, ldxp, w + j * ldw * ELEM(wt), ldw, out + i * ldo + j, ldo, K, 1, 1, wt, pf);
}

/* Pack x (M, K) into xp (M, Kp): rows zero-padded to whole chunks, bf16 chunks reordered even/odd (see the top). */
static void pack_x(const float *x, ptrdiff_t ldx, ptrdiff_t M, ptrdiff_t K, int wt, float *xp, ptrdiff_t ldxp)
{
    const ptrdiff_t chunk = CHUNK(wt), full = K - K % chunk;
    for (ptrdiff_t i = 0; i < M; i++) {
        const float *src = x + i * ldx;
        float *dst = xp + i * ldxp;
        if (K % chunk) memset(dst + full, 0, (size_t)chunk * sizeof(float));
        if (wt != W_BF16) {
            memcpy(dst, src, (size_t)K * sizeof(float));
            continue;
        }
        for (ptrdiff_t c = 0; c < full; c += chunk)
            for (int l = 0; l < VL; l++) { /* a loop the compiler turns into shuffles */
                dst[c + l] = src[c + 2 * l];
                dst[c + VL + l] = src[c + 2 * l + 1];
            }
        for (ptrdiff_t k = full; k < K; k++) {
            ptrdiff_t r = k - full;
            dst[full + (r % 2) * VL + r / 2] = src[k];
        }
    }
}

typedef struct {
    const float *xp;
    ptrdiff_t ldxp;
    const char *w;
    ptrdiff_t ldw;
    int wt;
    float *out;
    ptrdiff_t ldo, M, N, K, rows;
} mm_job;

/* Block b of the weight's rows against every row of x. */
TARGET static void mm_block(void *arg, ptrdiff_t b)
{
    const mm_job *j = (const mm_job *)arg;
    ptrdiff_t n_begin = b * j->rows, n_end = n_begin + j->rows < j->N ? n_begin + j->rows : j->N;
    const int pf = j->M < PF_NEXT_TILE_BELOW ? PF_NEXT_TILE : j->M < PF_MAX_ROWS ? PF_AHEAD : PF_NONE;
    for (ptrdiff_t m0 = 0; m0 < j->M; m0 += TILE_MB) {
        int mb = j->M - m0 < TILE_MB ? (int)(j->M - m0) : TILE_MB;
        int step = tile_nr[mb];
        for (ptrdiff_t n0 = n_begin; n0 < n_end; n0 += step) {
            int nr = n_end - n0 < step ? (int)(n_end - n0) : step;
            tile_any(j->xp + m0 * j->ldxp, j->ldxp, W_ROW(j->w, j->wt, n0, j->ldw), j->ldw,
                     j->out + m0 * j->ldo + n0, j->ldo, j->K, mb, nr, j->wt, pf);
        }
    }
}

static ptrdiff_t whole_tiles(ptrdiff_t rows)
{
    return rows < BLOCK_ROWS_UNIT ? BLOCK_ROWS_UNIT : rows - rows % BLOCK_ROWS_UNIT;
}

static _Thread_local float *packed_x;
static _Thread_local size_t packed_x_capacity;

void VARIANT(tl_matmul)(const float *x, ptrdiff_t ldx, const void *w, ptrdiff_t ldw, int wtype, float *out,
                        ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        for (ptrdiff_t i = 0; i < M; i++) memset(out + i * ldo, 0, (size_t)N * sizeof(float));
        return;
    }
    const ptrdiff_t chunk = CHUNK(wtype), ldxp = (K + chunk - 1) / chunk * chunk;
    size_t need = (size_t)(M * ldxp);
    if (need > packed_x_capacity) {
        free(packed_x);
        packed_x = (float *)malloc(need * sizeof(float));
        packed_x_capacity = packed_x ? need : 0;
        if (!packed_x) abort();
    }
    pack_x(x, ldx, M, K, wtype, packed_x, ldxp);
    ptrdiff_t rows = whole_tiles((M <= TILE_MB ? BLOCK_BYTES_ONE_PASS : BLOCK_BYTES) / (K * ELEM(wtype)));
    if ((N + rows - 1) / rows < 4 * threads) rows = whole_tiles(N / (4 * threads)); /* small weights: every thread works */
    mm_job job = {packed_x, ldxp, (const char *)w, ldw, wtype, out, ldo, M, N, K, rows};
    tl_parallel(mm_block, &job, (N + rows - 1) / rows, threads);
}

typedef struct {
    const char *w;
    ptrdiff_t ldw;
    int wt;
    float *out;
    ptrdiff_t ldo, N, K, rows;
} widen_job;

/* Rows of block b of a 16-bit weight widened to float32, in order (exact). */
TARGET static void widen_block(void *arg, ptrdiff_t b)
{
    const widen_job *j = (const widen_job *)arg;
    ptrdiff_t n_end = (b + 1) * j->rows < j->N ? (b + 1) * j->rows : j->N;
    for (ptrdiff_t n = b * j->rows; n < n_end; n++) {
        const uint16_t *src = (const uint16_t *)W_ROW(j->w, j->wt, n, j->ldw);
        float *dst = j->out + n * j->ldo;
        if (j->wt == W_BF16) {
            for (ptrdiff_t k = 0; k < j->K; k++) { /* the compiler vectorises this: zero-extend, shift */
                uint32_t bits = (uint32_t)src[k] << 16;
                memcpy(dst + k, &bits, 4);
            }
        } else {
            ptrdiff_t k = 0;
            for (; k + VL <= j->K; k += VL) vf_store(dst + k, f16_load(src + k));
            if (k < j->K) {
                uint16_t tail[VL];
                float wide[VL];
                memset(tail, 0, sizeof tail);
                memcpy(tail, src + k, (size_t)(j->K - k) * 2);
                vf_store(wide, f16_load(tail));
                memcpy(dst + k, wide, (size_t)(j->K - k) * sizeof(float));
            }
        }
    }
}

/* out (N, K) float32 = w (N, K) bf16 or fp16 widened exactly; strides in elements. */
void VARIANT(tl_widen)(const void *w, ptrdiff_t ldw, int wtype, float *out, ptrdiff_t ldo, ptrdiff_t N, ptrdiff_t K,
                       int threads)
{
    if (N <= 0 || K <= 0 || wtype == W_F32) return;
    ptrdiff_t rows = (N + 8 * threads - 1) / (8 * threads);
    widen_job job = {(const char *)w, ldw, wtype, out, ldo, N, K, rows};
    tl_parallel(widen_block, &job, (N + rows - 1) / rows, threads);
}

typedef struct {
    const float *gate_up;
    ptrdiff_t ld, inter;
    float *out;
    ptrdiff_t ldo, rows;
    ptrdiff_t M;
} swiglu_job;

TARGET static void swiglu_rows(void *arg, ptrdiff_t b)
{
    const swiglu_job *j = (const swiglu_job *)arg;
    ptrdiff_t m_end = (b + 1) * j->rows < j->M ? (b + 1) * j->rows : j->M, I = j->inter, Iv = I - I % VL;
    const vf one = vf_set1(1.0f);
    for (ptrdiff_t m = b * j->rows; m < m_end; m++) {
        const float *g = j->gate_up + m * j->ld, *u = g + I;
        float *o = j->out + m * j->ldo;
        for (ptrdiff_t i = 0; i < Iv; i += VL) {
            vf x = vf_load(g + i);
            vf e = vf_exp(vf_mul(x, vf_set1(-1.0f))); /* e^-x: 0 for x > 87.3 (silu(x) = x there) */
            vf_store(o + i, vf_mul(vf_div(x, vf_add(one, e)), vf_load(u + i)));
        }
        for (ptrdiff_t i = Iv; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* out (M, I) = silu(gate) * up for gate_up (M, 2I), gate columns first; silu(x) = x / (1 + e^-x), float32. */
void VARIANT(tl_swiglu)(const float *gate_up, ptrdiff_t ld, float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t inter,
                        int threads)
{
    if (M <= 0 || inter <= 0) return;
    ptrdiff_t rows = M < 4 * threads ? 1 : (M + 4 * threads - 1) / (4 * threads);
    swiglu_job job = {gate_up, ld, inter, out, ldo, rows, M};
    tl_parallel(swiglu_rows, &job, (M + rows - 1) / rows, threads);
}

typedef struct {
    const float *x, *res, *w, *cos, *sin;
    const long long *pos;
    ptrdiff_t ldx, ldr, ldo, H, rows, M, heads, head_dim;
    float eps;
    float *out_x, *out_h;
} rows_job;

/* Rows of rms_norm: v = x (+ res), out_x = v when asked, out_h = w * (v * (1 / sqrt(mean(v^2) + eps))): the
 * operations and their order of NumPy's rms_norm (the mean summed in VL lanes, then across them). */
TARGET static void rms_rows(void *arg, ptrdiff_t b)
{
    const rows_job *j = (const rows_job *)arg;
    ptrdiff_t m_end = (b + 1) * j->rows < j->M ? (b + 1) * j->rows : j->M, H = j->H, Hv = H - H % VL;
    for (ptrdiff_t m = b * j->rows; m < m_end; m++) {
        const float *x = j->x + m * j->ldx, *r = j->res ? j->res + m * j->ldr : NULL;
        float *v = j->out_x ? j->out_x + m * j->ldo : j->out_h + m * j->ldo, *h = j->out_h + m * j->ldo;
        vf acc = vf_zero();
        float tail = 0.0f;
        for (ptrdiff_t i = 0; i < Hv; i += VL) {
            vf xv = r ? vf_add(vf_load(x + i), vf_load(r + i)) : vf_load(x + i);
            vf_store(v + i, xv);
            acc = vf_fmadd(xv, xv, acc);
        }
        for (ptrdiff_t i = Hv; i < H; i++) {
            v[i] = r ? x[i] + r[i] : x[i];
            tail += v[i] * v[i];
        }
        const float inv = 1.0f / sqrtf((vf_sum(acc) + tail) / (float)H + j->eps);
        const vf vinv = vf_set1(inv);
        for (ptrdiff_t i = 0; i < Hv; i += VL)
            vf_store(h + i, vf_mul(vf_load(j->w + i), vf_mul(vf_load(v + i), vinv)));
        for (ptrdiff_t i = Hv; i < H; i++) h[i] = j->w[i] * (v[i] * inv);
    }
}

/* out_h (M, H) = rms_norm(x (+ res)) with weight w (H,); out_x (M, H) = x + res when res is given (the residual
 * stream after the add), else NULL. Rows of x, res, out_x, out_h at strides ldx, ldr, ldo, ldo. */
void VARIANT(tl_rms_norm)(const float *x, ptrdiff_t ldx, const float *res, ptrdiff_t ldr, const float *w, float eps,
                          float *out_x, float *out_h, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t H, int threads)
{
    if (M <= 0) return;
    ptrdiff_t rows = M < 4 * threads ? 1 : (M + 4 * threads - 1) / (4 * threads);
    rows_job job = {x, res, w, NULL, NULL, NULL, ldx, ldr, ldo, H, rows, M, 0, 0, eps, out_x, out_h};
    tl_parallel(rms_rows, &job, (M + rows - 1) / rows, M * H > 65536 ? threads : 1);
}

/* Rows of the rotary embedding, in place: for each of the first `heads` heads of a row (head_dim d, half = d/2),
 * x1 = x[:half], x2 = x[half:] -> x1 * c - x2 * s, x2 * c + x1 * s with c, s the first halves of the position's
 * cos / sin rows (Hugging Face's rotate_half convention, the operations of NumPy's apply_rotary). */
TARGET static void rotary_rows(void *arg, ptrdiff_t b)
{
    const rows_job *j = (const rows_job *)arg;
    ptrdiff_t m_end = (b + 1) * j->rows < j->M ? (b + 1) * j->rows : j->M, half = j->head_dim / 2;
    ptrdiff_t hv = half - half % VL;
    for (ptrdiff_t m = b * j->rows; m < m_end; m++) {
        const float *c = j->cos + j->pos[m] * j->head_dim, *s = j->sin + j->pos[m] * j->head_dim;
        float *row = (float *)j->x + m * j->ldx;
        for (ptrdiff_t hd = 0; hd < j->heads; hd++) {
            float *x1 = row + hd * j->head_dim, *x2 = x1 + half;
            for (ptrdiff_t i = 0; i < hv; i += VL) {
                vf a = vf_load(x1 + i), bb = vf_load(x2 + i), cv = vf_load(c + i), sv = vf_load(s + i);
                vf_store(x1 + i, vf_sub(vf_mul(a, cv), vf_mul(bb, sv)));
                vf_store(x2 + i, vf_add(vf_mul(bb, cv), vf_mul(a, sv)));
            }
            for (ptrdiff_t i = hv; i < half; i++) {
                float a = x1[i], bb = x2[i];
                x1[i] = a * c[i] - bb * s[i];
                x2[i] = bb * c[i] + a * s[i];
            }
        }
    }
}

/* Rotary embedding in place on the first `heads` heads of each row of x (M rows at stride ldx), row m at position
 * pos[m]; cos, sin: (positions, head_dim) tables. */
void VARIANT(tl_rotary)(float *x, ptrdiff_t ldx, const long long *pos, const float *cos, const float *sin,
                        ptrdiff_t M, ptrdiff_t heads, ptrdiff_t head_dim, int threads)
{
    if (M <= 0) return;
    ptrdiff_t rows = M < 4 * threads ? 1 : (M + 4 * threads - 1) / (4 * threads);
    rows_job job = {x, NULL, NULL, cos, sin, pos, ldx, 0, 0, 0, rows, M, heads, head_dim, 0.0f, NULL, NULL};
    tl_parallel(rotary_rows, &job, (M + rows - 1) / rows, M * heads * head_dim > 65536 ? threads : 1);
}
