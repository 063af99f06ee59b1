/* The AVX-512 instruction set for the kernel templates (x86-64: Intel Xeon since Skylake-SP, Ice Lake and later
 * client chips, AMD Zen 4/5): 16 float lanes, 32 vector registers. Functions are compiled for AVX-512 with a target
 * attribute, so the rest of the library stays baseline x86-64 and the variant is only called where the CPU has it. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ISA_NAME "avx512"
#define TARGET __attribute__((target("avx512f,fma,f16c")))
#define INLINE __attribute__((always_inline)) static inline
#define VL 16
typedef __m512 vf;

/* Register tiles of the matmul: up to TILE_MB rows of x by TILE_NR_<mb> rows of w, mb*nr accumulators plus nr
 * widened weight vectors and one x vector within the 32 registers; 8 weight rows in flight at mb = 1 (a GEMV). */
#ifndef TILE_MB
#define TILE_MB 4
#endif
#ifndef TILE_NR_1
#define TILE_NR_1 8
#endif
#ifndef TILE_NR_N
#define TILE_NR_N 6 /* at 2 or more rows of x */
#endif
#define BLOCK_ROWS_UNIT 24 /* a multiple of every tile height */

TARGET INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
TARGET INLINE vf vf_set1(float a) { return _mm512_set1_ps(a); }
TARGET INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
TARGET INLINE void vf_store(float *p, vf v) { _mm512_storeu_ps(p, v); }
TARGET INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
TARGET INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
TARGET INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
TARGET INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
TARGET INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
TARGET INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
TARGET INLINE float vf_sum(vf v) { return _mm512_reduce_add_ps(v); }
TARGET INLINE float vf_hmax(vf v) { return _mm512_reduce_max_ps(v); }
/* a * b + c for one float, rounded once: written out where attention.h needs a row's bits not to depend on which
 * copy of a kernel computes it (the compiler fuses a plain a * b + c in some copies and not in others). */
TARGET INLINE float sf_fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
/* Keep v in a register: GCC would otherwise fold the load into each FMA that uses it (one load per FMA). */
#define KEEP(v) __asm__("" : "+v"(v))
/* Each lane rounded to the nearest integer, ties to even (rintf in the default rounding mode). */
TARGET INLINE vf vf_rint(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

/* 2*VL bfloat16 values at p (one 64-byte load) widened exactly to float32: a bf16 is the top half of the float32 of
 * the same value. The low half of each 32-bit lane is the even element, the high half the odd one. */
TARGET INLINE vf bf16_even(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512((const void *)p), 16));
}
TARGET INLINE vf bf16_odd(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512((const void *)p), _mm512_set1_epi32((int)0xFFFF0000u)));
}
/* VL float16 values at p widened exactly (every fp16 is a float32). */
TARGET INLINE vf f16_load(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

/* e^x, |relative error| < 2 ulp (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, times 2^n); 0 for
 * x < -87.3 (so -inf gives 0). */
TARGET INLINE vf vf_exp(vf x)
{
    __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    vf n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    vf p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    vf y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    return _mm512_maskz_mov_ps((__mmask16)~under, y);
}

/* Quantized weights (quant.h): int32 lanes, one per weight row of a 16-row block. Two builds: QDOT_VNNI (vpdpbusd)
 * where the CPU has AVX512-VNNI, QDOT_MADD (vpmaddwd, AVX512-BW) where it has not; variant_avx512.c sets QDOT. */
#define QTARGET_BW __attribute__((target("avx512f,avx512bw,fma,f16c")))
#define QTARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c")))
#define QMB 4    /* rows of x per tile */
#define QNBT_1 1 /* 16-row blocks per tile at one row of x: one stream (quant.h) */
#define QNBT_N8 2 /* int8 at more rows: 4 x 2 x 2 int32 + 4 x 2 float accumulators */
typedef __m512i qv;
typedef __m512i qw;
QTARGET_BW INLINE qv qv_zero(void) { return _mm512_setzero_si512(); }
QTARGET_BW INLINE qv qv_load(const void *p) { return _mm512_loadu_si512(p); }
QTARGET_BW INLINE qv qv_set1(int32_t a) { return _mm512_set1_epi32(a); }
QTARGET_BW INLINE qv qv_add(qv a, qv b) { return _mm512_add_epi32(a, b); }
QTARGET_BW INLINE qv qv_sub(qv a, qv b) { return _mm512_sub_epi32(a, b); }
QTARGET_BW INLINE qv qv_srai(qv a, int n) { return _mm512_srai_epi32(a, (unsigned)n); }
QTARGET_BW INLINE qv qv_slli(qv a, int n) { return _mm512_slli_epi32(a, (unsigned)n); }
QTARGET_BW INLINE vf qv_float(qv a) { return _mm512_cvtepi32_ps(a); }
/* VNNI: the bytes' low and high nibbles as plain values 0..15; acc + each lane's 4 products of w's unsigned bytes
 * with the 4 signed bytes at x, broadcast (exact in int32) */
QTARGET_BW INLINE qv qv_low_nibbles(qv v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
QTARGET_BW INLINE qv qv_high_nibbles(qv v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
QTARGET_VNNI INLINE qv qv_dpbusd(qv acc, qv w, const int8_t *x)
{
    int32_t quad;
    memcpy(&quad, x, 4);
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(quad));
}
/* MADD: 32 bytes (8 rows x 4 columns) widened to int16; acc + the pair products of w with the 4 int16 at x (a row's
 * columns 0,1 in its first lane, 2,3 in its second); rows 0-7 and 8-15 of two such sums, each row's two lanes added */
QTARGET_BW INLINE qw qw_u8(const uint8_t *p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
QTARGET_BW INLINE qv qv_madd_quad(qv acc, qw w, const int16_t *x)
{
    int64_t quad;
    memcpy(&quad, x, 8);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi64(quad)));
}
QTARGET_BW INLINE qv qv_fold(qv a, qv b)
{
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b), _mm512_permutex2var_epi32(a, odd, b));
}
/* int4: nibble i of every 16-bit word left in place, times 16^Q4_SCALE(i): one AND (the top nibble: one shift down);
 * acc + its pair products with the pair of int16 at x, broadcast */
#define Q4_SCALE(i) ((i) == 1 ? 1 : (i) == 2 ? 2 : 0)
QTARGET_BW INLINE qw qw_nibble(qv words, int i)
{
    if (i == 3) return _mm512_srli_epi16(words, 12);
    return _mm512_and_si512(words, _mm512_set1_epi16((short)(0xF << (4 * i))));
}
QTARGET_BW INLINE qv qv_madd_pair(qv acc, qw w, const int16_t *x)
{
    int32_t pair;
    memcpy(&pair, x, 4);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(pair)));
}
