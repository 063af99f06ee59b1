/* Portable C for the kernel templates: GCC/Clang vector extensions, 4 float lanes, which the compiler maps to the
 * platform's own vectors (NEON on ARM: Apple M-series, Graviton; SSE2 on any x86-64) with no intrinsics. */
#include <stdint.h>
#include <string.h>

#define ISA_NAME "portable"
#define TARGET
#define INLINE __attribute__((always_inline)) static inline
#define VL 4
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));
typedef uint32_t vu __attribute__((vector_size(16)));

/* 2 rows of x by 4 of w: 8 accumulators + 4 weight vectors + 1 x vector fit 16 registers (SSE2) or 32 (NEON). */
#define TILE_MB 2
#define TILE_NR_1 4
#define TILE_NR_2 4
#define BLOCK_ROWS_UNIT 4

INLINE vf vf_zero(void) { return (vf){0.0f, 0.0f, 0.0f, 0.0f}; }
INLINE vf vf_set1(float a) { return (vf){a, a, a, a}; }
INLINE vf vf_load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void vf_store(float *p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf vf_fmadd(vf a, vf b, vf c) { return a * b + c; }
INLINE vf vf_mul(vf a, vf b) { return a * b; }
INLINE vf vf_add(vf a, vf b) { return a + b; }
INLINE vf vf_sub(vf a, vf b) { return a - b; }
INLINE vf vf_div(vf a, vf b) { return a / b; }
INLINE vf vf_max(vf a, vf b) { return (vf)(((vi)(a > b) & (vi)a) | ((vi)(a <= b) & (vi)b)); }
INLINE float vf_sum(vf v) { return (v[0] + v[1]) + (v[2] + v[3]); }
INLINE float vf_hmax(vf v)
{
    float a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
    return a > b ? a : b;
}
#define KEEP(v) ((void)0)
/* Each lane rounded to the nearest integer, ties to even, for |v| < 2^22: adding and subtracting 1.5 * 2^23 rounds
 * exactly there. The empty asm makes v a value of its own first, so the compiler cannot fuse the multiply that made
 * it into the addition (GCC contracts a * b + c to an FMA across statements where the target has one: ARM). */
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_VALUE(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__) || defined(__arm__)
#define KEEP_VALUE(v) __asm__("" : "+w"(v))
#else
#define KEEP_VALUE(v) __asm__("" : "+m"(v))
#endif
INLINE vf vf_rint(vf v)
{
    const vf magic = vf_set1(12582912.0f);
    KEEP_VALUE(v);
    return (v + magic) - magic;
}
/* a * b + c for one float, the same in every copy of a kernel (attention.h): one rounding where the target has a fused
 * multiply-add (the compiler may fuse a plain a * b + c in some copies and not in others), two where it has none (and
 * then no copy can fuse it). */
#ifdef __FP_FAST_FMAF
INLINE float sf_fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
INLINE float sf_fmadd(float a, float b, float c) { return a * b + c; }
#endif

/* float lanes -> int32 lanes (truncating): __builtin_convertvector where the compiler has it (Clang, GCC 9+), else
 * lane by lane (GCC 8 and older: RHEL 8, Amazon Linux 2). TL_NO_CONVERTVECTOR forces the fallback (for the tests). */
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)) && !defined(TL_NO_CONVERTVECTOR)
#define vf_to_vi(v) __builtin_convertvector((v), vi)
#else
INLINE vi vf_to_vi(vf v) { return (vi){(int32_t)v[0], (int32_t)v[1], (int32_t)v[2], (int32_t)v[3]}; }
#endif

INLINE vu vu_load(const uint16_t *p) { vu v; memcpy(&v, p, sizeof v); return v; } /* 2*VL bf16 as VL uint32 */
INLINE vf bf16_even(const uint16_t *p) { return (vf)(vu_load(p) << 16); }
INLINE vf bf16_odd(const uint16_t *p) { return (vf)(vu_load(p) & 0xFFFF0000u); }
/* VL float16 at p -> float32, exactly, with integer operations (no F16C or _Float16 needed). */
INLINE vf f16_load(const uint16_t *p)
{
    uint16_t h[VL];
    memcpy(h, p, sizeof h);
    vu u = {h[0], h[1], h[2], h[3]};
    vu sign = (u & 0x8000u) << 16;
    vu mag = (u & 0x7FFFu) << 13;                   /* exponent and mantissa in float32 position */
    vu exp = mag & (0x7C00u << 13);
    vf normal = (vf)(mag + ((127u - 15u) << 23));     /* rebias */
    vf inf_nan = (vf)(mag + ((255u - 31u) << 23));    /* 5-bit all-ones exponent -> 8-bit all-ones */
    vf sub = (vf)(mag + (1u << 23)) - (vf)(vu){1u << 23, 1u << 23, 1u << 23, 1u << 23};
    sub = sub * (vf){0x1p112f, 0x1p112f, 0x1p112f, 0x1p112f}; /* subnormal fp16: mantissa * 2^-24 */
    vi is_sub = (vi)(exp == 0u), is_inf = (vi)(exp == (0x7C00u << 13));
    vi bits = ((vi)normal & ~(is_sub | is_inf)) | ((vi)sub & is_sub) | ((vi)inf_nan & is_inf);
    return (vf)((vu)bits | sign);
}

/* e^x as in simd_avx512.h, rounding to the nearest integer by the 1.5 * 2^23 trick (exact for |n| < 2^22). */
INLINE vf vf_exp(vf x)
{
    const vf lo = vf_set1(-87.3f), hi = vf_set1(88.3f), magic = vf_set1(12582912.0f);
    vi under = (vi)(x < lo);
    x = (vf)(((vi)(x < lo) & (vi)lo) | (~(vi)(x < lo) & (vi)x));
    x = (vf)(((vi)(x > hi) & (vi)hi) | (~(vi)(x > hi) & (vi)x));
    vf n = (x * vf_set1(1.44269504088896341f) + magic) - magic;
    vf r = x - n * vf_set1(0.693359375f);
    r = r - n * vf_set1(-2.12194440e-4f);
    vf p = vf_set1(1.9875691500e-4f);
    p = p * r + vf_set1(1.3981999507e-3f);
    p = p * r + vf_set1(8.3334519073e-3f);
    p = p * r + vf_set1(4.1665795894e-2f);
    p = p * r + vf_set1(1.6666665459e-1f);
    p = p * r + vf_set1(5.0000001201e-1f);
    vf y = p * r * r + (r + vf_set1(1.0f));
    vi e = (vf_to_vi(n) + 127) << 23;
    y = y * (vf)e;
    return (vf)((vi)y & ~under);
}

/* Quantized weights (quant.h): int32 lanes, one weight row per lane, 4 rows per vector (QDOT_LANES): a lane's 4 bytes
 * taken apart by shifts (little-endian, as on x86 and ARM) and multiplied by scalar activations. */
#define QTARGET
#define QDOT QDOT_LANES
#define QMB 2
#define QNBT_1 1
#define QNBT_N8 1
#define QNBT_N4 1
typedef vi qv;
INLINE qv qv_zero(void) { return (vi){0, 0, 0, 0}; }
INLINE qv qv_load(const void *p) { vi v; memcpy(&v, p, sizeof v); return v; }
INLINE qv qv_set1(int32_t a) { return (vi){a, a, a, a}; }
INLINE qv qv_add(qv a, qv b) { return a + b; }
INLINE qv qv_sub(qv a, qv b) { return a - b; }
INLINE qv qv_srli(qv a, int n) { return (vi)((vu)a >> n); }
INLINE qv qv_byte(qv words, int j) { return (vi)(((vu)words >> (8 * j)) & 0xFFu); }
INLINE qv qv_and15(qv a) { return a & 15; }
INLINE qv qv_mul1(qv a, int16_t x) { return a * (int32_t)x; }
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9)) && !defined(TL_NO_CONVERTVECTOR)
#define qv_float(a) __builtin_convertvector((a), vf)
#else
INLINE vf qv_float(qv a) { return (vf){(float)a[0], (float)a[1], (float)a[2], (float)a[3]}; }
#endif
