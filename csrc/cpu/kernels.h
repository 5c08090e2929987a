// The CPU kernels behind the unetx ops. Each op's file implements the kernels named after it; the fused
// conv_bn_relu op composes them around ATen's (oneDNN's) convolution.
//
// Layouts: every tensor argument is either planar (NCHW-like: stride(3) == 1) or channels-last
// (NHWC-like: stride(1) == 1). Outputs may be channel slices of a larger tensor (a concatenation buffer),
// so kernels honour the strides they are given rather than assuming a dense tensor.
#pragma once
#include <ATen/core/Tensor.h>
#include <algorithm>
#include <optional>
#include <utility>

#include "common/upsample2x.h"
#include "conv_bn_relu.h"  // StageRows

namespace unetx::cpu {

// Runs f(T{}) with T the C++ type of the operands' dtype, float32 or bfloat16 (and float16 with kHalf), for kernels
// that compute in float32 whatever their operands' dtype (winograd.cpp, conv_transpose2x2.cpp); the caller has
// checked the dtype.
template <bool kHalf = false, typename F>
decltype(auto) with_io_type(at::ScalarType t, F&& f) {
  if (t == at::kBFloat16) return f(c10::BFloat16{});
  if constexpr (kHalf) {
    if (t == at::kHalf) return f(c10::Half{});
  }
  return f(float{});
}

// Grain for at::parallel_for when each item covers `elems` elements: about 32k elements per task (ATen's
// GRAIN_SIZE), so small tensors stay on one thread instead of paying a fork-join per call.
inline int64_t grain_for(int64_t elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(elems, 1));
}
// Number of reduction blocks for `total` elements: enough for the threads, never smaller than ~32k elements each.
inline int64_t reduction_blocks(int64_t items, int64_t total, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>({items, 4 * threads, total / 32768}));
}

// ---- bn_relu.cpp: the activation z = relu((x - mean[c]) * scale[c] + shift[c]) (identity when scale is absent;
// mean absent = 0), optionally 2x2-average-pooled. One read of x; writes z and/or p. Nothing is saved: backward
// recomputes from x.
void activation_forward(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, at::Tensor* z,
                        at::Tensor* p);

// Backward of activation_forward: g = grad_z + upsample(grad_p) / 4, masked where the pre-activation <= 0;
// grad_x = g * scale, grad_scale[c] = sum(g * (x - mean)) (centred: no cancellation for large means),
// grad_shift[c] = sum(g) (so grad_mean = -scale * grad_shift). Reads x and the grads once, writes grad_x.
void activation_backward(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x,
                         const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, at::Tensor& grad_x, at::Tensor* grad_scale,
                         at::Tensor* grad_shift);

// ---- upsample_concat.cpp: x (N, C, h, w) -> out (N, C, 2h, 2w) (a channel slice of the concatenation);
// mode None copies. Reads x once, writes out once.
void upsample_forward(const at::Tensor& x, Upsample mode, at::Tensor& out);
// Adjoint: grad (N, C, 2h, 2w) -> grad_x (N, C, h, w).
void upsample_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_x);
// The op upsample_concat's forward and backward in one pass over the concatenation (LayerKernels): channels-last
// tensors with contiguous channels (false otherwise: the op then copies and upsamples apart).
bool upsample_concat_forward(const at::Tensor& skip, const at::Tensor& x, Upsample mode, at::Tensor& out);
bool upsample_concat_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_skip, at::Tensor& grad_x);

// ---- batch_stats.cpp: per-channel mean and biased variance of y, accumulated in double around a per-channel
// pivot (y's first element), so large means do not cancel. One read of y.
void batch_stats(const at::Tensor& y, at::Tensor& mean, at::Tensor& var);

// out = mask(grad_y) + a[c] + b[c] * (y - mean[c]), mask = 0 where y <= 0 (NaN passes) when relu. The gradient
// reaching a conv output through its batch statistics (a = dmean / M, b = 2 dvar / M) and/or its fused ReLU.
// Reads grad_y and y once, writes out once.
void fold_output_grad(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                      const at::Tensor* b, bool relu, at::Tensor& out);

// ---- to_planar.cpp: a dense channels-last tensor copied to planar (NCHW) layout (anything else: x.contiguous()).
// Reads and writes each element once.
at::Tensor to_planar(const at::Tensor& x);
// The weight gradient is chosen per layer shape and dtype by measurement (cpu/algo_choice.h, conv_bn_relu.cpp);
// this only orders the candidates (ties, and the order in which they are tried): from this many input channels
// unetx's own weight gradient and the planar one first, below it oneDNN's channels-last one (which measured as fast
// or faster there on both machine kinds: `python bench/conv_layouts.py --per-conv`, bench/weight_grad.py).
constexpr int64_t kPlanarWeightGradMinChannels = 16;

// ---- conv_weight_grad.cpp: the weight gradient [Co, C, k, k] (planar) of a stride-1 'same' k x k convolution
// from dense channels-last grad_y [N, Co, H, W] and input a [N, C, H, W], as k*k GEMMs over shifted pixel rows.
// std::nullopt where it does not apply (not float32/float64, not dense channels-last, even k, NaN / Inf in grad_y's
// k/2-pixel border, where stock multiplies the
// zero padding, or in a pixel whose wrapped product it would take out again); the caller then uses ATen's
// convolution_backward. Reads both
// operands once. With `rows`, a is a placeholder (shape, dtype, layout) and each block's rows of a (plus the
// k/2-row halo) are produced by rows->fill into a per-thread buffer that stays in cache: the recomputed input stage
// is never written to memory.
// Whether it or oneDNN's is used for a shape is measured (cpu/algo_choice.h; `python bench/weight_grad.py`).
std::optional<at::Tensor> weight_grad(const at::Tensor& grad_y, const at::Tensor& a, const StageRows* rows, int64_t k);

// ---- conv_transpose2x2.cpp: the convolutions that are one GEMM per pixel row, on dense channels-last float32 /
// bfloat16 / float16 operands (float32 arithmetic). The 2 x 2, stride-2 transposed convolution (weight [C, Co, 2, 2]):
// forward y [N, Co, 2H, 2W] (+ bias) from x [N, C, H, W], input gradient [N, C, H, W] from grad_y, weight gradient
// [C, Co, 2, 2] from grad_y and x. The 1 x 1 convolution (weight [Co, C, 1, 1]): forward y [N, Co, H, W] (+ bias),
// input gradient [N, C, H, W], weight gradient [Co, C, 1, 1]. std::nullopt where they do not apply (another dtype,
// kernel size or shape): the caller runs ATen's. Each reads its operands once, writes its result once (the weight
// gradient as a permuted view, which the caller copies into its parameter's layout).
std::optional<at::Tensor> conv_transpose2x2(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias);
std::optional<at::Tensor> conv_transpose2x2_input_grad(const at::Tensor& grad_y, const at::Tensor& weight);
std::optional<at::Tensor> conv_transpose2x2_weight_grad(const at::Tensor& grad_y, const at::Tensor& x);
std::optional<at::Tensor> conv1x1(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
std::optional<at::Tensor> conv1x1_input_grad(const at::Tensor& grad_y, const at::Tensor& weight);
std::optional<at::Tensor> conv1x1_weight_grad(const at::Tensor& grad_y, const at::Tensor& x);
// Each three as one LayerKernels entry: op 0 forward (x, weight, bias), 1 input gradient (grad_y, weight), 2 weight
// gradient (grad_y, x).
std::optional<at::Tensor> conv_transpose2x2_op(const at::Tensor& a, const at::Tensor& b,
                                               const std::optional<at::Tensor>& bias, int64_t op);
std::optional<at::Tensor> conv1x1_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                                     int64_t op);

// ---- winograd.cpp: Winograd F(tile x tile, 3 x 3) convolution (tile = 4 or 2) of a 3 x 3, stride-1, padding-1
// convolution, float32, computed in channels-last layout (other layouts are converted first); outputs are dense
// channels-last. Forward: y [N, Co, H, W] from x [N, C, H, W] and weight [Co, C, 3, 3]. Input gradient: grad_x
// [N, C, H, W] from grad_y [N, Co, H, W] and the same weight. Weight gradient: [Co, C, 3, 3] (planar) from grad_y and
// x. Each reads its operands once and writes its result once; the error bound against a float64 reference, measured
// per tile size, is in BENCHMARKS.md ("CPU Winograd").
at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight, int64_t tile);
at::Tensor winograd_conv3x3_input_grad(const at::Tensor& grad_y, const at::Tensor& weight, int64_t tile);
at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& grad_y, const at::Tensor& x, int64_t tile);
// The three as one LayerKernels entry: op 0 forward (x, weight), 1 input gradient (grad_y, weight), 2 weight
// gradient (grad_y, x). With `rows` (ops 0 and 2), x is a layer's input stage built band by band from the layer's
// own inputs into a per-thread buffer (x itself only a placeholder for its shape), never written to memory whole.
// The forward's epilogue (bias, ReLU: before the rounding to x's dtype; batch statistics: of the rounded output) is
// applied in its output transform.
at::Tensor winograd3x3(const at::Tensor& a, const at::Tensor& b, int64_t op, int64_t tile, const StageRows* rows,
                       const ConvEpilogue& out);
// Keep the forward's transformed weight of `weight` (computed by its first Winograd forward) across calls instead of
// transforming it on every call, transformed again when its version changes, dropped at release_weight_transforms
// or (at the next Winograd forward) once `weight` is freed: for an eval layer's folded weight (unetx.nn.layers).
// held_weight_transforms: the weights held and the bytes their transforms take.
void hold_weight_transforms(const at::Tensor& weight);
void release_weight_transforms(const at::Tensor& weight);
std::pair<int64_t, int64_t> held_weight_transforms();
// LayerKernels::drop_unchosen_weight_transforms: of the transforms held for `weight`, keep those of tiles ever chosen
// for it.
void drop_unchosen_weight_transforms(const at::Tensor& weight, int64_t tile);

}  // namespace unetx::cpu
