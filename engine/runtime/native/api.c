/* The library's entry points, called from Python with ctypes: which variants are compiled and runnable here, and the
 * kernels of a chosen variant. Compiled for the baseline of the platform: nothing here needs a particular ISA. */
#include "kernels.h"

#define ABI_VERSION 7

int tl_abi_version(void) { return ABI_VERSION; }

/* A variant is compiled in unless the build left it out (-DTL_WITHOUT_AVX512, -DTL_WITHOUT_AVX2, -DTL_WITHOUT_PORTABLE:
 * its source did not compile with this compiler, see build() in __init__.py); the x86 ones only on x86-64. */
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(TL_WITHOUT_AVX512)
#define HAVE_AVX512 1
#define AVX512_FN(name) name##_avx512,
#else
#define HAVE_AVX512 0
#define AVX512_FN(name) 0,
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(TL_WITHOUT_AVX2)
#define HAVE_AVX2 1
#define AVX2_FN(name) name##_avx2,
#else
#define HAVE_AVX2 0
#define AVX2_FN(name) 0,
#endif
#ifndef TL_WITHOUT_PORTABLE
#define HAVE_PORTABLE 1
#define PORTABLE_FN(name) name##_portable
#else
#define HAVE_PORTABLE 0
#define PORTABLE_FN(name) 0
#endif
/* A table of one kernel's variants, in the enum order of kernels.h. */
#define X86_PAIR(name) AVX512_FN(name) AVX2_FN(name)
#define VARIANTS(name) {X86_PAIR(name) PORTABLE_FN(name)}

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
/* Whether this CPU and OS run the AVX2 (avx512 = 0) or AVX-512 (avx512 = 1) variant: straight from cpuid, which every
 * GCC and Clang accepts (__builtin_cpu_supports("f16c") is an error before Clang 18). Leaf 1 ECX: FMA bit 12, OSXSAVE
 * 27, AVX 28, F16C 29; leaf 7 EBX: AVX2 bit 5, AVX-512F bit 16; XCR0 (xgetbv): the OS saves the YMM state (bits 1-2)
 * and for AVX-512 the opmask and ZMM state (bits 5-7). */
static int x86_runs(int avx512)
{
    unsigned a, b, c, d;
    const unsigned leaf1 = (1u << 12) | (1u << 27) | (1u << 28) | (1u << 29);
    if (__get_cpuid_max(0, 0) < 7 || !__get_cpuid(1, &a, &b, &c, &d) || (c & leaf1) != leaf1) return 0;
    unsigned xcr0, xcr0_hi;
    __asm__ __volatile__("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    __cpuid_count(7, 0, a, b, c, d);
    if (!avx512) return (xcr0 & 0x6u) == 0x6u && ((b >> 5) & 1u);
    return (xcr0 & 0xE6u) == 0xE6u && ((b >> 16) & 1u);
}

/* CPUID leaf 7's EBX and ECX, read once: cpuid traps to the hypervisor in a virtual machine (microseconds), too slow
 * for every matmul call. */
static void cpuid7(unsigned *ebx, unsigned *ecx)
{
    static volatile int known;
    static volatile unsigned saved_b, saved_c;
    if (!known) {
        unsigned a, b, c, d;
        __cpuid_count(7, 0, a, b, c, d);
        saved_b = b;
        saved_c = c;
        known = 1;
    }
    *ebx = saved_b;
    *ecx = saved_c;
}
#endif

/* 1 if `isa` is compiled into this library and this CPU (and OS) can run it. */
int tl_isa_usable(int isa)
{
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == ISA_AVX512) return HAVE_AVX512 && x86_runs(1);
    if (isa == ISA_AVX2) return HAVE_AVX2 && x86_runs(0);
#endif
    return isa == ISA_PORTABLE && HAVE_PORTABLE;
}

/* 1 if `isa` is compiled into this library (whatever this CPU runs). */
int tl_isa_compiled(int isa)
{
    return isa == ISA_AVX512 ? HAVE_AVX512 : isa == ISA_AVX2 ? HAVE_AVX2 : isa == ISA_PORTABLE && HAVE_PORTABLE;
}

static const tl_matmul_fn matmuls[ISA_COUNT] = VARIANTS(tl_matmul);
static const tl_widen_fn widens[ISA_COUNT] = VARIANTS(tl_widen);
static const tl_swiglu_fn swiglus[ISA_COUNT] = VARIANTS(tl_swiglu);
static const tl_rms_norm_fn rms_norms[ISA_COUNT] = VARIANTS(tl_rms_norm);
static const tl_rotary_fn rotaries[ISA_COUNT] = VARIANTS(tl_rotary);
static const tl_attention_fn attentions[ISA_COUNT] = VARIANTS(tl_attention);

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
    (void)isa; /* (only the x86 variants have a choice) */
#if HAVE_AVX512 /* leaf 7 EBX bit 30: AVX512BW, ECX bit 11: AVX512_VNNI (cpuid, as x86_runs) */
    unsigned b, c;
    cpuid7(&b, &c);
    if (isa == ISA_AVX512 && ((b >> 30) & 1u)) return (c >> 11) & 1u ? tl_qmatmul_avx512vnni : tl_qmatmul_avx512;
#endif
#if HAVE_AVX2
    if (isa == ISA_AVX512 || isa == ISA_AVX2) return tl_qmatmul_avx2;
#endif
#if HAVE_PORTABLE
    return tl_qmatmul_portable;
#else
    return 0; /* (no variant left for an AVX-512 CPU without BW in a build without avx2 and portable) */
#endif
}

/* The quantized matmul builds, by number: 0 portable, 1 avx2, 2 avx512 (BW, vpmaddwd), 3 avx512 VNNI (vpdpbusd);
 * NULL where it is not compiled in or this CPU cannot run it. */
static tl_qmatmul_fn qmatmul_build_fn(int build)
{
#if HAVE_AVX512
    if (build == 3) return tl_isa_usable(ISA_AVX512) && qmatmul_for(ISA_AVX512) == tl_qmatmul_avx512vnni
                           ? tl_qmatmul_avx512vnni : 0;
    if (build == 2) return tl_isa_usable(ISA_AVX512) && qmatmul_for(ISA_AVX512) != tl_qmatmul_avx2
                           ? tl_qmatmul_avx512 : 0; /* (a VNNI CPU has BW) */
#endif
#if HAVE_AVX2
    if (build == 1) return tl_isa_usable(ISA_AVX2) ? tl_qmatmul_avx2 : 0;
#endif
#if HAVE_PORTABLE
    if (build == 0) return tl_qmatmul_portable;
#endif
    return 0;
}

/* Which build qmatmul_for(isa) runs (the numbers of qmatmul_build_fn). */
int tl_qmatmul_build(int isa)
{
    tl_qmatmul_fn f = qmatmul_for(isa);
    for (int build = 3; build > 0; build--)
        if (f == qmatmul_build_fn(build)) return build;
    return 0;
}

/* y (M, N) = x (M, K) @ W.T for a quantized W (N, K): kind W_Q8 | W_Q4, its integers and scales (see quant.h). */
void tl_qmatmul(int isa, const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    qmatmul_for(isa)(x, ldx, data, scales, kind, out, ldo, M, N, K, threads);
}

/* The block-format matmul (kquant.h) of variant `isa`: as qmatmul_for, the VNNI build where the CPU has AVX512-VNNI. */
static tl_kmatmul_fn kmatmul_for(int isa)
{
    (void)isa;
#if HAVE_AVX512
    unsigned b, c;
    cpuid7(&b, &c);
    if (isa == ISA_AVX512 && ((b >> 30) & 1u)) return (c >> 11) & 1u ? tl_kmatmul_avx512vnni : tl_kmatmul_avx512;
#endif
#if HAVE_AVX2
    if (isa == ISA_AVX512 || isa == ISA_AVX2) return tl_kmatmul_avx2;
#endif
#if HAVE_PORTABLE
    return tl_kmatmul_portable;
#else
    return 0;
#endif
}

/* Which build kmatmul_for(isa) runs: 0 portable, 1 avx2, 2 avx512 (BW), 3 avx512 VNNI. */
int tl_kmatmul_build(int isa)
{
    tl_kmatmul_fn f = kmatmul_for(isa);
#if HAVE_AVX512
    if (f == tl_kmatmul_avx512vnni) return 3;
    if (f == tl_kmatmul_avx512) return 2;
#endif
#if HAVE_AVX2
    if (f == tl_kmatmul_avx2) return 1;
#endif
    (void)f;
    return 0;
}

/* The block-format matmul of the avx512 build without VNNI (vpmaddubsw), whatever this CPU has (the selftest checks it
 * on a VNNI CPU); 0 where the avx512 variant is not compiled in, else 1. The CPU must have AVX512-BW. */
int tl_kmatmul_avx512_madd(const float *x, ptrdiff_t ldx, const tl_wpart *parts, ptrdiff_t n_parts, float *out,
                           ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t K, int threads)
{
#if HAVE_AVX512
    tl_kmatmul_avx512(x, ldx, parts, n_parts, out, ldo, M, K, threads);
    return 1;
#else
    (void)x, (void)ldx, (void)parts, (void)n_parts, (void)out, (void)ldo, (void)M, (void)K, (void)threads;
    return 0;
#endif
}

/* y (M, sum of rows) = x (M, K) @ W.T for W given as parts (kernels.h's tl_wpart), outputs side by side: each run of
 * block-format parts in one call of the block-format kernel (the activations rounded once), a dense or int8 / int4
 * part with its own kernel. */
void tl_matmul_parts(int isa, const float *x, ptrdiff_t ldx, const tl_wpart *parts, ptrdiff_t n_parts, float *out,
                     ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t K, int threads)
{
    ptrdiff_t col = 0;
    for (ptrdiff_t p = 0; p < n_parts;) {
        const tl_wpart *part = &parts[p];
        if (part->kind >= W_Q4_1 && part->kind <= W_Q6_K) {
            ptrdiff_t n = 1, rows = part->rows;
            while (p + n < n_parts && parts[p + n].kind >= W_Q4_1 && parts[p + n].kind <= W_Q6_K)
                rows += parts[p + n++].rows;
            kmatmul_for(isa)(x, ldx, part, n, out + col, ldo, M, K, threads);
            col += rows;
            p += n;
            continue;
        }
        if (part->kind == W_Q8 || part->kind == W_Q4)
            qmatmul_for(isa)(x, ldx, part->data, part->scales, (int)part->kind, out + col, ldo, M, part->rows, K,
                             threads);
        else
            matmuls[isa](x, ldx, part->data, K, (int)part->kind, out + col, ldo, M, part->rows, K, threads);
        col += part->rows;
        p++;
    }
}

/* tl_qmatmul on a chosen build (qmatmul_build_fn's numbers, whatever the dispatch would pick: the tests compare the
 * builds); returns 0, or -1 where that build cannot run here. */
int tl_qmatmul_on(int build, const float *x, ptrdiff_t ldx, const void *data, const uint16_t *scales, int kind,
                  float *out, ptrdiff_t ldo, ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, int threads)
{
    tl_qmatmul_fn f = qmatmul_build_fn(build);
    if (!f) return -1;
    f(x, ldx, data, scales, kind, out, ldo, M, N, K, threads);
    return 0;
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

static const tl_attention_seqs_fn attention_seqs[ISA_COUNT] = VARIANTS(tl_attention_seqs);

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
/* x (rows, K) @ weight `w` (with scales `ws` when quantized; or matrix `i` of the layer given as parts) -> out
 * (N rows, Nw) */
#define MATMUL(i, x, ldx, w, ws, out, ldo, Nw, K) \
    (l->n_parts[i] ? tl_matmul_parts(isa, x, ldx, l->parts[i], l->n_parts[i], out, ldo, N, K, threads) \
     : qmm ? qmm(x, ldx, w, ws, wt, out, ldo, N, Nw, K, threads) : mm(x, ldx, w, K, wt, out, ldo, N, Nw, K, threads))
    float *qkv = scratch, *attn = qkv + N * W, *proj = attn + N * Q, *gate_up = proj + N * H, *act = gate_up + N * 2 * I;
    for (ptrdiff_t i = 0; i < n_layers; i++) {
        const tl_layer *l = &layers[i];
        MATMUL(0, h, H, l->wqkv, l->wqkv_s, qkv, W, W, H);
        rotaries[isa](qkv, W, pos, c->cos, c->sin, N, c->n_heads + c->n_kv_heads, D, threads);
        attention_seqs[isa](qkv, W, c->n_heads, c->n_kv_heads, D, n_seq, row, count, start, k_cache, v_cache, capacity,
                            i, c->scale, attn, Q, threads);
        MATMUL(1, attn, Q, l->wo, l->wo_s, proj, H, H, Q);
        rms_norms[isa](x, H, proj, H, l->mlp_norm, c->eps, x, h, H, N, H, threads);
        MATMUL(2, h, H, l->w_gate_up, l->w_gate_up_s, gate_up, 2 * I, 2 * I, H);
        swiglus[isa](gate_up, 2 * I, act, I, N, I, threads);
        MATMUL(3, act, I, l->w_down, l->w_down_s, proj, H, H, I);
        rms_norms[isa](x, H, proj, H, l->next_norm, c->eps, x, h, H, N, H, threads);
    }
#undef MATMUL
}
