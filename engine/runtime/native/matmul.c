/* y = x @ w.T for float32 at few rows of x: the decode, batched-decode and speculative-verify matmuls.
 *
 * x:   (M, K) float32, row stride ldx     (the activations of the step's tokens)
 * w:   (N, K) float32, row stride ldw     (a weight in Hugging Face's [out, in] layout)
 * out: (M, N) float32, row stride ldo
 *
 * Why our own: OpenBLAS's GEMM at 2-32 rows packs the whole weight for every call and reads it far below memory
 * bandwidth (M=8: ~6-9 GB/s against ~30-35 GB/s for a GEMV on a 2-core EPYC). Here every weight row is read from
 * memory once per call whatever M is: a tile of 6 weight rows (8 at M=1) is loaded 16 floats at a time and
 * multiplied into MB rows of x held in cache, 24 accumulators in AVX-512 registers, reduced once at the end of the row.
 * Threads (OpenMP) take blocks of the weight's rows in turn, so each streams its own contiguous part.
 */
#include <immintrin.h>
#include <stddef.h>

#define MB 4               /* rows of x per register tile (measured: 1.1x over 8 rows x 3 weight rows at M=8-32) */
#define NR 8               /* most rows of w per register tile (see rows_per_tile) */
#define PF_DIST 512        /* prefetch each weight row this many floats ahead into L2 (measured: 1.1-1.3x at M=1-8) */
#define BLOCK_BYTES 262144 /* weight rows per cache block: re-used from L2 by every MB-row chunk of x */
#define BLOCK_ROWS_UNIT 24 /* block heights are multiples of every tile height in rows_per_tile */

/* Weight rows per tile for mb rows of x: as many accumulators as the 32 zmm registers allow (mb*nr + nr + 1),
 * and several weight rows in flight even at mb=1, where the kernel is a GEMV bound by memory. */
static const int rows_per_tile[MB + 1] = {0, 8, 6, 6, 6};

#define TARGET __attribute__((target("avx512f")))
#define INLINE __attribute__((always_inline)) static inline

/* One register tile: out[i, j] = x[i, :] . w[j, :] for i < mb, j < nr (mb, nr are constants after inlining). */
TARGET INLINE void tile(const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t ldw, float *out, ptrdiff_t ldo,
                        ptrdiff_t K, const int mb, const int nr)
{
    __m512 acc[MB][NR];
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) {
            _mm_prefetch((const char *)(w + j * ldw + k + PF_DIST), _MM_HINT_T1);
            wv[j] = _mm512_loadu_ps(w + j * ldw + k);
        }
#pragma GCC unroll 8
        for (int i = 0; i < mb; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
            __asm__("" : "+v"(xv)); /* keep xv in a register: GCC would otherwise fold one load into each FMA */
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) { /* the last K % 16 columns, with masked loads */
        __mmask16 m = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) wv[j] = _mm512_maskz_loadu_ps(m, w + j * ldw + k);
#pragma GCC unroll 8
        for (int i = 0; i < mb; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x + i * ldx + k);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mb; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#define TILE_CASE(mb, nr) \
    case (mb) * 16 + (nr): tile(x, ldx, w, ldw, out, ldo, K, mb, nr); break;
#define TILE_CASES(mb) TILE_CASE(mb, 1) TILE_CASE(mb, 2) TILE_CASE(mb, 3) TILE_CASE(mb, 4) \
    TILE_CASE(mb, 5) TILE_CASE(mb, 6) TILE_CASE(mb, 7) TILE_CASE(mb, 8)

/* A tile of any mb <= MB, nr <= NR, each shape compiled with its constants. */
TARGET static void tile_any(const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t ldw, float *out, ptrdiff_t ldo,
                            ptrdiff_t K, int mb, int nr)
{
    switch (mb * 16 + nr) {
        TILE_CASES(1) TILE_CASES(2) TILE_CASES(3) TILE_CASES(4)
    }
}

/* 1 if this CPU runs the AVX-512 kernel, else 0 (the caller then uses BLAS). */
int matmul_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 1 : 0;
}

/* `rows` rounded down to whole tiles of every height, at least one unit. */
static ptrdiff_t whole_tiles(ptrdiff_t rows)
{
    return rows < BLOCK_ROWS_UNIT ? BLOCK_ROWS_UNIT : rows - rows % BLOCK_ROWS_UNIT;
}

/* out = x @ w.T (shapes above) on `threads` threads. Blocks of weight rows are split among the threads; inside a
 * block every MB-row chunk of x runs over the block's tiles, so the block is read from memory once. */
TARGET void matmul_xwt(const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t ldw, float *out, ptrdiff_t ldo,
                       ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    ptrdiff_t rows = whole_tiles(BLOCK_BYTES / (K * (ptrdiff_t)sizeof(float)));
    if ((N + rows - 1) / rows < 4 * threads) /* small weights: smaller blocks so every thread gets work */
        rows = whole_tiles(N / (4 * threads));
    ptrdiff_t blocks = (N + rows - 1) / rows;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (ptrdiff_t b = 0; b < blocks; b++) {
        ptrdiff_t n_end = (b + 1) * rows < N ? (b + 1) * rows : N;
        for (ptrdiff_t m0 = 0; m0 < M; m0 += MB) {
            int mb = M - m0 < MB ? (int)(M - m0) : MB;
            int step = rows_per_tile[mb];
            for (ptrdiff_t n0 = b * rows; n0 < n_end; n0 += step) {
                int nr = n_end - n0 < step ? (int)(n_end - n0) : step;
                tile_any(x + m0 * ldx, ldx, w + n0 * ldw, ldw, out + m0 * ldo + n0, ldo, K, mb, nr);
            }
        }
    }
}
