// Small host-side helpers every device's code uses: the accumulation dtype and the channels-last test.
#pragma once
#include <ATen/core/Tensor.h>

namespace unetx {

// The dtype per-channel statistics and gradient reductions accumulate in (and the dtype of the per-channel vectors
// the kernels read): float64 for float64 data, float32 for float32 / float16 / bfloat16 data.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether a kernel walks t channels-last (channels innermost): the channel stride is 1 and t is not plain
// contiguous. Shared by every kernel, CPU and CUDA, so both pick the same walk for the same tensor.
inline bool is_channels_last(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) == 1 && !t.is_contiguous();
}

}  // namespace unetx
