/* The avx512 variant of the kernels: the templates compiled against simd_avx512.h. */
#include "kernels.h"
#if defined(__x86_64__) || defined(_M_X64)
#include "simd_avx512.h"
#define VARIANT(name) name##_avx512
#include "matmul.h"
#include "attention.h"
/* Quantized weights twice: with AVX512-VNNI's vpdpbusd, and with vpmaddwd where the CPU has no VNNI (quant.h). */
#define QTARGET QTARGET_BW
#define QDOT QDOT_MADD
#define QNBT_N4 1 /* int4 at more rows: 3 accumulators per tile row (place values 1, 16, 256), one block */
#define QV(name) q_##name##_avx512
#define QVARIANT(name) name##_avx512
#include "quant.h"
#undef QTARGET
#undef QDOT
#undef QNBT_N4
#undef QV
#undef QVARIANT
#undef QX_SPLIT
#undef QX_NIBBLE_ORDER
#define QTARGET QTARGET_VNNI
#define QDOT QDOT_VNNI
#define QNBT_N4 2
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
