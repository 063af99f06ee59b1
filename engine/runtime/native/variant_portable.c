/* The portable variant of the kernels: the templates compiled against simd_portable.h. */
#include "kernels.h"

#include "simd_portable.h"
#define VARIANT(name) name##_portable
#include "matmul.h"
#include "attention.h"

