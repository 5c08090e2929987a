// CPU kernel: a dense channels-last tensor copied into planar (NCHW) layout, for the weight gradient that
// conv_bn_relu's backward computes in planar layout (see LayerKernels::to_planar).
//
// Reads and writes each element once (2T per element). ATen's copy_ between the two layouts walks the output in
// order and gathers the input with a stride of C elements (far below memory bandwidth; BENCHMARKS.md); transposing
// 32 x 32 tiles keeps both sides within cache lines. With AVX-512 each tile is transposed in vector registers by
// ATen's at::vec::transpose_mxn (shuffles for 4- and 2-byte elements); its generic version (other capabilities) is a
// scalar loop that writes across the output's rows, slower than the loop here, which writes along them.
#include "cpu/vec.h"  // first: selects ATen's vector capability

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

constexpr int64_t kTile = 32;

// One image: in is [P, C] (pixels, channels), out is [C, P].
template <typename T>
void transpose_tiles(const T* __restrict__ in, T* __restrict__ out, int64_t P, int64_t C, int64_t tile_begin,
                     int64_t tile_end, int64_t tiles_c) {
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t p0 = (t / tiles_c) * kTile, c0 = (t % tiles_c) * kTile;
    const int64_t p1 = std::min(p0 + kTile, P), c1 = std::min(c0 + kTile, C);
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (sizeof(T) == 4 || sizeof(T) == 2) {
      // the bits are moved, not interpreted: float / BFloat16 name the element size for ATen's kernel
      using E = std::conditional_t<sizeof(T) == 4, float, c10::BFloat16>;
      at::vec::transpose_mxn<E>(reinterpret_cast<const E*>(in + p0 * C + c0), C,
                                reinterpret_cast<E*>(out + c0 * P + p0), P, int(p1 - p0), int(c1 - c0));
      continue;
    }
#endif
    for (int64_t c = c0; c < c1; ++c) {
      const T* __restrict__ src = in + c;
      T* __restrict__ dst = out + c * P;
      for (int64_t p = p0; p < p1; ++p) dst[p] = src[p * C];
    }
  }
}

// Elements are moved, not interpreted: dispatch on the element size only.
template <typename T>
void to_planar_impl(const at::Tensor& x, at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const int64_t tiles_p = (P + kTile - 1) / kTile, tiles_c = (C + kTile - 1) / kTile, tiles = tiles_p * tiles_c;
  const T* X = static_cast<const T*>(x.const_data_ptr());
  T* O = static_cast<T*>(out.data_ptr());
  at::parallel_for(0, N * tiles, grain_for(kTile * kTile), [&](int64_t b, int64_t e) {
    while (b < e) {
      const int64_t n = b / tiles, t0 = b % tiles, t1 = std::min(tiles, t0 + (e - b));
      transpose_tiles(X + n * P * C, O + n * P * C, P, C, t0, t1, tiles_c);
      b += t1 - t0;
    }
  });
}

}  // namespace

at::Tensor to_planar(const at::Tensor& x) {
  if (x.dim() != 4 || x.is_contiguous() || !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x.contiguous();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  switch (x.element_size()) {
    case 2:
      to_planar_impl<uint16_t>(x, out);
      break;
    case 4:
      to_planar_impl<uint32_t>(x, out);
      break;
    case 8:
      to_planar_impl<uint64_t>(x, out);
      break;
    default:
      out.copy_(x);
  }
  return out;
}

}  // namespace unetx::cpu
