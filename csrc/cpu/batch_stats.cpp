// CPU kernels for the BatchNorm part of conv_bn_relu: the batch statistics of a conv output, and the gradient that
// flows back into that output through them.
//
// batch_stats:      reads y once (T per element); writes 2 values per channel. Sums are shifted by a per-channel
//                   pivot (the channel's first element) and accumulated in double, so a large mean does not cancel.
// fold_output_grad: reads grad_y and y once, writes out once (3T per element).
#include "cpu/vec.h"  // first: selects ATen's vector capability

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/layout.h"
#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

// Both kernels take dense tensors (the caller's contiguous(layout)): planar = (n, c) planes of H*W contiguous
// elements, channels-last = N*H*W pixels of C contiguous channels.
template <typename T>
void stats_impl(const at::Tensor& y, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<T>;
  using L = Lanes<T>;
  using Pk = typename L::Pack;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const T* Y = y.const_data_ptr<T>();
  const bool cl = is_channels_last(y);
  const double M = double(N * HW);
  std::vector<double> s1(C, 0.0), s2(C, 0.0), pivot(C);
  for (int64_t c = 0; c < C; ++c) {
    const double v = double(Y[cl ? c : c * HW]);
    pivot[c] = std::isfinite(v) ? v : 0.0;  // an Inf pivot would make every difference Inf - Inf = NaN
  }

  if (!cl) {
    at::parallel_for(0, C, grain_for(N * HW), [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const acc_t pv = acc_t(pivot[c]);
        double a1 = 0, a2 = 0;
        for (int64_t n = 0; n < N; ++n) {
          const T* __restrict__ r = Y + (n * C + c) * HW;
          for (int64_t i0 = 0; i0 < HW; i0 += 4096) {  // chunks in acc_t, chunks summed in double
            const int64_t i1 = std::min(HW, i0 + 4096);
            // kSize lanes, then the scalar tail
            const Pk pvv = L::broadcast(pv);
            Pk v1 = L::broadcast(0), v2 = L::broadcast(0);
            int64_t i = i0;
            for (; i + L::kSize <= i1; i += L::kSize) {
              const Pk x = L::load(r + i);
              for (int j = 0; j < L::kNV; ++j) {
                const auto d = x.v[j] - pvv.v[j];
                v1.v[j] = v1.v[j] + d;
                v2.v[j] = at::vec::fmadd(d, d, v2.v[j]);
              }
            }
            acc_t lanes1[L::kSize], lanes2[L::kSize];
            L::store_acc(lanes1, v1);
            L::store_acc(lanes2, v2);
            acc_t r1 = 0, r2 = 0;
            for (int64_t j = 0; j < L::kSize; ++j) r1 += lanes1[j], r2 += lanes2[j];
            for (; i < i1; ++i) {
              const acc_t d = acc_t(r[i]) - pv;
              r1 += d;
              r2 += d * d;
            }
            a1 += r1;
            a2 += r2;
          }
        }
        s1[c] = a1;
        s2[c] = a2;
      }
    });
  } else {
    const int64_t pixels = N * HW;
    const int64_t blocks = reduction_blocks(pixels, pixels * C, at::get_num_threads());
    std::vector<double> part(2 * blocks * C, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> pvv(C);
      for (int64_t c = 0; c < C; ++c) pvv[c] = acc_t(pivot[c]);
      for (int64_t blk = b; blk < e; ++blk) {
        double* p1 = part.data() + 2 * blk * C;
        double* p2 = p1 + C;
        const int64_t q0 = pixels * blk / blocks, q1 = pixels * (blk + 1) / blocks;
        // 256 pixels in acc_t, then into double; channels kSize at a time, the sums in registers (the 256 pixels'
        // rows stay in cache across the channel chunks)
        for (int64_t j0 = q0; j0 < q1; j0 += 256) {
          const int64_t j1 = std::min(q1, j0 + 256);
          for (int64_t c = 0; c < C; c += L::kSize) {
            const int64_t nc = C - c;
            const Pk p = L::load_acc(pvv.data() + c, nc);
            Pk v1 = L::broadcast(0), v2 = L::broadcast(0);
            for (int64_t j = j0; j < j1; ++j) {
              const Pk x = L::load(Y + j * C + c, nc);
              for (int u = 0; u < L::kNV; ++u) {
                const auto d = x.v[u] - p.v[u];
                v1.v[u] = v1.v[u] + d;
                v2.v[u] = at::vec::fmadd(d, d, v2.v[u]);
              }
            }
            acc_t l1[L::kSize], l2[L::kSize];
            L::store_acc(l1, v1, nc);  // nc: a partial pack's lanes are in its own order (Lanes::kUnpacked)
            L::store_acc(l2, v2, nc);
            for (int64_t u = 0; u < std::min<int64_t>(nc, L::kSize); ++u) {
              p1[c + u] += l1[u];
              p2[c + u] += l2[u];
            }
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

// One vector of the fold: mask(g) + a + b * (y - mu), mask = 0 where y <= 0 (NaN passes, as threshold_backward).
template <bool RELU, bool STATS, typename V>
inline V fold_v(V g, const V& y, const V& a, const V& b, const V& mu) {
  if constexpr (RELU) g = mask_le0(y, g);
  if constexpr (STATS) g = g + at::vec::fmadd(b, y - mu, a);
  return g;
}

// out = mask(gy) + a[c] + b[c] * (y - mu[c]) over one planar (n, c) plane of len elements.
template <typename T, bool RELU, bool STATS>
inline void fold_run(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ o, int64_t len,
                     const typename at::opmath_type<T>* a, const typename at::opmath_type<T>* b,
                     const typename at::opmath_type<T>* mu, int64_t c) {
  using L = Lanes<T>;
  using Pk = typename L::Pack;
  Pk av, bv, mv;
  if (STATS) av = L::broadcast(a[c]), bv = L::broadcast(b[c]), mv = L::broadcast(mu[c]);
  for (int64_t i = 0; i < len; i += L::kSize) {
    const int64_t n = len - i;
    const Pk yv = L::load(y + i, n);
    Pk g = L::load(gy + i, n);
    for (int j = 0; j < L::kNV; ++j) g.v[j] = fold_v<RELU, STATS>(g.v[j], yv.v[j], av.v[j], bv.v[j], mv.v[j]);
    L::store(o + i, g, n);
  }
}

// fold_run over `pixels` dense channels-last pixels of C channels: the per-channel vectors of a chunk are loaded
// once outside the pixel loop where the pixel is one chunk (C == kSize) or for its partial chunk (HalfLanes where it
// fits), per pixel otherwise; a, b, mu in Lanes<T>::par_order. Arguments by value: the vector stores may alias what
// by-reference captures point to.
template <typename T, bool RELU, bool STATS>
inline void fold_pixels(const T* gy, const T* y, T* o, int64_t pixels, int64_t C, const at::opmath_type<T>* a,
                        const at::opmath_type<T>* b, const at::opmath_type<T>* mu) {
  using L = Lanes<T>;
  using Pk = typename L::Pack;
  const auto params = [=](int64_t c, int64_t n) {
    Pk av, bv, mv;
    if (STATS) av = L::load_par(a + c, n), bv = L::load_par(b + c, n), mv = L::load_par(mu + c, n);
    return [av, bv, mv](auto g, const auto& yv) {
      for (int j = 0; j < int(sizeof(g.v) / sizeof(g.v[0])); ++j)
        g.v[j] = fold_v<RELU, STATS>(g.v[j], yv.v[j], av.v[j], bv.v[j], mv.v[j]);
      return g;
    };
  };
  const int64_t full = C - C % L::kSize;
  with_tail_lanes<T>(C, [=](auto lanes, int64_t nt) {
    using LT = decltype(lanes);
    if (nt == 0 && full == L::kSize) {
      const auto op = params(0, L::kSize);
      for (int64_t p = 0; p < pixels; ++p) L::store(o + p * C, op(L::load(gy + p * C), L::load(y + p * C)));
      return;
    }
    const auto tail = params(full, nt);
    for (int64_t p = 0; p < pixels; ++p) {
      const int64_t q = p * C;
      for (int64_t c = 0; c < full; c += L::kSize)
        L::store(o + q + c, params(c, L::kSize)(L::load(gy + q + c), L::load(y + q + c)));
      if (nt) LT::store(o + q + full, tail(LT::load(gy + q + full, nt), LT::load(y + q + full, nt)), nt);
    }
  });
}

template <typename T, bool RELU, bool STATS>
void fold_loops(const T* GY, const T* Y, T* O, int64_t N, int64_t C, int64_t HW, bool cl, const at::opmath_type<T>* A,
                const at::opmath_type<T>* B, const at::opmath_type<T>* MU) {
  if (!cl) {
    at::parallel_for(0, N * C, grain_for(HW), [&](int64_t bb, int64_t e) {
      for (int64_t nc = bb; nc < e; ++nc)
        fold_run<T, RELU, STATS>(GY + nc * HW, Y + nc * HW, O + nc * HW, HW, A, B, MU, nc % C);
    });
  } else {
    using L = Lanes<T>;
    const auto a = L::par_order(A, C), b = L::par_order(B, C), mu = L::par_order(MU, C);
    at::parallel_for(0, N * HW, grain_for(C), [&](int64_t bb, int64_t e) {
      fold_pixels<T, RELU, STATS>(GY + bb * C, Y + bb * C, O + bb * C, e - bb, C, a.data(), b.data(), mu.data());
    });
  }
}

template <typename T>
void fold_impl(const at::Tensor& gy, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
               const at::Tensor* b, bool relu, at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const bool cl = is_channels_last(y);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_INTERNAL_ASSERT(y.is_contiguous(fmt) && gy.is_contiguous(fmt) && out.is_contiguous(fmt),
                        "unetx.fold_output_grad: expects dense tensors of one layout");
  // a missing a (no grad_mean) or b (no grad_var) is a zero vector
  const auto acc = acc_type(y.scalar_type());
  const at::Tensor zeros = at::zeros({C}, y.options().dtype(acc));
  const acc_t* A = a ? a->const_data_ptr<acc_t>() : zeros.const_data_ptr<acc_t>();
  const acc_t* B = b ? b->const_data_ptr<acc_t>() : zeros.const_data_ptr<acc_t>();
  const acc_t* MU = mean ? mean->const_data_ptr<acc_t>() : zeros.const_data_ptr<acc_t>();
  const bool stats = a || b;
  const T* GY = gy.const_data_ptr<T>();
  const T* Y = y.const_data_ptr<T>();
  T* O = out.data_ptr<T>();
  if (relu && stats)
    fold_loops<T, true, true>(GY, Y, O, N, C, HW, cl, A, B, MU);
  else if (relu)
    fold_loops<T, true, false>(GY, Y, O, N, C, HW, cl, A, B, MU);
  else
    fold_loops<T, false, true>(GY, Y, O, N, C, HW, cl, A, B, MU);
}

}  // namespace

void batch_stats(const at::Tensor& y_in, at::Tensor& mean, at::Tensor& var) {
  const at::Tensor y = y_in.contiguous(y_in.suggest_memory_format());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unetx.batch_stats",
                                  [&] { stats_impl<scalar_t>(y, mean, var); });
}

void fold_output_grad(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                      const at::Tensor* b, bool relu, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unetx.fold_output_grad",
                                  [&] { fold_impl<scalar_t>(grad_y, y, mean, a, b, relu, out); });
}

}  // namespace unetx::cpu
