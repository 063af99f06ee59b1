/* The avx2 variant of the kernels: the templates compiled against simd_avx2.h. */
#include "kernels.h"
#if defined(__x86_64__) || defined(_M_X64)
#include "simd_avx2.h"
#define VARIANT(name) name##_avx2
#include "matmul.h"
#include "attention.h"
#define QV(name) q_##name##_avx2
#define QVARIANT(name) name##_avx2
#include "quant.h"
/* llama.cpp's block formats (kquant.h) */
#include "kquant_simd.h"
#define KV(name) kq_##name##_avx2
#define KVARIANT(name) name##_avx2
#include "kquant.h"
#endif
