// The fused layer conv_bn_relu, composed once for every device from that device's kernels and ATen's convolution.
//
//   a = [avg_pool2x2](relu((x - x_mean) * x_scale + x_shift))  ++  upsample2x(x2)        (input stage: one pass,
//   transient) y = conv(a, weight, bias)    ('same' k x k, stride 1; or k x k stride-k transposed)   (cuDNN / oneDNN)
//   mean, var = batch statistics of y                                          (one pass; training only)
//
// The layer's output stays pre-normalisation: its consumer applies the next relu(y * scale + shift) on the fly.
// Saved for backward: x (the previous layer's y, already saved there), x2 (if any), y, and per-channel vectors.
// So each conv-BN-ReLU layer keeps ONE activation-sized tensor for backward, where stock PyTorch keeps two
// (BatchNorm's input and ReLU's output); the input stage is recomputed in backward instead.
#pragma once
#include <ATen/core/Tensor.h>
#include <array>
#include <functional>
#include <optional>
#include <tuple>

#include "common/upsample2x.h"

namespace unetx {

using OptTensor = std::optional<at::Tensor>;

// A layer's input stage a [N, C, H, W] produced a few rows at a time, for a consumer that only needs it in
// cache-sized pieces (the CPU weight gradient), so the backward never writes the whole recomputed stage to memory.
// fill(n, lo, hi, rows) writes rows [lo, hi) of image n into `rows` ([1, C, hi - lo, W], dense channels-last);
// lo and hi must be multiples of `align` (or H), which keeps a nearest-upsampled part on whole source rows.
struct StageRows {
  std::function<void(int64_t n, int64_t lo, int64_t hi, at::Tensor& rows)> fill;
  int64_t align = 1;
};

// What a device's convolution kernel may do to its output while it writes it (LayerKernels::winograd3x3's forward):
// add `bias` (where not null), apply ReLU, and, with mean and var (float32 or float64 vectors, one value per output
// channel), compute the output's biased batch statistics as batch_stats does; so a layer's output is written once and
// not read again in its forward.
struct ConvEpilogue {
  const at::Tensor* bias = nullptr;
  bool relu = false;
  at::Tensor* mean = nullptr;
  at::Tensor* var = nullptr;
  // The weight gradient (op 2) only: written in this tensor's layout (the parameter's, where it is dense
  // channels-last), so that it reaches autograd without a copy into the parameter's strides.
  const at::Tensor* layout_of = nullptr;
};

// One device's kernels (see cpu/kernels.h for what each one does and its memory traffic). Every op (csrc/ops.cpp:
// checks, outputs, composition) is written once over this table; a device supplies only the table.
struct LayerKernels {
  void (*activation_forward)(const at::Tensor& x, const OptTensor& mean, const OptTensor& scale, const OptTensor& shift,
                             at::Tensor* z, at::Tensor* p);
  void (*activation_backward)(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x,
                              const OptTensor& mean, const OptTensor& scale, const OptTensor& shift, at::Tensor& grad_x,
                              at::Tensor* grad_scale, at::Tensor* grad_shift);
  void (*upsample_forward)(const at::Tensor& x, Upsample mode, at::Tensor& out);
  void (*upsample_backward)(const at::Tensor& grad, Upsample mode, at::Tensor& grad_x);
  void (*batch_stats)(const at::Tensor& y, at::Tensor& mean, at::Tensor& var);
  void (*fold_output_grad)(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                           const at::Tensor* b, bool relu, at::Tensor& out);
  // Where not null, a channels-last layer's weight gradient is computed in planar (NCHW) layout, its two operands
  // converted by this function. oneDNN's channels-last weight gradient of a k x k convolution with 16 or more input
  // channels is slower than its planar one on the CPU (below that it is as fast or faster), while channels-last
  // wins for the forward and the input gradient (`python bench/conv_layouts.py --per-conv`, figures in
  // BENCHMARKS.md); the two transposing copies cost far less than the difference. nullptr on CUDA (cuDNN prefers NHWC
  // throughout).
  at::Tensor (*to_planar)(const at::Tensor& x);
  // Where not null, tried first for a channels-last stride-1 layer's weight gradient (returns std::nullopt where it
  // does not apply): the device's own weight gradient, computed from the channels-last operands as they are. With
  // `rows`, a is only a placeholder for its shape and layout, and its values come from rows->fill block by block.
  std::optional<at::Tensor> (*weight_grad)(const at::Tensor& grad_y, const at::Tensor& a, const StageRows* rows,
                                           int64_t k);

  // ---- capabilities: device-specific choices of the shared compositions, named here instead of tested there.
  // activation_backward may be given grad_x and grad_z as the same tensor (it reads each element of grad_z before
  // writing that element of grad_x): the layer's backward then overwrites the convolution's input gradient instead
  // of faulting in a fresh activation-sized tensor.
  bool activation_backward_in_place = false;
  // With to_planar: the fewest input channels from which a k x k (k > 1) weight gradient is computed planar.
  int64_t to_planar_min_channels = 0;

  // Where not null: Winograd F(tile x tile, 3 x 3) kernels of a 3 x 3 stride-1 'same' float32 convolution,
  // computed channels-last (cpu/kernels.h): op 0 the forward (a = x, b = weight), 1 the input gradient (grad_y,
  // weight), 2 the weight gradient (grad_y, x); tile 4 or 2. The layer runs them where they measure faster than
  // ATen's convolution for its shape (cpu/algo_choice.h); UNETX_WINOGRAD=0 turns them off.
  // With `rows` (ops 0 and 2), x is the layer's input stage, built a band of rows at a time (x a placeholder).
  // The forward applies `out` (ConvEpilogue: bias, ReLU, batch statistics) in its output transform; op 1 takes an
  // empty one, op 2 one with at most layout_of.
  at::Tensor (*winograd3x3)(const at::Tensor& a, const at::Tensor& b, int64_t op, int64_t tile, const StageRows* rows,
                            const ConvEpilogue& out) = nullptr;

  // Where not null: the 2 x 2, stride-2 transposed convolution of the expanding path as GEMMs (cpu/kernels.h): op 0
  // the forward (a = x, b = weight, plus bias), 1 the input gradient (grad_y, weight), 2 the weight gradient
  // (grad_y, x); std::nullopt where it does not apply (dtype, shape). The layer runs it where it measures faster
  // than ATen's for its shape.
  std::optional<at::Tensor> (*conv_transpose2x2)(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                                                 int64_t op) = nullptr;
  // Where not null: the same for a 1 x 1 convolution (b = weight [Co, C, 1, 1]; the head, and the convolution after
  // a nearest / bilinear upsampling), whose forward and input gradient have no other kernel of the device (its
  // weight gradient also has `weight_grad`, float32 / float64 only): where the CPU lacks bfloat16 instructions, ATen's
  // bfloat16 convolution is im2col and emulated GEMMs (slow_conv2d).
  std::optional<at::Tensor> (*conv1x1)(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                                       int64_t op) = nullptr;

  // Where not null: upsample_concat's forward (out = cat([skip, upsample(x)])) and backward (grad -> grad_skip,
  // grad_x) in one pass over the concatenation, row by row, so that each of its cache lines is written (read) once,
  // not half by the skip's copy and half by the upsampling; false where it does not apply (layouts), and the op
  // then runs upsample_forward / upsample_backward on each part.
  bool (*upsample_concat_forward)(const at::Tensor& skip, const at::Tensor& x, Upsample mode,
                                  at::Tensor& out) = nullptr;
  bool (*upsample_concat_backward)(const at::Tensor& grad, Upsample mode, at::Tensor& grad_skip,
                                   at::Tensor& grad_x) = nullptr;

  // A bfloat16 / float16 layer's weight gradient also measures ATen's on float32 copies of its operands, rounded once
  // ("onednn_float32"): on a CPU without native bf16 instructions ATen's bf16 convolution is im2col and emulated
  // GEMMs (slow_conv2d), and where no kernel of the device applies (a first layer of fewer input channels than
  // Winograd's weight gradient takes; unetx's GEMM kernel is float32 only) the widening copies cost far less.
  // Synchronous devices only (the candidates are timed on the host's clock).
  bool widened_weight_grad = false;

  // Where not null: after a forward has chosen its convolution (Winograd tile `tile`, 0 for ATen's), drop the
  // transforms held for `weight` (cpu/kernels.h hold_weight_transforms) of tiles never chosen for it, so that a held
  // weight costs the memory of what runs, not of every candidate measured.
  void (*drop_unchosen_weight_transforms)(const at::Tensor& weight, int64_t tile) = nullptr;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward(const LayerKernels& k, const at::Tensor& x,
                                                                    const OptTensor& x_scale, const OptTensor& x_shift,
                                                                    bool x_pool, const OptTensor& x2,
                                                                    c10::string_view x2_mode, const at::Tensor& weight,
                                                                    const OptTensor& bias, bool transposed, bool stats,
                                                                    bool relu, const OptTensor& x_mean);

// Returns (grad_x, grad_x_scale, grad_x_shift, grad_x2, grad_weight, grad_bias, grad_x_mean); masked ones undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const LayerKernels& k, const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var,
    const at::Tensor& x, const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool, const OptTensor& x2,
    c10::string_view x2_mode, const at::Tensor& weight, bool has_bias, bool transposed, const at::Tensor& y,
    const at::Tensor& mean, bool relu, std::array<bool, 4> output_mask, const OptTensor& x_mean);

}  // namespace unetx
