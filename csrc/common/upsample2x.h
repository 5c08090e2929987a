// 2x upsampling taps shared by the CPU and CUDA kernels (nearest, and bilinear with align_corners=False,
// exactly as ATen computes them for scale_factor=2: src = max((o + 0.5) * 0.5 - 0.5, 0)).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define UNETX_HD __host__ __device__ __forceinline__
#else
#define UNETX_HD inline
#endif

namespace unetx {

enum class Upsample : int { None = 0, Nearest = 1, Bilinear = 2 };

// Output index o of a 2x-upsampled axis of length 2*in reads inputs i0, i1 with weights w0, w1.
UNETX_HD void bilinear_taps(int64_t o, int64_t in, int64_t& i0, int64_t& i1, float& w0, float& w1) {
  float src = (static_cast<float>(o) + 0.5f) * 0.5f - 0.5f;
  if (src < 0.f) src = 0.f;
  i0 = static_cast<int64_t>(src);
  i1 = i0 + 1 < in ? i0 + 1 : in - 1;
  w1 = src - static_cast<float>(i0);
  w0 = 1.f - w1;
}

// Adjoint of bilinear_taps for input k: the total weight with which output o reads input k.
UNETX_HD float bilinear_weight(int64_t o, int64_t k, int64_t in) {
  int64_t i0, i1;
  float w0, w1;
  bilinear_taps(o, in, i0, i1, w0, w1);
  return (i0 == k ? w0 : 0.f) + (i1 == k ? w1 : 0.f);
}

}  // namespace unetx
