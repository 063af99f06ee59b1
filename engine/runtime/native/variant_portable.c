/* The portable variant of the kernels: the templates compiled against simd_portable.h. */
#include "kernels.h"

#include "simd_portable.h"
#define VARIANT(name) name##_portable
#include "matmul.h"
#include "attention.h"
#define QV(name) q_##name##_portable
#define QVARIANT(name) name##_portable
#include "quant.h"
/* llama.cpp's block formats (kquant.h) */
#include "kquant_simd.h"
#define KV(name) kq_##name##_portable
#define KVARIANT(name) name##_portable
#include "kquant.h"
