// CUDA kernels: the activation z = relu((x - mean[c]) * scale[c] + shift[c]) (BatchNorm + ReLU with the batch
// statistics and affine parameters folded into mean/scale/shift; identity without scale) with optional fused 2x2
// average pooling p, and its backward: the kernels of the ops bn_relu, bn_relu_pool and avg_pool2x2 (csrc/ops.cpp)
// and of the fused layer's input stage.
//
// Memory traffic per element of x (T = element size; per-channel vectors stay in L1/L2):
//   forward:  read T (x), write T (z) and/or T/4 (p).
//             Saved for backward: nothing (backward recomputes the activation from x, which the caller keeps).
//   backward: read T (x; only with scale) + T (grad_z) and/or T/4 (grad_p), write T (grad_x).
//             grad_scale[c] = sum(g * (x - mean)) (centred: no cancellation when |mean| >> std) and
//             grad_shift[c] = sum(g) are reduced in the same pass: per-thread and per-block sums in float32 (float64
//             for float64 data), one partial per (channel, block), combined by a second, tiny kernel.
//
// Host-verified, not yet on a GPU: tests/cuda_host/test_kernels.py runs activation_forward_{planar,cl}_kernel,
// activation_backward_{planar,cl}_kernel, sum_partials_kernel on the host under host_emulation.h through their launch
// code (indexing, bounds, barriers, races, arithmetic; kernels.cuh says what only a GPU can prove).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace unetx::cuda {
namespace {

// Per-channel parameters of the activation; mean == nullptr means 0.
template <typename A>
struct Affine {
  const A* mean = nullptr;
  const A* scale = nullptr;
  const A* shift = nullptr;
  __device__ __forceinline__ void get(int64_t c, A& m, A& s, A& t) const {
    m = mean ? mean[c] : A(0);
    s = scale[c];
    t = shift[c];
  }
};

template <bool ACT, typename A>
__device__ __forceinline__ A act(A v, A m, A s, A t) {
  if constexpr (ACT) {
    const A r = (v - m) * s + t;
    return r <= A(0) ? A(0) : r;  // NaN stays NaN, as torch.relu
  } else {
    return v;
  }
}

// The activation of V consecutive values that share channel parameters m, s, t (arrays of V), in place.
template <bool ACT, int V, typename A>
__device__ __forceinline__ void act_all(A (&v)[V], const A (&m)[V], const A (&s)[V], const A (&t)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = act<ACT>(v[i], m[i], s[i], t[i]);
}

// The pooled value(s) at output (n, c, h, w) and, when z, the activation of the 2x2 windows they read.
// CL: V channels of one pooled pixel, reading pixels (2h + dy, 2w + dx). Planar: V pooled columns w.. of one channel,
// reading the 2V columns 2w.. of rows 2h, 2h + 1 as two V-wide halves; column k of that run belongs to pooled
// column k / 2. Both sum each window in the CPU kernel's order (row by row, left to right).
template <bool CL, bool ACT, int V, typename T, typename A>
__device__ __forceinline__ void pool_item(const T* __restrict__ x, const Strides4& xs, T* __restrict__ z,
                                          const Strides4& zs, T* __restrict__ p, const Strides4& ps, int64_t n,
                                          int64_t c, int64_t h, int64_t w, const A (&m)[V], const A (&s)[V],
                                          const A (&t)[V]) {
  A r[V];
#pragma unroll
  for (int i = 0; i < V; ++i) r[i] = A(0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t hh = 2 * h + k / 2, ww = CL ? 2 * w + k % 2 : 2 * w + (k % 2) * V;
    A q[V];
    load<V>(x + xs.at(n, c, hh, ww), q);
    act_all<ACT>(q, m, s, t);
    if (z) store<V>(z + zs.at(n, c, hh, ww), q);
#pragma unroll
    for (int i = 0; i < V; ++i) r[CL ? i : ((k % 2) * V + i) / 2] += q[i];
  }
#pragma unroll
  for (int i = 0; i < V; ++i) r[i] *= A(0.25);
  store<V>(p + ps.at(n, c, h, w), r);
}

// Planar forward: an item is V outputs along W of one (n, c, h) row (pooled row with POOL); the walk is
// (n, c, h, w / V) over the output grid. Neighbouring threads share a channel, so its parameters are one broadcast.
template <typename T, int V, bool ACT, bool POOL>
__global__ void __launch_bounds__(kThreads)
    activation_forward_planar_kernel(const T* __restrict__ x, Strides4 xs, T* __restrict__ z, Strides4 zs,
                                     T* __restrict__ p, Strides4 ps, Affine<acc_t<T>> f, Walk4 walk,
                                     unsigned int items) {
  using A = acc_t<T>;
  for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {
    unsigned int n, c, h, wq;
    walk.split(j, n, c, h, wq);
    const int64_t w = int64_t(wq) * V;
    A m[V], s[V], t[V];
    m[0] = A(0), s[0] = A(1), t[0] = A(0);
    if constexpr (ACT) f.get(c, m[0], s[0], t[0]);
#pragma unroll
    for (int i = 1; i < V; ++i) m[i] = m[0], s[i] = s[0], t[i] = t[0];
    if constexpr (POOL) {
      pool_item<false, ACT, V>(x, xs, z, zs, p, ps, n, c, h, w, m, s, t);
    } else {
      A v[V];
      load<V>(x + xs.at(n, c, h, w), v);
      act_all<ACT>(v, m, s, t);
      store<V>(z + zs.at(n, c, h, w), v);
    }
  }
}

// Channels-last forward: a (bx, by) block; thread x owns V channels of a channel group (grid.y) and keeps their
// parameters in registers; threads along y and the blocks of grid.x walk the (pooled with POOL) pixels.
template <typename T, int V, bool ACT, bool POOL>
__global__ void __launch_bounds__(kThreads)
    activation_forward_cl_kernel(const T* __restrict__ x, Strides4 xs, T* __restrict__ z, Strides4 zs,
                                 T* __restrict__ p, Strides4 ps, Affine<acc_t<T>> f, int64_t Cq, Div d_h, Div d_w,
                                 unsigned int pixels) {
  using A = acc_t<T>;
  const int64_t bx = blockDim.x;
  for (int64_t group = blockIdx.y; group * bx < Cq; group += gridDim.y) {
    const int64_t cq = group * bx + threadIdx.x, c = cq * V;
    if (cq >= Cq) continue;  // no barriers in this kernel
    A m[V], s[V], t[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      m[i] = A(0), s[i] = A(1), t[i] = A(0);
      if constexpr (ACT) f.get(c + i, m[i], s[i], t[i]);
    }
    for (unsigned int px = blockIdx.x * blockDim.y + threadIdx.y; px < pixels; px += gridDim.x * blockDim.y) {
      const auto a = d_w.divmod(px);
      const auto b = d_h.divmod(a.div);
      const int64_t n = b.div, h = b.mod, w = a.mod;
      if constexpr (POOL) {
        pool_item<true, ACT, V>(x, xs, z, zs, p, ps, n, c, h, w, m, s, t);
      } else {
        A v[V];
        load<V>(x + xs.at(n, c, h, w), v);
        act_all<ACT>(v, m, s, t);
        store<V>(z + zs.at(n, c, h, w), v);
      }
    }
  }
}

// Backward, planar: grid.y walks channels, the blocks of grid.x share one channel's (n, h, w / V) items.
// g = grad_z + grad_p(pooled position) / 4, masked where the recomputed pre-activation <= 0.
template <typename T, int V, bool ACT>
__global__ void __launch_bounds__(kThreads)
    activation_backward_planar_kernel(const T* __restrict__ gz, Strides4 gzs, const T* __restrict__ gp, Strides4 gps,
                                      const T* __restrict__ x, Strides4 xs, T* __restrict__ gx, Strides4 gxs,
                                      Affine<acc_t<T>> f, int64_t C, Div d_h, Div d_wq, unsigned int items,
                                      acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A sm[kThreads / kWarp];
  const int64_t G = gridDim.x;
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    A m = 0, s = 1, t = 0;
    if constexpr (ACT) f.get(c, m, s, t);
    A s1 = 0, s2 = 0;
    for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {
      const auto a = d_wq.divmod(j);
      const auto b = d_h.divmod(a.div);
      const int64_t n = b.div, h = b.mod, w = int64_t(a.mod) * V;
      A g[V];
      if (gz) {
        load<V>(gz + gzs.at(n, c, h, w), g);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] = A(0);
      }
      if (gp) {
#pragma unroll
        for (int i = 0; i < V; ++i) g[i] += A(0.25) * static_cast<A>(gp[gps.at(n, c, h / 2, (w + i) / 2)]);
      }
      if constexpr (ACT) {
        A xv[V];
        load<V>(x + xs.at(n, c, h, w), xv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A d = xv[i] - m;
          const A gv = d * s + t <= A(0) ? A(0) : g[i];
          g[i] = gv * s;
          s1 += gv * d;
          s2 += gv;
        }
      }
      store<V>(gx + gxs.at(n, c, h, w), g);
    }
    if (ACT && part) {
      s1 = block_sum(s1, sm);
      s2 = block_sum(s2, sm);
      if (threadIdx.x == 0) {
        part[c * G + blockIdx.x] = s1;
        part[(C + c) * G + blockIdx.x] = s2;
      }
    }
  }
}

// Backward, channels-last: a (bx, by) block; thread x owns V channels of a channel group (grid.y), threads along y
// and the blocks of grid.x walk the N*H*W pixels.
template <typename T, int V, bool ACT>
__global__ void __launch_bounds__(kThreads)
    activation_backward_cl_kernel(const T* __restrict__ gz, Strides4 gzs, const T* __restrict__ gp, Strides4 gps,
                                  const T* __restrict__ x, Strides4 xs, T* __restrict__ gx, Strides4 gxs,
                                  Affine<acc_t<T>> f, int64_t C, int64_t Cq, Div d_h, Div d_w, unsigned int pixels,
                                  acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A sm[2 * kThreads * V];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y, cols = bx * V;
  const int64_t G = gridDim.x;
  for (int64_t group = blockIdx.y; group * bx < Cq; group += gridDim.y) {
    const int64_t cq = group * bx + tx, c0 = cq * V;
    const bool live = cq < Cq;
    A m[V], s[V], t[V], s1[V], s2[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      m[i] = A(0), s[i] = A(1), t[i] = A(0), s1[i] = A(0), s2[i] = A(0);
      if (ACT && live) f.get(c0 + i, m[i], s[i], t[i]);
    }
    if (live) {
      for (unsigned int px = blockIdx.x * by + ty; px < pixels; px += gridDim.x * by) {
        const auto a = d_w.divmod(px);
        const auto b = d_h.divmod(a.div);
        const int64_t n = b.div, h = b.mod, w = a.mod;
        A g[V];
        if (gz) {
          load<V>(gz + gzs.at(n, c0, h, w), g);
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) g[i] = A(0);
        }
        if (gp) {
          A q[V];
          load<V>(gp + gps.at(n, c0, h / 2, w / 2), q);
#pragma unroll
          for (int i = 0; i < V; ++i) g[i] += A(0.25) * q[i];
        }
        if constexpr (ACT) {
          A xv[V];
          load<V>(x + xs.at(n, c0, h, w), xv);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const A d = xv[i] - m[i];
            const A gv = d * s[i] + t[i] <= A(0) ? A(0) : g[i];
            g[i] = gv * s[i];
            s1[i] += gv * d;
            s2[i] += gv;
          }
        }
        store<V>(gx + gxs.at(n, c0, h, w), g);
      }
    }
    if (ACT && part) {
      __syncthreads();  // the previous group's reduction is done with sm
#pragma unroll
      for (int i = 0; i < V; ++i) {
        sm[ty * cols + tx * V + i] = s1[i];
        sm[(by + ty) * cols + tx * V + i] = s2[i];
      }
      __syncthreads();
      for (int half = by / 2; half > 0; half /= 2) {  // by is a power of two
        if (ty < half)
#pragma unroll
          for (int i = 0; i < V; ++i) {
            sm[ty * cols + tx * V + i] += sm[(ty + half) * cols + tx * V + i];
            sm[(by + ty) * cols + tx * V + i] += sm[(by + ty + half) * cols + tx * V + i];
          }
        __syncthreads();
      }
      if (ty == 0 && live)
#pragma unroll
        for (int i = 0; i < V; ++i) {
          part[(c0 + i) * G + blockIdx.x] = sm[tx * V + i];
          part[(C + c0 + i) * G + blockIdx.x] = sm[by * cols + tx * V + i];
        }
    }
  }
}

// out0[c] = sum_g part[c][g], out1[c] = sum_g part[C + c][g]: one warp per row.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const A* __restrict__ part, int64_t C, int64_t G, A* __restrict__ out0, A* __restrict__ out1) {
  const int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= 2 * C) return;  // whole warps
  A s = 0;
  for (int64_t g = lane; g < G; g += kWarp) s += part[row * G + g];
  s = warp_sum(s);
  if (lane == 0) (row < C ? out0[row] : out1[row - C]) = s;
}

// ------------------------------------------------------------------------------------------------ host side
at::Tensor as_acc(const OptTensor& v, at::ScalarType data) {
  return v ? v->to(acc_type(data)).contiguous() : at::Tensor();
}

template <typename A>
Affine<A> affine_of(const at::Tensor& m, const at::Tensor& s, const at::Tensor& t) {
  Affine<A> f;
  if (s.defined()) {
    f.mean = m.defined() ? m.const_data_ptr<A>() : nullptr;
    f.scale = s.const_data_ptr<A>();
    f.shift = t.const_data_ptr<A>();
  }
  return f;
}

template <typename T, int V, bool CL, bool ACT, bool POOL>
void launch_forward(const at::Tensor& x, Affine<acc_t<T>> f, at::Tensor* z, at::Tensor* p) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t H = POOL ? x.size(2) / 2 : x.size(2), W = POOL ? x.size(3) / 2 : x.size(3);
  const int64_t items = N * C * H * W / V;
  check_items(items, "unetx.activation_forward", x);
  if (items == 0) return;
  const auto stream = current_stream();
  T* Z = z ? z->data_ptr<T>() : nullptr;
  T* P = p ? p->data_ptr<T>() : nullptr;
  const Strides4 zs = z ? Strides4(*z) : Strides4(), ps = p ? Strides4(*p) : Strides4();
  if constexpr (CL) {
    const int64_t Cq = C / V, pixels = N * H * W;
    const dim3 block = channels_last_block(Cq);
    const int64_t groups = (Cq + block.x - 1) / block.x;
    const int64_t most = std::max<int64_t>(4 * resident_blocks() / groups, 1);
    const dim3 grid(static_cast<unsigned int>(std::clamp<int64_t>((pixels + block.y - 1) / block.y, 1, most)),
                    static_cast<unsigned int>(std::min<int64_t>(groups, 65535)));
    launch(grid, block, stream, &activation_forward_cl_kernel<T, V, ACT, POOL>, x.const_data_ptr<T>(), Strides4(x), Z,
           zs, P, ps, f, Cq, Div(static_cast<unsigned int>(H)), Div(static_cast<unsigned int>(W)),
           static_cast<unsigned int>(pixels));
  } else {
    launch(elementwise_grid(items), kThreads, stream, &activation_forward_planar_kernel<T, V, ACT, POOL>,
           x.const_data_ptr<T>(), Strides4(x), Z, zs, P, ps, f, Walk4(C, H, W / V), static_cast<unsigned int>(items));
  }
}

template <typename T, int V, bool CL>
void forward_variant(const at::Tensor& x, Affine<acc_t<T>> f, at::Tensor* z, at::Tensor* p) {
  const bool act_on = f.scale != nullptr;
  if (p && act_on)
    launch_forward<T, V, CL, true, true>(x, f, z, p);
  else if (p)
    launch_forward<T, V, CL, false, true>(x, f, z, p);
  else
    launch_forward<T, V, CL, true, false>(x, f, z, p);
}

template <typename T>
void forward_impl(const at::Tensor& x, Affine<acc_t<T>> f, at::Tensor* z, at::Tensor* p) {
  constexpr int VV = kVec<T>;
  const bool cl = is_channels_last(x);
  const int inner = cl ? 1 : 3;
  const int64_t inner_out = cl ? x.size(1) : (p ? x.size(3) / 2 : x.size(3));
  const bool vec =
      inner_out % VV == 0 && vec_ok(x, inner, VV) && (!z || vec_ok(*z, inner, VV)) && (!p || vec_ok(*p, inner, VV));
  if (vec && cl)
    forward_variant<T, VV, true>(x, f, z, p);
  else if (vec)
    forward_variant<T, VV, false>(x, f, z, p);
  else if (cl)
    forward_variant<T, 1, true>(x, f, z, p);
  else
    forward_variant<T, 1, false>(x, f, z, p);
}

template <typename T, int V, bool ACT>
void launch_backward(const at::Tensor* gz, const at::Tensor* gp, const at::Tensor& x, Affine<acc_t<T>> f, bool cl,
                     at::Tensor& gx, at::Tensor* gs, at::Tensor* gt) {
  using A = acc_t<T>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto stream = current_stream();
  const T* GZ = gz ? gz->const_data_ptr<T>() : nullptr;
  const T* GP = gp ? gp->const_data_ptr<T>() : nullptr;
  const Strides4 gzs = gz ? Strides4(*gz) : Strides4(), gps = gp ? Strides4(*gp) : Strides4();
  const bool reduce = ACT && gs != nullptr;
  dim3 grid, block;
  if (!cl) {
    const int64_t items = N * H * (W / V);
    check_items(items, "unetx.activation_backward", x);
    block = dim3(kThreads);
    grid = dim3(reduction_blocks(items, kThreads, C), static_cast<unsigned int>(std::min<int64_t>(C, 65535)));
  } else {
    const int64_t pixels = N * H * W, Cq = C / V;
    check_items(pixels, "unetx.activation_backward", x);
    block = channels_last_block(Cq);
    const int64_t groups = (Cq + block.x - 1) / block.x;
    grid = dim3(reduction_blocks(pixels, block.y * kMinPixelsPerThread, groups),
                static_cast<unsigned int>(std::min<int64_t>(groups, 65535)));
  }
  at::Tensor part;
  if (reduce) part = at::empty({2, C, int64_t(grid.x)}, x.options().dtype(acc_type(x.scalar_type())));
  A* P = reduce ? part.data_ptr<A>() : nullptr;
  const T* X = ACT ? x.const_data_ptr<T>() : nullptr;
  if (!cl) {
    launch(grid, block, stream, &activation_backward_planar_kernel<T, V, ACT>, GZ, gzs, GP, gps, X, Strides4(x),
           gx.data_ptr<T>(), Strides4(gx), f, C, Div(static_cast<unsigned int>(H)),
           Div(static_cast<unsigned int>(W / V)), static_cast<unsigned int>(N * H * (W / V)), P);
  } else {
    launch(grid, block, stream, &activation_backward_cl_kernel<T, V, ACT>, GZ, gzs, GP, gps, X, Strides4(x),
           gx.data_ptr<T>(), Strides4(gx), f, C, C / V, Div(static_cast<unsigned int>(H)),
           Div(static_cast<unsigned int>(W)), static_cast<unsigned int>(N * H * W), P);
  }
  if (reduce) {
    TORCH_INTERNAL_ASSERT(gs->is_contiguous() && gt->is_contiguous() && gs->scalar_type() == part.scalar_type());
    const auto blocks = static_cast<unsigned int>((2 * C * kWarp + kThreads - 1) / kThreads);
    launch(blocks, kThreads, stream, &sum_partials_kernel<A>, P, C, grid.x, gs->data_ptr<A>(), gt->data_ptr<A>());
  }
}

template <typename T>
void backward_impl(const at::Tensor* gz, const at::Tensor* gp, const at::Tensor& x, Affine<acc_t<T>> f, at::Tensor& gx,
                   at::Tensor* gs, at::Tensor* gt) {
  constexpr int VV = kVec<T>;
  const bool act_on = f.scale != nullptr;
  const bool cl = is_channels_last(x);
  const int inner = cl ? 1 : 3;
  // planar: grad_p is read element by element (a quarter of the traffic); channels-last: V channels at a time
  const bool vec = vec_ok(gx, inner, VV) && (!act_on || vec_ok(x, inner, VV)) && (!gz || vec_ok(*gz, inner, VV)) &&
                   (!gp || !cl || vec_ok(*gp, inner, VV));
  if (vec && act_on)
    launch_backward<T, VV, true>(gz, gp, x, f, cl, gx, gs, gt);
  else if (vec)
    launch_backward<T, VV, false>(gz, gp, x, f, cl, gx, gs, gt);
  else if (act_on)
    launch_backward<T, 1, true>(gz, gp, x, f, cl, gx, gs, gt);
  else
    launch_backward<T, 1, false>(gz, gp, x, f, cl, gx, gs, gt);
}

}  // namespace

void activation_forward(const at::Tensor& x, const OptTensor& mean, const OptTensor& scale, const OptTensor& shift,
                        at::Tensor* z, at::Tensor* p) {
  const DeviceGuard guard(x.device());
  if (!scale && !p) {
    z->copy_(x);
    return;
  }
  TORCH_INTERNAL_ASSERT((!z || z->scalar_type() == x.scalar_type()) && (!p || p->scalar_type() == x.scalar_type()));
  const auto t = x.scalar_type();
  const at::Tensor m = scale ? as_acc(mean, t) : at::Tensor(), s = as_acc(scale, t), sh = as_acc(shift, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "unetx.activation_forward",
                                  [&] { forward_impl<scalar_t>(x, affine_of<acc_t<scalar_t>>(m, s, sh), z, p); });
}

void activation_backward(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x, const OptTensor& mean,
                         const OptTensor& scale, const OptTensor& shift, at::Tensor& grad_x, at::Tensor* grad_scale,
                         at::Tensor* grad_shift) {
  const DeviceGuard guard(x.device());
  if (grad_scale && !scale) {  // no activation: nothing to reduce (as the CPU kernel: zeros)
    grad_scale->zero_();
    grad_shift->zero_();
    grad_scale = grad_shift = nullptr;
  }
  if (x.numel() == 0) {
    if (grad_scale) {
      grad_scale->zero_();
      grad_shift->zero_();
    }
    return;
  }
  const auto t = x.scalar_type();
  const at::Tensor m = scale ? as_acc(mean, t) : at::Tensor(), s = as_acc(scale, t), sh = as_acc(shift, t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t, "unetx.activation_backward", [&] {
    backward_impl<scalar_t>(grad_z, grad_p, x, affine_of<acc_t<scalar_t>>(m, s, sh), grad_x, grad_scale, grad_shift);
  });
}

}  // namespace unetx::cuda
