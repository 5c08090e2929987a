// CPU kernels: the 2 x 2, stride-2 transposed convolution of the expanding path (the learned upsampling) as GEMMs on
// dense channels-last float32 operands: forward, input gradient and weight gradient, for conv_bn_relu's transposed
// layers (LayerKernels::conv_transpose2x2; the layer measures them against ATen's and runs the faster).
//
// Input pixel (n, h, w) writes the output block (2h + i, 2w + j), i, j in {0, 1}:
//     y[n, 2h+i, 2w+j, :] = x[n, h, w, :] . w[:, :, i, j] (+ bias).
// In channels-last memory, output row 2h+i holds, for w = 0 .. W-1, the values of j = 0 and 1 side by side
// (2 * Co floats per input pixel), so one input row and one i make one GEMM straight into the output:
//     Y(n, 2h+i)  (W x 2Co, ld 2Co) = X(n, h) (W x C) . Wf[i] (C x 2Co),   Wf[i][c][j * Co + co] = w[c][co][i][j];
// the input gradient is its adjoint, gX(n, h) = sum over i of gY(n, 2h+i) (W x 2Co) . Wf[i]^T, and the weight
// gradient Wf[i] += X(n, h)^T . gY(n, 2h+i), accumulated per thread and summed at the end. GEMMs (cpu/gemm.h):
// oneDNN's micro-kernel for the forward and input gradient, MKL's sgemm for the weight gradient (its first operand
// transposed). Rows are split among the threads.
//
// Memory traffic: each reads its operands once and writes its result once (the forward adds the bias to each
// output row while it is in cache); the repacked weight (4 * C * Co floats) is read once per row. Nothing is saved.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include "cpu/gemm.h"
#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

bool applies(const at::Tensor& t) {
  return t.dim() == 4 && t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

// Wf [2][C][2 * Co] (forward) from w [C, Co, 2, 2]; with `adjoint`, Wb [2][2 * Co][C] (its transpose per i). One
// copy from w's own strides (a channels-last weight too).
at::Tensor repack(const at::Tensor& w, bool adjoint) {
  const int64_t C = w.size(0), Co = w.size(1);
  // w[c][co][i][j] -> [i][c][j][co] (forward) or [i][j][co][c] (adjoint)
  return adjoint ? w.permute({2, 3, 1, 0}).contiguous() : w.permute({2, 0, 3, 1}).contiguous().view({2, C, 2 * Co});
}

}  // namespace

std::optional<at::Tensor> conv_transpose2x2(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias) {
  if (!applies(x) || !applies(weight) || weight.size(2) != 2 || weight.size(3) != 2 || weight.size(0) != x.size(1))
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
  const float* X = xc.const_data_ptr<float>();
  const float* Wf = wf.const_data_ptr<float>();
  const float* B = b ? b->const_data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N * H * 2, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t nh = r / 2, i = r % 2, n = nh / H, h = nh % H;
      float* out = Y + ((n * 2 * H + 2 * h + i) * 2 * W) * Co;
      block_gemm(W, 2 * Co, C, X + nh * W * C, C, Wf + i * C * 2 * Co, 2 * Co, false, out, 2 * Co);
      if (B)
        for (int64_t p = 0; p < 2 * W; ++p) {
          float* o = out + p * Co;
#pragma omp simd
          for (int64_t co = 0; co < Co; ++co) o[co] += B[co];
        }
    }
  });
  return y;
}

std::optional<at::Tensor> conv_transpose2x2_input_grad(const at::Tensor& grad_y, const at::Tensor& weight) {
  if (!applies(grad_y) || !applies(weight) || weight.size(2) != 2 || weight.size(3) != 2 ||
      weight.size(1) != grad_y.size(1) || grad_y.size(2) % 2 || grad_y.size(3) % 2)
    return std::nullopt;
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = grad_y.size(0), Co = grad_y.size(1), H = grad_y.size(2) / 2, W = grad_y.size(3) / 2,
                C = weight.size(0);
  auto gx = at::empty({N, C, H, W}, grad_y.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (gx.numel() == 0) return gx;
  if (Co == 0) return gx.zero_();
  const auto wb = repack(weight, true);
  const float* GY = gyc.const_data_ptr<float>();
  const float* Wb = wb.const_data_ptr<float>();
  float* GX = gx.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t nh = r0; nh < r1; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      for (int64_t i = 0; i < 2; ++i)
        block_gemm(W, C, 2 * Co, GY + ((n * 2 * H + 2 * h + i) * 2 * W) * Co, 2 * Co, Wb + i * 2 * Co * C, C, i > 0,
                   GX + nh * W * C, C);
    }
  });
  return gx;
}

std::optional<at::Tensor> conv_transpose2x2_weight_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  if (!applies(grad_y) || !applies(x) || grad_y.size(0) != x.size(0) || grad_y.size(2) != 2 * x.size(2) ||
      grad_y.size(3) != 2 * x.size(3))
    return std::nullopt;
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = grad_y.size(1);
  const int64_t rows = N * H, threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  // per thread: G[t][i] (C x 2Co row-major, i.e. 2Co x C column-major for the BLAS)
  auto acc = at::zeros({threads, 2, C, 2 * Co}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* GY = gyc.const_data_ptr<float>();
  const float* X = xc.const_data_ptr<float>();
  float* A = acc.data_ptr<float>();
  if (C > 0 && Co > 0 && rows > 0)
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t nh = rows * t / threads; nh < rows * (t + 1) / threads; ++nh) {
          const int64_t n = nh / H, h = nh % H;
          for (int64_t i = 0; i < 2; ++i)
            // column-major G^T (2Co x C) += gY(n, 2h+i)^T (2Co x W) . X(n, h) (W x C)
            gemm(false, true, 2 * Co, C, W, GY + ((n * 2 * H + 2 * h + i) * 2 * W) * Co, 2 * Co, X + nh * W * C, C, 1.f,
                 A + (t * 2 + i) * C * 2 * Co, 2 * Co);
        }
    });
  // [i][c][j][co] viewed as w's [c][co][i][j]: the layer copies it into its parameter's layout (one copy, not two)
  return acc.sum(0).view({2, C, 2, Co}).permute({1, 3, 0, 2});
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
