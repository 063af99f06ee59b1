/* The integer primitives of kquant.h, per instruction set (after the variant's simd_*.h, whose vf / VL / f16_load it
 * uses): kv, VL int32 lanes (one weight row each); kb, 4 * VL bytes (4 bytes per lane: one row, 4 columns).
 *
 *   kv_zero, kv_set1, kv_add, kv_sub, kv_or, kv_and(a, m), kv_slli(a, n), kv_srli(a, n) (logical)
 *   kv_loadu(p)      VL int32 / uint32 at p
 *   kv_u8(p), kv_s8(p)  VL bytes at p, zero- / sign-extended to int32 lanes
 *   kv_float(a)      int32 lanes -> float lanes (exact below 2^24)
 *   kb_load(p)       4 * VL bytes at p
 *   kb_and8(a, m)    every byte AND m
 *   kb_srl(a, n), kb_sll(a, n)  shifted by n bits; bits may enter a byte from its neighbour: the caller masks them
 *   kb_merge(a, t, m)  (a & m) | t, for a t with no bit inside m
 *   kv_dot(acc, w, x4) acc + sum over j < 4 of (unsigned byte j of w's lane) * (signed byte x4[j]), exact in int32:
 *                    AVX512-VNNI vpdpbusd, else vpmaddubsw + vpmaddwd + vpaddd (the pair sums stay below 2^15:
 *                    the formats' u < 64, |x4| <= 128), portable: lane by lane in int32.
 * KMB rows of x per register tile, KNBT_1 / KNBT_N row blocks per tile at one / more rows of x. */
#ifndef TL_KQUANT_SIMD_H
#define TL_KQUANT_SIMD_H

#include <string.h>

#include "kquant_layout.h"

#if VL == 16 /* ---------------------------------------------------------------------------- avx512 (with BW) */
#define KTARGET_BW __attribute__((target("avx512f,avx512bw,fma,f16c")))
#define KTARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c")))
#ifndef KMB
#define KMB 4
#endif
#ifndef KNBT_1
#define KNBT_1 2
#endif
#ifndef KNBT_N
#define KNBT_N 1
#endif
typedef __m512i kv;
typedef __m512i kb;
KTARGET_BW INLINE kv kv_zero(void) { return _mm512_setzero_si512(); }
KTARGET_BW INLINE kv kv_set1(int32_t a) { return _mm512_set1_epi32(a); }
KTARGET_BW INLINE kv kv_add(kv a, kv b) { return _mm512_add_epi32(a, b); }
KTARGET_BW INLINE kv kv_sub(kv a, kv b) { return _mm512_sub_epi32(a, b); }
KTARGET_BW INLINE kv kv_or(kv a, kv b) { return _mm512_or_si512(a, b); }
KTARGET_BW INLINE kv kv_and(kv a, int32_t m) { return _mm512_and_si512(a, _mm512_set1_epi32(m)); }
KTARGET_BW INLINE kv kv_slli(kv a, int n) { return _mm512_slli_epi32(a, (unsigned)n); }
KTARGET_BW INLINE kv kv_srli(kv a, int n) { return _mm512_srli_epi32(a, (unsigned)n); }
KTARGET_BW INLINE kv kv_loadu(const void *p) { return _mm512_loadu_si512(p); }
KTARGET_BW INLINE kv kv_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
KTARGET_BW INLINE kv kv_s8(const int8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
KTARGET_BW INLINE vf kv_float(kv a) { return _mm512_cvtepi32_ps(a); }
KTARGET_BW INLINE kb kb_load(const void *p) { return _mm512_loadu_si512(p); }
KTARGET_BW INLINE kb kb_and8(kb a, uint8_t m) { return _mm512_and_si512(a, _mm512_set1_epi8((char)m)); }
KTARGET_BW INLINE kb kb_srl(kb a, int n) { return _mm512_srli_epi16(a, (unsigned)n); }
KTARGET_BW INLINE kb kb_sll(kb a, int n) { return _mm512_slli_epi16(a, (unsigned)n); }
/* ternary logic 0xE4: c ? a : b per bit, with c = m */
KTARGET_BW INLINE kb kb_merge(kb a, kb t, uint8_t m)
{
    return _mm512_ternarylogic_epi32(a, t, _mm512_set1_epi8((char)m), 0xE4);
}
KTARGET_BW INLINE kv kv_dot_madd(kv acc, kb w, const int8_t *x4)
{
    int32_t quad;
    memcpy(&quad, x4, 4);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, _mm512_set1_epi32(quad)),
                                                   _mm512_set1_epi16(1)));
}
KTARGET_VNNI INLINE kv kv_dot_vnni(kv acc, kb w, const int8_t *x4)
{
    int32_t quad;
    memcpy(&quad, x4, 4);
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(quad));
}

/* One group of 32 activations -> its hi / lo quads and scalars (kquant_layout.h's kq_xgroup): the arithmetic of the
 * portable kq_prepare_group below (xq = the float32 product rounded to the nearest even integer), vectorised. */
KTARGET_BW INLINE void kq_prepare_group(const float *v, int8_t *dst, kq_xgroup *xg)
{
    const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float inv = amax > 0.0f ? (float)KQ_XMAX / amax : 0.0f;
    const __m512 vi = _mm512_set1_ps(inv);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vi)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vi));
    const __m512i ha = _mm512_srai_epi32(_mm512_add_epi32(qa, _mm512_set1_epi32(128)), 8);
    const __m512i hb = _mm512_srai_epi32(_mm512_add_epi32(qb, _mm512_set1_epi32(128)), 8);
    const __m512i la = _mm512_sub_epi32(qa, _mm512_slli_epi32(ha, 8)), lb = _mm512_sub_epi32(qb, _mm512_slli_epi32(hb, 8));
    const __m128i h0 = _mm512_cvtepi32_epi8(ha), h1 = _mm512_cvtepi32_epi8(hb);
    const __m128i l0 = _mm512_cvtepi32_epi8(la), l1 = _mm512_cvtepi32_epi8(lb);
    _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi32(h0, l0));
    _mm_storeu_si128((__m128i *)(dst + 16), _mm_unpackhi_epi32(h0, l0));
    _mm_storeu_si128((__m128i *)(dst + 32), _mm_unpacklo_epi32(h1, l1));
    _mm_storeu_si128((__m128i *)(dst + 48), _mm_unpackhi_epi32(h1, l1));
    const int32_t s0 = _mm512_reduce_add_epi32(qa), s1 = _mm512_reduce_add_epi32(qb);
    const float xs = amax / (float)KQ_XMAX;
    xg->xs = xs;
    xg->xsum[0] = s0;
    xg->xsum[1] = s1;
    xg->xsum[2] = s0 + s1;
    for (int i = 0; i < 3; i++) xg->xsx[i] = xs * (float)xg->xsum[i];
    xg->pad = 0;
}

#elif VL == 8 /* ---------------------------------------------------------------------------- avx2 */
#define KTARGET TARGET
#ifndef KMB
#define KMB 2
#endif
#ifndef KNBT_1
#define KNBT_1 1
#endif
#ifndef KNBT_N
#define KNBT_N 1
#endif
typedef __m256i kv;
typedef __m256i kb;
TARGET INLINE kv kv_zero(void) { return _mm256_setzero_si256(); }
TARGET INLINE kv kv_set1(int32_t a) { return _mm256_set1_epi32(a); }
TARGET INLINE kv kv_add(kv a, kv b) { return _mm256_add_epi32(a, b); }
TARGET INLINE kv kv_sub(kv a, kv b) { return _mm256_sub_epi32(a, b); }
TARGET INLINE kv kv_or(kv a, kv b) { return _mm256_or_si256(a, b); }
TARGET INLINE kv kv_and(kv a, int32_t m) { return _mm256_and_si256(a, _mm256_set1_epi32(m)); }
TARGET INLINE kv kv_slli(kv a, int n) { return _mm256_slli_epi32(a, n); }
TARGET INLINE kv kv_srli(kv a, int n) { return _mm256_srli_epi32(a, n); }
TARGET INLINE kv kv_loadu(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
TARGET INLINE kv kv_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
TARGET INLINE kv kv_s8(const int8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
TARGET INLINE vf kv_float(kv a) { return _mm256_cvtepi32_ps(a); }
TARGET INLINE kb kb_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
TARGET INLINE kb kb_and8(kb a, uint8_t m) { return _mm256_and_si256(a, _mm256_set1_epi8((char)m)); }
TARGET INLINE kb kb_srl(kb a, int n) { return _mm256_srli_epi16(a, n); }
TARGET INLINE kb kb_sll(kb a, int n) { return _mm256_slli_epi16(a, n); }
TARGET INLINE kb kb_merge(kb a, kb t, uint8_t m) { return _mm256_or_si256(_mm256_and_si256(a, _mm256_set1_epi8((char)m)), t); }
TARGET INLINE kv kv_dot(kv acc, kb w, const int8_t *x4)
{
    int32_t quad;
    memcpy(&quad, x4, 4);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(quad)),
                                                   _mm256_set1_epi16(1)));
}

TARGET INLINE void kq_prepare_group(const float *v, int8_t *dst, kq_xgroup *xg)
{
    __m256 x[4];
    __m256 mx = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) {
        x[i] = _mm256_loadu_ps(v + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, x[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float inv = amax > 0.0f ? (float)KQ_XMAX / amax : 0.0f;
    __m256i q[4], h[4], l[4];
    for (int i = 0; i < 4; i++) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(x[i], _mm256_set1_ps(inv)));
        h[i] = _mm256_srai_epi32(_mm256_add_epi32(q[i], _mm256_set1_epi32(128)), 8);
        l[i] = _mm256_sub_epi32(q[i], _mm256_slli_epi32(h[i], 8));
    }
    /* bytes as int32 units [q0 q2 q4 q6 | q1 q3 q5 q7] (quads), then interleaved hi, lo and put in order */
    const __m256i hb = _mm256_packs_epi16(_mm256_packs_epi32(h[0], h[1]), _mm256_packs_epi32(h[2], h[3]));
    const __m256i lb = _mm256_packs_epi16(_mm256_packs_epi32(l[0], l[1]), _mm256_packs_epi32(l[2], l[3]));
    _mm256_storeu_si256((__m256i *)dst, _mm256_permute4x64_epi64(_mm256_unpacklo_epi32(hb, lb), 0xD8));
    _mm256_storeu_si256((__m256i *)(dst + 32), _mm256_permute4x64_epi64(_mm256_unpackhi_epi32(hb, lb), 0xD8));
    int32_t part[8], s0 = 0, s1 = 0;
    _mm256_storeu_si256((__m256i *)part, _mm256_add_epi32(q[0], q[1]));
    for (int i = 0; i < 8; i++) s0 += part[i];
    _mm256_storeu_si256((__m256i *)part, _mm256_add_epi32(q[2], q[3]));
    for (int i = 0; i < 8; i++) s1 += part[i];
    const float xs = amax / (float)KQ_XMAX;
    xg->xs = xs;
    xg->xsum[0] = s0;
    xg->xsum[1] = s1;
    xg->xsum[2] = s0 + s1;
    for (int i = 0; i < 3; i++) xg->xsx[i] = xs * (float)xg->xsum[i];
    xg->pad = 0;
}

#else /* ---------------------------------------------------------------------------------------- portable */
#define KTARGET
#ifndef KMB
#define KMB 2
#endif
#ifndef KNBT_1
#define KNBT_1 1
#endif
#ifndef KNBT_N
#define KNBT_N 1
#endif
typedef int32_t kv __attribute__((vector_size(16)));
typedef uint32_t kvu __attribute__((vector_size(16)));
typedef uint8_t kb __attribute__((vector_size(16)));
INLINE kv kv_zero(void) { return (kv){0, 0, 0, 0}; }
INLINE kv kv_set1(int32_t a) { return (kv){a, a, a, a}; }
INLINE kv kv_add(kv a, kv b) { return a + b; }
INLINE kv kv_sub(kv a, kv b) { return a - b; }
INLINE kv kv_or(kv a, kv b) { return a | b; }
INLINE kv kv_and(kv a, int32_t m) { return a & m; }
INLINE kv kv_slli(kv a, int n) { return a << n; }
INLINE kv kv_srli(kv a, int n) { return (kv)((kvu)a >> n); }
INLINE kv kv_loadu(const void *p) { kv v; memcpy(&v, p, sizeof v); return v; }
INLINE kv kv_u8(const uint8_t *p) { return (kv){p[0], p[1], p[2], p[3]}; }
INLINE kv kv_s8(const int8_t *p) { return (kv){p[0], p[1], p[2], p[3]}; }
INLINE vf kv_float(kv a) { return __builtin_convertvector(a, vf); }
INLINE kb kb_load(const void *p) { kb v; memcpy(&v, p, sizeof v); return v; }
INLINE kb kb_and8(kb a, uint8_t m) { return a & m; }
INLINE kb kb_srl(kb a, int n) { return a >> n; }
INLINE kb kb_sll(kb a, int n) { return a << n; }
INLINE kb kb_merge(kb a, kb t, uint8_t m) { return (a & m) | t; }
/* little-endian: byte j of lane l is byte 4 l + j. In 16-bit lanes (SSE2 has no 32-bit multiply): the even and odd
 * bytes times x4's even and odd bytes, each product and the sum of a lane's four below 2^15 (u < 64, |x| <= 128). */
typedef int16_t kh __attribute__((vector_size(16)));
typedef uint16_t khu __attribute__((vector_size(16)));
INLINE kv kv_dot(kv acc, kb w, const int8_t *x4)
{
    khu w16;
    memcpy(&w16, &w, sizeof w16);
    const kh e = (kh)(w16 & 0xFFu), o = (kh)(w16 >> 8);
    const kh xe = {x4[0], x4[2], x4[0], x4[2], x4[0], x4[2], x4[0], x4[2]};
    const kh xo = {x4[1], x4[3], x4[1], x4[3], x4[1], x4[3], x4[1], x4[3]};
    const kh p = e * xe + o * xo;
    kv p32;
    memcpy(&p32, &p, sizeof p32);
    return acc + ((p32 << 16) >> 16) + (p32 >> 16);
}
/* One group of 32 activations -> its hi / lo quads and scalars: xs = amax / KQ_XMAX, xq = rint(x * (KQ_XMAX / amax))
 * (the product in float32, rounded to the nearest even integer), hi = (xq + 128) >> 8, lo = xq - 256 hi. */
INLINE void kq_prepare_group(const float *v, int8_t *dst, kq_xgroup *xg)
{
    float amax = 0.0f;
    for (int k = 0; k < 32; k++) {
        const float a = v[k] < 0.0f ? -v[k] : v[k];
        amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.0f ? (float)KQ_XMAX / amax : 0.0f;
    int32_t s0 = 0, s1 = 0;
    for (int k = 0; k < 32; k++) {
        const int32_t x = (int32_t)__builtin_rintf(v[k] * inv), hi = (x + 128) >> 8;
        dst[8 * (k / 4) + k % 4] = (int8_t)hi;
        dst[8 * (k / 4) + 4 + k % 4] = (int8_t)(x - 256 * hi);
        if (k < 16) s0 += x;
        else s1 += x;
    }
    const float xs = amax / (float)KQ_XMAX;
    xg->xs = xs;
    xg->xsum[0] = s0;
    xg->xsum[1] = s1;
    xg->xsum[2] = s0 + s1;
    for (int i = 0; i < 3; i++) xg->xsx[i] = xs * (float)xg->xsum[i];
    xg->pad = 0;
}
#endif

#endif
