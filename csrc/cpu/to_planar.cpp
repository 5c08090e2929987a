// CPU kernel: a dense channels-last tensor copied into planar (NCHW) layout, for the weight gradient that
// conv_bn_relu's backward computes in planar layout (see LayerKernels::to_planar).
//
// Reads and writes each element once (2T per element). ATen's copy_ between the two layouts walks the output in
// order and gathers the input with a stride of C elements (far below memory bandwidth; BENCHMARKS.md); transposing
// 32 x 32 tiles keeps both sides within cache lines. With AVX-512 each tile is transposed in vector registers by
// ATen's at::vec::transpose_mxn (shuffles for 4- and 2-byte elements). With AVX2 ATen has it for 8 x 8 floats only,
// so 4-byte tiles go through that in 8 x 8 blocks and 2-byte ones through the 8 x 8 unpack network below; its
// generic version (other capabilities, and the tiles' edges) is a scalar loop that writes across the output's rows,
// slower than the loop here, which writes along them. A scalar transpose moves one element per load and store
// whatever its size, so a 2-byte one took ~0.6x the 4-byte one's time, not ~0.5x (bench/bf16_passes.py).
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

#if defined(CPU_CAPABILITY_AVX2)
// 8 x 8 2-byte elements: row i of src (stride ls) into column i of dst (stride ld), by three rounds of unpacks
inline void transpose8x8_16(const uint16_t* src, int64_t ls, uint16_t* dst, int64_t ld) {
  __m128i r[8], s[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ls));
  // rows a..h: s[2k] = a0 b0 a1 b1 a2 b2 a3 b3 for rows (2k, 2k + 1), s[2k + 1] the same for elements 4-7
  for (int k = 0; k < 4; ++k) {
    s[2 * k] = _mm_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
    s[2 * k + 1] = _mm_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
  }
  // r[4h + j] = elements 2j, 2j + 1 of rows 4h..4h + 3: a0 b0 c0 d0 a1 b1 c1 d1 for j = 0
  for (int h = 0; h < 2; ++h) {
    r[4 * h] = _mm_unpacklo_epi32(s[4 * h], s[4 * h + 2]);
    r[4 * h + 1] = _mm_unpackhi_epi32(s[4 * h], s[4 * h + 2]);
    r[4 * h + 2] = _mm_unpacklo_epi32(s[4 * h + 1], s[4 * h + 3]);
    r[4 * h + 3] = _mm_unpackhi_epi32(s[4 * h + 1], s[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * j * ld), _mm_unpacklo_epi64(r[j], r[4 + j]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j + 1) * ld), _mm_unpackhi_epi64(r[j], r[4 + j]));
  }
}
#endif

// in [P, C] -> out [C, P] for pixels [p0, p1) and channels [c0, c1), element by element along the output's rows
template <typename T>
inline void scalar_block(const T* __restrict__ in, T* __restrict__ out, int64_t P, int64_t C, int64_t p0, int64_t p1,
                         int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const T* __restrict__ src = in + c;
    T* __restrict__ dst = out + c * P;
    for (int64_t p = p0; p < p1; ++p) dst[p] = src[p * C];
  }
}

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
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (sizeof(T) == 4 || sizeof(T) == 2) {
      // whole 8 x 8 blocks in registers, then the tile's edges (p1 - p0 or c1 - c0 not a multiple of 8) below
      const int64_t pe = p0 + (p1 - p0) / 8 * 8, ce = c0 + (c1 - c0) / 8 * 8;
      for (int64_t p = p0; p < pe; p += 8)
        for (int64_t c = c0; c < ce; c += 8) {
          if constexpr (sizeof(T) == 4)
            at::vec::transpose_mxn<float, 8, 8>(reinterpret_cast<const float*>(in + p * C + c), C,
                                                reinterpret_cast<float*>(out + c * P + p), P);
          else
            transpose8x8_16(reinterpret_cast<const uint16_t*>(in + p * C + c), C,
                            reinterpret_cast<uint16_t*>(out + c * P + p), P);
        }
      scalar_block(in, out, P, C, pe, p1, c0, c1);
      scalar_block(in, out, P, C, p0, pe, ce, c1);
      continue;
    }
#endif
    scalar_block(in, out, P, C, p0, p1, c0, c1);
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
