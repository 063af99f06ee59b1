/* Template: y = x @ W.T for float32 activations against weights in llama.cpp's block formats (Q4_1, Q5_0, Q5_1, Q2_K,
 * Q3_K, Q4_K, Q5_K, Q6_K) repacked at load into the layout of kquant_layout.h. Included by each variant_*.c after its
 * simd_*.h and kquant_simd.h, with KTARGET, kv_dot and KV / KVARIANT naming its functions and entry points.
 *
 * Every format is w = A_j u - B_j per sub-block j (16 or 32 columns) of a row, u a small unsigned integer. The
 * activations are rounded to int16 per row and group of 32: xs = max|x_g| / 32639, xq = rint(x / xs) (relative error
 * <= 2^-16 of the group's largest value; llama.cpp rounds them to int8 per 32, q8_0, or per 256, q8_K: 2^-8), and
 * each xq is split into two signed bytes, xq = 256 hi + lo. Per weight row n (a lane of a vector: 16 rows of a row
 * block side by side) and sub-block j the sum
 *     S_j = sum_k u[n, k] xq[k] = 256 sum_k u hi_k + sum_k u lo_k
 * is exact in int32 (|S_j| < 32 * 63 * 32639 < 2^26), as byte dot products of 16 rows x 4 columns against one
 * broadcast quad of hi (or lo) bytes (AVX512-VNNI vpdpbusd: 64 products an instruction; vpmaddubsw + vpmaddwd
 * elsewhere). The signed formats subtract offset * X_j (X_j = sum_k xq over the sub-block: an integer); then, in
 * float32, in a fixed order:
 *   k-quants (256-column super-blocks): per super-block s, over its sub-blocks in order
 *       fs = fma(float(S_j), sc_j * xs_g, fs);  fm = fma(m_j, -(xs_g X_j), fm)        (fm: formats with minimums)
 *     then y = fma(d, fs, y); y = fma(dmin, fm, y);
 *   Q4_1, Q5_0, Q5_1 (one 32-column group):  y = fma(float(S), d * xs, y); y = fma(m, xs X, y)   (Q4_1, Q5_1).
 * The minimum's term takes the same int16 activations (xs X_j = sum of the rounded x), so the result is the exact
 * dot product of the file's weights with the rounded activations, to float32 roundings. The order depends on nothing
 * but the row, so a row's result is the same bits alone, in any batch, in any tile (batch-invariant).
 *
 * Work: tasks of whole row blocks (at most ~1 MB of weights at one row of x, 256 KB above; at least 4 per thread);
 * a task runs every row of x over its blocks, KQ_XCHUNK rows of x at a time, KNBT_1 blocks at once for one row of x
 * (independent chains), KMB rows of x by KNBT_N blocks above. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kquant_layout.h"

#define KH (KQ_ROWS / VL) /* vectors per row block */
#define KNBT_MAX (KNBT_1 > KNBT_N ? KNBT_1 : KNBT_N)
#ifndef KQ_TASK_BYTES
#define KQ_TASK_BYTES 1048576 /* weights per task at one row of x (a long run keeps the prefetchers' streams going) */
#endif
#ifndef KQ_TASK_BYTES_N
#define KQ_TASK_BYTES_N 262144 /* above: the task's blocks stay in L2 while chunks of x's rows run over them */
#endif
#ifndef KQ_XCHUNK
#define KQ_XCHUNK 32 /* rows of x per pass over a task's blocks (32 rows: 196 KB of activations at K = 2048) */
#endif
#ifndef KQ_PREFETCH
/* Bytes ahead in a row block's data, prefetched into L2 (locality 2). Against llama.cpp on the same file in one
 * process (bench.interleave, TinyLlama's shape, 2-core EPYC Zen 4, quiet, 2026-12-07): 2 KB into L1 gave Q4_K_M
 * 0.88-0.90x and Q6_K 0.99-1.00x llama.cpp's decode; 4 KB into L2 1.02-1.16x and 1.11-1.31x (three runs); 6 KB
 * 1.00x / 1.14x; 8 KB 0.98x / 1.12x (into L1: 0.88x / 0.93x). */
#define KQ_PREFETCH 4096
#endif

typedef struct {
    const tl_wpart *parts;
    const kq_task *tasks;
    const int8_t *xb;      /* (M, G, 64): per group 8 quads of 4 hi then 4 lo bytes */
    const kq_xgroup *xg;   /* (M, G) */
    float *out;
    ptrdiff_t ldo, M, K, G;
} KV(job);

/* The byte operand of quad q (0..7) of a group record, rows h VL..h VL + VL - 1: u of 16 rows x 4 columns. */
KTARGET INLINE kb KV(operand)(const char *rec, int h, int q, const int kind)
{
    const ptrdiff_t lane = (ptrdiff_t)h * VL * 4;
    const char *cr = rec + 256 * KQ_HAS_NIB(kind), *hi = cr + 128 * KQ_HAS_CR(kind);
    kb base;
    if (KQ_HAS_NIB(kind)) {
        kb n = kb_load(rec + (q & 3) * 64 + lane);
        base = q < 4 ? n : kb_srl(n, 4);
    }
    if (kind == W_Q4_1 || kind == W_Q4_K) return kb_and8(base, 0x0F);
    if (kind == W_Q5_0 || kind == W_Q5_1 || kind == W_Q5_K) { /* bit q of a HI byte -> bit 4 */
        kb hv = kb_load(hi + lane);
        hv = q < 4 ? kb_sll(hv, 4 - q) : q > 4 ? kb_srl(hv, q - 4) : hv;
        return kb_merge(base, kb_and8(hv, 0x10), 0x0F);
    }
    const int t = q & 3;
    kb c = kb_load(cr + (q >> 2) * 64 + lane); /* bits 2t, 2t+1 */
    if (kind == W_Q6_K) { /* -> bits 4, 5 */
        c = t == 0 ? kb_sll(c, 4) : t == 1 ? kb_sll(c, 2) : t == 3 ? kb_srl(c, 2) : c;
        return kb_merge(base, kb_and8(c, 0x30), 0x0F);
    }
    c = t ? kb_srl(c, 2 * t) : c; /* -> bits 0, 1 */
    if (kind == W_Q2_K) return kb_and8(c, 0x03);
    kb hv = kb_load(hi + lane); /* Q3_K: bit q -> bit 2 */
    hv = q < 2 ? kb_sll(hv, 2 - q) : q > 2 ? kb_srl(hv, q - 2) : hv;
    return kb_merge(c, kb_and8(hv, 0x04), 0x03);
}

/* Q4_K / Q5_K: the 6-bit scale (which = 0) or minimum (which = 1) of sub-block j from the packed P0, P1, P2 (at
 * offset `at` of the header); Q3_K: its scale j + 8 which. */
KTARGET INLINE kv KV(scale6)(const char *hdr, int at, int h, int j, int which)
{
    const char *p = hdr + at + (ptrdiff_t)h * VL * 4;
    if (which == 0)
        return j < 5 ? kv_and(kv_srli(kv_loadu(p), 6 * j), 63) : kv_and(kv_srli(kv_loadu(p + 128), 6 * (j - 5)), 63);
    if (j < 5) return kv_and(kv_srli(kv_loadu(p + 64), 6 * j), 63);
    if (j < 7) return kv_and(kv_srli(kv_loadu(p + 128), 6 * (j - 2)), 63);
    return kv_or(kv_srli(kv_loadu(p), 30), kv_or(kv_and(kv_srli(kv_loadu(p + 64), 28), 12),
                                                  kv_and(kv_srli(kv_loadu(p + 128), 26), 48)));
}

/* One register tile: rows m0..m0+mb-1 of x against row blocks w0, w0 + bb, .. (nbt of them); their output columns
 * start at col, and `valid` of their rows exist (the last block of a part may be partial). */
KTARGET INLINE void KV(tile)(const KV(job) *j, const char *w0, ptrdiff_t bb, ptrdiff_t m0, ptrdiff_t col,
                             ptrdiff_t valid, const int mb, const int nbt, const int kind)
{
    const ptrdiff_t K = j->K, G = j->G, nsb = K / KQ_SB(kind), hb = kq_header_bytes(kind, K);
    const int gps = KQ_SB(kind) / 32, halves = 32 / KQ_SUB(kind), nq = KQ_SUB(kind) / 4;
    vf y[KMB][KNBT_MAX][KH];
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
            for (int h = 0; h < KH; h++) y[m][b][h] = vf_zero();
    for (ptrdiff_t s = 0; s < nsb; s++) {
        const char *hdr[KNBT_MAX], *dat[KNBT_MAX];
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) {
            hdr[b] = w0 + b * bb + s * KQ_HDR(kind);
            dat[b] = w0 + b * bb + hb + s * gps * KQ_GROUP_BYTES(kind);
            for (int line = 0; line < KQ_HDR(kind); line += 64) /* the next super-block's header */
                __builtin_prefetch(hdr[b] + KQ_HDR(kind) + line, 0, 3);
        }
        vf fs[KMB][KNBT_MAX][KH], fm[KMB][KNBT_MAX][KH];
        if (KQ_IS_K(kind)) {
#pragma GCC unroll 4
            for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                    for (int h = 0; h < KH; h++) fs[m][b][h] = fm[m][b][h] = vf_zero();
        }
#pragma GCC unroll 1
        for (int gi = 0; gi < gps; gi++) {
            const ptrdiff_t g = s * gps + gi;
            const char *rec[KNBT_MAX];
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++) {
                rec[b] = dat[b] + gi * KQ_GROUP_BYTES(kind);
                for (int line = 0; line < KQ_GROUP_BYTES(kind); line += 64)
                    __builtin_prefetch(rec[b] + KQ_PREFETCH + line, 0, 2);
            }
#pragma GCC unroll 2
            for (int half = 0; half < halves; half++) {
                kv acc_h[KMB][KNBT_MAX][KH], acc_l[KMB][KNBT_MAX][KH];
#pragma GCC unroll 4
                for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
                    for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                        for (int h = 0; h < KH; h++) acc_h[m][b][h] = acc_l[m][b][h] = kv_zero();
#pragma GCC unroll 8
                for (int qi = 0; qi < nq; qi++) {
                    const int q = half * nq + qi;
#pragma GCC unroll 4
                    for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                        for (int h = 0; h < KH; h++) {
                            const kb w = KV(operand)(rec[b], h, q, kind);
#pragma GCC unroll 4
                            for (int m = 0; m < mb; m++) {
                                const int8_t *xq = j->xb + ((m0 + m) * G + g) * 64 + q * 8;
                                acc_h[m][b][h] = kv_dot(acc_h[m][b][h], w, xq);
                                acc_l[m][b][h] = kv_dot(acc_l[m][b][h], w, xq + 4);
                            }
                        }
                }
                const int js = gi * halves + half; /* the sub-block within the super-block */
                const int xi = halves == 2 ? half : 2; /* which of the group's sums */
#pragma GCC unroll 4
                for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                    for (int h = 0; h < KH; h++) {
                        vf a, mn = vf_zero();
                        const char *hd = hdr[b];
                        if (kind == W_Q4_K || kind == W_Q5_K) {
                            a = kv_float(KV(scale6)(hd, 64, h, js, 0));
                            mn = kv_float(KV(scale6)(hd, 64, h, js, 1));
                        } else if (kind == W_Q3_K) {
                            a = kv_float(kv_sub(KV(scale6)(hd, 32, h, js & 7, js >> 3), kv_set1(32)));
                        } else if (kind == W_Q6_K) {
                            a = kv_float(kv_s8((const int8_t *)hd + 32 + js * 16 + h * VL));
                        } else if (kind == W_Q2_K) {
                            const kv scm = kv_u8((const uint8_t *)hd + 64 + js * 16 + h * VL);
                            a = kv_float(kv_and(scm, 15));
                            mn = kv_float(kv_srli(scm, 4));
                        } else {
                            a = f16_load((const uint16_t *)hd + h * VL);
                            if (KQ_MIN(kind) == 2) mn = f16_load((const uint16_t *)hd + 16 + h * VL);
                        }
#pragma GCC unroll 4
                        for (int m = 0; m < mb; m++) {
                            const kq_xgroup *xg = j->xg + (m0 + m) * G + g;
                            kv sum = kv_add(kv_slli(acc_h[m][b][h], 8), acc_l[m][b][h]);
                            if (KQ_OFFSET(kind)) sum = kv_sub(sum, kv_set1(KQ_OFFSET(kind) * xg->xsum[xi]));
                            const vf sf = kv_float(sum);
                            if (KQ_IS_K(kind)) {
                                fs[m][b][h] = vf_fmadd(sf, vf_mul(a, vf_set1(xg->xs)), fs[m][b][h]);
                                if (KQ_MIN(kind)) fm[m][b][h] = vf_fmadd(mn, vf_set1(-xg->xsx[xi]), fm[m][b][h]);
                            } else {
                                y[m][b][h] = vf_fmadd(sf, vf_mul(a, vf_set1(xg->xs)), y[m][b][h]);
                                if (KQ_MIN(kind)) y[m][b][h] = vf_fmadd(mn, vf_set1(xg->xsx[xi]), y[m][b][h]);
                            }
                        }
                    }
            }
        }
        if (KQ_IS_K(kind)) {
#pragma GCC unroll 4
            for (int b = 0; b < nbt; b++)
#pragma GCC unroll 4
                for (int h = 0; h < KH; h++) {
                    const vf d = f16_load((const uint16_t *)hdr[b] + h * VL);
                    const vf dmin = KQ_MIN(kind) ? f16_load((const uint16_t *)hdr[b] + 16 + h * VL) : vf_zero();
#pragma GCC unroll 4
                    for (int m = 0; m < mb; m++) {
                        y[m][b][h] = vf_fmadd(d, fs[m][b][h], y[m][b][h]);
                        if (KQ_MIN(kind)) y[m][b][h] = vf_fmadd(dmin, fm[m][b][h], y[m][b][h]);
                    }
                }
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < mb; m++)
#pragma GCC unroll 4
        for (int b = 0; b < nbt; b++) {
            float *o = j->out + (m0 + m) * j->ldo + col + b * KQ_ROWS;
            const ptrdiff_t left = valid - b * KQ_ROWS;
            if (left >= KQ_ROWS) {
#pragma GCC unroll 4
                for (int h = 0; h < KH; h++) vf_store(o + h * VL, y[m][b][h]);
            } else {
                float tmp[KQ_ROWS];
                for (int h = 0; h < KH; h++) vf_store(tmp + h * VL, y[m][b][h]);
                memcpy(o, tmp, (size_t)left * sizeof(float));
            }
        }
}

#define KCASE(mb, nbt, kind) \
    case ((kind) * 8 + (mb)) * 8 + (nbt): KV(tile)(j, w0, bb, m0, col, valid, mb, nbt, kind); return;
#if KNBT_1 > 1
#define KCASES_M1(kind) KCASE(1, KNBT_1, kind) KCASE(1, 1, kind)
#else
#define KCASES_M1(kind) KCASE(1, 1, kind)
#endif
#if KNBT_N > 1
#define KCASE_N(mb, kind) KCASE(mb, KNBT_N, kind) KCASE(mb, 1, kind)
#else
#define KCASE_N(mb, kind) KCASE(mb, 1, kind)
#endif
#if KMB >= 4
#define KCASES_MN(kind) KCASE_N(2, kind) KCASE_N(3, kind) KCASE_N(4, kind)
#elif KMB >= 2
#define KCASES_MN(kind) KCASE_N(2, kind)
#else
#define KCASES_MN(kind)
#endif
#define KCASES(kind) KCASES_M1(kind) KCASES_MN(kind)

/* A tile of any shape the tasks make (mb <= KMB, nbt <= KNBT_1 or KNBT_N), each compiled with its constants. */
KTARGET static void KV(tile_any)(const KV(job) *j, int kind, const char *w0, ptrdiff_t bb, ptrdiff_t m0,
                                 ptrdiff_t col, ptrdiff_t valid, int mb, int nbt)
{
    switch ((kind * 8 + mb) * 8 + nbt) {
        KCASES(W_Q4_1) KCASES(W_Q5_0) KCASES(W_Q5_1) KCASES(W_Q2_K) KCASES(W_Q3_K) KCASES(W_Q4_K) KCASES(W_Q5_K)
        KCASES(W_Q6_K)
    default:
        break;
    }
    for (int b = 0; b < nbt; b++) /* (not reached with the shapes the tasks make) */
        KV(tile_any)(j, kind, w0 + b * bb, bb, m0, col + b * KQ_ROWS, valid - b * KQ_ROWS, mb, 1);
}

/* Task t: its row blocks against every row of x. */
KTARGET static void KV(task)(void *arg, ptrdiff_t t)
{
    const KV(job) *j = (const KV(job) *)arg;
    const kq_task *task = j->tasks + t;
    const tl_wpart *part = j->parts + task->part;
    const int kind = (int)part->kind;
    const ptrdiff_t bb = kq_block_bytes(kind, j->K);
    const int step = j->M == 1 ? KNBT_1 : KNBT_N;
    for (ptrdiff_t x0 = 0; x0 < j->M; x0 += KQ_XCHUNK) { /* a chunk of x's rows stays in L2 over the task's blocks */
        const ptrdiff_t x1 = x0 + KQ_XCHUNK < j->M ? x0 + KQ_XCHUNK : j->M;
        for (ptrdiff_t b0 = task->b0; b0 < task->b1; b0 += step) {
            const int nbt = task->b1 - b0 < step ? (int)(task->b1 - b0) : step;
            const char *w0 = (const char *)part->data + b0 * bb;
            const ptrdiff_t valid = part->rows - b0 * KQ_ROWS, col = task->col + b0 * KQ_ROWS;
            for (ptrdiff_t m0 = x0; m0 < x1; m0 += KMB)
                KV(tile_any)(j, kind, w0, bb, m0, col, valid, x1 - m0 < KMB ? (int)(x1 - m0) : KMB, nbt);
        }
    }
}

typedef struct {
    const float *x;
    ptrdiff_t ldx, K, G, rows, M;
    int8_t *xb;
    kq_xgroup *xg;
} KV(xjob);

/* Rows of x as the kernels take them (kquant_layout.h; kquant_simd.h's kq_prepare_group, per group of 32). */
KTARGET static void KV(prepare_x_rows)(void *arg, ptrdiff_t t)
{
    const KV(xjob) *j = (const KV(xjob) *)arg;
    const ptrdiff_t m_end = (t + 1) * j->rows < j->M ? (t + 1) * j->rows : j->M;
    for (ptrdiff_t m = t * j->rows; m < m_end; m++)
        for (ptrdiff_t g = 0; g < j->G; g++)
            kq_prepare_group(j->x + m * j->ldx + g * 32, j->xb + (m * j->G + g) * 64, j->xg + m * j->G + g);
}

static _Thread_local int8_t *KV(xb_buf);
static _Thread_local kq_xgroup *KV(xg_buf);
static _Thread_local size_t KV(x_capacity);
static _Thread_local kq_task *KV(task_buf);
static _Thread_local size_t KV(task_capacity);

/* out (M, sum of the parts' rows) = x (M, K) @ W.T for W given as parts in block formats (kquant_layout.h), their
 * outputs side by side in part order; K a multiple of 256 where a part is a k-quant, else of 32. */
void KVARIANT(tl_kmatmul)(const float *x, ptrdiff_t ldx, const tl_wpart *parts, ptrdiff_t n_parts, float *out,
                          ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t K, int threads)
{
    if (M <= 0 || n_parts <= 0 || K <= 0) return;
    const ptrdiff_t G = K / 32;
    const size_t need = (size_t)(M * G);
    if (need > KV(x_capacity)) {
        free(KV(xb_buf));
        free(KV(xg_buf));
        KV(xb_buf) = (int8_t *)malloc(need * 64);
        KV(xg_buf) = (kq_xgroup *)malloc(need * sizeof(kq_xgroup));
        if (!KV(xb_buf) || !KV(xg_buf)) abort();
        KV(x_capacity) = need;
    }
    KV(xjob) xj = {x, ldx, K, G, M < 8 * threads ? 1 : (M + 8 * threads - 1) / (8 * threads), M, KV(xb_buf),
                   KV(xg_buf)};
    tl_parallel(KV(prepare_x_rows), &xj, (M + xj.rows - 1) / xj.rows, M * K > 32768 ? threads : 1);
    /* tasks: whole tile steps of row blocks, at most KQ_TASK_BYTES each, at least ~4 per thread in all */
    const ptrdiff_t step = M == 1 ? KNBT_1 : KNBT_N;
    ptrdiff_t total = 0, widest = 1;
    for (ptrdiff_t p = 0; p < n_parts; p++) {
        total += (parts[p].rows + KQ_ROWS - 1) / KQ_ROWS;
        const ptrdiff_t bb = kq_block_bytes((int)parts[p].kind, K);
        widest = bb > widest ? bb : widest;
    }
    ptrdiff_t tb = total / (4 * threads), cap = (M == 1 ? KQ_TASK_BYTES : KQ_TASK_BYTES_N) / widest;
    tb = tb < cap ? tb : cap;
    tb = tb < 1 ? 1 : tb;
    tb = (tb + step - 1) / step * step;
    size_t n_tasks = 0;
    for (ptrdiff_t p = 0; p < n_parts; p++) n_tasks += (size_t)(((parts[p].rows + KQ_ROWS - 1) / KQ_ROWS + tb - 1) / tb);
    if (n_tasks > KV(task_capacity)) {
        free(KV(task_buf));
        KV(task_buf) = (kq_task *)malloc(n_tasks * sizeof(kq_task));
        if (!KV(task_buf)) abort();
        KV(task_capacity) = n_tasks;
    }
    size_t t = 0;
    ptrdiff_t col = 0;
    for (ptrdiff_t p = 0; p < n_parts; p++) {
        const ptrdiff_t blocks = (parts[p].rows + KQ_ROWS - 1) / KQ_ROWS;
        for (ptrdiff_t b = 0; b < blocks; b += tb) {
            kq_task task = {p, b, b + tb < blocks ? b + tb : blocks, col};
            KV(task_buf)[t++] = task;
        }
        col += parts[p].rows;
    }
    KV(job) job = {parts, KV(task_buf), KV(xb_buf), KV(xg_buf), out, ldo, M, K, G};
    tl_parallel(KV(task), &job, (ptrdiff_t)n_tasks, threads);
}
