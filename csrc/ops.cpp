// The device-generic entries of bn_relu, bn_relu_pool, avg_pool2x2 and upsample_concat (forward and backward):
// argument checks, output allocation and composition, once for every device, over its kernel table. The fused
// layer's composition is in conv_bn_relu.cpp. Checks are those of common/checks.h: an op names itself and the offending
// argument, and refuses a tensor on another device, of another dtype or of the wrong shape before any kernel runs.
#include "ops.h"

#include <ATen/DeviceGuard.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>

#include <tuple>

#include "common/checks.h"
#include "common/layout.h"

namespace unetx {
namespace {

using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_bn_relu_args(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, const OptTensor& mean,
                        const char* op) {
  check_4d(y, op, "y");
  check_channel_vector(scale, y.size(1), y, op, "scale");
  check_channel_vector(shift, y.size(1), y, op, "shift");
  if (mean) check_channel_vector(*mean, y.size(1), y, op, "mean");
}

// A gradient must match what its forward produced: shape (else the kernels would index out of bounds), device and
// dtype.
void check_grad(const at::Tensor& grad, const at::Tensor& like, at::IntArrayRef expected, const char* op,
                const char* name, const char* like_name) {
  TORCH_CHECK(grad.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", grad.sizes());
  check_same(like, grad, op, like_name, name);
}

at::Tensor empty_in(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().memory_format(layout_of(like)));
}

std::vector<int64_t> pooled(const at::Tensor& y) {
  return {y.size(0), y.size(1), y.size(2) / 2, y.size(3) / 2};
}

// Runs the activation backward; returns (grad_y, grad_scale, grad_shift, grad_mean), grad_mean = -scale * grad_shift
// (undefined when no mean was given).
Grads4 activation_grads(const LayerKernels& k, const at::Tensor* gz, const at::Tensor* gp, const at::Tensor& yc,
                        const at::Tensor& scale, const at::Tensor& shift, const OptTensor& mean) {
  auto gx = empty_in(yc, yc.sizes());
  auto opts = yc.options().dtype(acc_type(yc.scalar_type()));
  auto gs = at::empty({yc.size(1)}, opts), gt = at::empty({yc.size(1)}, opts);
  k.activation_backward(gz, gp, yc, mean, scale, shift, gx, &gs, &gt);
  at::Tensor gm;
  if (mean) gm = at::neg(at::mul(gt, scale.to(gt.scalar_type()))).to(mean->scalar_type());
  return std::make_tuple(gx, gs.to(scale.scalar_type()), gt.to(shift.scalar_type()), gm);
}

// ------------------------------------------------------------------------------------------------ bn_relu
at::Tensor bn_relu(const LayerKernels& k, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                   const OptTensor& mean) {
  check_bn_relu_args(y, scale, shift, mean, "unetx.bn_relu");
  const at::OptionalDeviceGuard guard(at::device_of(y));
  const auto yc = y.contiguous(layout_of(y));
  auto z = empty_in(yc, yc.sizes());
  k.activation_forward(yc, mean, scale, shift, &z, nullptr);
  return z;
}

Grads4 bn_relu_backward(const LayerKernels& k, const at::Tensor& grad, const at::Tensor& y, const at::Tensor& scale,
                        const at::Tensor& shift, const OptTensor& mean) {
  const char* op = "unetx.bn_relu_backward";
  check_bn_relu_args(y, scale, shift, mean, op);
  check_grad(grad, y, y.sizes(), op, "grad", "y");
  const at::OptionalDeviceGuard guard(at::device_of(y));
  const auto yc = y.contiguous(layout_of(y));
  const auto gc = grad.contiguous(layout_of(yc));
  return activation_grads(k, &gc, nullptr, yc, scale, shift, mean);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_pool(const LayerKernels& k, const at::Tensor& y, const at::Tensor& scale,
                                                const at::Tensor& shift, const OptTensor& mean) {
  check_bn_relu_args(y, scale, shift, mean, "unetx.bn_relu_pool");
  check_even(y, "unetx.bn_relu_pool");
  const at::OptionalDeviceGuard guard(at::device_of(y));
  const auto yc = y.contiguous(layout_of(y));
  auto z = empty_in(yc, yc.sizes());
  auto p = empty_in(yc, pooled(yc));
  k.activation_forward(yc, mean, scale, shift, &z, &p);
  return {z, p};
}

Grads4 bn_relu_pool_backward(const LayerKernels& k, const at::Tensor& grad_z, const at::Tensor& grad_p,
                             const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                             const OptTensor& mean) {
  const char* op = "unetx.bn_relu_pool_backward";
  check_bn_relu_args(y, scale, shift, mean, op);
  check_even(y, op);
  check_grad(grad_z, y, y.sizes(), op, "grad_z", "y");
  check_grad(grad_p, y, pooled(y), op, "grad_p", "y");
  const at::OptionalDeviceGuard guard(at::device_of(y));
  const auto yc = y.contiguous(layout_of(y));
  const auto gz = grad_z.contiguous(layout_of(yc));
  const auto gp = grad_p.contiguous(layout_of(yc));
  return activation_grads(k, &gz, &gp, yc, scale, shift, mean);
}

// ------------------------------------------------------------------------------------------------ avg_pool2x2
// The activation kernels with no normalisation. Memory traffic per input element (T = element size): forward read
// T, write T/4; backward read T/4, write T. Saved for backward: nothing (shapes only).
at::Tensor avg_pool2x2(const LayerKernels& k, const at::Tensor& x) {
  check_4d(x, "unetx.avg_pool2x2", "x");
  check_even(x, "unetx.avg_pool2x2");
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const auto xc = x.contiguous(layout_of(x));
  auto p = empty_in(xc, pooled(xc));
  k.activation_forward(xc, std::nullopt, std::nullopt, std::nullopt, nullptr, &p);
  return p;
}

at::Tensor avg_pool2x2_backward(const LayerKernels& k, const at::Tensor& grad) {
  check_4d(grad, "unetx.avg_pool2x2_backward", "grad");
  const at::OptionalDeviceGuard guard(at::device_of(grad));
  const auto gc = grad.contiguous(layout_of(grad));
  auto gx = empty_in(gc, {gc.size(0), gc.size(1), 2 * gc.size(2), 2 * gc.size(3)});
  // gx doubles as the shape of x: with no scale, activation_backward never reads x.
  k.activation_backward(nullptr, &gc, gx, std::nullopt, std::nullopt, std::nullopt, gx, nullptr, nullptr);
  return gx;
}

// ------------------------------------------------------------------------------------------------ upsample_concat
// The skip part of the buffer is one ATen copy; the upsampled part is written by the device's kernel straight into
// its channel slice. Saved for backward: nothing (shapes only).
at::Tensor upsample_concat(const LayerKernels& k, const at::Tensor& skip, const at::Tensor& x,
                           c10::string_view mode_str) {
  const char* op = "unetx.upsample_concat";
  const Upsample mode = parse_upsample(mode_str, op);
  check_4d(skip, op, "skip");
  check_4d(x, op, "x");
  check_same(skip, x, op, "skip", "x");
  const int64_t f = mode == Upsample::None ? 1 : 2;
  TORCH_CHECK(skip.size(0) == x.size(0) && skip.size(2) == f * x.size(2) && skip.size(3) == f * x.size(3), op,
              ": skip ", skip.sizes(), " does not match x ", x.sizes(), " upsampled ", f, "x (expected skip of shape [",
              x.size(0), ", *, ", f * x.size(2), ", ", f * x.size(3), "])");
  const at::OptionalDeviceGuard guard(at::device_of(skip));
  const auto mf = layout_of(skip);
  auto out =
      at::empty({skip.size(0), skip.size(1) + x.size(1), skip.size(2), skip.size(3)}, skip.options().memory_format(mf));
  if (k.upsample_concat_forward && k.upsample_concat_forward(skip, x, mode, out)) return out;
  out.narrow(1, 0, skip.size(1)).copy_(skip);
  auto up = out.narrow(1, skip.size(1), x.size(1));
  k.upsample_forward(x.contiguous(mf), mode, up);
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_concat_backward(const LayerKernels& k, const at::Tensor& grad,
                                                            int64_t skip_channels, c10::string_view mode_str) {
  const char* op = "unetx.upsample_concat_backward";
  const Upsample mode = parse_upsample(mode_str, op);
  check_4d(grad, op, "grad");
  TORCH_CHECK(0 <= skip_channels && skip_channels <= grad.size(1), op, ": skip_channels=", skip_channels,
              " out of range for grad ", grad.sizes());
  const int64_t f = mode == Upsample::None ? 1 : 2;
  TORCH_CHECK(grad.size(2) % f == 0 && grad.size(3) % f == 0, op, ": grad ", grad.sizes(),
              " must have an even height and width for 2x upsampling");
  const at::OptionalDeviceGuard guard(at::device_of(grad));
  const auto mf = layout_of(grad);
  // fresh tensors, not contiguous(): with batch 1 the planar channel slice is already contiguous, and an output may
  // not alias an input (the schema declares none)
  auto gskip = at::empty({grad.size(0), skip_channels, grad.size(2), grad.size(3)}, grad.options().memory_format(mf));
  auto gx = at::empty({grad.size(0), grad.size(1) - skip_channels, grad.size(2) / f, grad.size(3) / f},
                      grad.options().memory_format(mf));
  if (k.upsample_concat_backward && k.upsample_concat_backward(grad, mode, gskip, gx)) return {gskip, gx};
  gskip.copy_(grad.narrow(1, 0, skip_channels));
  k.upsample_backward(grad.narrow(1, skip_channels, grad.size(1) - skip_channels), mode, gx);
  return {gskip, gx};
}

}  // namespace

void define_ops(torch::Library& m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // bn_relu: relu((y - mean) * scale + shift); mean defaults to 0. Backward returns (y, scale, shift, mean) grads.
  m.def("bn_relu(Tensor y, Tensor scale, Tensor shift, Tensor? mean=None) -> Tensor", tags);
  m.def(
      "bn_relu_backward(Tensor grad, Tensor y, Tensor scale, Tensor shift, Tensor? mean=None)"
      " -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def("bn_relu_pool(Tensor y, Tensor scale, Tensor shift, Tensor? mean=None) -> (Tensor, Tensor)", tags);
  m.def(
      "bn_relu_pool_backward(Tensor grad_z, Tensor grad_p, Tensor y, Tensor scale, Tensor shift, Tensor? mean=None)"
      " -> (Tensor, Tensor, Tensor, Tensor)",
      tags);
  m.def("avg_pool2x2(Tensor x) -> Tensor", tags);
  m.def("avg_pool2x2_backward(Tensor grad) -> Tensor", tags);
  m.def("upsample_concat(Tensor skip, Tensor x, str mode) -> Tensor", tags);
  m.def("upsample_concat_backward(Tensor grad, int skip_channels, str mode) -> (Tensor, Tensor)", tags);
  m.def(
      "conv_bn_relu(Tensor x, Tensor? x_scale, Tensor? x_shift, bool x_pool, Tensor? x2, str x2_mode,"
      " Tensor weight, Tensor? bias, bool transposed, bool stats, bool relu, Tensor? x_mean=None)"
      " -> (Tensor, Tensor, Tensor)",
      tags);
  m.def(
      "conv_bn_relu_backward(Tensor grad_y, Tensor? grad_mean, Tensor? grad_var, Tensor x, Tensor? x_scale,"
      " Tensor? x_shift, bool x_pool, Tensor? x2, str x2_mode, Tensor weight, bool has_bias, bool transposed,"
      " Tensor y, Tensor mean, bool relu, bool[4] output_mask, Tensor? x_mean=None)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
      tags);
}

void register_ops(torch::Library& m, const LayerKernels& k) {
  const LayerKernels* kp = &k;
  m.impl("bn_relu", [kp](const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, const OptTensor& mean) {
    return bn_relu(*kp, y, scale, shift, mean);
  });
  m.impl("bn_relu_backward",
         [kp](const at::Tensor& grad, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
              const OptTensor& mean) { return bn_relu_backward(*kp, grad, y, scale, shift, mean); });
  m.impl("bn_relu_pool", [kp](const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                              const OptTensor& mean) { return bn_relu_pool(*kp, y, scale, shift, mean); });
  m.impl("bn_relu_pool_backward", [kp](const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& y,
                                       const at::Tensor& scale, const at::Tensor& shift, const OptTensor& mean) {
    return bn_relu_pool_backward(*kp, grad_z, grad_p, y, scale, shift, mean);
  });
  m.impl("avg_pool2x2", [kp](const at::Tensor& x) { return avg_pool2x2(*kp, x); });
  m.impl("avg_pool2x2_backward", [kp](const at::Tensor& grad) { return avg_pool2x2_backward(*kp, grad); });
  m.impl("upsample_concat", [kp](const at::Tensor& skip, const at::Tensor& x, c10::string_view mode) {
    return upsample_concat(*kp, skip, x, mode);
  });
  m.impl("upsample_concat_backward", [kp](const at::Tensor& grad, int64_t skip_channels, c10::string_view mode) {
    return upsample_concat_backward(*kp, grad, skip_channels, mode);
  });
  m.impl("conv_bn_relu", [kp](const at::Tensor& x, const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool,
                              const OptTensor& x2, c10::string_view x2_mode, const at::Tensor& weight,
                              const OptTensor& bias, bool transposed, bool stats, bool relu, const OptTensor& x_mean) {
    // the dispatcher may come here for another argument's device: x's checks name both devices
    const at::OptionalDeviceGuard guard(at::device_of(x));
    return conv_bn_relu_forward(*kp, x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed, stats, relu,
                                x_mean);
  });
  m.impl("conv_bn_relu_backward",
         [kp](const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var, const at::Tensor& x,
              const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool, const OptTensor& x2,
              c10::string_view x2_mode, const at::Tensor& weight, bool has_bias, bool transposed, const at::Tensor& y,
              const at::Tensor& mean, bool relu, std::array<bool, 4> output_mask, const OptTensor& x_mean) {
           const at::OptionalDeviceGuard guard(at::device_of(x));
           return conv_bn_relu_backward(*kp, grad_y, grad_mean, grad_var, x, x_scale, x_shift, x_pool, x2, x2_mode,
                                        weight, has_bias, transposed, y, mean, relu, output_mask, x_mean);
         });
}

}  // namespace unetx
