/* llama.cpp's block formats at load: ggml's on-disk blocks repacked into the kernels' layout (kquant_layout.h) and
 * read back (dequantized rows, float32). Plain C for the platform's baseline (it runs once per load); rows are shared
 * among the pool's threads (every byte of the layout belongs to one row, so threads never write the same byte).
 *
 * A ggml block decodes to its integers u (0..2^bits - 1) per column and, per sub-block, the integer scale sc and
 * minimum m, plus the float16 d and dmin (kq_block below); the layout stores exactly those, so the values the kernels
 * multiply are the file's values: w = d sc u - dmin m (k-quants with minimums), d sc (u - offset) (Q6_K, Q3_K),
 * d (u - 16) (Q5_0), d u + m (Q4_1, Q5_1), each in float32 as gguf.quants.dequantize computes it. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "kquant_layout.h"

float tl_f16_to_f32(uint16_t h);

/* ggml's bytes per block and columns per block. */
static ptrdiff_t ggml_block_bytes(int kind)
{
    switch (kind) {
    case W_Q4_1: return 20;
    case W_Q5_0: return 22;
    case W_Q5_1: return 24;
    case W_Q2_K: return 84;
    case W_Q3_K: return 110;
    case W_Q4_K: return 144;
    case W_Q5_K: return 176;
    case W_Q6_K: return 210;
    default: return 0;
    }
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* Q4_K / Q5_K's 12 bytes of 6-bit scales and minimums (ggml's get_scale_min_k4). */
static void unpack_scales_k4(const uint8_t *s, int *sc, int *m)
{
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
}

static void pack_scales_k4(const int *sc, const int *m, uint8_t *s)
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
    }
}

/* ggml block p of `kind` -> b (the definitions of ggml's dequantize_row_* / gguf.quants). */
static void decode_block(int kind, const uint8_t *p, kq_block *b)
{
    switch (kind) {
    case W_Q4_1:
    case W_Q5_0:
    case W_Q5_1: {
        const int has_m = kind != W_Q5_0, five = kind != W_Q4_1;
        b->d = rd16(p);
        b->dmin = has_m ? rd16(p + 2) : 0;
        const uint8_t *q = p + 2 + 2 * has_m;
        const uint32_t qh = five ? rd32(q) : 0;
        const uint8_t *qs = q + 4 * five;
        for (int l = 0; l < 16; l++) {
            b->u[l] = (uint8_t)((qs[l] & 0xF) | (((qh >> l) & 1) << 4));
            b->u[l + 16] = (uint8_t)((qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4));
        }
        b->sc[0] = 1;
        b->m[0] = 0;
        break;
    }
    case W_Q2_K: {
        const uint8_t *scales = p, *qs = p + 16;
        b->d = rd16(p + 80);
        b->dmin = rd16(p + 82);
        for (int j = 0; j < 16; j++) {
            b->sc[j] = scales[j] & 0xF;
            b->m[j] = scales[j] >> 4;
        }
        for (int c = 0; c < 2; c++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) b->u[c * 128 + s * 32 + l] = (qs[c * 32 + l] >> (2 * s)) & 3;
        break;
    }
    case W_Q3_K: {
        const uint8_t *hmask = p, *qs = p + 32, *scales = p + 96;
        b->d = rd16(p + 108);
        b->dmin = 0;
        for (int i = 0; i < 16; i++) {
            const int lo = i < 8 ? scales[i] & 0xF : scales[i - 8] >> 4;
            const int hi = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
            b->sc[i] = (lo | hi << 4) - 32;
            b->m[i] = 0;
        }
        for (int c = 0; c < 2; c++)
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) {
                    const int idx = c * 128 + s * 32 + l;
                    b->u[idx] = (uint8_t)(((qs[c * 32 + l] >> (2 * s)) & 3) | (((hmask[l] >> (idx / 32)) & 1) << 2));
                }
        break;
    }
    case W_Q4_K:
    case W_Q5_K: {
        b->d = rd16(p);
        b->dmin = rd16(p + 2);
        unpack_scales_k4(p + 4, b->sc, b->m);
        const int five = kind == W_Q5_K;
        const uint8_t *qh = p + 16, *qs = p + 16 + 32 * five;
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 32; l++) {
                    const int idx = c * 64 + h * 32 + l;
                    b->u[idx] = (uint8_t)((qs[c * 32 + l] >> (4 * h)) & 0xF);
                    if (five) b->u[idx] |= (uint8_t)(((qh[l] >> (idx / 32)) & 1) << 4);
                }
        break;
    }
    case W_Q6_K: {
        const uint8_t *ql = p, *qh = p + 128;
        const int8_t *scales = (const int8_t *)(p + 192);
        b->d = rd16(p + 208);
        b->dmin = 0;
        for (int j = 0; j < 16; j++) {
            b->sc[j] = scales[j];
            b->m[j] = 0;
        }
        for (int c = 0; c < 2; c++) {
            for (int h = 0; h < 2; h++)
                for (int l = 0; l < 64; l++) b->u[c * 128 + h * 64 + l] = (ql[c * 64 + l] >> (4 * h)) & 0xF;
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) b->u[c * 128 + s * 32 + l] |= (uint8_t)(((qh[c * 32 + l] >> (2 * s)) & 3) << 4);
        }
        break;
    }
    default:
        break;
    }
}

/* b -> ggml block p of `kind` (the inverse of decode_block, for the quantizer's output). */
static void encode_block(int kind, const kq_block *b, uint8_t *p)
{
    switch (kind) {
    case W_Q4_1:
    case W_Q5_0:
    case W_Q5_1: {
        const int has_m = kind != W_Q5_0, five = kind != W_Q4_1;
        memcpy(p, &b->d, 2);
        if (has_m) memcpy(p + 2, &b->dmin, 2);
        uint8_t *q = p + 2 + 2 * has_m, *qs = q + 4 * five;
        uint32_t qh = 0;
        for (int l = 0; l < 16; l++) {
            qs[l] = (uint8_t)((b->u[l] & 0xF) | (b->u[l + 16] & 0xF) << 4);
            qh |= (uint32_t)(b->u[l] >> 4) << l | (uint32_t)(b->u[l + 16] >> 4) << (l + 16);
        }
        if (five)
            for (int i = 0; i < 4; i++) q[i] = (uint8_t)(qh >> (8 * i));
        break;
    }
    case W_Q4_K:
    case W_Q5_K: {
        memcpy(p, &b->d, 2);
        memcpy(p + 2, &b->dmin, 2);
        pack_scales_k4(b->sc, b->m, p + 4);
        const int five = kind == W_Q5_K;
        uint8_t *qh = p + 16, *qs = p + 16 + 32 * five;
        if (five) memset(qh, 0, 32);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                qs[c * 32 + l] = (uint8_t)((b->u[c * 64 + l] & 0xF) | (b->u[c * 64 + 32 + l] & 0xF) << 4);
        if (five)
            for (int idx = 0; idx < 256; idx++) qh[idx % 32] |= (uint8_t)((b->u[idx] >> 4) << (idx / 32));
        break;
    }
    case W_Q6_K: {
        uint8_t *ql = p, *qh = p + 128;
        memset(p, 0, 192);
        for (int c = 0; c < 2; c++) {
            for (int l = 0; l < 64; l++)
                ql[c * 64 + l] = (uint8_t)((b->u[c * 128 + l] & 0xF) | (b->u[c * 128 + 64 + l] & 0xF) << 4);
            for (int s = 0; s < 4; s++)
                for (int l = 0; l < 32; l++) qh[c * 32 + l] |= (uint8_t)((b->u[c * 128 + s * 32 + l] >> 4) << (2 * s));
        }
        for (int j = 0; j < 16; j++) p[192 + j] = (uint8_t)(int8_t)b->sc[j];
        memcpy(p + 208, &b->d, 2);
        break;
    }
    default:
        break;
    }
}

/* Row r of the layout at `blk` (its row block) gets super-block s of b. */
static void store_block(int kind, ptrdiff_t K, uint8_t *blk, int r, ptrdiff_t s, const kq_block *b)
{
    uint8_t *hdr = blk + s * KQ_HDR(kind);
    memcpy(hdr + 2 * r, &b->d, 2);
    if (KQ_MIN(kind) || kind == W_Q5_K) memcpy(hdr + 32 + 2 * r, &b->dmin, 2);
    const int nsub = KQ_SB(kind) / KQ_SUB(kind);
    if (kind == W_Q4_K || kind == W_Q5_K || kind == W_Q3_K) {
        int v[16];
        for (int j = 0; j < 8; j++) { /* Q3_K: its 16 scales + 32 as the sc and m fields */
            v[j] = kind == W_Q3_K ? b->sc[j] + 32 : b->sc[j];
            v[8 + j] = kind == W_Q3_K ? b->sc[8 + j] + 32 : b->m[j];
        }
        const uint32_t p0 = (uint32_t)v[0] | (uint32_t)v[1] << 6 | (uint32_t)v[2] << 12 | (uint32_t)v[3] << 18
                            | (uint32_t)v[4] << 24 | (uint32_t)(v[15] & 3) << 30;
        const uint32_t p1 = (uint32_t)v[8] | (uint32_t)v[9] << 6 | (uint32_t)v[10] << 12 | (uint32_t)v[11] << 18
                            | (uint32_t)v[12] << 24 | (uint32_t)((v[15] >> 2) & 3) << 30;
        const uint32_t p2 = (uint32_t)v[5] | (uint32_t)v[6] << 6 | (uint32_t)v[7] << 12 | (uint32_t)v[13] << 18
                            | (uint32_t)v[14] << 24 | (uint32_t)(v[15] >> 4) << 30;
        uint8_t *p = hdr + KQ_P6(kind);
        memcpy(p + 4 * r, &p0, 4);
        memcpy(p + 64 + 4 * r, &p1, 4);
        memcpy(p + 128 + 4 * r, &p2, 4);
    } else if (kind == W_Q6_K) {
        for (int j = 0; j < nsub; j++) hdr[32 + j * 16 + r] = (uint8_t)(int8_t)b->sc[j];
    } else if (kind == W_Q2_K) {
        for (int j = 0; j < nsub; j++) hdr[64 + j * 16 + r] = (uint8_t)(b->sc[j] | b->m[j] << 4);
    }
    const int gps = KQ_SB(kind) / 32;
    for (int gi = 0; gi < gps; gi++) {
        uint8_t *rec = blk + kq_header_bytes(kind, K) + (s * gps + gi) * KQ_GROUP_BYTES(kind);
        const uint8_t *u = b->u + gi * 32;
        uint8_t *cr = rec + 256 * KQ_HAS_NIB(kind), *hi = cr + 128 * KQ_HAS_CR(kind);
        const int cr_shift = kind == W_Q6_K ? 4 : 0, hi_bit = kind == W_Q3_K ? 2 : 4;
        for (int jj = 0; jj < 4; jj++) {
            if (KQ_HAS_NIB(kind))
                for (int v = 0; v < 4; v++)
                    rec[v * 64 + 4 * r + jj] = (uint8_t)((u[4 * v + jj] & 0xF) | (u[16 + 4 * v + jj] & 0xF) << 4);
            if (KQ_HAS_CR(kind))
                for (int i = 0; i < 2; i++) {
                    uint8_t byte = 0;
                    for (int t = 0; t < 4; t++) byte |= (uint8_t)(((u[4 * (4 * i + t) + jj] >> cr_shift) & 3) << (2 * t));
                    cr[i * 64 + 4 * r + jj] = byte;
                }
            if (KQ_HAS_HI(kind)) {
                uint8_t byte = 0;
                for (int q = 0; q < 8; q++) byte |= (uint8_t)(((u[4 * q + jj] >> hi_bit) & 1) << q);
                hi[4 * r + jj] = byte;
            }
        }
    }
}

/* Row r of the layout at `blk`, super-block s -> b (the inverse of store_block). */
static void load_block(int kind, ptrdiff_t K, const uint8_t *blk, int r, ptrdiff_t s, kq_block *b)
{
    const uint8_t *hdr = blk + s * KQ_HDR(kind);
    b->d = rd16(hdr + 2 * r);
    b->dmin = KQ_MIN(kind) || kind == W_Q5_K ? rd16(hdr + 32 + 2 * r) : 0;
    const int nsub = KQ_SB(kind) / KQ_SUB(kind);
    if (kind == W_Q4_K || kind == W_Q5_K || kind == W_Q3_K) {
        const uint8_t *p = hdr + KQ_P6(kind);
        const uint32_t p0 = rd32(p + 4 * r), p1 = rd32(p + 64 + 4 * r), p2 = rd32(p + 128 + 4 * r);
        int v[16];
        for (int j = 0; j < 5; j++) {
            v[j] = (p0 >> (6 * j)) & 63;
            v[8 + j] = (p1 >> (6 * j)) & 63;
        }
        for (int j = 5; j < 8; j++) v[j] = (p2 >> (6 * (j - 5))) & 63;
        v[13] = (p2 >> 18) & 63;
        v[14] = (p2 >> 24) & 63;
        v[15] = (int)((p0 >> 30) | ((p1 >> 30) << 2) | ((p2 >> 30) << 4));
        for (int j = 0; j < 8; j++) {
            if (kind == W_Q3_K) {
                b->sc[j] = v[j] - 32;
                b->sc[8 + j] = v[8 + j] - 32;
                b->m[j] = b->m[8 + j] = 0;
            } else {
                b->sc[j] = v[j];
                b->m[j] = v[8 + j];
            }
        }
    } else if (kind == W_Q6_K) {
        for (int j = 0; j < nsub; j++) b->sc[j] = (int8_t)hdr[32 + j * 16 + r];
    } else if (kind == W_Q2_K) {
        for (int j = 0; j < nsub; j++) {
            b->sc[j] = hdr[64 + j * 16 + r] & 0xF;
            b->m[j] = hdr[64 + j * 16 + r] >> 4;
        }
    }
    const int gps = KQ_SB(kind) / 32;
    for (int gi = 0; gi < gps; gi++) {
        const uint8_t *rec = blk + kq_header_bytes(kind, K) + (s * gps + gi) * KQ_GROUP_BYTES(kind);
        const uint8_t *cr = rec + 256 * KQ_HAS_NIB(kind), *hi = cr + 128 * KQ_HAS_CR(kind);
        const int cr_shift = kind == W_Q6_K ? 4 : 0, hi_bit = kind == W_Q3_K ? 2 : 4;
        for (int c = 0; c < 32; c++) {
            const int q = c / 4, jj = c % 4;
            int u = 0;
            if (KQ_HAS_NIB(kind)) u = (rec[(q & 3) * 64 + 4 * r + jj] >> (4 * (q >> 2))) & 0xF;
            if (KQ_HAS_CR(kind)) u |= ((cr[(q >> 2) * 64 + 4 * r + jj] >> (2 * (q & 3))) & 3) << cr_shift;
            if (KQ_HAS_HI(kind)) u |= ((hi[4 * r + jj] >> q) & 1) << hi_bit;
            b->u[gi * 32 + c] = (uint8_t)u;
        }
    }
}

/* The float32 values of b's columns, computed as gguf.quants.dequantize computes them. */
static void block_values(int kind, const kq_block *b, float *out)
{
    const float d = tl_f16_to_f32(b->d), dmin = tl_f16_to_f32(b->dmin);
    const int n = KQ_SB(kind), sub = KQ_SUB(kind);
    for (int k = 0; k < n; k++) {
        const int j = k / sub, u = b->u[k];
        switch (kind) {
        case W_Q4_1:
        case W_Q5_1: out[k] = d * (float)u + dmin; break;
        case W_Q5_0: out[k] = d * (float)(u - 16); break;
        case W_Q2_K:
        case W_Q4_K:
        case W_Q5_K: out[k] = (d * (float)b->sc[j]) * (float)u - dmin * (float)b->m[j]; break;
        case W_Q3_K: out[k] = (d * (float)b->sc[j]) * (float)(u - 4); break;
        case W_Q6_K: out[k] = (d * (float)b->sc[j]) * (float)(u - 32); break;
        default: out[k] = 0.0f;
        }
    }
}

typedef struct {
    int kind;
    const uint8_t *src;
    uint8_t *dst;
    float *out;
    const long long *rows;
    ptrdiff_t n, K, row0, per;
} pack_job;

static void pack_rows(void *arg, ptrdiff_t t)
{
    const pack_job *j = (const pack_job *)arg;
    const ptrdiff_t end = (t + 1) * j->per < j->n ? (t + 1) * j->per : j->n, nsb = j->K / KQ_SB(j->kind);
    const ptrdiff_t bb = kq_block_bytes(j->kind, j->K), gb = ggml_block_bytes(j->kind);
    kq_block b;
    for (ptrdiff_t i = t * j->per; i < end; i++) {
        const ptrdiff_t row = j->row0 + i;
        uint8_t *blk = j->dst + (row / KQ_ROWS) * bb;
        for (ptrdiff_t s = 0; s < nsb; s++) {
            decode_block(j->kind, j->src + (i * nsb + s) * gb, &b);
            store_block(j->kind, j->K, blk, (int)(row % KQ_ROWS), s, &b);
        }
    }
}

/* Rows row0..row0+n of a layout `dst` (kind, K columns; sized for all its rows, zeroed) from n rows of ggml blocks at
 * src (row i at src + i * (K / block columns) * block bytes). */
void tl_kpack(int kind, const uint8_t *src, ptrdiff_t n, ptrdiff_t K, ptrdiff_t row0, uint8_t *dst, int threads)
{
    if (n <= 0 || !kq_is_kind(kind)) return;
    ptrdiff_t per = (n + 8 * threads - 1) / (8 * threads);
    per = per < 16 ? 16 : per;
    pack_job job = {kind, src, dst, NULL, NULL, n, K, row0, per};
    tl_parallel(pack_rows, &job, (n + per - 1) / per, threads);
}

static void unpack_rows(void *arg, ptrdiff_t t)
{
    const pack_job *j = (const pack_job *)arg;
    const ptrdiff_t end = (t + 1) * j->per < j->n ? (t + 1) * j->per : j->n, nsb = j->K / KQ_SB(j->kind);
    const ptrdiff_t bb = kq_block_bytes(j->kind, j->K);
    kq_block b;
    for (ptrdiff_t i = t * j->per; i < end; i++) {
        const long long row = j->rows[i];
        const uint8_t *blk = j->src + (row / KQ_ROWS) * bb;
        for (ptrdiff_t s = 0; s < nsb; s++) {
            load_block(j->kind, j->K, blk, (int)(row % KQ_ROWS), s, &b);
            block_values(j->kind, &b, j->out + i * j->K + s * KQ_SB(j->kind));
        }
    }
}

/* out (n, K) float32 = rows `rows` of the layout `src` dequantized (the file's values, as gguf computes them). */
void tl_kdequant(int kind, const uint8_t *src, ptrdiff_t K, const long long *rows, ptrdiff_t n, float *out,
                 int threads)
{
    if (n <= 0 || !kq_is_kind(kind)) return;
    ptrdiff_t per = (n + 8 * threads - 1) / (8 * threads);
    per = per < 4 ? 4 : per;
    pack_job job = {kind, src, NULL, out, rows, n, K, 0, per};
    tl_parallel(unpack_rows, &job, (n + per - 1) / per, n * K > 65536 ? threads : 1);
}

/* ggml's bytes of one row of K columns of `kind` (0 for a kind that is not a block format). */
ptrdiff_t tl_kggml_row_bytes(int kind, ptrdiff_t K)
{
    return kq_is_kind(kind) ? K / KQ_SB(kind) * ggml_block_bytes(kind) : 0;
}

/* (for the quantizer, kquant_quantize.c) */
void tl_kq_encode_block(int kind, const kq_block *b, uint8_t *p) { encode_block(kind, b, p); }
void tl_kq_decode_block(int kind, const uint8_t *p, kq_block *b) { decode_block(kind, p, b); }
void tl_kq_block_values(int kind, const kq_block *b, float *out) { block_values(kind, b, out); }
ptrdiff_t tl_kq_ggml_block_bytes(int kind) { return ggml_block_bytes(kind); }
