/* The AVX2 + FMA + F16C instruction set for the kernel templates (x86-64 since Intel Haswell / AMD Zen 1: most
 * laptops and desktops; Intel client chips since 2021 have no AVX-512): 8 float lanes, 16 vector registers. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ISA_NAME "avx2"
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE __attribute__((always_inline)) static inline
#define VL 8
typedef __m256 vf;

/* mb*nr accumulators + nr weight vectors + one x vector (+ the bf16 mask) within 16 registers. */
#define TILE_MB 3
#define TILE_NR_1 6
#define TILE_NR_2 4
#define TILE_NR_3 3
#define BLOCK_ROWS_UNIT 12
#define PF_NEXT_TILE_BELOW 5 /* next-tile prefetch up to 4 rows of x (see matmul.h) */

TARGET INLINE vf vf_zero(void) { return _mm256_setzero_ps(); }
TARGET INLINE vf vf_set1(float a) { return _mm256_set1_ps(a); }
TARGET INLINE vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
TARGET INLINE void vf_store(float *p, vf v) { _mm256_storeu_ps(p, v); }
TARGET INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
TARGET INLINE vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
TARGET INLINE vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
TARGET INLINE vf vf_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
TARGET INLINE vf vf_div(vf a, vf b) { return _mm256_div_ps(a, b); }
TARGET INLINE vf vf_max(vf a, vf b) { return _mm256_max_ps(a, b); }
TARGET INLINE float vf_sum(vf v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
TARGET INLINE float vf_hmax(vf v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* a * b + c for one float, rounded once: written out where attention.h needs a row's bits not to depend on which
 * copy of a kernel computes it (the compiler fuses a plain a * b + c in some copies and not in others). */
TARGET INLINE float sf_fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#define KEEP(v) __asm__("" : "+x"(v))
/* Each lane rounded to the nearest integer, ties to even (rintf in the default rounding mode). */
TARGET INLINE vf vf_rint(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

/* 2*VL bf16 at p (one 32-byte load) -> the even elements / the odd elements as float32 (exact). */
TARGET INLINE vf bf16_even(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)p), 16));
}
TARGET INLINE vf bf16_odd(const uint16_t *p)
{
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)p),
                                                _mm256_set1_epi32((int)0xFFFF0000u)));
}
TARGET INLINE vf f16_load(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* e^x as in simd_avx512.h. */
TARGET INLINE vf vf_exp(vf x)
{
    vf under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    vf n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    vf p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    vf y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}

/* Quantized weights (quant.h): int32 lanes, 8 weight rows per vector (a 16-row block is two); vpmaddwd (QDOT_MADD). */
#define QTARGET TARGET
#define QDOT QDOT_MADD
#define QMB 2
#define QNBT_1 1
#define QNBT_N8 1
#define QNBT_N4 1
typedef __m256i qv;
typedef __m256i qw;
TARGET INLINE qv qv_zero(void) { return _mm256_setzero_si256(); }
TARGET INLINE qv qv_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
TARGET INLINE qv qv_set1(int32_t a) { return _mm256_set1_epi32(a); }
TARGET INLINE qv qv_add(qv a, qv b) { return _mm256_add_epi32(a, b); }
TARGET INLINE qv qv_sub(qv a, qv b) { return _mm256_sub_epi32(a, b); }
TARGET INLINE qv qv_srai(qv a, int n) { return _mm256_srai_epi32(a, n); }
TARGET INLINE vf qv_float(qv a) { return _mm256_cvtepi32_ps(a); }
/* 16 bytes (4 rows x 4 columns) widened to int16; acc + the pair products with the 4 int16 at x; rows 0-3 and 4-7
 * of two such sums, each row's two lanes added (vphaddd works within 128-bit halves: 0 1 4 5 | 2 3 6 7, reordered) */
TARGET INLINE qw qw_u8(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }
TARGET INLINE qv qv_madd_quad(qv acc, qw w, const int16_t *x)
{
    int64_t quad;
    memcpy(&quad, x, 8);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi64x(quad)));
}
TARGET INLINE qv qv_fold(qv a, qv b) { return _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), 0xD8); }
/* int4: nibble i of every 16-bit word left in place, times 16^Q4_SCALE(i): one AND (the top nibble: one shift down) */
#define Q4_SCALE(i) ((i) == 1 ? 1 : (i) == 2 ? 2 : 0)
TARGET INLINE qw qw_nibble(qv words, int i)
{
    if (i == 3) return _mm256_srli_epi16(words, 12);
    return _mm256_and_si256(words, _mm256_set1_epi16((short)(0xF << (4 * i))));
}
TARGET INLINE qv qv_madd_pair(qv acc, qw w, const int16_t *x)
{
    int32_t pair;
    memcpy(&pair, x, 4);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
}
