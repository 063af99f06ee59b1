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
#include <stdlib.h>
#include <string.h>

#ifndef PF_BYTES
#define PF_BYTES 512       /* prefetch each weight row this far ahead */
#endif
#ifndef PF_MAX_ROWS
#define PF_MAX_ROWS 64     /* prefetch only below this many rows of x (above, the tiles are bound by arithmetic) */
#endif
#ifndef PF_NEXT_TILE
#define PF_NEXT_TILE 0
#endif
#ifndef PF_LOCALITY
#define PF_LOCALITY 3 /* prefetcht0: into L1 (measured: 29.6 against 26.2 GB/s into L2 at 2 KB) */
#endif
#ifndef BLOCK_BYTES
#define BLOCK_BYTES 262144 /* weight bytes per block */
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
#if PF_NEXT_TILE
    /* The same line of the next tile's rows: a whole tile ahead, so every row of the next tile is already streaming
     * when it starts (rows follow each other in memory; a prefetch past the end never faults). */
    if (pf)
        for (int j = 0; j < nr; j++) __builtin_prefetch(w + (nr + j) * ldw_bytes + off, 0, PF_LOCALITY);
#else
    if (pf)
        for (int j = 0; j < nr; j++) __builtin_prefetch(w + j * ldw_bytes + off + PF_BYTES, 0, PF_LOCALITY);
#endif
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
    case ((mb) * 16 + (nr)) * 4 + (wt): \
        if (pf) tile(xp, ldxp, w, ldw, out, ldo, K, mb, nr, wt, 1); \
        else tile(xp, ldxp, w, ldw, out, ldo, K, mb, nr, wt, 0); \
        break;
#define TILE_CASES_W(mb, nr) TILE_CASE(mb, nr, W_F32) TILE_CASE(mb, nr, W_BF16) TILE_CASE(mb, nr, W_F16)

/* A tile of any mb <= TILE_MB, nr <= TILE_NR_MAX and weight type, each shape compiled with its constants. */
TARGET static void tile_any(const float *xp, ptrdiff_t ldxp, const char *w, ptrdiff_t ldw, float *out, ptrdiff_t ldo,
                            ptrdiff_t K, int mb, int nr, int wt, int pf)
{
    switch ((mb * 16 + nr) * 4 + wt) {
#define NR_CASES(mb) TILE_CASES_W(mb, 1) TILE_CASES_W(mb, 2) TILE_CASES_W(mb, 3) TILE_CASES_W(mb, 4)
        NR_CASES(1)
#if TILE_MB >= 2
        NR_CASES(2)
#endif
#if TILE_MB >= 3
        NR_CASES(3)
#endif
#if TILE_MB >= 4
        NR_CASES(4)
#endif
#if TILE_NR_MAX >= 5
        TILE_CASES_W(1, 5) TILE_CASES_W(1, 6) TILE_CASES_W(2, 5) TILE_CASES_W(2, 6)
#if TILE_MB >= 3
        TILE_CASES_W(3, 5) TILE_CASES_W(3, 6)
#endif
#if TILE_MB >= 4
        TILE_CASES_W(4, 5) TILE_CASES_W(4, 6)
#endif
#endif
#if TILE_NR_MAX >= 8
        TILE_CASES_W(1, 7) TILE_CASES_W(1, 8)
#endif
#if TILE_NR_MAX >= 12
        TILE_CASES_W(1, 9) TILE_CASES_W(1, 10) TILE_CASES_W(1, 11) TILE_CASES_W(1, 12)
#endif
    default:
        abort(); /* a shape the tables above never ask for */
    }
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
    for (ptrdiff_t m0 = 0; m0 < j->M; m0 += TILE_MB) {
        int mb = j->M - m0 < TILE_MB ? (int)(j->M - m0) : TILE_MB;
        int step = tile_nr[mb];
        for (ptrdiff_t n0 = n_begin; n0 < n_end; n0 += step) {
            int nr = n_end - n0 < step ? (int)(n_end - n0) : step;
            tile_any(j->xp + m0 * j->ldxp, j->ldxp, W_ROW(j->w, j->wt, n0, j->ldw), j->ldw,
                     j->out + m0 * j->ldo + n0, j->ldo, j->K, mb, nr, j->wt, j->M < PF_MAX_ROWS);
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
    ptrdiff_t rows = whole_tiles(BLOCK_BYTES / (K * ELEM(wtype)));
    if ((N + rows - 1) / rows < 4 * threads) rows = whole_tiles(N / (4 * threads)); /* small weights: every thread works */
    mm_job job = {packed_x, ldxp, (const char *)w, ldw, wtype, out, ldo, M, N, K, rows};
    tl_parallel(mm_block, &job, (N + rows - 1) / rows, threads);
}
