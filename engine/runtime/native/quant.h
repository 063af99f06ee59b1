/* Template: y = x @ W.T for float32 activations against a quantized weight (int8 or int4, groups of 32 columns with
 * a float16 scale each; the layout of engine/runtime/quant.py). Included by each variant_*.c after its simd_*.h and
 * its quantized primitives (QTARGET, qv, qw, qv_zero, qv_set1, qv_add, qv_sub, qv_srai, qv_load, qw_int8, qw_nibble,
 * Q4_SCALE, qv_dot, qv_float; see simd_*.h), with QV / QVARIANT naming its functions and entry points.
 *
 * Activations are rounded to int16, per row and group of 32: xs = max|x| / 32767, xq = rint(x / xs) (relative error
 * <= 2^-16 of the group's largest value, where llama.cpp rounds them to int8: 2^-8). Then per output row n and group g
 * the integer sum  S = sum_k q[n, k] xq[k]  is exact in int32 (|S| <= 32 * 127 * 32767 < 2^31), computed as pair dot
 * products (vpdpwssd with AVX512-VNNI, vpmaddwd + vpaddd otherwise) with 16 weight rows in the lanes of a vector and
 * one broadcast pair of x (int4: of the stored nibbles u = q + 8, less 8 * sum_k xq, each nibble taken in place by
 * one AND or shift and summed apart by its place value, 1, 16 or 256, every partial sum < 2^30); each group's sum is
 * turned to float32 once and added in group order:
 *     y[n] = fma(float(S_g), float(s[n, g]) * xs_g, y[n])   for g = 0, 1, ..
 * The order is fixed and the integer part exact, so a row's result does not depend on M, its tile, the threads or
 * the rows beside it (the same batch invariance as the 16-bit kernels).
 *
 * Work: tasks of whole 16-row blocks; a task runs every row of x over its blocks (they stay in L2), QNBT blocks of
 * weight rows by QMB rows of x per register tile (a GEMV at one row runs QNBT_1 blocks at once: independent chains). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QROWS 16                 /* weight rows per block (the lanes of the layout) */
#define QGROUP 32                /* columns per scale */
#define QH (QROWS / VL)          /* vectors per block row-set */
#ifndef QNBT_N
#define QNBT_N QNBT_1
#endif
#define QNBT_MAX (QNBT_1 > QNBT_N ? QNBT_1 : QNBT_N)

typedef struct {
    const int16_t *xq; /* (M, Kp) activations rounded to int16, zero-padded */
    const float *xs;   /* (M, G) their scales */
    const int32_t *xsum; /* (M, G) the sum of each group's int16 values (int4's offset of 8) */
    const char *data;  /* the weight's integers, kernel layout */
    const uint16_t *scales; /* (blocks, G, 16) float16 */
    int kind;          /* W_Q8 | W_Q4 */
    float *out;
    ptrdiff_t ldo, M, N, G, blocks, task_blocks;
} QV(job);

/* Bytes of one (block, group) of integers. */
#ifndef QNBT_N4
#define QNBT_N4 QNBT_N
#endif
#define QBYTES(kind) ((kind) == W_Q8 ? 512 : 256)

/* One register tile: rows m0..m0+mb of x against blocks b0..b0+nbt of the weight (constants after inlining). */
QTARGET INLINE void QV(tile)(const QV(job) *j, ptrdiff_t m0, ptrdiff_t b0, const int mb, const int nbt, const int kind)
{
    vf accf[QMB][QNBT_MAX][QH];
    const ptrdiff_t G = j->G, Kp = G * QGROUP;
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
            for (int h = 0; h < QH; h++) accf[m][b][h] = vf_zero();
    for (ptrdiff_t g = 0; g < G; g++) {
        qv acc[QMB][QNBT_MAX][QH];
#pragma GCC unroll 4
        for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                for (int h = 0; h < QH; h++) acc[m][b][h] = qv_zero();
        const char *base[QNBT_MAX];
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) {
            base[b] = j->data + ((b0 + b) * G + g) * QBYTES(kind);
            __builtin_prefetch(base[b] + 4 * QBYTES(kind), 0, 3);
            if (kind == W_Q8) __builtin_prefetch(base[b] + 4 * QBYTES(kind) + 256, 0, 3);
        }
        const int16_t *xg = j->xq + m0 * Kp + g * QGROUP;
        if (kind == W_Q8) {
#pragma GCC unroll 16
            for (int p = 0; p < 16; p++)
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                    for (int h = 0; h < QH; h++) {
                        qw w = qw_int8((const int8_t *)(base[b] + p * 32 + h * 2 * VL));
#pragma GCC unroll 4
                        for (int m = 0; m < mb; m++) acc[m][b][h] = qv_dot(acc[m][b][h], w, xg + m * Kp + 2 * p);
                    }
        } else {
            /* int4: nibble i of each word, in place (qw_nibble: times 16^Q4_SCALE(i)), summed into accumulator
             * Q4_ACC(i); the partial sums are exact multiples of their 16^s and are shifted back at the end */
            qv acc2[QMB][QNBT_MAX][QH], acc3[QMB][QNBT_MAX][QH];
#pragma GCC unroll 4
            for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                    for (int h = 0; h < QH; h++) acc2[m][b][h] = acc3[m][b][h] = qv_zero();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                qv words[QNBT_MAX][QH];
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                    for (int h = 0; h < QH; h++) words[b][h] = qv_load(base[b] + c * 64 + h * 4 * VL);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    const int p = 4 * c + i;
#pragma GCC unroll 4
                    for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                        for (int h = 0; h < QH; h++) {
                            qw w = qw_nibble(words[b][h], i);
#pragma GCC unroll 4
                            for (int m = 0; m < mb; m++) {
                                qv *a = Q4_SCALE(i) == 0 ? &acc[m][b][h] : Q4_SCALE(i) == 1 ? &acc2[m][b][h]
                                                                                            : &acc3[m][b][h];
                                *a = qv_dot(*a, w, xg + m * Kp + 2 * p);
                            }
                        }
                }
            }
#pragma GCC unroll 4
            for (int m = 0; m < mb; m++) {
                const qv offset = qv_set1(8 * j->xsum[(m0 + m) * G + g]); /* q = u - 8 */
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
                    for (int h = 0; h < QH; h++)
                        acc[m][b][h] = qv_sub(qv_add(acc[m][b][h], qv_add(qv_srai(acc2[m][b][h], 4),
                                                                          qv_srai(acc3[m][b][h], 8))), offset);
            }
        }
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 2
            for (int h = 0; h < QH; h++) {
                vf sv = f16_load(j->scales + ((b0 + b) * G + g) * QROWS + h * VL);
#pragma GCC unroll 4
                for (int m = 0; m < mb; m++)
                    accf[m][b][h] = vf_fmadd(qv_float(acc[m][b][h]), vf_mul(sv, vf_set1(j->xs[(m0 + m) * G + g])),
                                             accf[m][b][h]);
            }
    }
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) {
            const ptrdiff_t row = (b0 + b) * QROWS;
            float *o = j->out + (m0 + m) * j->ldo + row;
            if (row + QROWS <= j->N) {
#pragma GCC unroll 2
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

/* Any tile shape with mb <= QMB and nbt <= 4, each compiled with its constants. */
QTARGET static void QV(tile_any)(const QV(job) *j, ptrdiff_t m0, ptrdiff_t b0, int mb, int nbt)
{
    switch ((mb * 8 + nbt) * 2 + (j->kind == W_Q4)) {
#if QNBT_MAX >= 4
        QCASES_K(1, 4) QCASES_K(1, 3)
#endif
        QCASES_K(1, 2) QCASES_K(1, 1)
#if QMB >= 2
        QCASES_K(2, 1)
#if QNBT_N >= 2
        QCASES_K(2, 2)
#endif
#endif
#if QMB >= 3
        QCASES_K(3, 1)
#if QNBT_N >= 2
        QCASES_K(3, 2)
#endif
#endif
#if QMB >= 4
        QCASES_K(4, 1)
#if QNBT_N >= 2
        QCASES_K(4, 2)
#endif
#endif
    default:
        break;
    }
    for (int b = 0; b < nbt; b++) QV(tile_any)(j, m0, b0 + b, mb, 1); /* never reached with the shapes above */
}

/* Task t: its blocks against every row of x. */
QTARGET static void QV(task)(void *arg, ptrdiff_t t)
{
    const QV(job) *j = (const QV(job) *)arg;
    const ptrdiff_t b_end = (t + 1) * j->task_blocks < j->blocks ? (t + 1) * j->task_blocks : j->blocks;
    const int step = j->M == 1 ? QNBT_1 : j->kind == W_Q4 ? QNBT_N4 : QNBT_N;
    for (ptrdiff_t b0 = t * j->task_blocks; b0 < b_end; b0 += step) {
        int nbt = b_end - b0 < step ? (int)(b_end - b0) : step;
        for (ptrdiff_t m0 = 0; m0 < j->M; m0 += QMB)
            QV(tile_any)(j, m0, b0, j->M - m0 < QMB ? (int)(j->M - m0) : QMB, nbt);
    }
}

typedef struct {
    const float *x;
    ptrdiff_t ldx, K, G, rows, M;
    int16_t *xq;
    float *xs;
    int32_t *xsum;
} QV(xjob);

/* Rows of x rounded to int16 per group of 32 (see the top): xq = rint(x * (32767 / amax)), xs = amax / 32767. In
 * vectors, with no libm call (a scalar fmaxf is one: it cost ~4 us per 2048 columns, a tenth of a TinyLlama-sized
 * int8 matmul at one row); max, product and rounding are exact IEEE operations, so every variant gets the same bits. */
QTARGET static void QV(quantize_x_rows)(void *arg, ptrdiff_t t)
{
    const QV(xjob) *j = (const QV(xjob) *)arg;
    const ptrdiff_t m_end = (t + 1) * j->rows < j->M ? (t + 1) * j->rows : j->M;
    for (ptrdiff_t m = t * j->rows; m < m_end; m++) {
        const float *src = j->x + m * j->ldx;
        int16_t *dst = j->xq + m * j->G * QGROUP;
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
            const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            const vf vinv = vf_set1(inv); /* rint(v * inv), ties to even: the same bits on every variant */
#pragma GCC unroll 8
            for (int k = 0; k < QGROUP; k += VL) vf_store(r + k, vf_rint(vf_mul(vf_load(v + k), vinv)));
            int32_t sum = 0;
            for (int k = 0; k < QGROUP; k++) {
                const int32_t q = (int32_t)r[k];
                dst[k0 + k] = (int16_t)q;
                sum += q;
            }
            j->xs[m * j->G + g] = amax / 32767.0f;
            j->xsum[m * j->G + g] = sum;
        }
    }
}

static _Thread_local int16_t *QV(xq_buf);
static _Thread_local float *QV(xs_buf);
static _Thread_local int32_t *QV(xsum_buf);
static _Thread_local size_t QV(x_capacity);

/* out (M, N) = x (M, K) @ W.T for a quantized W (N, K) of `kind` (W_Q8, W_Q4): data and scales in the kernel layout. */
void QVARIANT(tl_qmatmul)(const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                          float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    if (M <= 0 || N <= 0) return;
    const ptrdiff_t G = (K + QGROUP - 1) / QGROUP, Kp = G * QGROUP, blocks = (N + QROWS - 1) / QROWS;
    size_t need = (size_t)(M * Kp);
    if (need > QV(x_capacity)) {
        free(QV(xq_buf));
        free(QV(xs_buf));
        free(QV(xsum_buf));
        QV(xq_buf) = (int16_t *)malloc(need * sizeof(int16_t));
        QV(xs_buf) = (float *)malloc((need / QGROUP) * sizeof(float));
        QV(xsum_buf) = (int32_t *)malloc((need / QGROUP) * sizeof(int32_t));
        if (!QV(xq_buf) || !QV(xs_buf) || !QV(xsum_buf)) abort();
        QV(x_capacity) = need;
    }
    QV(xjob) xj = {x, ldx, K, G, M < 8 * threads ? 1 : (M + 8 * threads - 1) / (8 * threads), M, QV(xq_buf),
                   QV(xs_buf), QV(xsum_buf)};
    tl_parallel(QV(quantize_x_rows), &xj, (M + xj.rows - 1) / xj.rows, M * K > 32768 ? threads : 1);
    /* tasks: ~8 per thread, whole tile steps of blocks */
    const ptrdiff_t step = M == 1 ? QNBT_1 : kind == W_Q4 ? QNBT_N4 : QNBT_N;
    ptrdiff_t task_blocks = (blocks + 8 * threads - 1) / (8 * threads);
    task_blocks = (task_blocks + step - 1) / step * step;
    QV(job) job = {QV(xq_buf), QV(xs_buf), QV(xsum_buf), (const char *)data, scales, kind, out, ldo, M, N, G, blocks,
                   task_blocks};
    tl_parallel(QV(task), &job, (blocks + task_blocks - 1) / task_blocks, threads);
}
