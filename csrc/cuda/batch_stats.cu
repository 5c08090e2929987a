// CUDA kernels for the BatchNorm part of conv_bn_relu: the batch statistics of a conv output, and the gradient that
// flows back into that output through them (and through a fused ReLU).
//
// batch_stats: reads y once (T per element, T = element size); writes 2 values per channel. Two levels:
//   1. each thread keeps Welford moments (count, mean, M2) of its elements, taken relative to a per-channel pivot
//      (the channel's first element, so float32 never holds |mean| >> std); threads and then warps of a block merge
//      with Chan's formula; one (count, mean, M2) partial per (channel, block) goes to a float32 (float64 for float64
//      data) scratch tensor of 3 * C * blocks values;
//   2. a second kernel merges each channel's partials with Chan's formula in float64.
//   No difference of large sums anywhere, so a large mean (e.g. 1e4 with std 1) costs no precision.
// fold_output_grad: reads grad_y and y once, writes out once (3T per element); per-channel vectors from cache.
// Saved for backward: nothing here (conv_bn_relu keeps y and the batch mean).
//
// Host-verified, not yet on a GPU: tests/cuda_host/test_kernels.py runs batch_stats_{planar,cl}_kernel,
// batch_stats_finish_kernel, fold_output_grad_{planar,cl}_kernel on the host under host_emulation.h through their
// launch code (indexing, bounds, barriers, races, arithmetic; kernels.cuh says what only a GPU can prove).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "cuda/common.cuh"
#include "cuda/kernels.cuh"

namespace unetx::cuda {
namespace {

// Moments of a 1-D block (kThreads); valid in thread 0.
template <typename A>
__device__ __forceinline__ Moments<A> block_moments(Moments<A> m, Moments<A>* sm /* kThreads / kWarp */) {
  warp_merge(m);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // sm may still be read from a previous channel
  if (lane == 0) sm[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < kThreads / kWarp; ++w) merge(m, sm[w].n, sm[w].mean, sm[w].m2);
  return m;
}

template <typename A>
__device__ __forceinline__ void write_partial(A* part, int64_t C, int64_t c, const Moments<A>& m) {
  const int64_t G = gridDim.x;
  part[c * G + blockIdx.x] = m.n;
  part[(C + c) * G + blockIdx.x] = m.mean;
  part[(2 * C + c) * G + blockIdx.x] = m.m2;
}

// Planar (dense NCHW): grid.y walks channels; the blocks of grid.x share one channel's N x HW / V items.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    batch_stats_planar_kernel(const T* __restrict__ y, int64_t C, int64_t HW, Div d_hwq, unsigned int items,
                              acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ Moments<A> sm[kThreads / kWarp];
  for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
    const A pivot = static_cast<A>(y[c * HW]);
    Moments<A> st{A(0), A(0), A(0)};
    for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {
      const auto a = d_hwq.divmod(j);
      A v[V];
      load<V>(y + (int64_t(a.div) * C + c) * HW + int64_t(a.mod) * V, v);
      // the V values as one batch (count V, mean mb, M2 m2b), merged into the running moments
      A s1 = 0, s2 = 0;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A d = v[i] - pivot;
        s1 += d;
        s2 += d * d;
      }
      const A mb = s1 * (A(1) / A(V));
      merge(st, A(V), mb, s2 - s1 * mb);
    }
    st = block_moments(st, sm);
    if (threadIdx.x == 0) write_partial(part, C, c, st);
  }
}

// Channels-last (dense NHWC): a (bx, by) block; thread x owns V channels of a channel group (grid.y), threads
// along y and the blocks of grid.x walk the N*H*W pixels.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) batch_stats_cl_kernel(const T* __restrict__ y, int64_t C, int64_t Cq,
                                                                  unsigned int pixels, acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A sm_mean[kThreads * V], sm_m2[kThreads * V], sm_n[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y, cols = bx * V;
  for (int64_t group = blockIdx.y; group * bx < Cq; group += gridDim.y) {
    const int64_t cq = group * bx + tx, c0 = cq * V;
    const bool live = cq < Cq;
    A pivot[V], mean[V], m2[V], n = 0;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      pivot[i] = live ? static_cast<A>(y[c0 + i]) : A(0);
      mean[i] = m2[i] = A(0);
    }
    if (live) {
      for (unsigned int px = blockIdx.x * by + ty; px < pixels; px += gridDim.x * by) {
        A v[V];
        load<V>(y + int64_t(px) * C + c0, v);
        n += A(1);
        const A r = A(1) / n;  // one division per pixel, shared by its V channels
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const A d = v[i] - pivot[i];
          const A delta = d - mean[i];
          mean[i] += delta * r;
          m2[i] += delta * (d - mean[i]);
        }
      }
    }
    __syncthreads();  // the previous group's merge is done with sm
    sm_n[ty * bx + tx] = n;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sm_mean[ty * cols + tx * V + i] = mean[i];
      sm_m2[ty * cols + tx * V + i] = m2[i];
    }
    __syncthreads();
    for (int half = by / 2; half > 0; half /= 2) {  // by is a power of two
      if (ty < half) {
        const A na = sm_n[ty * bx + tx], nb = sm_n[(ty + half) * bx + tx];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int ka = ty * cols + tx * V + i, kb = (ty + half) * cols + tx * V + i;
          Moments<A> m{na, sm_mean[ka], sm_m2[ka]};
          merge(m, nb, sm_mean[kb], sm_m2[kb]);
          sm_mean[ka] = m.mean;
          sm_m2[ka] = m.m2;
        }
        sm_n[ty * bx + tx] = na + nb;
      }
      __syncthreads();
    }
    if (ty == 0 && live)
#pragma unroll
      for (int i = 0; i < V; ++i)
        write_partial(part, C, c0 + i, Moments<A>{sm_n[tx], sm_mean[tx * V + i], sm_m2[tx * V + i]});
  }
}

// Merges each channel's partials in float64 (one warp per channel); mean = pivot + merged mean, var = M2 / count.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    batch_stats_finish_kernel(const T* __restrict__ y, int64_t pivot_stride, const acc_t<T>* __restrict__ part,
                              int64_t C, int64_t G, acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ var) {
  using A = acc_t<T>;
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;  // whole warps
  Moments<double> m{0.0, 0.0, 0.0};
  for (int64_t g = lane; g < G; g += kWarp)
    merge(m, double(part[c * G + g]), double(part[(C + c) * G + g]), double(part[(2 * C + c) * G + g]));
  warp_merge(m);
  if (lane == 0) {
    mean[c] = static_cast<A>(static_cast<double>(static_cast<A>(y[c * pivot_stride])) + m.mean);
    var[c] = static_cast<A>(m.n > 0.0 ? (m.m2 > 0.0 ? m.m2 / m.n : 0.0) : 0.0);
  }
}

template <typename T, int V>
void launch_stats(const at::Tensor& y, bool cl, at::Tensor& mean, at::Tensor& var) {
  using A = acc_t<T>;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const auto stream = current_stream();
  at::Tensor part;
  unsigned int G;
  if (!cl) {
    const int64_t items = N * (HW / V);
    check_items(items, "unetx.batch_stats", y);
    G = reduction_blocks(items, kThreads, C);
    part = at::empty({3, C, int64_t(G)}, y.options().dtype(mean.scalar_type()));
    const dim3 grid(G, static_cast<unsigned int>(std::min<int64_t>(C, 65535)));
    launch(grid, kThreads, stream, &batch_stats_planar_kernel<T, V>, y.const_data_ptr<T>(), C, HW,
           Div(static_cast<unsigned int>(HW / V)), static_cast<unsigned int>(items), part.data_ptr<A>());
  } else {
    const int64_t pixels = N * HW, Cq = C / V;
    check_items(pixels, "unetx.batch_stats", y);
    const dim3 block = channels_last_block(Cq);
    const int64_t groups = (Cq + block.x - 1) / block.x;
    G = reduction_blocks(pixels, block.y * kMinPixelsPerThread, groups);
    part = at::empty({3, C, int64_t(G)}, y.options().dtype(mean.scalar_type()));
    const dim3 grid(G, static_cast<unsigned int>(std::min<int64_t>(groups, 65535)));
    launch(grid, block, stream, &batch_stats_cl_kernel<T, V>, y.const_data_ptr<T>(), C, Cq,
           static_cast<unsigned int>(pixels), part.data_ptr<A>());
  }
  const auto blocks = static_cast<unsigned int>((C * kWarp + kThreads - 1) / kThreads);
  launch(blocks, kThreads, stream, &batch_stats_finish_kernel<T>, y.const_data_ptr<T>(), cl ? 1 : HW,
         part.const_data_ptr<A>(), C, G, mean.data_ptr<A>(), var.data_ptr<A>());
}

// out = mask(grad_y) + a[c] + b[c] * (y - mean[c]), mask = 0 where y <= 0 (NaN passes) with relu, on V values of
// channels c[i].
template <int V, typename A>
__device__ __forceinline__ void fold(A (&g)[V], const A (&yv)[V], const A (&av)[V], const A (&bv)[V], const A (&mv)[V],
                                     bool relu, bool stats) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if (relu) g[i] = yv[i] <= A(0) ? A(0) : g[i];  // NaN passes, as threshold_backward
    if (stats) g[i] += av[i] + bv[i] * (yv[i] - mv[i]);
  }
}

template <typename A>
__device__ __forceinline__ A entry(const A* v, int64_t c) {
  return v ? v[c] : A(0);
}

// Planar (dense NCHW): an item is V consecutive elements of one (n, c) plane (the host checked HW % V == 0).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    fold_output_grad_planar_kernel(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ out,
                                   const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ a,
                                   const acc_t<T>* __restrict__ b, bool relu, Div d_hwq, Div d_c, unsigned int items) {
  using A = acc_t<T>;
  const bool stats = a || b;
  for (unsigned int j = blockIdx.x * kThreads + threadIdx.x; j < items; j += gridDim.x * kThreads) {
    const int64_t c = d_c.divmod(d_hwq.div(j)).mod;  // neighbouring threads share it: broadcast loads
    A g[V], yv[V], av[V], bv[V], mv[V];
    av[0] = entry(a, c), bv[0] = entry(b, c), mv[0] = entry(mean, c);
#pragma unroll
    for (int i = 1; i < V; ++i) av[i] = av[0], bv[i] = bv[0], mv[i] = mv[0];
    load<V>(gy + int64_t(j) * V, g);
    load<V>(y + int64_t(j) * V, yv);
    fold(g, yv, av, bv, mv, relu, stats);
    store<V>(out + int64_t(j) * V, g);
  }
}

// Channels-last (dense NHWC): a (bx, by) block; thread x owns V channels of a channel group (grid.y) and keeps their
// vectors in registers; threads along y and the blocks of grid.x walk the pixels.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    fold_output_grad_cl_kernel(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ out,
                               const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ a,
                               const acc_t<T>* __restrict__ b, bool relu, int64_t C, int64_t Cq, unsigned int pixels) {
  using A = acc_t<T>;
  const bool stats = a || b;
  const int64_t bx = blockDim.x;
  for (int64_t group = blockIdx.y; group * bx < Cq; group += gridDim.y) {
    const int64_t cq = group * bx + threadIdx.x, c0 = cq * V;
    if (cq >= Cq) continue;  // no barriers in this kernel
    A av[V], bv[V], mv[V];
#pragma unroll
    for (int i = 0; i < V; ++i) av[i] = entry(a, c0 + i), bv[i] = entry(b, c0 + i), mv[i] = entry(mean, c0 + i);
    for (unsigned int px = blockIdx.x * blockDim.y + threadIdx.y; px < pixels; px += gridDim.x * blockDim.y) {
      const int64_t off = int64_t(px) * C + c0;
      A g[V], yv[V];
      load<V>(gy + off, g);
      load<V>(y + off, yv);
      fold(g, yv, av, bv, mv, relu, stats);
      store<V>(out + off, g);
    }
  }
}

template <typename T, int V, bool CL>
void launch_fold(const at::Tensor& gy, const at::Tensor& y, const at::Tensor* mean, const at::Tensor* a,
                 const at::Tensor* b, bool relu, at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  const int64_t items = N * C * HW / V;
  check_items(items, "unetx.fold_output_grad", y);
  if (items == 0) return;
  const auto ptr = [](const at::Tensor* t) { return t ? t->const_data_ptr<A>() : nullptr; };
  const auto stream = current_stream();
  if constexpr (CL) {
    const int64_t Cq = C / V, pixels = N * HW;
    const dim3 block = channels_last_block(Cq);
    const int64_t groups = (Cq + block.x - 1) / block.x;
    const int64_t most = std::max<int64_t>(4 * resident_blocks() / groups, 1);
    const dim3 grid(static_cast<unsigned int>(std::clamp<int64_t>((pixels + block.y - 1) / block.y, 1, most)),
                    static_cast<unsigned int>(std::min<int64_t>(groups, 65535)));
    launch(grid, block, stream, &fold_output_grad_cl_kernel<T, V>, gy.const_data_ptr<T>(), y.const_data_ptr<T>(),
           out.data_ptr<T>(), ptr(mean), ptr(a), ptr(b), relu, C, Cq, static_cast<unsigned int>(pixels));
  } else {
    launch(elementwise_grid(items), kThreads, stream, &fold_output_grad_planar_kernel<T, V>, gy.const_data_ptr<T>(),
           y.const_data_ptr<T>(), out.data_ptr<T>(), ptr(mean), ptr(a), ptr(b), relu,
           Div(static_cast<unsigned int>(HW / V)), Div(static_cast<unsigned int>(C)), static_cast<unsigned int>(items));
  }
}

bool aligned(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % static_cast<uintptr_t>(bytes) == 0;
}

}  // namespace

void batch_stats(const at::Tensor& y_in, at::Tensor& mean, at::Tensor& var) {
  const DeviceGuard guard(y_in.device());
  const auto fmt = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(fmt);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  TORCH_INTERNAL_ASSERT(mean.is_contiguous() && var.is_contiguous() && mean.scalar_type() == var.scalar_type() &&
                        mean.scalar_type() == acc_type(y.scalar_type()));
  TORCH_CHECK(y.numel() > 0, "unetx.batch_stats: y of shape ", y.sizes(), " has no elements");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unetx.batch_stats", [&] {
    constexpr int VV = kVec<scalar_t>;
    const int64_t inner = cl ? y.size(1) : y.size(2) * y.size(3);
    if (inner % VV == 0 && aligned(y, 16))
      launch_stats<scalar_t, VV>(y, cl, mean, var);
    else
      launch_stats<scalar_t, 1>(y, cl, mean, var);
  });
}

void fold_output_grad(const at::Tensor& grad_y, const at::Tensor& y_in, const at::Tensor* mean, const at::Tensor* a,
                      const at::Tensor* b, bool relu, at::Tensor& out) {
  const DeviceGuard guard(y_in.device());
  // the kernel walks dense tensors of one layout; the composition passes exactly that, anything else is copied
  const auto fmt = y_in.suggest_memory_format();
  const at::Tensor y = y_in.contiguous(fmt), gy = grad_y.contiguous(fmt);
  const bool out_dense = out.is_contiguous(fmt);
  at::Tensor o = out_dense ? out : at::empty(out.sizes(), out.options().memory_format(fmt));
  const auto acc = acc_type(y.scalar_type());
  for (const at::Tensor* v : {mean, a, b})
    TORCH_INTERNAL_ASSERT(!v || (v->is_contiguous() && v->scalar_type() == acc && v->numel() == y.size(1)));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "unetx.fold_output_grad", [&] {
    constexpr int VV = kVec<scalar_t>;
    const int64_t inner = cl ? y.size(1) : y.size(2) * y.size(3);
    const bool vec = inner % VV == 0 && aligned(y, 16) && aligned(gy, 16) && aligned(o, 16);
    if (vec && cl)
      launch_fold<scalar_t, VV, true>(gy, y, mean, a, b, relu, o);
    else if (vec)
      launch_fold<scalar_t, VV, false>(gy, y, mean, a, b, relu, o);
    else if (cl)
      launch_fold<scalar_t, 1, true>(gy, y, mean, a, b, relu, o);
    else
      launch_fold<scalar_t, 1, false>(gy, y, mean, a, b, relu, o);
  });
  if (!out_dense) out.copy_(o);
}

}  // namespace unetx::cuda
