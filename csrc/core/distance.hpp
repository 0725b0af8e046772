// Distance kernels for the HNSW index, chosen at run time for the CPU (AVX-512, AVX2+FMA, scalar).
#pragma once

#include <cstddef>

namespace tailrank {

using DistFn = float (*)(const void* a, const void* b, const void* dim_param);

/// 1 - <a, b> (hnswlib's inner-product distance convention).
DistFn inner_product_distance();
/// Squared Euclidean distance.
DistFn l2_squared_distance();
/// Which kernel the CPU got: "avx512", "avx2" or "scalar".
const char* distance_isa();

}  // namespace tailrank
