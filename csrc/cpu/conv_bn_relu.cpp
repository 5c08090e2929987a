// CPU registration of the fused layer: the device-generic composition (../conv_bn_relu.cpp) over the CPU kernels.
#include "conv_bn_relu.h"

#include <torch/library.h>

#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

const LayerKernels kKernels{activation_forward, activation_backward, upsample_forward,
                            upsample_backward,  batch_stats,         fold_output_grad,
                            to_planar, weight_grad};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const OptTensor& x_scale,
                                                       const OptTensor& x_shift, bool x_pool, const OptTensor& x2,
                                                       c10::string_view x2_mode, const at::Tensor& weight,
                                                       const OptTensor& bias, bool transposed, bool stats, bool relu,
                                                       const OptTensor& x_mean) {
  return conv_bn_relu_forward(kKernels, x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats,
                              relu, x_mean);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var, const at::Tensor& x,
    const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool, const OptTensor& x2, c10::string_view x2_mode,
    const at::Tensor& weight, bool has_bias, bool transposed, const at::Tensor& y, const at::Tensor& mean, bool relu,
    std::array<bool, 4> output_mask, const OptTensor& x_mean) {
  return conv_bn_relu_backward(kKernels, grad_y, grad_mean, grad_var, x, x_scale, x_shift, x_pool, x2, x2_mode,
                               weight, has_bias, transposed, y, mean, relu, output_mask, x_mean);
}

}  // namespace
}  // namespace unetx::cpu

TORCH_LIBRARY_IMPL(unetx, CPU, m) {
  m.impl("conv_bn_relu", &unetx::cpu::forward);
  m.impl("conv_bn_relu_backward", &unetx::cpu::backward);
}
