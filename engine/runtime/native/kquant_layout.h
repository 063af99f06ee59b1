/* The kernel layout of llama.cpp's block formats (engine/runtime/kquant.py documents it in full): what the repacking
 * and quantizing code (kquant_pack.c, plain C) and the matmul template (kquant.h) both need to agree on.
 *
 * Every format is w = A_j * u - B_j per sub-block j of a row, u an unsigned integer of 2 to 6 bits:
 *   kind    ggml   super-block  sub-block  u bits  A_j          B_j                  ggml bytes / 256 weights
 *   Q4_1    q4_1        32          32        4    d            -m                   160
 *   Q5_0    q5_0        32          32        5    d            16 d                 176
 *   Q5_1    q5_1        32          32        5    d            -m                   192
 *   Q2_K    q2_K       256          16        2    d sc_j       dmin m_j              84
 *   Q3_K    q3_K       256          16        3    d sc_j       4 d sc_j             110
 *   Q4_K    q4_K       256          32        4    d sc_j       dmin m_j             144
 *   Q5_K    q5_K       256          32        5    d sc_j       dmin m_j             176
 *   Q6_K    q6_K       256          16        6    d sc_j       32 d sc_j            210
 * (d, dmin, m float16; sc_j, m_j small integers: Q2_K 4 bits each, Q3_K 6 bits signed, Q4_K/Q5_K 6 bits, Q6_K int8.)
 *
 * Rows are taken 16 at a time (a row block: 16 lanes of a vector, one row each); a row block is one run of bytes:
 *   [headers: one per super-block, HDR(kind) bytes]  (padded to 64 bytes)
 *   [data: one record per group of 32 columns, GROUP_BYTES(kind) bytes]  (padded to 64 bytes)
 * A header holds the super-block's scales as 16-lane vectors (lane r = row r of the block):
 *   Q4_K, Q5_K: d f16[16], dmin f16[16], then sc_j and m_j, 6 bits each, packed in three uint32 per row, each a
 *               16-lane vector: P0 = sc0..sc4 | (m7 & 3) << 30, P1 = m0..m4 | (m7 >> 2 & 3) << 30,
 *               P2 = sc5, sc6, sc7, m5, m6 | (m7 >> 4) << 30 (field i at bits 6i) -- 12 bytes a row, as ggml's;
 *   Q6_K:       d f16[16], sc int8[16 sub-blocks][16];
 *   Q3_K:       d f16[16], then sc_j + 32 (6 bits) packed as Q4_K's sc and m: sub-blocks 0..7 as sc0..sc7, 8..15 as
 *               m0..m7, in three uint32 per row (12 bytes a row, as ggml's);
 *   Q2_K:       d f16[16], dmin f16[16], sc | m << 4 uint8[16][16];
 *   Q4_1, Q5_1: d f16[16], m f16[16];   Q5_0: d f16[16].
 * A group record holds u for 16 rows x 32 columns as up to three bit planes, in 4-column quads (q = 0..7: columns
 * 4q..4q+3 of the group); byte 4r + j of a 64-byte vector belongs to row r and column 4q + j of its quad:
 *   NIB (256 bytes, formats of 4+ bits): vector v = 0..3 holds u's low 4 bits of quad v (low nibble) and of quad v + 4
 *        (high nibble);
 *   CR  (128 bytes: Q6_K bits 4-5, Q2_K / Q3_K bits 0-1): vector i = 0, 1, bits 2t..2t+1 of a byte: quad 4i + t;
 *   HI  (64 bytes: Q5_* bit 4, Q3_K bit 2): one vector, bit q of a byte: quad q.
 * in the order NIB, CR, HI. One 64-byte vector of NIB gives two quads of 16 rows each with a shift and a mask. */
#ifndef TL_KQUANT_LAYOUT_H
#define TL_KQUANT_LAYOUT_H
#include <stddef.h>
#include <stdint.h>

#define KQ_ROWS 16
#define KQ_IS_K(kind) ((kind) >= W_Q2_K) /* a 256-column super-block format */
#define KQ_SB(kind) (KQ_IS_K(kind) ? 256 : 32)
#define KQ_SUB(kind) ((kind) == W_Q6_K || (kind) == W_Q3_K || (kind) == W_Q2_K ? 16 : 32)
#define KQ_HAS_NIB(kind) ((kind) != W_Q2_K && (kind) != W_Q3_K)
#define KQ_HAS_CR(kind) ((kind) == W_Q6_K || (kind) == W_Q2_K || (kind) == W_Q3_K)
#define KQ_HAS_HI(kind) ((kind) == W_Q5_0 || (kind) == W_Q5_1 || (kind) == W_Q5_K || (kind) == W_Q3_K)
#define KQ_GROUP_BYTES(kind) (256 * KQ_HAS_NIB(kind) + 128 * KQ_HAS_CR(kind) + 64 * KQ_HAS_HI(kind))
#define KQ_HDR(kind) \
    ((kind) == W_Q4_K || (kind) == W_Q5_K ? 256 : (kind) == W_Q6_K ? 288 : (kind) == W_Q3_K ? 224 \
     : (kind) == W_Q2_K ? 320 : (kind) == W_Q5_0 ? 32 : 64)
/* where a header's packed 6-bit fields start (Q4_K, Q5_K, Q3_K) */
#define KQ_P6(kind) ((kind) == W_Q3_K ? 32 : 64)
/* the integer subtracted from u for the signed formats (q = u - offset), else 0 */
#define KQ_OFFSET(kind) ((kind) == W_Q5_0 ? 16 : (kind) == W_Q6_K ? 32 : (kind) == W_Q3_K ? 4 : 0)
/* 1: w = A u - dmin m_j (the k-quants' minimums), 2: w = d u + m (Q4_1, Q5_1), 0: none */
#define KQ_MIN(kind) ((kind) == W_Q4_K || (kind) == W_Q5_K || (kind) == W_Q2_K ? 1 \
                      : (kind) == W_Q4_1 || (kind) == W_Q5_1 ? 2 : 0)
#define KQ_ROUND64(n) (((n) + 63) / 64 * 64)

/* Bytes of one row block's headers (padded) and of the whole row block, for K columns (a multiple of KQ_SB). */
static inline ptrdiff_t kq_header_bytes(int kind, ptrdiff_t K) { return KQ_ROUND64(K / KQ_SB(kind) * KQ_HDR(kind)); }
static inline ptrdiff_t kq_block_bytes(int kind, ptrdiff_t K)
{
    return kq_header_bytes(kind, K) + KQ_ROUND64(K / 32 * KQ_GROUP_BYTES(kind));
}
static inline int kq_is_kind(long long kind) { return kind >= W_Q4_1 && kind <= W_Q6_K; }

/* One group of 32 activations of a row as the kernels take them (kquant.h): the integers xq = rint(x / xs),
 * |xq| <= KQ_XMAX, xs = max|x| / KQ_XMAX, split as xq = 256 hi + lo (hi, lo signed bytes) and stored by quads
 * (8 bytes each: the 4 hi, then the 4 lo) beside this record of the group's scalars: xs, the integer sums of xq over
 * the group's halves and whole (xsum[0], xsum[1], xsum[2]) and xs times each (xsx). */
#define KQ_XMAX 32639 /* the largest |xq| whose hi = (xq + 128) >> 8 is a signed byte */
typedef struct {
    float xs, xsx[3];
    int32_t xsum[3], pad;
} kq_xgroup;

/* One decoded ggml block (kquant_pack.c): its integers u per column (up to 256), per sub-block the integer scale and
 * minimum, the float16 bits of d and dmin (Q4_1 / Q5_1: of d and m). */
typedef struct {
    uint8_t u[256];
    int sc[16], m[16];
    uint16_t d, dmin;
} kq_block;

/* A task of the matmul: row blocks b0..b1-1 of part `part`, whose row 0 is output column `col`. */
typedef struct {
    ptrdiff_t part, b0, b1, col;
} kq_task;

#endif
