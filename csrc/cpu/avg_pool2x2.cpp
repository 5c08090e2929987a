// CPU op avg_pool2x2: 2x2 average pooling, stride 2 (the activation kernel with no normalisation).
// Memory traffic per input element: forward read T, write T/4; backward read T/4, write T. Saves nothing.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/kernels.h"

namespace unetx::cpu {

at::Tensor avg_pool2x2(const at::Tensor& x) {
  check_4d(x, "unetx.avg_pool2x2", "x");
  check_even(x, "unetx.avg_pool2x2");
  const auto xc = x.contiguous(layout_of(x));
  auto p = at::empty({xc.size(0), xc.size(1), xc.size(2) / 2, xc.size(3) / 2},
                     xc.options().memory_format(layout_of(xc)));
  activation_forward(xc, std::nullopt, std::nullopt, std::nullopt, nullptr, &p);
  return p;
}

at::Tensor avg_pool2x2_backward(const at::Tensor& grad) {
  check_4d(grad, "unetx.avg_pool2x2_backward", "grad");
  const auto gc = grad.contiguous(layout_of(grad));
  auto gx = at::empty({gc.size(0), gc.size(1), 2 * gc.size(2), 2 * gc.size(3)},
                      gc.options().memory_format(layout_of(gc)));
  // gx doubles as the shape of x: with no scale, activation_backward never reads x.
  activation_backward(nullptr, &gc, gx, std::nullopt, std::nullopt, std::nullopt, gx, nullptr, nullptr);
  return gx;
}

}  // namespace unetx::cpu

TORCH_LIBRARY_IMPL(unetx, CPU, m) {
  m.impl("avg_pool2x2", &unetx::cpu::avg_pool2x2);
  m.impl("avg_pool2x2_backward", &unetx::cpu::avg_pool2x2_backward);
}
