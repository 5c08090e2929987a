// CUDA op avg_pool2x2: 2x2 average pooling, stride 2: the activation kernels of bn_relu.cu with no normalisation.
// Memory traffic per input element (T = element size): forward read T, write T/4; backward read T/4, write T.
// Saved for backward: nothing (shapes only).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "cuda/kernels.cuh"

namespace unetx::cuda {

at::Tensor avg_pool2x2(const at::Tensor& x) {
  check_4d(x, "unetx.avg_pool2x2", "x");
  check_even(x, "unetx.avg_pool2x2");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous(layout_of(x));
  auto p = at::empty({xc.size(0), xc.size(1), xc.size(2) / 2, xc.size(3) / 2},
                     xc.options().memory_format(layout_of(xc)));
  activation_forward(xc, std::nullopt, std::nullopt, std::nullopt, nullptr, &p);
  return p;
}

at::Tensor avg_pool2x2_backward(const at::Tensor& grad) {
  check_4d(grad, "unetx.avg_pool2x2_backward", "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto gc = grad.contiguous(layout_of(grad));
  auto gx = at::empty({gc.size(0), gc.size(1), 2 * gc.size(2), 2 * gc.size(3)},
                      gc.options().memory_format(layout_of(gc)));
  // gx doubles as the shape of x: with no scale, activation_backward never reads x.
  activation_backward(nullptr, &gc, gx, std::nullopt, std::nullopt, std::nullopt, gx, nullptr, nullptr);
  return gx;
}

}  // namespace unetx::cuda
