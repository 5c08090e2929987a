// The CUDA kernels behind the unetx ops: the same functions, signatures and semantics as the CPU kernels
// (csrc/cpu/kernels.h documents each one), so the device-generic op layer (csrc/ops.cpp, csrc/conv_bn_relu.cpp)
// runs on either device over its kernel table (registration.cu). Each op's .cu file implements the kernels named
// after it; its header comment states the memory traffic and what is saved for backward. common.cuh has the layouts
// and thread mappings.
//
// Verified so far on the host, not on a GPU: every .cu file also compiles with the host C++ compiler under
// host_emulation.h, and tests/cuda_host runs each kernel through its real launch code against unetx.reference and
// the CPU kernels, plain and under ASan+UBSan and TSan (scripts/cuda-host-check). That proves the indexing, bounds,
// barriers and shuffles (races in shared memory, divergent or missing barriers) and the arithmetic. Only a GPU can
// prove the real warp scheduler and memory model, the device path of IntDivider (__umulhi), cuDNN, streams and graph
// capture, and speed (scripts/gpu-check).
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
void activation_backward(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x, const OptTensor& mean,
                         const OptTensor& scale, const OptTensor& shift, at::Tensor& grad_x, at::Tensor* grad_scale,
                         at::Tensor* grad_shift);

// ---- upsample_concat.cu: 2x upsampling into a channel slice, and its adjoint.
void upsample_forward(const at::Tensor& x, Upsample mode, at::Tensor& out);
void upsample_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_x);

// ---- batch_stats.cu: per-channel batch mean / biased variance, and the gradient through them (and a fused ReLU).
void batch_stats(const at::Tensor& y, at::Tensor& mean, at::Tensor& var);
void fold_output_grad(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                      const at::Tensor* b, bool relu, at::Tensor& out);

}  // namespace unetx::cuda
