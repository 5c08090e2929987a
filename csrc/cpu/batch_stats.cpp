// CPU kernels for the BatchNorm part of conv_bn_relu: the batch statistics of a conv output, and the gradient that
// flows back into that output through them.
//
// batch_stats:      reads y once (T per element); writes 2 values per channel. Sums are shifted by a per-channel
//                   pivot (the channel's first element) and accumulated in double, so a large mean does not cancel.
// fold_output_grad: reads grad_y and y once, writes out once (3T per element).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

inline bool channels_last(const at::Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1 && !x.is_contiguous(); }

template <typename T>
void stats_impl(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
  const int64_t sn = y.stride(0), sc = y.stride(1), sh = y.stride(2), sw = y.stride(3);
  const T* Y = y.const_data_ptr<T>();
  const double M = double(N * H * W);
  std::vector<double> s1(C, 0.0), s2(C, 0.0), pivot(C);
  for (int64_t c = 0; c < C; ++c) pivot[c] = double(Y[c * sc]);

  if (!channels_last(y)) {
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const acc_t pv = acc_t(pivot[c]);
        double a1 = 0, a2 = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < H; ++h) {
            const T* r = Y + n * sn + c * sc + h * sh;
            acc_t r1 = 0, r2 = 0;  // one row in acc_t (short), rows summed in double
            for (int64_t w = 0; w < W; ++w) {
              const acc_t d = acc_t(r[w * sw]) - pv;
              r1 += d;
              r2 += d * d;
            }
            a1 += r1;
            a2 += r2;
          }
        s1[c] = a1;
        s2[c] = a2;
      }
    });
  } else {
    const int64_t rows = N * H;
    const int64_t blocks = std::min<int64_t>(rows, 4 * at::get_num_threads());
    std::vector<double> part(2 * blocks * C, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> r1(C), r2(C), pv(C);
      for (int64_t c = 0; c < C; ++c) pv[c] = acc_t(pivot[c]);
      for (int64_t blk = b; blk < e; ++blk) {
        double* p1 = part.data() + 2 * blk * C;
        double* p2 = p1 + C;
        for (int64_t r = rows * blk / blocks; r < rows * (blk + 1) / blocks; ++r) {
          const int64_t n = r / H, h = r % H;
          std::fill(r1.begin(), r1.end(), acc_t(0));
          std::fill(r2.begin(), r2.end(), acc_t(0));
          for (int64_t w = 0; w < W; ++w) {
            const T* px = Y + n * sn + h * sh + w * sw;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = acc_t(px[c * sc]) - pv[c];
              r1[c] += d;
              r2[c] += d * d;
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            p1[c] += r1[c];
            p2[c] += r2[c];
          }
        }
      }
    });
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += part[2 * blk * C + c];
        s2[c] += part[2 * blk * C + C + c];
      }
  }
  acc_t* MEAN = mean.data_ptr<acc_t>();
  acc_t* VAR = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < C; ++c) {
    const double m1 = s1[c] / M;
    MEAN[c] = acc_t(pivot[c] + m1);
    VAR[c] = acc_t(std::max(s2[c] / M - m1 * m1, 0.0));
  }
}

template <typename T>
void fold_impl(const at::Tensor& gy, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
               const at::Tensor* b, bool relu, at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = y.size(0), C = y.size(1), H = y.size(2), W = y.size(3);
  const T* GY = gy.const_data_ptr<T>();
  const T* Y = y.const_data_ptr<T>();
  T* O = out.data_ptr<T>();
  const acc_t* MEAN = mean ? mean->const_data_ptr<acc_t>() : nullptr;
  const acc_t* A = a ? a->const_data_ptr<acc_t>() : nullptr;
  const acc_t* B = b ? b->const_data_ptr<acc_t>() : nullptr;
  // gy, y and out share one dense layout (the caller makes them so): index them with y's strides.
  const int64_t sn = y.stride(0), sc = y.stride(1), sh = y.stride(2), sw = y.stride(3);
  auto one = [&](int64_t i, int64_t c) {
    const acc_t yv = acc_t(Y[i]);
    acc_t g = acc_t(GY[i]);
    if (relu && !(yv > acc_t(0))) g = 0;
    if (A) g += A[c];
    if (B) g += B[c] * (yv - MEAN[c]);
    O[i] = T(g);
  };
  if (!channels_last(y)) {
    at::parallel_for(0, N * C, 1, [&](int64_t bb, int64_t e) {
      for (int64_t nc = bb; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) one(n * sn + c * sc + h * sh + w * sw, c);
      }
    });
  } else {
    at::parallel_for(0, N * H, 1, [&](int64_t bb, int64_t e) {
      for (int64_t r = bb; r < e; ++r) {
        const int64_t n = r / H, h = r % H;
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) one(n * sn + c * sc + h * sh + w * sw, c);
      }
    });
  }
}

}  // namespace

void batch_stats(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unetx.batch_stats",
                                  [&] { stats_impl<scalar_t>(y, mean, var); });
}

void fold_output_grad(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                      const at::Tensor* b, bool relu, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unetx.fold_output_grad",
                                  [&] { fold_impl<scalar_t>(grad_y, y, mean, a, b, relu, out); });
}

}  // namespace unetx::cpu
