// CPU kernels: the 2 x 2, stride-2 transposed convolution of the expanding path (the learned upsampling) as GEMMs on
// dense channels-last operands (float32, bfloat16, float16): forward, input gradient and weight gradient, for
// conv_bn_relu's transposed layers (LayerKernels::conv_transpose2x2; the layer measures them against ATen's and runs
// the faster, per shape and dtype).
//
// Input pixel (n, h, w) writes the output block (2h + i, 2w + j), i, j in {0, 1}:
//     y[n, 2h+i, 2w+j, :] = x[n, h, w, :] . w[:, :, i, j] (+ bias).
// In channels-last memory, output row 2h+i holds, for w = 0 .. W-1, the values of j = 0 and 1 side by side
// (2 * Co floats per input pixel), so one input row and one i make one GEMM straight into the output:
//     Y(n, 2h+i)  (W x 2Co, ld 2Co) = X(n, h) (W x C) . Wf[i] (C x 2Co),   Wf[i][c][j * Co + co] = w[c][co][i][j];
// the input gradient is its adjoint, gX(n, h) = sum over i of gY(n, 2h+i) (W x 2Co) . Wf[i]^T, and the weight
// gradient Wf[i] += X(n, h)^T . gY(n, 2h+i), accumulated per thread and summed at the end. GEMMs (cpu/gemm.h):
// oneDNN's micro-kernel for the forward and input gradient, MKL's sgemm for the weight gradient (its first operand
// transposed). Rows are split among the threads. The GEMMs are float32: a bfloat16 / float16 operand row is widened
// into a per-task float32 row before its GEMMs and a result row narrowed after them (rounded once, the products
// summed in float32, as oneDNN's reduced-precision convolutions do). ATen's own transposed convolution in bfloat16 on
// a CPU without native bfloat16 is an unvectorised fallback (slow_conv_transpose2d: im2col and an unblocked GEMM).
//
// Memory traffic: each reads its operands once and writes its result once (the forward adds the bias to each
// output row while it is in cache); the repacked weight (4 * C * Co floats) is read once per row. Nothing is saved.
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

// Wf [2][C][2 * Co] (forward) from w [C, Co, 2, 2]; with `adjoint`, Wb [2][2 * Co][C] (its transpose per i). One
// copy from w's own strides (a channels-last weight too), into float32.
at::Tensor repack(const at::Tensor& w, bool adjoint) {
  const int64_t C = w.size(0), Co = w.size(1);
  // w[c][co][i][j] -> [i][c][j][co] (forward) or [i][j][co][c] (adjoint)
  const auto p = adjoint ? w.permute({2, 3, 1, 0}) : w.permute({2, 0, 3, 1});
  auto out = at::empty(p.sizes(), w.options().dtype(at::kFloat)).copy_(p);
  return adjoint ? out : out.view({2, C, 2 * Co});
}

template <typename T>
void forward_rows(const at::Tensor& xc, const at::Tensor& wf, const float* B, at::Tensor& y) {
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), Co = y.size(1);
  const T* X = xc.const_data_ptr<T>();
  const float* Wf = wf.const_data_ptr<float>();
  T* Y = y.data_ptr<T>();
  at::parallel_for(0, N * H * 2, 1, [&](int64_t r0, int64_t r1) {
    Rows<T> xr(W * C), yr(2 * W * Co);
    const float* xf = nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t nh = r / 2, i = r % 2, n = nh / H, h = nh % H;
      if (!xf || i == 0) xf = xr.in(X + nh * W * C, W * C);
      T* dst = Y + ((n * 2 * H + 2 * h + i) * 2 * W) * Co;
      float* out = yr.out(dst);
      block_gemm(W, 2 * Co, C, xf, C, Wf + i * C * 2 * Co, 2 * Co, false, out, 2 * Co);
      if (B)
        for (int64_t p = 0; p < 2 * W; ++p) {
          float* o = out + p * Co;
#pragma omp simd
          for (int64_t co = 0; co < Co; ++co) o[co] += B[co];
        }
      yr.done(dst, 2 * W * Co);
    }
  });
}

template <typename T>
void input_grad_rows(const at::Tensor& gyc, const at::Tensor& wb, at::Tensor& gx) {
  const int64_t N = gx.size(0), C = gx.size(1), H = gx.size(2), W = gx.size(3), Co = gyc.size(1);
  const T* GY = gyc.const_data_ptr<T>();
  const float* Wb = wb.const_data_ptr<float>();
  T* GX = gx.data_ptr<T>();
  at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    Rows<T> gyr(2 * W * Co), gxr(W * C);
    for (int64_t nh = r0; nh < r1; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      float* out = gxr.out(GX + nh * W * C);
      for (int64_t i = 0; i < 2; ++i)
        block_gemm(W, C, 2 * Co, gyr.in(GY + ((n * 2 * H + 2 * h + i) * 2 * W) * Co, 2 * W * Co), 2 * Co,
                   Wb + i * 2 * Co * C, C, i > 0, out, C);
      gxr.done(GX + nh * W * C, W * C);
    }
  });
}

template <typename T>
void weight_grad_rows(const at::Tensor& gyc, const at::Tensor& xc, int64_t threads, at::Tensor& acc) {
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), Co = gyc.size(1), rows = N * H;
  const T* GY = gyc.const_data_ptr<T>();
  const T* X = xc.const_data_ptr<T>();
  float* A = acc.data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    Rows<T> xr(W * C), gyr(2 * W * Co);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t nh = rows * t / threads; nh < rows * (t + 1) / threads; ++nh) {
        const int64_t n = nh / H, h = nh % H;
        const float* xf = xr.in(X + nh * W * C, W * C);
        for (int64_t i = 0; i < 2; ++i)
          // column-major G^T (2Co x C) += gY(n, 2h+i)^T (2Co x W) . X(n, h) (W x C)
          gemm(false, true, 2 * Co, C, W, gyr.in(GY + ((n * 2 * H + 2 * h + i) * 2 * W) * Co, 2 * W * Co), 2 * Co, xf,
               C, 1.f, A + (t * 2 + i) * C * 2 * Co, 2 * Co);
      }
  });
}

}  // namespace

std::optional<at::Tensor> conv_transpose2x2(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias) {
  if (!applies(x) || weight.scalar_type() != x.scalar_type() || !applies(weight) || weight.size(2) != 2 ||
      weight.size(3) != 2 || weight.size(0) != x.size(1))
    return std::nullopt;
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = weight.size(1);
  auto y = at::empty({N, Co, 2 * H, 2 * W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (C == 0) {
    y.zero_();
    if (bias) y.add_(bias->view({1, -1, 1, 1}));
    return y;
  }
  const auto wf = repack(weight, false);
  const auto b = bias ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  with_io_type<true>(x.scalar_type(), [&](auto tag) {
    forward_rows<decltype(tag)>(xc, wf, b ? b->const_data_ptr<float>() : nullptr, y);
  });
  return y;
}

std::optional<at::Tensor> conv_transpose2x2_input_grad(const at::Tensor& grad_y, const at::Tensor& weight) {
  if (!applies(grad_y) || weight.scalar_type() != grad_y.scalar_type() || !applies(weight) || weight.size(2) != 2 ||
      weight.size(3) != 2 || weight.size(1) != grad_y.size(1) || grad_y.size(2) % 2 || grad_y.size(3) % 2)
    return std::nullopt;
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = grad_y.size(0), Co = grad_y.size(1), H = grad_y.size(2) / 2, W = grad_y.size(3) / 2,
                C = weight.size(0);
  auto gx = at::empty({N, C, H, W}, grad_y.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (gx.numel() == 0) return gx;
  if (Co == 0) return gx.zero_();
  const auto wb = repack(weight, true);
  with_io_type<true>(grad_y.scalar_type(), [&](auto tag) { input_grad_rows<decltype(tag)>(gyc, wb, gx); });
  return gx;
}

std::optional<at::Tensor> conv_transpose2x2_weight_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  if (!applies(grad_y) || x.scalar_type() != grad_y.scalar_type() || !applies(x) || grad_y.size(0) != x.size(0) ||
      grad_y.size(2) != 2 * x.size(2) || grad_y.size(3) != 2 * x.size(3))
    return std::nullopt;
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), Co = grad_y.size(1);
  const int64_t rows = N * H, threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  // per thread: G[t][i] (C x 2Co row-major, i.e. 2Co x C column-major for the BLAS), float32 in any dtype
  auto acc =
      at::zeros({threads, 2, C, 2 * Co}, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  if (C > 0 && Co > 0 && rows > 0)
    with_io_type<true>(x.scalar_type(), [&](auto tag) { weight_grad_rows<decltype(tag)>(gyc, xc, threads, acc); });
  // [i][c][j][co] viewed as w's [c][co][i][j], in the operands' dtype (a conversion copy of this weight-sized sum
  // where they are not float32): the layer copies it into its parameter's layout
  return acc.sum(0).to(x.scalar_type()).view({2, C, 2, Co}).permute({1, 3, 0, 2});
}

std::optional<at::Tensor> conv_transpose2x2_op(const at::Tensor& a, const at::Tensor& b,
                                               const std::optional<at::Tensor>& bias, int64_t op) {
  switch (op) {
    case 0:
      return conv_transpose2x2(a, b, bias);
    case 1:
      return conv_transpose2x2_input_grad(a, b);
    default:
      return conv_transpose2x2_weight_grad(a, b);
  }
}

}  // namespace unetx::cpu
