// Device helpers shared by the unetx CUDA kernels: 16-byte packed loads/stores, the thread mappings of the two
// layouts, launch geometry, and the per-channel reductions (plain sums, and Welford/Chan moments).
//
// Layouts. Kernels address every tensor through its own four strides, so an output may be a channel slice of a
// concatenation buffer and an input a slice of a gradient. The main tensor's layout picks the thread mapping:
//   planar (NCHW-like):        a work item is V consecutive elements along W of one (n, c, h) row;
//   channels-last (NHWC-like): a work item is V consecutive channels of one (n, h, w) pixel.
// V = 16 bytes / element size when every tensor the kernel touches allows one aligned 16-byte access per item
// (unit stride along the vectorised dimension, its size and the other strides multiples of V, base aligned),
// otherwise V = 1 (same kernel, scalar accesses). A tensor in neither layout is still handled exactly, just slower.
//
// Indices: work items are counted in 32 bits and split with multiply-shift dividers (IntDivider); the host checks
// the range and raises a clear error past it. Memory offsets are 64-bit.
//
// The same file compiles for the host (UNETX_HOST_EMULATION, see host_emulation.h): kernels are launched through
// launch(), never <<<...>>>, and the few CUDA runtime calls sit behind DeviceGuard / current_stream() /
// multiprocessor_count(), so the host run executes every kernel with the launch geometry a GPU would get.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "common/layout.h"

#ifdef UNETX_HOST_EMULATION
#include "cuda/host_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace unetx::cuda {

// ------------------------------------------------------------------------------------------------ device access
#ifdef UNETX_HOST_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
struct Stream {};
inline Stream current_stream() {
  return {};
}
// kernel<<<grid, block, 0, stream>>>(args...), run by the emulator's threads
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, Stream, void (*kernel)(P...), const A&... args) {
  emu::launch(grid, block, kernel, args...);
}
// The emulated GPU's multiprocessor count (it sets the grids): UNETX_EMU_SMS, default 1.
inline int multiprocessor_count() {
  return std::max(1, emu::env_int("UNETX_EMU_SMS", 1));
}
#define UNETX_EMU_CHECK_ALIGNED(p, bytes) ::unetx::emu::check_aligned(p, bytes)
#else
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = c10::cuda::CUDAStream;
inline Stream current_stream() {
  return c10::cuda::getCurrentCUDAStream();
}
// kernel<<<grid, block, 0, stream>>>(args...), checked
template <typename... P, typename... A>
void launch(dim3 grid, dim3 block, Stream stream, void (*kernel)(P...), const A&... args) {
  // a .cuh is formatted as C++, which would split the launch's >>>
  // clang-format off
  kernel<<<grid, block, 0, stream.stream()>>>(static_cast<P>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
inline int multiprocessor_count() {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = c10::cuda::current_device();
  if (dev < 64) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}
#define UNETX_EMU_CHECK_ALIGNED(p, bytes) ((void)0)
#endif

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarp = 32;

template <typename T>
using acc_t = at::opmath_type<T>;  // float for float/half/bfloat16, double for double (acc_type() on the host side)

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access

using Div = at::cuda::detail::IntDivider<unsigned int>;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive elements, converted to A. N > 1: one aligned vector access (the host checked alignment).
template <int N, typename T, typename A>
__device__ __forceinline__ void load(const T* p, A (&out)[N]) {
  if constexpr (N > 1) {
    UNETX_EMU_CHECK_ALIGNED(p, sizeof(Pack<T, N>));
    const Pack<T, N> v = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v.v[i]);
  } else {
    out[0] = static_cast<A>(*p);
  }
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store(T* p, const A (&in)[N]) {
  if constexpr (N > 1) {
    Pack<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
    UNETX_EMU_CHECK_ALIGNED(p, sizeof(Pack<T, N>));
    *reinterpret_cast<Pack<T, N>*>(p) = v;
  } else {
    *p = static_cast<T>(in[0]);
  }
}

struct Strides4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
  Strides4() = default;
  explicit Strides4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  __device__ __forceinline__ int64_t at(int64_t nn, int64_t cc, int64_t hh, int64_t ww) const {
    return nn * n + cc * c + hh * h + ww * w;
  }
};

// Splits an item index j of a walk over (d0, d1, d2, d3) (d3 innermost) into its coordinates.
struct Walk4 {
  Div d1, d2, d3;
  Walk4(int64_t s1, int64_t s2, int64_t s3)
      : d1(static_cast<unsigned int>(std::max<int64_t>(s1, 1))),
        d2(static_cast<unsigned int>(std::max<int64_t>(s2, 1))),
        d3(static_cast<unsigned int>(std::max<int64_t>(s3, 1))) {}
  __device__ __forceinline__ void split(unsigned int j, unsigned int& i0, unsigned int& i1, unsigned int& i2,
                                        unsigned int& i3) const {
    const auto a = d3.divmod(j);
    const auto b = d2.divmod(a.div);
    const auto c = d1.divmod(b.div);
    i3 = a.mod;
    i2 = b.mod;
    i1 = c.mod;
    i0 = c.div;
  }
};

// ------------------------------------------------------------------------------------------------ host side
// Whether items of n consecutive elements along dim `inner` can each move as one aligned access everywhere in t.
inline bool vec_ok(const at::Tensor& t, int inner, int n) {
  if (n == 1) return true;
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (static_cast<uintptr_t>(n) * t.element_size()) != 0)
    return false;
  if (t.size(inner) % n != 0 || (t.size(inner) > 1 && t.stride(inner) != 1)) return false;
  for (int d = 0; d < 4; ++d)
    if (d != inner && t.size(d) > 1 && t.stride(d) % n != 0) return false;
  return true;
}

// The kernels count work items in 32 bits.
inline void check_items(int64_t items, const char* op, const at::Tensor& t) {
  TORCH_CHECK(items < std::numeric_limits<int32_t>::max(), op, ": tensor of shape ", t.sizes(),
              " is too large for one CUDA launch (", items,
              " work items, at most 2^31 - 1); split the batch into smaller chunks");
}

// Blocks of kThreads that keep every SM full (8 resident blocks each); grid-stride loops cover the rest.
inline int64_t resident_blocks() {
  return 8 * static_cast<int64_t>(multiprocessor_count());
}

inline unsigned int elementwise_grid(int64_t items) {
  return static_cast<unsigned int>(std::clamp<int64_t>((items + kThreads - 1) / kThreads, 1, 4 * resident_blocks()));
}

// Reductions write one partial per (channel, block) and a second kernel combines them: deterministic, no atomics.
// Blocks per channel group: enough to fill the GPU, no more than the work has items for.
inline unsigned int reduction_blocks(int64_t items_per_group, int64_t items_per_block_step, int64_t groups) {
  const int64_t useful = (items_per_group + items_per_block_step - 1) / items_per_block_step;
  const int64_t wanted = (resident_blocks() + groups - 1) / std::max<int64_t>(groups, 1);
  return static_cast<unsigned int>(std::clamp<int64_t>(std::min(useful, wanted), 1, 65535));
}

// Channels-last reductions write C partials per block: each thread walks at least this many pixels, so the partials
// stay small next to the data (e.g. 1024 channels at 32 x 32: ~10% instead of ~75% of the bytes read).
constexpr int64_t kMinPixelsPerThread = 8;

// Channels-last reductions: a (bx, by) block; x spans channel chunks (a power of two up to a warp), y pixels.
inline dim3 channels_last_block(int64_t chunks) {
  int bx = 1;
  while (bx < chunks && bx < kWarp) bx *= 2;
  return dim3(bx, kThreads / bx);
}

// ------------------------------------------------------------------------------------------------ reductions
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a 1-D block of kThreads; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* sm /* kThreads / kWarp */) {
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // sm may still be read from a previous call
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < kThreads / kWarp; ++w) v += sm[w];
  return v;
}

// Count, mean and sum of squared deviations of a set of values; merge() is Chan et al.'s pairwise combination,
// exact in exact arithmetic and stable in floating point (no difference of two large sums).
template <typename A>
struct Moments {
  A n, mean, m2;
};

template <typename A>
__device__ __forceinline__ void merge(Moments<A>& a, A nb, A mb, A m2b) {
  const A n = a.n + nb;
  if (n == A(0)) return;
  const A d = mb - a.mean;
  const A f = nb / n;
  a.mean += d * f;
  a.m2 += m2b + d * d * a.n * f;
  a.n = n;
}

template <typename A>
__device__ __forceinline__ void warp_merge(Moments<A>& m) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const A nb = __shfl_down_sync(0xffffffffu, m.n, o);
    const A mb = __shfl_down_sync(0xffffffffu, m.mean, o);
    const A m2b = __shfl_down_sync(0xffffffffu, m.m2, o);
    merge(m, nb, mb, m2b);
  }
}

}  // namespace unetx::cuda
