// CPU kernel: the weight gradient of a 'same' k x k, stride-1 convolution computed straight from channels-last
// operands, for conv_bn_relu's backward (see LayerKernels::weight_grad).
//
// In channels-last layout the input a is a [P, C] matrix and the output gradient g a [P, Co] matrix (P = N*H*W
// pixels), and a spatial shift (dh, dw) of the input is a shift of dh*W + dw rows. So each of the k*k taps of the
// weight gradient is one GEMM over pixels,
//     grad_w[:, :, kh, kw] = g[p]^T a[p + s],   s = (kh - k/2) * W + (kw - k/2),
// with the rows that would read the zero padding left out: a shift in h clips the row range, and the pixels whose
// shifted column leaves the image (|dw| per row) are subtracted again as rank-1 updates.
// Work is split into blocks of whole rows of one image, sized to stay in cache across the k*k GEMMs, each thread
// accumulating its own gradient; the GEMMs are ATen's (MKL / oneDNN sgemm).
//
// Memory traffic: reads g and a once from memory (the k*k GEMMs of one block reuse them from cache), writes the
// gradient (Co * C * k * k) once. Where a is a recomputed input stage (StageRows), it is never in memory at all:
// each block's rows plus a k/2-row halo (about 2k/R extra stage work, R ~ 10-60 rows) are built into a per-thread
// buffer from x and x2, so the stage is never written to memory. Why this kernel rather than oneDNN's weight
// gradient, per shape: `python bench/weight_grad.py` (figures in BENCHMARKS.md).
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

// Rows per block: about 1 MiB of g and a together, at least one row (1 MiB and 2 MiB measured alike on a
// 2-core EPYC, 256 KiB and 4+ MiB slower).
int64_t block_rows(int64_t W, int64_t C, int64_t Co, int64_t elem) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, W * (C + Co) * elem));
}

// Returns false (gw unusable) where a pixel whose product was taken out again holds NaN or Inf: subtracting it
// cannot undo it (Inf - Inf, NaN - NaN), where stock never reads that pixel for that tap.
template <typename T>
bool weight_grad_impl(const at::Tensor& g, const at::Tensor& a, const StageRows* rows, int64_t k, at::Tensor& gw) {
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), Co = g.size(1), HW = H * W;
  const int64_t r = k / 2, KK = k * k;
  const int64_t R = block_rows(W, C, Co, sizeof(T));
  const int64_t blocks_per_image = (H + R - 1) / R, blocks = N * blocks_per_image;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  T* G = const_cast<T*>(g.const_data_ptr<T>());
  const auto opts = a.options().memory_format(at::MemoryFormat::Contiguous);
  // one accumulator per thread: [threads, k*k, Co, C]
  auto acc = at::zeros({threads, KK, Co, C}, opts);
  T* ACC = acc.data_ptr<T>();
  // with `rows`: one buffer per thread for a block's rows of a and their halo, rounded out to rows->align
  const int64_t align = rows ? std::max<int64_t>(1, rows->align) : 1;
  const int64_t buf_rows = std::min(H, R + 2 * r + 2 * (align - 1));
  at::Tensor buf = rows ? at::empty({threads, buf_rows * W * C}, opts) : at::Tensor();
  std::atomic<bool> nonfinite{false};

  auto run_block = [&](int64_t blk, int64_t tid) {
    const int64_t n = blk / blocks_per_image, h0 = (blk % blocks_per_image) * R, h1 = std::min(H, h0 + R);
    T* acc_t = ACC + tid * KK * Co * C;
    // A + (p - p0) * C is pixel p of a (p counted over the whole batch)
    const T* A = a.const_data_ptr<T>();
    int64_t p0 = 0;
    if (rows) {
      const int64_t lo = std::max<int64_t>(0, h0 - r) / align * align;
      const int64_t hi = std::min(H, (std::min(H, h1 + r) + align - 1) / align * align);
      T* b = buf.data_ptr<T>() + tid * buf_rows * W * C;
      auto view = at::from_blob(b, {1, C, hi - lo, W}, {(hi - lo) * W * C, 1, W * C, C}, opts);
      rows->fill(n, lo, hi, view);
      A = b;
      p0 = n * HW + lo * W;
    }
    for (int64_t kh = 0; kh < k; ++kh) {
      const int64_t dh = kh - r;
      const int64_t hs = std::max(h0, -dh), he = std::min(h1, H - dh);
      if (hs >= he) continue;
      for (int64_t kw = 0; kw < k; ++kw) {
        const int64_t dw = kw - r;
        if (std::abs(dw) >= W) continue;  // every pixel would read the padding
        const int64_t s = dh * W + dw;
        const int64_t pb = n * HW + hs * W + std::max<int64_t>(0, -dw), pe = n * HW + he * W - std::max<int64_t>(0, dw);
        T* out = acc_t + (kh * k + kw) * Co * C;
        auto out_t = at::from_blob(out, {Co, C}, opts);
        auto g_t = at::from_blob(G + pb * Co, {pe - pb, Co}, {Co, 1}, opts).t();
        auto a_t = at::from_blob(const_cast<T*>(A) + (pb + s - p0) * C, {pe - pb, C}, {C, 1}, opts);
        at::addmm_out(out_t, out_t, g_t, a_t);
        // the pixels in [pb, pe) whose shifted column leaves the image read the next or previous row instead
        // of the padding: take their products out again
        if (dw == 0) continue;
        for (int64_t h = (dw < 0 ? hs + 1 : hs); h < (dw < 0 ? he : he - 1); ++h) {
          for (int64_t j = 0; j < std::abs(dw); ++j) {
            const int64_t w = dw < 0 ? j : W - 1 - j;
            const int64_t p = n * HW + h * W + w;
            const T* __restrict__ gp = G + p * Co;
            const T* __restrict__ ap = A + (p + s - p0) * C;
            T probe = 0;  // NaN iff a value is NaN or Inf
#pragma omp simd reduction(+ : probe)
            for (int64_t ci = 0; ci < C; ++ci) probe += ap[ci] * T(0);
            for (int64_t co = 0; co < Co; ++co) probe += gp[co] * T(0);
            if (probe != probe) nonfinite.store(true, std::memory_order_relaxed);
            for (int64_t co = 0; co < Co; ++co) {
              T* __restrict__ o = out + co * C;
              const T gv = gp[co];
#pragma omp simd
              for (int64_t ci = 0; ci < C; ++ci) o[ci] -= gv * ap[ci];
            }
          }
        }
      }
    }
  };

  if (threads <= 1) {
    for (int64_t b = 0; b < blocks; ++b) run_block(b, 0);
  } else {
    // one contiguous range of blocks per thread; each thread writes only its own accumulator
    at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t) {
        const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
        for (int64_t b = b0; b < b1; ++b) run_block(b, t);
      }
    });
  }
  // gw[co, ci, kh, kw] = sum over threads of acc[t, kh * k + kw, co, ci]
  T* GW = gw.data_ptr<T>();
  at::parallel_for(0, Co, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t co = cb; co < ce; ++co)
      for (int64_t ci = 0; ci < C; ++ci)
        for (int64_t kk = 0; kk < KK; ++kk) {
          T sum = 0;
          for (int64_t t = 0; t < threads; ++t) sum += ACC[((t * KK + kk) * Co + co) * C + ci];
          GW[(co * C + ci) * KK + kk] = sum;
        }
  });
  return !nonfinite.load();
}

bool dense_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace

std::optional<at::Tensor> weight_grad(const at::Tensor& grad_y, const at::Tensor& a, const StageRows* rows, int64_t k) {
  // float32 and float64 only: a reduced-precision input keeps oneDNN's path (which accumulates in float32)
  const auto dt = a.scalar_type();
  if ((dt != at::kFloat && dt != at::kDouble) || grad_y.scalar_type() != dt || k % 2 == 0 || !dense_channels_last(a) ||
      !dense_channels_last(grad_y) || a.size(0) != grad_y.size(0) || a.size(2) != grad_y.size(2) ||
      a.size(3) != grad_y.size(3))
    return std::nullopt;
  // Stock's weight gradient multiplies the zero padding too, so a NaN / Inf in grad_y's border band (the pixels
  // some tap reads padding for) makes that tap NaN there; this kernel leaves the padding out: ATen's then.
  const int64_t r = k / 2, H = grad_y.size(2), W = grad_y.size(3);
  if (r > 0) {
    const int64_t bh = std::min(r, H), bw = std::min(r, W);
    for (const auto& band :
         {grad_y.narrow(2, 0, bh), grad_y.narrow(2, H - bh, bh), grad_y.narrow(3, 0, bw), grad_y.narrow(3, W - bw, bw)})
      if (!at::isfinite(band).all().item<bool>()) return std::nullopt;
  }
  auto gw = at::empty({grad_y.size(1), a.size(1), k, k}, a.options().memory_format(at::MemoryFormat::Contiguous));
  const bool ok = dt == at::kFloat ? weight_grad_impl<float>(grad_y, a, rows, k, gw)
                                   : weight_grad_impl<double>(grad_y, a, rows, k, gw);
  if (!ok) return std::nullopt;  // NaN / Inf at an image's edge column: ATen's, which never reads it for that tap
  return gw;
}

}  // namespace unetx::cpu
