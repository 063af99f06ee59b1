/* Template: y = x @ W.T for float32 activations against a quantized weight (int8 or int4, groups of 32 columns with
 * a float16 scale each; the layout of engine/runtime/quant.py). Included by each variant_*.c after its simd_*.h, with
 * QV / QVARIANT naming its functions and entry points and QDOT choosing how a group's integer sums are computed:
 * QDOT_VNNI (AVX512-VNNI vpdpbusd), QDOT_MADD (vpmaddwd: AVX-512 BW, AVX2; the primitives of simd_*.h) or QDOT_LANES
 * (portable vector C, one weight row per lane).
 *
 * Activations are rounded to int16, per row and group of 32: xs = max|x| / QX_MAX, xq = rint(x / xs), QX_MAX = 32639
 * (relative error <= 2^-16 of the group's largest value, where llama.cpp rounds them to int8: 2^-8). QX_MAX leaves
 * room to write every xq as 256 hi + lo with hi and lo both int8 (|xq| <= 32639 = 127 * 256 + 127): VNNI multiplies
 * bytes, unsigned weight bytes by signed activation bytes, 64 products per instruction, so an exact int16 product is
 * two of them. Weights are stored offset to unsigned, u = q + 128 (int8) or q + 8 (int4, one nibble), so per output
 * row n and group g
 *     S = sum_k q[n, k] xq[k] = sum_k u[n, k] xq[k] - off * sum_k xq[k]      (off = 128 | 8)
 * and every build computes sum_k u xq exactly in int32 (|sum u xq| <= 32 * 255 * 32639 < 2^28; VNNI as
 * 256 sum u hi + sum u lo, each below 2^21; the others as int16 pair products), in whatever order suits it: the
 * integer is the same. Each group's sum is turned to float32 once and added in group order:
 *     y[n] = fma(float(S_g), float(s[n, g]) * xs_g, y[n])   for g = 0, 1, ..
 * The order is fixed and the integer part exact, so a row's result does not depend on M, its tile, the threads or
 * the rows beside it (the same batch invariance as the 16-bit kernels), and every build with a hardware FMA (avx512
 * VNNI and BW, avx2) gives the same bits.
 *
 * Layout (quant.py): rows in blocks of 16, a block's groups contiguous (blocks, groups, ...), per block and group:
 *   int8: 8 quads of columns x 16 rows x 4 bytes: [p, r, j] = u of column 4 p + j of row r (512 bytes);
 *   int4: 4 words x 16 rows x 4 bytes: byte [c, r, j] holds column 8 c + j in its low nibble and 8 c + 4 + j in its
 *         high nibble (256 bytes).
 * A 64-byte vector is then 16 rows x 4 columns (VNNI: lane = row, one 4-byte dot product per lane).
 *
 * Work: tasks of whole blocks; a task runs every row of x over its blocks (they stay in L2), QNBT blocks of weight
 * rows by QMB rows of x per register tile. At one row of x (decode) a tile is ONE block: a task then reads its blocks
 * as one sequential stream, every 64-byte line of it prefetched QPF_AHEAD bytes ahead into L2. Measured A/B in one
 * process, Zen 4, one thread (CPU time, so other jobs' use of the cores does not count): on a 65536 x 2048 matrix the
 * single stream with 8 KB ahead read 1.2-1.5x faster than 4-block tiles with 2 KB ahead into L1 (the old kernel);
 * over TinyLlama's layer matrices prefetching every line rather than every other one gave int4 +43% (int8 +3%);
 * 4 KB ahead -3 to -12%, 16 KB or 32 KB, scales prefetched too, or prefetcht0 / prefetcht2: within the noise. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QROWS 16                 /* weight rows per block (the lanes of the layout) */
#define QGROUP 32                /* columns per scale */
#define QH (QROWS / VL)          /* vectors per block row-set */
#define QX_MAX 32639.0f          /* the largest |xq| (see the top) */
#define QXB 64                   /* bytes of one row's group of activations, in the order the build reads (qx_store) */
#define QBYTES(kind) ((kind) == W_Q8 ? 512 : 256)
#define QOFFSET(kind) ((kind) == W_Q8 ? 128 : 8)
#ifndef QPF_AHEAD
#define QPF_AHEAD 8192 /* bytes of the weight stream prefetched ahead, every 64-byte line, into L2 (see the top) */
#endif
#define QNBT_MAX (QNBT_1 > QNBT_N8 ? (QNBT_1 > QNBT_N4 ? QNBT_1 : QNBT_N4) : (QNBT_N8 > QNBT_N4 ? QNBT_N8 : QNBT_N4))

/* ---- The integer sums of one group: S[m][b][h] = sum_k u xq over the group for rows of x m < mb, blocks b < nbt
 * (lanes h * VL.. of the block's 16 rows). base[b]: the block's group; xg: row m0's group of activations, the next
 * row's ldx bytes further. ---- */
#if QDOT == QDOT_VNNI
/* x per group: 32 hi bytes then 32 lo bytes (xq = 256 hi + lo). A 64-byte weight vector (4 columns of each row) times
 * a broadcast quad of hi, and of lo: vpdpbusd adds the 4 products of each lane. int4's high nibbles are shifted down
 * to plain values (vpdpbusd's unsigned operand). */
QTARGET INLINE void QV(group)(qv S[QMB][QNBT_MAX][QH], const uint8_t *const base[], const int8_t *xg, ptrdiff_t ldx,
                              const int mb, const int nbt, const int kind)
{
    /* at one row and one block, the quads alternate between two pairs of accumulators (more chains in flight) */
    enum { SPLIT = 2 };
    const int split = mb * nbt == 1 ? SPLIT : 1;
    qv hi[QMB][QNBT_MAX][SPLIT], lo[QMB][QNBT_MAX][SPLIT];
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
            for (int s = 0; s < split; s++) hi[m][b][s] = lo[m][b][s] = qv_zero();
    if (kind == W_Q8) {
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++) {
            const int s = p % split;
            qv w[QNBT_MAX];
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++) w[b] = qv_load(base[b] + 64 * p);
#pragma GCC unroll 4
            for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++) {
                    hi[m][b][s] = qv_dpbusd(hi[m][b][s], w[b], xg + m * ldx + 4 * p);
                    lo[m][b][s] = qv_dpbusd(lo[m][b][s], w[b], xg + m * ldx + 32 + 4 * p);
                }
        }
    } else {
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const int s = c % split;
            qv wl[QNBT_MAX], wh[QNBT_MAX];
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++) {
                const qv v = qv_load(base[b] + 64 * c);
                wl[b] = qv_low_nibbles(v);
                wh[b] = qv_high_nibbles(v);
            }
#pragma GCC unroll 4
            for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++) {
                    const int8_t *x = xg + m * ldx + 8 * c;
                    hi[m][b][s] = qv_dpbusd(qv_dpbusd(hi[m][b][s], wl[b], x), wh[b], x + 4);
                    lo[m][b][s] = qv_dpbusd(qv_dpbusd(lo[m][b][s], wl[b], x + 32), wh[b], x + 36);
                }
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) {
            qv h = hi[m][b][0], l = lo[m][b][0];
            if (split == 2) {
                h = qv_add(h, hi[m][b][1]);
                l = qv_add(l, lo[m][b][1]);
            }
            S[m][b][0] = qv_add(qv_slli(h, 8), l);
        }
}
#define QX_SPLIT 1 /* x stored as hi and lo bytes */
#elif QDOT == QDOT_MADD
/* x per group: int16. int8: 2 VL weight bytes (VL / 2 rows x 4 columns) widened to int16, times a broadcast quad of
 * x: vpmaddwd gives a row's two pair sums in two lanes (qv_fold adds them). int4: a vector of VL rows x 4 bytes, each
 * 16-bit word holding 4 nibbles: nibble i of every word taken in place (qw_nibble: times 16^Q4_SCALE(i)), its pairs
 * (columns 8 c + 2 w + (0, 4, 1, 5)[i] of word w = 0, 1) against x stored in that order (qx_store), summed apart by place
 * value and shifted back at the end (each partial sum an exact multiple of its 16^s). */
QTARGET INLINE void QV(group)(qv S[QMB][QNBT_MAX][QH], const uint8_t *const base[], const int16_t *xg, ptrdiff_t ldx,
                              const int mb, const int nbt, const int kind)
{
    if (kind == W_Q8) {
        qv acc[QMB][QNBT_MAX][2 * QH]; /* pair lanes: vector i holds rows i VL/2 .. (i + 1) VL/2 */
#pragma GCC unroll 4
        for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                for (int i = 0; i < 2 * QH; i++) acc[m][b][i] = qv_zero();
#pragma GCC unroll 8
        for (int p = 0; p < 8; p++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                for (int i = 0; i < 2 * QH; i++) {
                    const qw w = qw_u8(base[b] + 64 * p + 2 * VL * i);
#pragma GCC unroll 4
                    for (int m = 0; m < mb; m++) acc[m][b][i] = qv_madd_quad(acc[m][b][i], w, xg + m * ldx + 4 * p);
                }
#pragma GCC unroll 4
        for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                for (int h = 0; h < QH; h++) S[m][b][h] = qv_fold(acc[m][b][2 * h], acc[m][b][2 * h + 1]);
    } else {
        qv acc[QMB][QNBT_MAX][QH][3];
#pragma GCC unroll 4
        for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                for (int h = 0; h < QH; h++) acc[m][b][h][0] = acc[m][b][h][1] = acc[m][b][h][2] = qv_zero();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                for (int h = 0; h < QH; h++) {
                    const qv words = qv_load(base[b] + 64 * c + 4 * VL * h);
#pragma GCC unroll 4
                    for (int i = 0; i < 4; i++) {
                        const qw w = qw_nibble(words, i);
#pragma GCC unroll 4
                        for (int m = 0; m < mb; m++)
                            acc[m][b][h][Q4_SCALE(i)] = qv_madd_pair(acc[m][b][h][Q4_SCALE(i)], w,
                                                                     xg + m * ldx + 8 * c + 2 * i);
                    }
                }
#pragma GCC unroll 4
        for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                for (int h = 0; h < QH; h++)
                    S[m][b][h] = qv_add(acc[m][b][h][0], qv_add(qv_srai(acc[m][b][h][1], 4),
                                                                qv_srai(acc[m][b][h][2], 8)));
    }
}
#define QX_SPLIT 0
#define QX_NIBBLE_ORDER 1 /* int4's activations in the order of qw_nibble's pairs */
#else /* QDOT_LANES: a lane per weight row (VL rows per vector), its 4 bytes of each vector taken apart by shifts */
QTARGET INLINE void QV(group)(qv S[QMB][QNBT_MAX][QH], const uint8_t *const base[], const int16_t *xg, ptrdiff_t ldx,
                              const int mb, const int nbt, const int kind)
{
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
            for (int h = 0; h < QH; h++) S[m][b][h] = qv_zero();
    for (int c = 0; c < (kind == W_Q8 ? 8 : 4); c++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
            for (int h = 0; h < QH; h++) {
                const qv words = qv_load(base[b] + 64 * c + 4 * VL * h);
#pragma GCC unroll 4
                for (int m = 0; m < mb; m++) {
                    const int16_t *x = xg + m * ldx;
                    qv a = S[m][b][h];
                    if (kind == W_Q8) {
#pragma GCC unroll 4
                        for (int j = 0; j < 4; j++) a = qv_add(a, qv_mul1(qv_byte(words, j), x[4 * c + j]));
                    } else {
#pragma GCC unroll 4
                        for (int j = 0; j < 4; j++) {
                            const qv byte = qv_byte(words, j);
                            a = qv_add(a, qv_mul1(qv_and15(byte), x[8 * c + j]));
                            a = qv_add(a, qv_mul1(qv_srli(byte, 4), x[8 * c + 4 + j]));
                        }
                    }
                    S[m][b][h] = a;
                }
            }
}
#define QX_SPLIT 0
#define QX_NIBBLE_ORDER 0
#endif

typedef struct {
    const char *xq;      /* (M, G) groups of activations, QXB bytes each (qx_store's order) */
    const float *xs;     /* (M, G) their scales */
    const int32_t *xsum; /* (M, G) the sum of each group's int16 values (for the offset of u) */
    const uint8_t *data; /* the weight's integers, kernel layout */
    const uint16_t *scales; /* (blocks, G, 16) float16 */
    int kind;            /* W_Q8 | W_Q4 */
    float *out;
    ptrdiff_t ldo, M, N, G, blocks, task_blocks;
} QV(job);

/* One register tile: rows m0..m0+mb of x against blocks b0..b0+nbt of the weight (constants after inlining). */
QTARGET INLINE void QV(tile)(const QV(job) *j, ptrdiff_t m0, ptrdiff_t b0, const int mb, const int nbt, const int kind)
{
    vf accf[QMB][QNBT_MAX][QH];
    const ptrdiff_t G = j->G;
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
            for (int h = 0; h < QH; h++) accf[m][b][h] = vf_zero();
    const uint8_t *base[QNBT_MAX];
#pragma GCC unroll 4
    for (int b = 0; b < nbt; b++) base[b] = j->data + (b0 + b) * G * QBYTES(kind);
    for (ptrdiff_t g = 0; g < G; g++) {
        if (m0 == 0) { /* the first pass over these blocks reads them from memory; later rows of x find them in L2 */
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
                for (int l = 0; l < QBYTES(kind); l += 64) __builtin_prefetch(base[b] + QPF_AHEAD + l, 0, 2);
        }
        qv S[QMB][QNBT_MAX][QH];
        QV(group)(S, base, (const void *)(j->xq + (m0 * G + g) * QXB), G * QXB / (QX_SPLIT ? 1 : 2), mb, nbt, kind);
#pragma GCC unroll 4
        for (int m = 0; m < mb; m++) {
            const qv offset = qv_set1(QOFFSET(kind) * j->xsum[(m0 + m) * G + g]); /* q = u - off */
            const vf xs = vf_set1(j->xs[(m0 + m) * G + g]);
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                for (int h = 0; h < QH; h++) {
                    const vf sv = f16_load(j->scales + ((b0 + b) * G + g) * QROWS + h * VL);
                    accf[m][b][h] = vf_fmadd(qv_float(qv_sub(S[m][b][h], offset)), vf_mul(sv, xs), accf[m][b][h]);
                }
        }
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) base[b] += QBYTES(kind);
    }
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) {
            const ptrdiff_t row = (b0 + b) * QROWS;
            float *o = j->out + (m0 + m) * j->ldo + row;
            if (row + QROWS <= j->N) {
#pragma GCC unroll 4
                for (int h = 0; h < QH; h++) vf_store(o + h * VL, accf[m][b][h]);
            } else {
                float tmp[QROWS];
                for (int h = 0; h < QH; h++) vf_store(tmp + h * VL, accf[m][b][h]);
                memcpy(o, tmp, (size_t)(j->N - row) * sizeof(float));
            }
        }
}

#define QCASE(mb, nbt, kind) \
    case ((mb) * 8 + (nbt)) * 2 + ((kind) == W_Q4): QV(tile)(j, m0, b0, mb, nbt, kind); return;
#define QCASES_K(mb, nbt) QCASE(mb, nbt, W_Q8) QCASE(mb, nbt, W_Q4)

/* Any tile shape with mb <= QMB and nbt <= 2, each compiled with its constants. */
QTARGET static void QV(tile_any)(const QV(job) *j, ptrdiff_t m0, ptrdiff_t b0, int mb, int nbt)
{
    switch ((mb * 8 + nbt) * 2 + (j->kind == W_Q4)) {
        QCASES_K(1, 1)
#if QNBT_MAX >= 2
        QCASES_K(1, 2)
#endif
#if QMB >= 2
        QCASES_K(2, 1)
#if QNBT_MAX >= 2
        QCASES_K(2, 2)
#endif
#endif
#if QMB >= 3
        QCASES_K(3, 1)
#if QNBT_MAX >= 2
        QCASES_K(3, 2)
#endif
#endif
#if QMB >= 4
        QCASES_K(4, 1)
#if QNBT_MAX >= 2
        QCASES_K(4, 2)
#endif
#endif
    default:
        break;
    }
    for (int b = 0; b < nbt; b++) QV(tile_any)(j, m0, b0 + b, mb, 1); /* never reached with the shapes above */
}

/* Blocks per tile step: one at one row of x (a single stream), else the kind's tile width. */
#define QSTEP(M, kind) ((M) == 1 ? QNBT_1 : (kind) == W_Q4 ? QNBT_N4 : QNBT_N8)

/* Task t: its blocks against every row of x. */
QTARGET static void QV(task)(void *arg, ptrdiff_t t)
{
    const QV(job) *j = (const QV(job) *)arg;
    const ptrdiff_t b_end = (t + 1) * j->task_blocks < j->blocks ? (t + 1) * j->task_blocks : j->blocks;
    const int step = QSTEP(j->M, j->kind);
    for (ptrdiff_t b0 = t * j->task_blocks; b0 < b_end; b0 += step) {
        int nbt = b_end - b0 < step ? (int)(b_end - b0) : step;
        for (ptrdiff_t m0 = 0; m0 < j->M; m0 += QMB)
            QV(tile_any)(j, m0, b0, j->M - m0 < QMB ? (int)(j->M - m0) : QMB, nbt);
    }
}

typedef struct {
    const float *x;
    ptrdiff_t ldx, K, G, rows, M;
    int kind;
    char *xq;
    float *xs;
    int32_t *xsum;
} QV(xjob);

/* One group's integers q[32] in the order this build reads (64 bytes at dst): hi bytes then lo bytes (xq = 256 hi +
 * lo, both int8: lo the low byte as signed, hi the rest) for VNNI; else int16, for int4 in qw_nibble's order where the
 * build takes nibbles in place (column 8 c + 2 w + (0, 4, 1, 5)[i] at 8 c + 2 i + w). */
QTARGET INLINE void QV(qx_store)(const int32_t q[QGROUP], int kind, char *dst)
{
    (void)kind;
#if QX_SPLIT
    int8_t *hi = (int8_t *)dst, *lo = hi + QGROUP;
    for (int k = 0; k < QGROUP; k++) {
        lo[k] = (int8_t)(q[k] & 0xFF);
        hi[k] = (int8_t)((q[k] - lo[k]) / 256);
    }
#else
    int16_t *out = (int16_t *)dst;
    if (QX_NIBBLE_ORDER && kind == W_Q4) {
        static const int col[8] = {0, 2, 4, 6, 1, 3, 5, 7}; /* position 2 i + w: column 2 w + (0, 4, 1, 5)[i] */
        for (int c = 0; c < 4; c++)
            for (int i = 0; i < 8; i++) out[8 * c + i] = (int16_t)q[8 * c + col[i]];
    } else {
        for (int k = 0; k < QGROUP; k++) out[k] = (int16_t)q[k];
    }
#endif
}

/* Rows of x rounded to int16 per group of 32 (see the top): xq = rint(x * (QX_MAX / amax)), xs = amax / QX_MAX. In
 * vectors, with no libm call (a scalar fmaxf is one: it cost ~4 us per 2048 columns, a tenth of a TinyLlama-sized
 * int8 matmul at one row); max, product and rounding are exact IEEE operations, so every variant gets the same bits. */
QTARGET static void QV(quantize_x_rows)(void *arg, ptrdiff_t t)
{
    const QV(xjob) *j = (const QV(xjob) *)arg;
    const ptrdiff_t m_end = (t + 1) * j->rows < j->M ? (t + 1) * j->rows : j->M;
    for (ptrdiff_t m = t * j->rows; m < m_end; m++) {
        const float *src = j->x + m * j->ldx;
        for (ptrdiff_t g = 0; g < j->G; g++) {
            float v[QGROUP], r[QGROUP];
            const ptrdiff_t k0 = g * QGROUP, n = j->K - k0 < QGROUP ? j->K - k0 : QGROUP;
            if (n == QGROUP) {
                memcpy(v, src + k0, sizeof v);
            } else {
                memcpy(v, src + k0, (size_t)n * sizeof(float));
                for (ptrdiff_t k = n; k < QGROUP; k++) v[k] = 0.0f;
            }
            vf vmax = vf_zero();
#pragma GCC unroll 8
            for (int k = 0; k < QGROUP; k += VL) {
                const vf a = vf_load(v + k);
                vmax = vf_max(vmax, vf_max(a, vf_sub(vf_zero(), a))); /* |a| */
            }
            const float amax = vf_hmax(vmax);
            const float inv = amax > 0.0f ? QX_MAX / amax : 0.0f;
            const vf vinv = vf_set1(inv); /* rint(v * inv), ties to even: the same bits on every variant */
#pragma GCC unroll 8
            for (int k = 0; k < QGROUP; k += VL) vf_store(r + k, vf_rint(vf_mul(vf_load(v + k), vinv)));
            int32_t q[QGROUP], sum = 0;
            for (int k = 0; k < QGROUP; k++) {
                q[k] = (int32_t)r[k];
                sum += q[k];
            }
            QV(qx_store)(q, j->kind, j->xq + (m * j->G + g) * QXB);
            j->xs[m * j->G + g] = amax / QX_MAX;
            j->xsum[m * j->G + g] = sum;
        }
    }
}

static _Thread_local char *QV(xq_buf);
static _Thread_local float *QV(xs_buf);
static _Thread_local int32_t *QV(xsum_buf);
static _Thread_local size_t QV(x_capacity); /* groups */

/* out (M, N) = x (M, K) @ W.T for a quantized W (N, K) of `kind` (W_Q8, W_Q4): data and scales in the kernel layout. */
void QVARIANT(tl_qmatmul)(const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                          float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    if (M <= 0 || N <= 0) return;
    const ptrdiff_t G = (K + QGROUP - 1) / QGROUP, blocks = (N + QROWS - 1) / QROWS;
    size_t need = (size_t)(M * G);
    if (need > QV(x_capacity)) {
        free(QV(xq_buf));
        free(QV(xs_buf));
        free(QV(xsum_buf));
        QV(xq_buf) = (char *)malloc(need * QXB);
        QV(xs_buf) = (float *)malloc(need * sizeof(float));
        QV(xsum_buf) = (int32_t *)malloc(need * sizeof(int32_t));
        if (!QV(xq_buf) || !QV(xs_buf) || !QV(xsum_buf)) abort();
        QV(x_capacity) = need;
    }
    QV(xjob) xj = {x, ldx, K, G, M < 8 * threads ? 1 : (M + 8 * threads - 1) / (8 * threads), M, kind, QV(xq_buf),
                   QV(xs_buf), QV(xsum_buf)};
    tl_parallel(QV(quantize_x_rows), &xj, (M + xj.rows - 1) / xj.rows, M * K > 32768 ? threads : 1);
    /* tasks: ~8 per thread, whole tile steps of blocks */
    const ptrdiff_t step = QSTEP(M, kind);
    ptrdiff_t task_blocks = (blocks + 8 * threads - 1) / (8 * threads);
    task_blocks = (task_blocks + step - 1) / step * step;
    QV(job) job = {QV(xq_buf), QV(xs_buf), QV(xsum_buf), (const uint8_t *)data, scales, kind, out, ldo, M, N, G,
                   blocks, task_blocks};
    tl_parallel(QV(task), &job, (blocks + task_blocks - 1) / task_blocks, threads);
}
