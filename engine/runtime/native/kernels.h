/* Declarations shared by the kernel variants (variant_*.c, one per instruction set) and the exported entry points
 * (api.c). Every variant compiles the same templates, matmul.h and attention.h, against its own simd_*.h. */
#ifndef TL_KERNELS_H
#define TL_KERNELS_H
#include <stddef.h>
#include <stdint.h>

#include "pool.h"

/* How a weight matrix is stored: float32, bfloat16, float16, or quantized int8 / int4 (quant.h's layout), or one of
 * llama.cpp's block formats repacked (kquant_layout.h, kquant.h). */
enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_Q8 = 3, W_Q4 = 4 };
enum { W_Q4_1 = 5, W_Q5_0 = 6, W_Q5_1 = 7, W_Q2_K = 8, W_Q3_K = 9, W_Q4_K = 10, W_Q5_K = 11, W_Q6_K = 12 };
/* How quant.h computes a group's integer sums (simd_*.h / variant_*.c choose): AVX512-VNNI vpdpbusd, vpmaddwd, or
 * one weight row per lane in portable C. */
#define QDOT_LANES 0
#define QDOT_MADD 1
#define QDOT_VNNI 2
/* Instruction-set variants, in order of preference. */
enum { ISA_AVX512 = 0, ISA_AVX2 = 1, ISA_PORTABLE = 2, ISA_COUNT = 3 };

/* y (M, N) = x (M, K) @ w (N, K).T; see matmul.h. */
typedef void (*tl_matmul_fn)(const float *x, ptrdiff_t ldx, const void *w, ptrdiff_t ldw, int wtype, float *out,
                             ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads);
/* Causal grouped-query attention of T new queries over one sequence's keys/values; see attention.h. */
typedef void (*tl_attention_fn)(const float *q, ptrdiff_t ldq, ptrdiff_t T, ptrdiff_t n_heads, ptrdiff_t head_dim,
                                const float *k, const float *v, ptrdiff_t ldh, ptrdiff_t ldp, ptrdiff_t n_kv_heads,
                                ptrdiff_t start, float scale, float *out, ptrdiff_t ldo, float *probs, int threads);

void tl_matmul_avx512(const float *, ptrdiff_t, const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                      ptrdiff_t, int);
void tl_matmul_avx2(const float *, ptrdiff_t, const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                    ptrdiff_t, int);
void tl_matmul_portable(const float *, ptrdiff_t, const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t,
                        ptrdiff_t, ptrdiff_t, int);
void tl_widen_avx512(const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
void tl_widen_avx2(const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
void tl_widen_portable(const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
void tl_swiglu_avx512(const float *, ptrdiff_t, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
void tl_swiglu_avx2(const float *, ptrdiff_t, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
void tl_swiglu_portable(const float *, ptrdiff_t, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
typedef void (*tl_swiglu_fn)(const float *, ptrdiff_t, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
#define RMS_ARGS const float *, ptrdiff_t, const float *, ptrdiff_t, const float *, float, float *, float *, ptrdiff_t, \
    ptrdiff_t, ptrdiff_t, int
#define ROT_ARGS float *, ptrdiff_t, const long long *, const float *, const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int
void tl_rms_norm_avx512(RMS_ARGS);
void tl_rms_norm_avx2(RMS_ARGS);
void tl_rms_norm_portable(RMS_ARGS);
typedef void (*tl_rms_norm_fn)(RMS_ARGS);
void tl_rotary_avx512(ROT_ARGS);
void tl_rotary_avx2(ROT_ARGS);
void tl_rotary_portable(ROT_ARGS);
typedef void (*tl_rotary_fn)(ROT_ARGS);
typedef void (*tl_widen_fn)(const void *, ptrdiff_t, int, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
void tl_attention_avx512(const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const float *, const float *,
                         ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, float, float *, ptrdiff_t, float *, int);
void tl_attention_avx2(const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const float *, const float *,
                       ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, float, float *, ptrdiff_t, float *, int);
void tl_attention_portable(const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const float *, const float *,
                           ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, float, float *, ptrdiff_t, float *, int);

#define SEQS_ARGS const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const long long *, \
    const long long *, const long long *, float *const *, float *const *, const long long *, ptrdiff_t, float, float *, \
    ptrdiff_t, int
void tl_attention_seqs_avx512(SEQS_ARGS);
void tl_attention_seqs_avx2(SEQS_ARGS);
void tl_attention_seqs_portable(SEQS_ARGS);
typedef void (*tl_attention_seqs_fn)(SEQS_ARGS);

/* y (M, N) = x (M, K) @ W.T for a quantized W (kind W_Q8 | W_Q4): its integers and float16 scales; see quant.h. */
#define QMM_ARGS const float *, ptrdiff_t, const void *, const uint16_t *, int, float *, ptrdiff_t, ptrdiff_t, \
    ptrdiff_t, ptrdiff_t, int
typedef void (*tl_qmatmul_fn)(QMM_ARGS);
void tl_qmatmul_avx512(QMM_ARGS);
void tl_qmatmul_avx512vnni(QMM_ARGS);
void tl_qmatmul_avx2(QMM_ARGS);
void tl_qmatmul_portable(QMM_ARGS);

/* One part of a weight matrix given as rows of parts, each in its own format: `rows` rows (N) of `kind` -- dense
 * (W_F32, W_BF16, W_F16: data is the (rows, K) matrix, contiguous rows), int8 / int4 (data: the integers, scales: the
 * float16 scales, quant.h) or a block format (W_Q4_1..W_Q6_K: data, kquant.h; scales unused). A matrix of parts
 * (e.g. llama.cpp's q4_K_M q/k/v: q and k in Q4_K, v in Q6_K) is multiplied in one call, its outputs side by side. */
typedef struct {
    long long kind, rows;
    const void *data;
    const uint16_t *scales;
} tl_wpart;

/* y (M, sum of rows) = x (M, K) @ W.T for W given as parts that are all block formats (kquant.h). */
#define KMM_ARGS const float *, ptrdiff_t, const tl_wpart *, ptrdiff_t, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, int
typedef void (*tl_kmatmul_fn)(KMM_ARGS);
void tl_kmatmul_avx512(KMM_ARGS);
void tl_kmatmul_avx512vnni(KMM_ARGS);
void tl_kmatmul_avx2(KMM_ARGS);
void tl_kmatmul_portable(KMM_ARGS);

/* One decoder layer's weights for tl_decoder_layers: matrices in Hugging Face's layout with contiguous rows, in the
 * stack's weight type; the norm that follows the MLP is the next layer's input norm (the final norm after the last). */
typedef struct {
    const void *wqkv;      /* (Q + 2 KV, H) */
    const void *wo;        /* (H, Q) */
    const void *w_gate_up; /* (2 I, H) */
    const void *w_down;    /* (H, I) */
    const float *mlp_norm; /* (H,) */
    const float *next_norm; /* (H,) */
    /* quantized stacks (wtype W_Q8 / W_Q4): each matrix's float16 scales (the pointers above hold its integers) */
    const uint16_t *wqkv_s, *wo_s, *w_gate_up_s, *w_down_s;
    /* matrices given as parts (wqkv, wo, w_gate_up, w_down; n_parts 0: the pointers above, in the stack's wtype) */
    const tl_wpart *parts[4];
    long long n_parts[4];
} tl_layer;

/* The shapes and constants shared by every layer of a stack. */
typedef struct {
    long long hidden, inter, n_heads, n_kv_heads, head_dim, wtype;
    float eps, scale;
    const float *cos, *sin; /* (positions, head_dim) rotary tables */
} tl_stack;

#endif
