// The CUDA kernels behind the unetx ops: the same functions, signatures and semantics as the CPU kernels
// (csrc/cpu/kernels.h documents each one), so the device-generic conv_bn_relu composition (csrc/conv_bn_relu.cpp)
// runs on either device. Each op's .cu file implements the kernels named after it; its header comment states the
// memory traffic and what is saved for backward. common.cuh has the layouts and thread mappings.
//
// Every launch goes to the current stream of the tensors' device, with no host synchronisation; temporaries come
// from the caching allocator (at::empty), so the ops can be captured in CUDA graphs and traced by torch.compile.
// Per-channel statistics and grad_scale / grad_shift accumulate in float32 (float64 for float64 data).
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/upsample2x.h"

namespace unetx::cuda {

using OptTensor = std::optional<at::Tensor>;

// ---- bn_relu.cu: z = relu((x - mean[c]) * scale[c] + shift[c]) and/or its 2x2 average pool p; and its backward.
void activation_forward(const at::Tensor& x, const OptTensor& mean, const OptTensor& scale, const OptTensor& shift,
                        at::Tensor* z, at::Tensor* p);
void activation_backward(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x,
                         const OptTensor& mean, const OptTensor& scale, const OptTensor& shift, at::Tensor& grad_x,
                         at::Tensor* grad_scale, at::Tensor* grad_shift);

// ---- upsample_concat.cu: 2x upsampling into a channel slice, and its adjoint.
void upsample_forward(const at::Tensor& x, Upsample mode, at::Tensor& out);
void upsample_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_x);

// ---- batch_stats.cu: per-channel batch mean / biased variance, and the gradient through them (and a fused ReLU).
void batch_stats(const at::Tensor& y, at::Tensor& mean, at::Tensor& var);
void fold_output_grad(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                      const at::Tensor* b, bool relu, at::Tensor& out);

// ------------------------------------------------------------------------------------------------ the ops
// Registered for the CUDA dispatch key by register_kernels (registration.cu), only when the user opts in.
using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

at::Tensor bn_relu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, const OptTensor& mean);
Grads4 bn_relu_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                        const OptTensor& mean);
std::tuple<at::Tensor, at::Tensor> bn_relu_pool(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                                                const OptTensor& mean);
Grads4 bn_relu_pool_backward(const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& y,
                             const at::Tensor& scale, const at::Tensor& shift, const OptTensor& mean);

at::Tensor avg_pool2x2(const at::Tensor& x);
at::Tensor avg_pool2x2_backward(const at::Tensor& grad);

at::Tensor upsample_concat(const at::Tensor& skip, const at::Tensor& x, c10::string_view mode);
std::tuple<at::Tensor, at::Tensor> upsample_concat_backward(const at::Tensor& grad, int64_t skip_channels,
                                                            c10::string_view mode);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu(const at::Tensor& x, const OptTensor& x_scale,
                                                            const OptTensor& x_shift, bool x_pool, const OptTensor& x2,
                                                            c10::string_view x2_mode, const at::Tensor& weight,
                                                            const OptTensor& bias, bool transposed, bool stats,
                                                            bool relu, const OptTensor& x_mean);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var, const at::Tensor& x,
    const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool, const OptTensor& x2, c10::string_view x2_mode,
    const at::Tensor& weight, bool has_bias, bool transposed, const at::Tensor& y, const at::Tensor& mean, bool relu,
    std::array<bool, 4> output_mask, const OptTensor& x_mean);

}  // namespace unetx::cuda
