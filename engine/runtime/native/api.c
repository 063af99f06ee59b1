/* The library's entry points, called from Python with ctypes: which variants are compiled and runnable here, and the
 * kernels of a chosen variant. Compiled for the baseline of the platform: nothing here needs a particular ISA. */
#include "kernels.h"

#define ABI_VERSION 5

int tl_abi_version(void) { return ABI_VERSION; }

/* 1 if `isa` is compiled into this library and this CPU (and OS) can run it. */
int tl_isa_usable(int isa)
{
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (isa == ISA_AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return isa == ISA_PORTABLE;
}

static const tl_matmul_fn matmuls[ISA_COUNT] = {
#if defined(__x86_64__) || defined(_M_X64)
    tl_matmul_avx512, tl_matmul_avx2,
#else
    0, 0,
#endif
    tl_matmul_portable};
static const tl_widen_fn widens[ISA_COUNT] = {
#if defined(__x86_64__) || defined(_M_X64)
    tl_widen_avx512, tl_widen_avx2,
#else
    0, 0,
#endif
    tl_widen_portable};
static const tl_swiglu_fn swiglus[ISA_COUNT] = {
#if defined(__x86_64__) || defined(_M_X64)
    tl_swiglu_avx512, tl_swiglu_avx2,
#else
    0, 0,
#endif
    tl_swiglu_portable};
#if defined(__x86_64__) || defined(_M_X64)
#define X86_PAIR(name) name##_avx512, name##_avx2,
#else
#define X86_PAIR(name) 0, 0,
#endif
static const tl_rms_norm_fn rms_norms[ISA_COUNT] = {X86_PAIR(tl_rms_norm) tl_rms_norm_portable};
static const tl_rotary_fn rotaries[ISA_COUNT] = {X86_PAIR(tl_rotary) tl_rotary_portable};
static const tl_attention_fn attentions[ISA_COUNT] = {
#if defined(__x86_64__) || defined(_M_X64)
    tl_attention_avx512, tl_attention_avx2,
#else
    0, 0,
#endif
    tl_attention_portable};

/* y (M, N) = x (M, K) @ w (N, K).T with w stored as wtype (W_F32, W_BF16, W_F16); strides in elements. */
void tl_matmul(int isa, const float *x, ptrdiff_t ldx, const void *w, ptrdiff_t ldw, int wtype, float *out,
               ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    matmuls[isa](x, ldx, w, ldw, wtype, out, ldo, M, N, K, threads);
}

/* The quantized matmul of variant `isa`: on avx512, the VNNI build where the CPU has AVX512-VNNI, the BW build
 * without it, and the avx2 one on an AVX-512 CPU without BW (none is sold; it keeps the dispatch total). */
static tl_qmatmul_fn qmatmul_for(int isa)
{
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (isa == ISA_AVX512) {
        if (!__builtin_cpu_supports("avx512bw")) return tl_qmatmul_avx2;
        return __builtin_cpu_supports("avx512vnni") ? tl_qmatmul_avx512vnni : tl_qmatmul_avx512;
    }
    if (isa == ISA_AVX2) return tl_qmatmul_avx2;
#endif
    return tl_qmatmul_portable;
}

/* Which build qmatmul_for(isa) runs: 0 portable, 1 avx2, 2 avx512 (BW), 3 avx512 VNNI. */
int tl_qmatmul_build(int isa)
{
    tl_qmatmul_fn f = qmatmul_for(isa);
#if defined(__x86_64__) || defined(_M_X64)
    if (f == tl_qmatmul_avx512vnni) return 3;
    if (f == tl_qmatmul_avx512) return 2;
    if (f == tl_qmatmul_avx2) return 1;
#endif
    return 0;
}

/* y (M, N) = x (M, K) @ W.T for a quantized W (N, K): kind W_Q8 | W_Q4, its integers and scales (see quant.h). */
void tl_qmatmul(int isa, const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    qmatmul_for(isa)(x, ldx, data, scales, kind, out, ldo, M, N, K, threads);
}

/* out (N, K) float32 = w (N, K) bf16 / fp16 widened exactly (for OpenBLAS's GEMM on widened blocks). */
void tl_widen(int isa, const void *w, ptrdiff_t ldw, int wtype, float *out, ptrdiff_t ldo, ptrdiff_t N, ptrdiff_t K,
              int threads)
{
    widens[isa](w, ldw, wtype, out, ldo, N, K, threads);
}

/* out (M, I) = silu(gate) * up of gate_up (M, 2I) (gate columns first). */
void tl_swiglu(int isa, const float *gate_up, ptrdiff_t ld, float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t inter,
               int threads)
{
    swiglus[isa](gate_up, ld, out, ldo, M, inter, threads);
}

/* out_h = rms_norm(x + res) (res may be NULL), out_x = x + res (may be NULL without res); see matmul.h. */
void tl_rms_norm(int isa, const float *x, ptrdiff_t ldx, const float *res, ptrdiff_t ldr, const float *w, float eps,
                 float *out_x, float *out_h, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t H, int threads)
{
    rms_norms[isa](x, ldx, res, ldr, w, eps, out_x, out_h, ldo, M, H, threads);
}

/* The rotary embedding in place on the first `heads` heads of each row (see matmul.h). */
void tl_rotary(int isa, float *x, ptrdiff_t ldx, const long long *pos, const float *cos, const float *sin, ptrdiff_t M,
               ptrdiff_t heads, ptrdiff_t head_dim, int threads)
{
    rotaries[isa](x, ldx, pos, cos, sin, M, heads, head_dim, threads);
}

/* Causal GQA attention of T queries over one sequence's cache (see attention.h); probs may be NULL. */
void tl_attention(int isa, const float *q, ptrdiff_t ldq, ptrdiff_t T, ptrdiff_t n_heads, ptrdiff_t head_dim,
                  const float *k, const float *v, ptrdiff_t ldh, ptrdiff_t ldp, ptrdiff_t n_kv_heads, ptrdiff_t start,
                  float scale, float *out, ptrdiff_t ldo, float *probs, int threads)
{
    attentions[isa](q, ldq, T, n_heads, head_dim, k, v, ldh, ldp, n_kv_heads, start, scale, out, ldo, probs,
                    threads);
}

static const tl_attention_seqs_fn attention_seqs[ISA_COUNT] = {X86_PAIR(tl_attention_seqs) tl_attention_seqs_portable};

/* The attention of every sequence of a step at one layer, their new keys and values stored first (see attention.h). */
void tl_attention_seqs(int isa, const float *qkv, ptrdiff_t ld_qkv, ptrdiff_t n_heads, ptrdiff_t n_kv_heads,
                       ptrdiff_t head_dim, ptrdiff_t n_seq, const long long *row, const long long *count,
                       const long long *start, float *const *k_cache, float *const *v_cache, const long long *capacity,
                       ptrdiff_t layer, float scale, float *out, ptrdiff_t ldo, int threads)
{
    attention_seqs[isa](qkv, ld_qkv, n_heads, n_kv_heads, head_dim, n_seq, row, count, start, k_cache, v_cache,
                        capacity, layer, scale, out, ldo, threads);
}

/* The decoder layers of one forward pass in one call, the kernels above in the order of the NumPy backend's layer
 * loop (engine/runtime/numpy_backend.py), so the same bits: per layer qkv = h @ wqkv.T, the rotary embedding on the
 * query and key heads, every sequence's keys/values stored and its attention (tl_attention_seqs), then
 * x, h = x + attn @ wo.T and its RMSNorm, x, h = x + silu/up(h @ w_gate_up.T) @ w_down.T and the next norm.
 * x, h: (N, H) float32, the residual stream and its normed copy, updated in place; pos: (N,) positions; the
 * sequences' arguments as in tl_attention_seqs; scratch: N * (Q + 2 KV + Q + H + 2 I + I) floats. */
void tl_decoder_layers(int isa, const tl_stack *c, const tl_layer *layers, ptrdiff_t n_layers, float *x, float *h,
                       ptrdiff_t N, const long long *pos, ptrdiff_t n_seq, const long long *row, const long long *count,
                       const long long *start, float *const *k_cache, float *const *v_cache, const long long *capacity,
                       float *scratch, int threads)
{
    const ptrdiff_t H = c->hidden, I = c->inter, D = c->head_dim, Q = c->n_heads * D, KV = c->n_kv_heads * D;
    const ptrdiff_t W = Q + 2 * KV;
    const int wt = (int)c->wtype;
    const tl_matmul_fn mm = matmuls[isa];
    const tl_qmatmul_fn qmm = wt == W_Q8 || wt == W_Q4 ? qmatmul_for(isa) : 0;
/* x (rows, K) @ weight `w` (with scales `ws` when quantized) -> out (N rows, Nw) */
#define MATMUL(x, ldx, w, ws, out, ldo, Nw, K) \
    (qmm ? qmm(x, ldx, w, ws, wt, out, ldo, N, Nw, K, threads) : mm(x, ldx, w, K, wt, out, ldo, N, Nw, K, threads))
    float *qkv = scratch, *attn = qkv + N * W, *proj = attn + N * Q, *gate_up = proj + N * H, *act = gate_up + N * 2 * I;
    for (ptrdiff_t i = 0; i < n_layers; i++) {
        const tl_layer *l = &layers[i];
        MATMUL(h, H, l->wqkv, l->wqkv_s, qkv, W, W, H);
        rotaries[isa](qkv, W, pos, c->cos, c->sin, N, c->n_heads + c->n_kv_heads, D, threads);
        attention_seqs[isa](qkv, W, c->n_heads, c->n_kv_heads, D, n_seq, row, count, start, k_cache, v_cache, capacity,
                            i, c->scale, attn, Q, threads);
        MATMUL(attn, Q, l->wo, l->wo_s, proj, H, H, Q);
        rms_norms[isa](x, H, proj, H, l->mlp_norm, c->eps, x, h, H, N, H, threads);
        MATMUL(h, H, l->w_gate_up, l->w_gate_up_s, gate_up, 2 * I, 2 * I, H);
        swiglus[isa](gate_up, 2 * I, act, I, N, I, threads);
        MATMUL(act, I, l->w_down, l->w_down_s, proj, H, H, I);
        rms_norms[isa](x, H, proj, H, l->next_norm, c->eps, x, h, H, N, H, threads);
    }
#undef MATMUL
}
