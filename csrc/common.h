// Helpers shared by the CPU and CUDA files (as torchvision keeps its ops' common headers).
#pragma once

#include <type_traits>

// Functions written once for host and device, so that both kernels evaluate the same arithmetic.
#if defined(__CUDACC__)
#define FASTAP_HD __host__ __device__ __forceinline__
#else
#define FASTAP_HD inline
#endif

namespace fastap {

// Calls f with std::true_type or std::false_type, so that `largest` is a compile-time constant
// in the kernels (the comparisons of the inner loops then carry no branch on it).
template <typename F>
inline void dispatch_largest(bool largest, F&& f) {
  if (largest) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace fastap
