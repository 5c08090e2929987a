// CUDA registration of the fused layer: the device-generic composition (../conv_bn_relu.cpp: input stage, cuDNN
// convolution through ATen, batch statistics; and the backward) over this directory's CUDA kernels.
//
// Memory traffic around the convolution, per element (T = element size): the input stage reads x (T) and writes the
// staged input a (T; skipped when there is nothing to stage); the statistics read y once (T). Backward recomputes a
// (T read + T write), folds the statistics' and ReLU's gradient into grad_y (2T read, T write), and runs the input
// stage's backward (reads x and grad_a, writes grad_x: 3T).
// Saved for backward: x (the previous layer's y, already saved there), x2 if any, y, and per-channel vectors: one
// activation-sized tensor per layer, where stock Conv-BatchNorm-ReLU keeps two.
#include <c10/cuda/CUDAGuard.h>

#include "conv_bn_relu.h"
#include "cuda/kernels.cuh"

namespace unetx::cuda {
namespace {

const LayerKernels kKernels{activation_forward, activation_backward, upsample_forward,
                            upsample_backward,  batch_stats,         fold_output_grad,
                            /*to_planar=*/nullptr, /*weight_grad=*/nullptr};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu(const at::Tensor& x, const OptTensor& x_scale,
                                                            const OptTensor& x_shift, bool x_pool, const OptTensor& x2,
                                                            c10::string_view x2_mode, const at::Tensor& weight,
                                                            const OptTensor& bias, bool transposed, bool stats,
                                                            bool relu, const OptTensor& x_mean) {
  // The dispatcher comes here when any argument is on a CUDA device; an x elsewhere is refused by the composition's
  // checks (naming both devices), so only a CUDA x sets the current device.
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  return conv_bn_relu_forward(kKernels, x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats,
                              relu, x_mean);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var, const at::Tensor& x,
    const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool, const OptTensor& x2, c10::string_view x2_mode,
    const at::Tensor& weight, bool has_bias, bool transposed, const at::Tensor& y, const at::Tensor& mean, bool relu,
    std::array<bool, 4> output_mask, const OptTensor& x_mean) {
  // The dispatcher comes here when any argument is on a CUDA device; an x elsewhere is refused by the composition's
  // checks (naming both devices), so only a CUDA x sets the current device.
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  return unetx::conv_bn_relu_backward(kKernels, grad_y, grad_mean, grad_var, x, x_scale, x_shift, x_pool, x2, x2_mode,
                                      weight, has_bias, transposed, y, mean, relu, output_mask, x_mean);
}

}  // namespace unetx::cuda
