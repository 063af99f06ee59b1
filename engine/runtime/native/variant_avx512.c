/* The avx512 variant of the kernels: the templates compiled against simd_avx512.h. */
#include "kernels.h"
#if defined(__x86_64__) || defined(_M_X64)
#include "simd_avx512.h"
#define VARIANT(name) name##_avx512
#include "matmul.h"
#include "attention.h"
/* Quantized weights twice: with AVX512-VNNI's vpdpwssd, and with vpmaddwd + vpaddd where the CPU has no VNNI. */
#define QTARGET QTARGET_BW
#define qv_dot qv_dot_madd
#define QV(name) q_##name##_avx512
#define QVARIANT(name) name##_avx512
#include "quant.h"
#undef QTARGET
#undef qv_dot
#undef QV
#undef QVARIANT
#define QTARGET __attribute__((target("avx512f,avx512bw,avx512vnni,fma,f16c")))
#define qv_dot qv_dot_vnni
#define QV(name) q_##name##_avx512vnni
#define QVARIANT(name) name##_avx512vnni
#include "quant.h"
/* llama.cpp's block formats (kquant.h), with and without AVX512-VNNI's vpdpbusd */
#include "kquant_simd.h"
#define KTARGET KTARGET_BW
#define kv_dot kv_dot_madd
#define KV(name) kq_##name##_avx512
#define KVARIANT(name) name##_avx512
#include "kquant.h"
#undef KTARGET
#undef kv_dot
#undef KV
#undef KVARIANT
#define KTARGET KTARGET_VNNI
#define kv_dot kv_dot_vnni
#define KV(name) kq_##name##_avx512vnni
#define KVARIANT(name) name##_avx512vnni
#include "kquant.h"
#endif
