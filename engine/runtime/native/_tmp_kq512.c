#include "kernels.h"
#include "simd_avx512.h"
#include "kquant_simd.h"
#define KTARGET KTARGET_VNNI
#define kv_dot kv_dot_vnni
#define KV(name) kq_##name##_avx512vnni
#define KVARIANT(name) name##_avx512vnni
#include "kquant.h"
