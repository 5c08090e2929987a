// CPU kernels: the convolutions that are one GEMM per pixel row, on dense channels-last operands (float32, bfloat16,
// float16): the 2 x 2, stride-2 transposed convolution of the expanding path (the learned upsampling) and the 1 x 1
// convolution (the head, and the 1 x 1 convolution after a nearest / bilinear upsampling). Forward, input gradient
// and weight gradient, for conv_bn_relu's layers of those shapes (LayerKernels::conv_transpose2x2 and ::conv1x1; the
// layer measures them against ATen's and runs the faster, per shape and dtype).
//
// Both are an F x F, stride-F transposed convolution (F = 2, or F = 1: a 1 x 1 convolution with weight w [Co, C, 1, 1]
// is the F = 1 transposed one with w's first two dimensions swapped). Input pixel (n, h, w) writes the output block
// (Fh + i, Fw + j), i, j in [0, F):
//     y[n, Fh+i, Fw+j, :] = x[n, h, w, :] . w[:, :, i, j] (+ bias).
// In channels-last memory, output row Fh+i holds, for w = 0 .. W-1, the values of j = 0 .. F-1 side by side
// (F * Co floats per input pixel), so one input row and one i make one GEMM straight into the output:
//     Y(n, Fh+i)  (W x FCo, ld FCo) = X(n, h) (W x C) . Wf[i] (C x FCo),   Wf[i][c][j * Co + co] = w[c][co][i][j];
// the input gradient is its adjoint, gX(n, h) = sum over i of gY(n, Fh+i) (W x FCo) . Wf[i]^T, and the weight
// gradient Wf[i] += X(n, h)^T . gY(n, Fh+i), accumulated per thread and summed at the end. GEMMs (cpu/gemm.h):
// oneDNN's micro-kernel for the forward and input gradient, MKL's sgemm for the weight gradient (its first operand
// transposed). Rows are split among the threads. The GEMMs are float32: a bfloat16 / float16 operand row is widened
// into a per-task float32 row before its GEMMs and a result row narrowed after them (rounded once, the products
// summed in float32, as oneDNN's reduced-precision convolutions do). ATen's own convolutions in bfloat16 on a CPU
// without native bfloat16 are unvectorised fallbacks (slow_conv2d, slow_conv_transpose2d: im2col and an unblocked
// GEMM).
//
// Memory traffic: each reads its operands once and writes its result once (the forward adds the bias to each
// output row while it is in cache); the repacked weight (F * F * C * Co floats) is read once per row. Nothing is
// saved.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace unetx::cpu {
namespace {

bool applies(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return t.dim() == 4 && t.device().is_cpu() && (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf);
}

// Rows of T as float32 for the GEMMs: the row itself where T is float, else widened into (or, for a result, computed
// in and then narrowed from) this task's buffer.
template <typename T>
struct Rows {
  static constexpr bool kWiden = !std::is_same_v<T, float>;
  std::vector<float> buf;
  explicit Rows(int64_t n) : buf(kWiden ? n : 0) {}
  const float* in(const T* p, int64_t n) {
    if constexpr (kWiden) {
      widen_row(p, buf.data(), n);
      return buf.data();
    } else {
      return p;
    }
  }
  float* out(T* p) {
    if constexpr (kWiden) {
      return buf.data();
    } else {
      return p;
    }
  }
  void done(T* p, int64_t n) {
    if constexpr (kWiden) narrow_row(buf.data(), p, n);
  }
};

// Wf [F][C][F * Co] (forward) from w [C, Co, F, F]; with `adjoint`, Wb [F][F * Co][C] (its transpose per i). One
// copy from w's own strides (a channels-last weight, or a 1 x 1 convolution's weight seen transposed), into float32.
at::Tensor repack(const at::Tensor& w, bool adjoint) {
  const int64_t C = w.size(0), Co = w.size(1), F = w.size(2);
  // w[c][co][i][j] -> [i][c][j][co] (forward) or [i][j][co][c] (adjoint)
  const auto p = adjoint ? w.permute({2, 3, 1, 0}) : w.permute({2, 0, 3, 1});
  auto out = at::empty(p.sizes(), w.options().dtype(at::kFloat)).copy_(p);
  return adjoint ? out : out.view({F, C, F * Co});
}

template <typename T>
void forward_rows(const at::Tensor& xc, const at::Tensor& wf, const float* B, int64_t F, at::Tensor& y) {
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), Co = y.size(1);
  const T* X = xc.const_data_ptr<T>();
  const float* Wf = wf.const_data_ptr<float>();
  T* Y = y.data_ptr<T>();
  at::parallel_for(0, N * H * F, 1, [&](int64_t r0, int64_t r1) {
    Rows<T> xr(W * C), yr(F * W * Co);
    const float* xf = nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t nh = r / F, i = r % F, n = nh / H, h = nh % H;
      if (!xf || i == 0) xf = xr.in(X + nh * W * C, W * C);
      T* dst = Y + ((n * F * H + F * h + i) * F * W) * Co;
      float* out = yr.out(dst);
      block_gemm(W, F * Co, C, xf, C, Wf + i * C * F * Co, F * Co, false, out, F * Co);
      if (B)
        for (int64_t p = 0; p < F * W; ++p) {
          float* o = out + p * Co;
#pragma omp simd
          for (int64_t co = 0; co < Co; ++co) o[co] += B[co];
        }
      yr.done(dst, F * W * Co);
    }
  });
}

template <typename T>
void input_grad_rows(const at::Tensor& gyc, const at::Tensor& wb, int64_t F, at::Tensor& gx) {
  const int64_t N = gx.size(0), C = gx.size(1), H = gx.size(2), W = gx.size(3), Co = gyc.size(1);
  const T* GY = gyc.const_data_ptr<T>();
  const float* Wb = wb.const_data_ptr<float>();
  T* GX = gx.data_ptr<T>();
  at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    Rows<T> gyr(F * W * Co), gxr(W * C);
    for (int64_t nh = r0; nh < r1; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      float* out = gxr.out(GX + nh * W * C);
      for (int64_t i = 0; i < F; ++i)
        block_gemm(W, C, F * Co, gyr.in(GY + ((n * F * H + F * h + i) * F * W) * Co, F * W * Co), F * Co,
                   Wb + i * F * Co * C, C, i > 0, out, C);
      gxr.done(GX + nh * W * C, W * C);
    }
  });
}

template <typename T>
void weight_grad_rows(const at::Tensor& gyc, const at::Tensor& xc, int64_t F, int64_t threads, at::Tensor& acc) {
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), Co = gyc.size(1), rows = N * H;
  const T* GY = gyc.const_data_ptr<T>();
  const T* X = xc.const_data_ptr<T>();
  float* A = acc.data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    Rows<T> xr(W * C), gyr(F * W * Co);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t nh = rows * t / threads; nh < rows * (t + 1) / threads; ++nh) {
        const int64_t n = nh / H, h = nh % H;
        const float* xf = xr.in(X + nh * W * C, W * C);
        for (int64_t i = 0; i < F; ++i)
          // column-major G^T (FCo x C) += gY(n, Fh+i)^T (FCo x W) . X(n, h) (W x C)
          gemm(false, true, F * Co, C, W, gyr.in(GY + ((n * F * H + F * h + i) * F * W) * Co, F * W * Co), F * Co, xf,
               C, 1.f, A + (t * F + i) * C * F * Co, F * Co);
      }
  });
}

// The F x F, stride-F transposed convolution (w [C, Co, F, F], any strides): forward, input gradient, weight gradient
// ([C, Co, F, F], a permuted view). std::nullopt where it does not apply.
std::optional<at::Tensor> pixel_forward(const at::Tensor& x, const at::Tensor& w,
                                        const std::optional<at::Tensor>& bias) {
  const int64_t F = w.size(2);
  if (!applies(x) || w.scalar_type() != x.scalar_type() || !applies(w) || w.size(3) != F || w.size(0) != x.size(1))
    return std::nullopt;
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = w.size(1);
  auto y = at::empty({N, Co, F * H, F * W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (C == 0) {
    y.zero_();
    if (bias) y.add_(bias->view({1, -1, 1, 1}));
    return y;
  }
  const auto wf = repack(w, false);
  const auto b = bias ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  with_io_type<true>(x.scalar_type(), [&](auto tag) {
    forward_rows<decltype(tag)>(xc, wf, b ? b->const_data_ptr<float>() : nullptr, F, y);
  });
  return y;
}

std::optional<at::Tensor> pixel_input_grad(const at::Tensor& grad_y, const at::Tensor& w) {
  const int64_t F = w.size(2);
  if (!applies(grad_y) || w.scalar_type() != grad_y.scalar_type() || !applies(w) || w.size(3) != F ||
      w.size(1) != grad_y.size(1) || grad_y.size(2) % F || grad_y.size(3) % F)
    return std::nullopt;
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = grad_y.size(0), Co = grad_y.size(1), H = grad_y.size(2) / F, W = grad_y.size(3) / F, C = w.size(0);
  auto gx = at::empty({N, C, H, W}, grad_y.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (gx.numel() == 0) return gx;
  if (Co == 0) return gx.zero_();
  const auto wb = repack(w, true);
  with_io_type<true>(grad_y.scalar_type(), [&](auto tag) { input_grad_rows<decltype(tag)>(gyc, wb, F, gx); });
  return gx;
}

std::optional<at::Tensor> pixel_weight_grad(const at::Tensor& grad_y, const at::Tensor& x, int64_t F) {
  if (!applies(grad_y) || x.scalar_type() != grad_y.scalar_type() || !applies(x) || grad_y.size(0) != x.size(0) ||
      grad_y.size(2) != F * x.size(2) || grad_y.size(3) != F * x.size(3))
    return std::nullopt;
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), Co = grad_y.size(1);
  const int64_t rows = N * H, threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  // per thread: G[t][i] (C x FCo row-major, i.e. FCo x C column-major for the BLAS), float32 in any dtype
  auto acc =
      at::zeros({threads, F, C, F * Co}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  if (C > 0 && Co > 0 && rows > 0)
    with_io_type<true>(x.scalar_type(), [&](auto tag) { weight_grad_rows<decltype(tag)>(gyc, xc, F, threads, acc); });
  // [i][c][j][co] viewed as w's [c][co][i][j], in the operands' dtype (a conversion copy of this weight-sized sum
  // where they are not float32): the layer copies it into its parameter's layout
  return acc.sum(0).to(x.scalar_type()).view({F, C, F, Co}).permute({1, 3, 0, 2});
}

bool kernel_is(const at::Tensor& w, int64_t f) {
  return w.dim() == 4 && w.size(2) == f && w.size(3) == f;
}

}  // namespace

std::optional<at::Tensor> conv_transpose2x2(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias) {
  return kernel_is(weight, 2) ? pixel_forward(x, weight, bias) : std::nullopt;
}

std::optional<at::Tensor> conv_transpose2x2_input_grad(const at::Tensor& grad_y, const at::Tensor& weight) {
  return kernel_is(weight, 2) ? pixel_input_grad(grad_y, weight) : std::nullopt;
}

std::optional<at::Tensor> conv_transpose2x2_weight_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  return pixel_weight_grad(grad_y, x, 2);
}

// The 1 x 1 convolution (w [Co, C, 1, 1]) is the F = 1 transposed one of w.transpose(0, 1) ([C, Co, 1, 1]).
std::optional<at::Tensor> conv1x1(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  return kernel_is(weight, 1) ? pixel_forward(x, weight.transpose(0, 1), bias) : std::nullopt;
}

std::optional<at::Tensor> conv1x1_input_grad(const at::Tensor& grad_y, const at::Tensor& weight) {
  return kernel_is(weight, 1) ? pixel_input_grad(grad_y, weight.transpose(0, 1)) : std::nullopt;
}

std::optional<at::Tensor> conv1x1_weight_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  auto g = pixel_weight_grad(grad_y, x, 1);
  if (g) g = g->transpose(0, 1);
  return g;
}

namespace {
// One LayerKernels entry from a kernel's three passes: op 0 forward (x, weight, bias), 1 input gradient (grad_y,
// weight), 2 weight gradient (grad_y, x).
template <auto Forward, auto InputGrad, auto WeightGrad>
std::optional<at::Tensor> by_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                                int64_t op) {
  switch (op) {
    case 0:
      return Forward(a, b, bias);
    case 1:
      return InputGrad(a, b);
    default:
      return WeightGrad(a, b);
  }
}
}  // namespace

std::optional<at::Tensor> conv_transpose2x2_op(const at::Tensor& a, const at::Tensor& b,
                                               const std::optional<at::Tensor>& bias, int64_t op) {
  return by_op<conv_transpose2x2, conv_transpose2x2_input_grad, conv_transpose2x2_weight_grad>(a, b, bias, op);
}

std::optional<at::Tensor> conv1x1_op(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                                     int64_t op) {
  return by_op<conv1x1, conv1x1_input_grad, conv1x1_weight_grad>(a, b, bias, op);
}

}  // namespace unetx::cpu
