// CUDA kernels: 2x upsampling (nearest; bilinear with align_corners=False, the taps of common/upsample2x.h that the
// CPU kernels use) written straight into its channel slice of a concatenation buffer, and its adjoint: the kernels of
// the op upsample_concat = cat([skip, upsample2x(x)], dim=1) (csrc/ops.cpp) and of the fused layer's input stage.
//
// Memory traffic (T = element size), per element of the upsampled output:
//   forward:  write T; read T/4 of x (each x element is read by 4 outputs, the repeats hit L1/L2). The skip part of
//             the buffer is one ATen copy (read T, write T per skip element). No intermediate upsampled tensor.
//   backward: read T of grad (each grad element feeds up to 4 input positions, repeats from cache), write T/4
//             (grad_x); the skip part is one ATen copy of its slice.
// Saved for backward: nothing (shapes only).
//
// Host-verified, not yet on a GPU: tests/cuda_host/test_kernels.py runs upsample_forward_kernel,
// upsample_backward_kernel on the host under host_emulation.h through their launch code (indexing, bounds, barriers,
// races, arithmetic; kernels.cuh says what only a GPU can prove).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace unetx::cuda {
namespace {

struct Taps {
  int64_t i0, i1;
  float w0, w1;
};

template <bool BILINEAR>
__device__ __forceinline__ Taps taps_of(int64_t o, int64_t in) {
  Taps t;
  if constexpr (BILINEAR) {
    bilinear_taps(o, in, t.i0, t.i1, t.w0, t.w1);
  } else {
    t.i0 = t.i1 = o / 2;
    t.w0 = 1.f;
    t.w1 = 0.f;
  }
  return t;
}

// The upsampled value at (a, b) of the (n, c) plane whose origin is xp.
template <typename A, typename T>
__device__ __forceinline__ A bilinear_at(const T* xp, int64_t sh, int64_t sw, const Taps& a, const Taps& b) {
  const auto px = [&](int64_t i, int64_t j) { return static_cast<A>(xp[i * sh + j * sw]); };
  const A top = A(b.w0) * px(a.i0, b.i0) + A(b.w1) * px(a.i0, b.i1);
  const A bot = A(b.w0) * px(a.i1, b.i0) + A(b.w1) * px(a.i1, b.i1);
  return A(a.w0) * top + A(a.w1) * bot;
}

// Walk over out (N, C, 2h, 2w): channels-last (n, i, j, c / V), planar (n, c, i, j / V).
template <typename T, int V, bool CL, bool BILINEAR>
__global__ void __launch_bounds__(kThreads)
    upsample_forward_kernel(const T* __restrict__ x, Strides4 xs, T* __restrict__ out, Strides4 os, int64_t h,
                            int64_t w, Walk4 walk, unsigned int items) {
  using A = acc_t<T>;
  for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {
    unsigned int i0, i1, i2, i3;
    walk.split(j, i0, i1, i2, i3);
    const int64_t n = i0, c = CL ? int64_t(i3) * V : i1, oi = CL ? i1 : i2, oj = CL ? i2 : int64_t(i3) * V;
    const Taps a = taps_of<BILINEAR>(oi, h);
    A v[V];
    if constexpr (CL) {
      const Taps b = taps_of<BILINEAR>(oj, w);
      if constexpr (!BILINEAR) {
        load<V>(x + xs.at(n, c, a.i0, b.i0), v);
      } else {
        A q00[V], q01[V], q10[V], q11[V];
        load<V>(x + xs.at(n, c, a.i0, b.i0), q00);
        load<V>(x + xs.at(n, c, a.i0, b.i1), q01);
        load<V>(x + xs.at(n, c, a.i1, b.i0), q10);
        load<V>(x + xs.at(n, c, a.i1, b.i1), q11);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A top = A(b.w0) * q00[k] + A(b.w1) * q01[k];
          const A bot = A(b.w0) * q10[k] + A(b.w1) * q11[k];
          v[k] = A(a.w0) * top + A(a.w1) * bot;
        }
      }
    } else {
      const T* xp = x + xs.at(n, c, 0, 0);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const Taps b = taps_of<BILINEAR>(oj + k, w);
        if constexpr (BILINEAR)
          v[k] = bilinear_at<A>(xp, xs.h, xs.w, a, b);
        else
          v[k] = static_cast<A>(xp[a.i0 * xs.h + b.i0 * xs.w]);
      }
    }
    store<V>(out + os.at(n, c, oi, oj), v);
  }
}

// The outputs of a 2x-upsampled axis (length out = 2 * in) that read input k: candidates o = 2k - 2 + t, t < kTaps,
// with weight 0 where o is outside the axis or does not read k. A fixed count and compile-time slots keep the taps in
// registers; zero weights are skipped, so the sums run over the same terms in the same order as the CPU kernel's.
template <bool BILINEAR>
struct Adjoint {
  static constexpr int kTaps = BILINEAR ? 5 : 2;
  int64_t o0;  // the first candidate
  float wt[kTaps];
  __device__ __forceinline__ Adjoint(int64_t k, int64_t in, int64_t out) {
    if constexpr (BILINEAR) {
      o0 = 2 * k - 2;
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const int64_t o = o0 + t;
        wt[t] = o >= 0 && o < out ? bilinear_weight(o, k, in) : 0.f;
      }
    } else {
      o0 = 2 * k;
      wt[0] = wt[1] = 1.f;
    }
  }
};

// Walk over grad_x (N, C, h, w): channels-last (n, k, l, c / V), planar (n, c, k, l / V).
template <typename T, int V, bool CL, bool BILINEAR>
__global__ void __launch_bounds__(kThreads)
    upsample_backward_kernel(const T* __restrict__ g, Strides4 gs, T* __restrict__ gx, Strides4 xs, int64_t h,
                             int64_t w, Walk4 walk, unsigned int items) {
  using A = acc_t<T>;
  using Adj = Adjoint<BILINEAR>;
  const int64_t H = 2 * h, W = 2 * w;
  for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {
    unsigned int i0, i1, i2, i3;
    walk.split(j, i0, i1, i2, i3);
    const int64_t n = i0, c = CL ? int64_t(i3) * V : i1, k = CL ? i1 : i2, l = CL ? i2 : int64_t(i3) * V;
    const Adj rows(k, h, H);
    A s[V];
#pragma unroll
    for (int i = 0; i < V; ++i) s[i] = A(0);
    if constexpr (CL) {
      const Adj cols(l, w, W);
#pragma unroll
      for (int p = 0; p < Adj::kTaps; ++p) {
        if (rows.wt[p] != 0.f) {
          A row[V];
#pragma unroll
          for (int i = 0; i < V; ++i) row[i] = A(0);
#pragma unroll
          for (int q = 0; q < Adj::kTaps; ++q) {
            if (cols.wt[q] != 0.f) {
              A v[V];
              load<V>(g + gs.at(n, c, rows.o0 + p, cols.o0 + q), v);
#pragma unroll
              for (int i = 0; i < V; ++i) row[i] += A(cols.wt[q]) * v[i];
            }
          }
#pragma unroll
          for (int i = 0; i < V; ++i) s[i] += A(rows.wt[p]) * row[i];
        }
      }
    } else if constexpr (!BILINEAR) {
      // V inputs l.. read the 2V columns 2l.. of rows 2k and 2k + 1, as two V-wide halves each
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        A q[2][V];
        load<V>(g + gs.at(n, c, rows.o0 + p, 2 * l), q[0]);
        load<V>(g + gs.at(n, c, rows.o0 + p, 2 * l + V), q[1]);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int c0 = 2 * i, c1 = 2 * i + 1;
          A row = A(0) + q[c0 / V][c0 % V];
          row += q[c1 / V][c1 % V];
          s[i] += row;
        }
      }
    } else {
      const T* gp = g + gs.at(n, c, 0, 0);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const Adj cols(l + i, w, W);
#pragma unroll
        for (int p = 0; p < Adj::kTaps; ++p) {
          if (rows.wt[p] == 0.f) continue;
          A row = A(0);
#pragma unroll
          for (int q = 0; q < Adj::kTaps; ++q)
            if (cols.wt[q] != 0.f)
              row += A(cols.wt[q]) * static_cast<A>(gp[(rows.o0 + p) * gs.h + (cols.o0 + q) * gs.w]);
          s[i] += A(rows.wt[p]) * row;
        }
      }
    }
    store<V>(gx + xs.at(n, c, k, l), s);
  }
}

template <typename T, int V, bool CL, bool BILINEAR>
void launch_forward(const at::Tensor& x, at::Tensor& out) {
  const int64_t N = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  const int64_t items = N * C * H * W / V;
  check_items(items, "unetx.upsample_concat", out);
  if (items == 0) return;
  const Walk4 walk = CL ? Walk4(H, W, C / V) : Walk4(C, H, W / V);
  const auto stream = current_stream();
  launch(elementwise_grid(items), kThreads, stream, &upsample_forward_kernel<T, V, CL, BILINEAR>, x.const_data_ptr<T>(),
         Strides4(x), out.data_ptr<T>(), Strides4(out), x.size(2), x.size(3), walk, static_cast<unsigned int>(items));
}

template <typename T, int V, bool CL, bool BILINEAR>
void launch_backward(const at::Tensor& grad, at::Tensor& gx) {
  const int64_t N = gx.size(0), C = gx.size(1), h = gx.size(2), w = gx.size(3);
  const int64_t items = N * C * h * w / V;
  check_items(items, "unetx.upsample_concat_backward", gx);
  if (items == 0) return;
  const Walk4 walk = CL ? Walk4(h, w, C / V) : Walk4(C, h, w / V);
  const auto stream = current_stream();
  launch(elementwise_grid(items), kThreads, stream, &upsample_backward_kernel<T, V, CL, BILINEAR>,
         grad.const_data_ptr<T>(), Strides4(grad), gx.data_ptr<T>(), Strides4(gx), h, w, walk,
         static_cast<unsigned int>(items));
}

template <typename T, int V, bool BILINEAR>
void forward_layout(const at::Tensor& x, at::Tensor& out, bool cl) {
  if (cl)
    launch_forward<T, V, true, BILINEAR>(x, out);
  else
    launch_forward<T, V, false, BILINEAR>(x, out);
}

template <typename T, int V, bool BILINEAR>
void backward_layout(const at::Tensor& grad, at::Tensor& gx, bool cl) {
  if (cl)
    launch_backward<T, V, true, BILINEAR>(grad, gx);
  else
    launch_backward<T, V, false, BILINEAR>(grad, gx);
}

}  // namespace

void upsample_forward(const at::Tensor& x, Upsample mode, at::Tensor& out) {
  const DeviceGuard guard(x.device());
  if (mode == Upsample::None) {
    out.copy_(x);
    return;
  }
  TORCH_INTERNAL_ASSERT(out.size(2) == 2 * x.size(2) && out.size(3) == 2 * x.size(3) && out.size(1) == x.size(1) &&
                        out.scalar_type() == x.scalar_type());
  // the thread mapping follows the output: it is 4x the input's traffic
  const bool cl = is_channels_last(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.upsample_forward", [&] {
    constexpr int VV = kVec<scalar_t>;
    // planar reads x element by element (a quarter of the traffic); channels-last reads V channels at a time
    const bool vec = cl ? vec_ok(out, 1, VV) && vec_ok(x, 1, VV) : vec_ok(out, 3, VV);
    const bool bil = mode == Upsample::Bilinear;
    if (vec && bil)
      forward_layout<scalar_t, VV, true>(x, out, cl);
    else if (vec)
      forward_layout<scalar_t, VV, false>(x, out, cl);
    else if (bil)
      forward_layout<scalar_t, 1, true>(x, out, cl);
    else
      forward_layout<scalar_t, 1, false>(x, out, cl);
  });
}

void upsample_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_x) {
  const DeviceGuard guard(grad.device());
  if (mode == Upsample::None) {
    grad_x.copy_(grad);
    return;
  }
  TORCH_INTERNAL_ASSERT(grad.size(2) == 2 * grad_x.size(2) && grad.size(3) == 2 * grad_x.size(3) &&
                        grad.size(1) == grad_x.size(1) && grad.scalar_type() == grad_x.scalar_type());
  const bool cl = is_channels_last(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "unetx.upsample_backward", [&] {
    constexpr int VV = kVec<scalar_t>;
    const bool bil = mode == Upsample::Bilinear;
    // planar bilinear reads grad element by element; the other mappings read V-wide runs of it
    const bool vec =
        cl ? vec_ok(grad_x, 1, VV) && vec_ok(grad, 1, VV) : vec_ok(grad_x, 3, VV) && (bil || vec_ok(grad, 3, VV));
    if (vec && bil)
      backward_layout<scalar_t, VV, true>(grad, grad_x, cl);
    else if (vec)
      backward_layout<scalar_t, VV, false>(grad, grad_x, cl);
    else if (bil)
      backward_layout<scalar_t, 1, true>(grad, grad_x, cl);
    else
      backward_layout<scalar_t, 1, false>(grad, grad_x, cl);
  });
}

}  // namespace unetx::cuda
