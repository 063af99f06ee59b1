/* The portable variant of the kernels: the templates compiled against simd_portable.h. */
#include "kernels.h"

#include "simd_portable.h"
#define VARIANT(name) name##_portable
#include "matmul.h"
#include "attention.h"
#define QV(name) q_##name##_portable
#define QVARIANT(name) name##_portable
#include "quant.h"

