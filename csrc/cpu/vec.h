// Vectorised loads and stores for the CPU kernels: elements of T (float, double, bfloat16, half) in, arithmetic in
// at::opmath_type<T> (float for the reduced-precision types), as ATen's own CPU kernels do it (at::vec::Vectorized,
// convert_to_float / convert_from_float).
//
// Vectorized<T> uses AVX2 / AVX-512 only where CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 is defined: ATen compiles
// its kernels once per capability and picks one at runtime. unetx's CPU kernels are compiled for the machine that
// builds them (-march=native by default, CMakeLists.txt), so the capability follows from the compiler's target
// macros here; a portable build (UNETX_NATIVE=OFF) gets ATen's generic Vectorized (plain loops over arrays).
// Include this header before any other ATen/cpu/vec header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace unetx::cpu {

template <typename T>
struct HalfLanes;

// kSize elements of T as kNV vectors of acc_t: one Vectorized<T> for float / double, two Vectorized<float> for
// bfloat16 / half (one Vectorized<T> holds twice as many elements).
template <typename T>
struct Lanes {
  using acc_t = at::opmath_type<T>;
  using V = at::vec::Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<T, acc_t>;
  static constexpr int kNV = kReduced ? 2 : 1;
  static constexpr int64_t kV = V::size();
  static constexpr int64_t kSize = kNV * kV;
  // bfloat16 with AVX2 and no AVX-512: a pack of kSize = 16 elements holds elements {0-3, 8-11} in v[0] and {4-7,
  // 12-15} in v[1], the order in which one 256-bit load widens by two 16-bit unpacks (ATen's order, v[0] = 0-7,
  // takes two zero-extensions and two shifts) and in which narrow's 32-to-16-bit pack comes back in memory order
  // without ATen's lane-crossing permute. AVX2 has no float-to-bfloat16 instruction, so these conversions are what
  // bound a bfloat16 pass there. Arithmetic lane by lane does not see the order; whatever reads a pack's lanes by
  // index goes through store_acc, and per-channel vectors come in through load_acc or load_par, which follow it. A
  // pack of n <= kV elements (a tail, with HalfLanes) keeps memory order in v[0].
  static constexpr bool kUnpacked =
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
      std::is_same_v<T, c10::BFloat16>;
#else
      false;
#endif
  struct Pack {
    V v[kNV];
  };

  static inline Pack load(const T* p) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kUnpacked) return unpack(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (kReduced) return Pack{{widen(half(p)), widen(half(p) + 1)}};
#endif
    if constexpr (kReduced) {
      auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
      return Pack{{a, b}};
    } else {
      return Pack{{V::loadu(p)}};
    }
  }
  // The first n elements (all kSize where n >= kSize); the other lanes are zero. Partial loads and stores serve the
  // tails of rows whose length is not a multiple of kSize.
  static inline Pack load(const T* p, int64_t n) {
    if (n >= kSize) return load(p);
    if constexpr (kReduced) {
      if (n <= kV) return Pack{{HalfLanes<T>::load(p, n).v[0], V(0)}};  // one load and conversion, not two
#if defined(CPU_CAPABILITY_AVX512)
      const auto rest = static_cast<__mmask16>((1u << (n - kV)) - 1u);
      return Pack{{widen(half(p)), widen(_mm256_maskz_loadu_epi16(rest, half(p) + 1))}};
#endif
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (kUnpacked) return unpack(at::vec::Vectorized<T>::loadu(p, n));
#endif
      auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
      return Pack{{a, b}};
    } else {
      return Pack{{V::loadu(p, n)}};
    }
  }
  // kSize acc_t lanes rounded to T. Where the CPU converts float to bfloat16 itself (AVX512_BF16: one instruction for
  // 32 lanes, round to nearest even, NaN stays NaN), that instruction; ATen's rounding in integer instructions
  // otherwise (16 per 16 bfloat16 lanes with AVX2, 15 in a kUnpacked pack's order), which makes the conversion back
  // the largest cost of a bf16 pass. The instruction treats float32 denormal inputs (below 1.2e-38) as zero, where
  // the integer rounding keeps them as bfloat16 denormals.
  static inline at::vec::Vectorized<T> narrow(const Pack& x) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return at::vec::Vectorized<T>((__m512i)_mm512_cvtne2ps_pbh(x.v[1], x.v[0]));
    }
#endif
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kUnpacked) return at::vec::Vectorized<T>(_mm256_packus_epi32(round16(x.v[0]), round16(x.v[1])));
#endif
    return at::vec::convert_from_float<T>(x.v[0], x.v[1]);
  }
  static inline void store(T* p, const Pack& x) {
    if constexpr (kReduced) {
      narrow(x).store(p);
    } else {
      x.v[0].store(p);
    }
  }
  static inline void store(T* p, const Pack& x, int64_t n) {
    if (n >= kSize) return store(p, x);
    if constexpr (kReduced) {
      if (n <= kV) return HalfLanes<T>::store(p, typename HalfLanes<T>::Pack{{x.v[0]}}, n);
      narrow(x).store(p, n);
    } else {
      x.v[0].store(p, n);
    }
  }
  // acc_t arrays in memory order (per-channel parameters, accumulators, rows), whole or the first n elements, as
  // packs in the order of a pack of that many elements of T (kUnpacked)
  static inline Pack load_acc(const acc_t* p) { return to_pack_order(load_mem(p, kSize)); }
  static inline Pack load_acc(const acc_t* p, int64_t n) {
    const Pack r = load_mem(p, n);
    return n > kV ? to_pack_order(r) : r;
  }
  static inline void store_acc(acc_t* p, const Pack& x) {
    store_mem(p, to_pack_order(x), kSize);  // the order is its own inverse
  }
  static inline void store_acc(acc_t* p, const Pack& x, int64_t n) { store_mem(p, n > kV ? to_pack_order(x) : x, n); }
  // Per-channel vectors that a loop reads for every pixel: par_order(p, C) once per call, then load_par(q + c, n)
  // for the chunk [c, c + n) where load_acc(p + c, n) would be, without reordering lanes per pixel. The copy has C
  // rounded up to kSize elements, each chunk as load_acc gives it.
  static inline std::vector<acc_t> par_order(const acc_t* p, int64_t C) {
    std::vector<acc_t> q(static_cast<size_t>((C + kSize - 1) / kSize * kSize), acc_t(0));
    for (int64_t c = 0; c < C; c += kSize) store_mem(q.data() + c, load_acc(p + c, C - c), kSize);
    return q;
  }
  static inline Pack load_par(const acc_t* q, int64_t n) { return load_mem(q, n > kV ? kSize : n); }
  static inline Pack broadcast(acc_t v) {
    Pack r;
    for (int j = 0; j < kNV; ++j) r.v[j] = V(v);
    return r;
  }

 private:
  // the first n elements of an acc_t array (all kSize where n >= kSize) as they lie in memory, the other lanes zero;
  // and the first n lanes stored as they are
  static inline Pack load_mem(const acc_t* p, int64_t n) {
    Pack r;
    for (int j = 0; j < kNV; ++j)
      r.v[j] = n >= kSize ? V::loadu(p + j * kV) : V::loadu(p + j * kV, std::clamp<int64_t>(n - j * kV, 0, kV));
    return r;
  }
  static inline void store_mem(acc_t* p, const Pack& x, int64_t n) {
    for (int j = 0; j < kNV; ++j) {
      if (n >= kSize) {
        x.v[j].store(p + j * kV);
      } else {
        const int64_t k = std::clamp<int64_t>(n - j * kV, 0, kV);
        if (k > 0) x.v[j].store(p + j * kV, k);
      }
    }
  }
  // a pack of acc_t read from memory order into a pack's order (and back: the swap is its own inverse)
  static inline Pack to_pack_order(const Pack& x) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kUnpacked) {
      const __m256 a = x.v[0], b = x.v[1];
      return Pack{{V(_mm256_permute2f128_ps(a, b, 0x20)), V(_mm256_permute2f128_ps(a, b, 0x31))}};
    }
#endif
    return x;
  }
#if defined(CPU_CAPABILITY_AVX2)
  // 16 bfloat16 elements widened in a pack's order: the 16-bit unpacks interleave zeros below each element
  static inline Pack unpack(__m256i v) {
    const __m256i z = _mm256_setzero_si256();
    return Pack{
        {V(_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v))), V(_mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v)))}};
  }
  // 8 floats rounded to bfloat16 in the low 16 bits of each 32-bit lane: ATen's cvtfp32_bf16 up to its pack (round
  // to nearest even; NaN becomes 0xffff), so the bits are ATen's
  static inline __m256i round16(__m256 a) {
    const __m256i b = _mm256_castps_si256(a);
    __m256i t = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    t = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(t, _mm256_set1_epi32(0x7fff)), b), 16);
    return _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), t, _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_ORD_Q)));
  }
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // kV elements of T (half a Vectorized<T>) widened to kV floats. Lanes::load widens each half of a pack straight
  // from memory (the load folds into the zero-extension): ATen's convert_to_float loads a whole Vectorized<T> and
  // extracts its upper half first, one more shuffle per kSize elements, and the shuffles are what bound a bfloat16
  // pass in cache.
#if defined(CPU_CAPABILITY_AVX512)
  using HalfBits = __m256i;
  using FloatBits = __m512;
#else
  using HalfBits = __m128i;
  using FloatBits = __m256;
#endif
  static inline const HalfBits* half(const T* p) { return reinterpret_cast<const HalfBits*>(p); }
  static inline V widen(const HalfBits* p) {
#if defined(CPU_CAPABILITY_AVX512)
    return widen(_mm256_loadu_si256(p));
#else
    return widen(_mm_loadu_si128(p));
#endif
  }
  static inline V widen(HalfBits h) {
    FloatBits f;
    at::vec::cvt_to_fp32<T>(h, f);  // ATen's, as HalfLanes::load
    return V(f);
  }
#endif
};

// The first kV lanes of Lanes<T> for a reduced-precision T: one acc_t vector. A tail of at most kV channels (16
// bfloat16 channels with AVX-512) as a Lanes<T>::Pack costs two loads' conversions and twice the arithmetic on a
// vector of zeros; as a HalfLanes<T>::Pack, one of each (pixels_map and the loops like it pick it for such tails).
template <typename T>
struct HalfLanes {
  using acc_t = at::opmath_type<T>;
  using V = at::vec::Vectorized<acc_t>;
  static constexpr int kNV = 1;
  static constexpr int64_t kSize = V::size();
  struct Pack {
    V v[1];
  };
  // the first n <= kSize elements; the other lanes are zero
  static inline Pack load(const T* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    __m512 lo;
    at::vec::cvt_to_fp32<T>(_mm256_maskz_loadu_epi16(mask(n), p), lo);
    return Pack{{V(lo)}};
#else
    return Pack{{std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n)))}};
#endif
  }
  // the lanes in memory order (a HalfLanes pack has no other)
  static inline void store_acc(acc_t* p, const Pack& x) { x.v[0].store(p); }
  static inline void store(T* p, const Pack& x, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_mask_storeu_epi16(p, mask(n), narrow(x.v[0]));
#else
    at::vec::convert_from_float<T>(x.v[0], V(0)).store(p, n);
#endif
  }

 private:
#if defined(CPU_CAPABILITY_AVX512)
  static inline __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  // kSize float lanes rounded to T, as Lanes<T>::narrow
  static inline __m256i narrow(const V& x) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
#if defined(__AVX512BF16__)
      return (__m256i)_mm512_cvtneps_pbh(x);
#else
      return at::vec::cvtfp32_bf16(__m512(x));
#endif
    } else {
      return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
  }
#endif
};

// Calls body(lanes, nt) for the partial chunk of C channels (nt = C % Lanes<T>::kSize channels, maybe 0): `lanes` is
// HalfLanes<T>{} where the tail fits in one vector (reduced T), else Lanes<T>{} (empty structs: `using LT =
// decltype(lanes);` in a generic lambda), so that a loop over pixels picks the tail's lanes once, outside it.
template <typename T, typename Body>
inline void with_tail_lanes(int64_t C, Body&& body) {
  using L = Lanes<T>;
  const int64_t nt = C % L::kSize;
  if constexpr (L::kReduced) {
    if (nt > 0 && nt <= L::kV) return body(HalfLanes<T>{}, nt);
  }
  body(L{}, nt);
}

// n contiguous elements of T into acc_t (widen_row) and back, rounded once (narrow_row): a row that a float32
// kernel (a GEMM) reads or writes, converted around it for a reduced-precision T. The lanes go through Lanes<T>'s
// own order and back (store_acc / load_acc), so memory order is kept.
template <typename T>
inline void widen_row(const T* src, at::opmath_type<T>* dst, int64_t n) {
  using L = Lanes<T>;
  for (int64_t i = 0; i < n; i += L::kSize) L::store_acc(dst + i, L::load(src + i, n - i), n - i);
}
template <typename T>
inline void narrow_row(const at::opmath_type<T>* src, T* dst, int64_t n) {
  using L = Lanes<T>;
  for (int64_t i = 0; i < n; i += L::kSize) L::store(dst + i, L::load_acc(src + i, n - i), n - i);
}

// Calls chunk(lanes, j, c, n) for pixels j < W and, for each, the channel chunks [c, c + n) of C channels: whole
// Lanes<T> chunks, then the partial one in the lanes with_tail_lanes picks (once, outside the pixel loop). chunk is a
// generic callable, taken by value like everything a pixel loop reads (see bn_relu.cpp's pixels_map).
template <typename T, typename Chunk>
inline void for_pixel_chunks(int64_t W, int64_t C, Chunk chunk) {
  using L = Lanes<T>;
  const int64_t full = C - C % L::kSize;
  with_tail_lanes<T>(C, [=](auto lanes, int64_t nt) {
    for (int64_t j = 0; j < W; ++j) {
      for (int64_t c = 0; c < full; c += L::kSize) chunk(L{}, j, c, L::kSize);
      if (nt) chunk(lanes, j, full, nt);
    }
  });
}

// Asks the CPU for the cache lines of n pixels' C channels (pixel stride ps elements) ahead of their use. For a
// channel slice of wider pixels (a concatenation's gradient read one part at a time) the hardware prefetchers do
// not keep enough lines in flight; in bfloat16, where the slice is half as many lines, the read waited on memory.
template <typename T>
inline void prefetch_pixels(const T* p, int64_t ps, int64_t n, int64_t C) {
  for (int64_t j = 0; j < n; ++j) {
    const auto a = reinterpret_cast<uintptr_t>(p + j * ps);
    const uintptr_t first = a & ~uintptr_t(63), last = (a + C * sizeof(T) - 1) & ~uintptr_t(63);
    for (uintptr_t l = first; l <= last; l += 64) __builtin_prefetch(reinterpret_cast<const void*>(l));
  }
}

// max(r, 0) lane by lane; NaN stays NaN (as torch.relu, which is ATen's clamp_min: one max instruction, whose
// operand order keeps a NaN r; -0 stays -0, as there). ATen's blendv on AVX-512 is four instructions.
template <typename V>
inline V relu_keep_nan(const V& r) {
  return at::vec::clamp_min(r, V(0));
}
// keep <= 0 ? 0 : g, lane by lane (a NaN in `keep` passes g, as threshold_backward)
template <typename V>
inline V mask_le0(const V& keep, const V& g) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(keep, _mm512_setzero_ps(), _CMP_NLE_UQ), g);
  }
#endif
  return V::blendv(g, V(0), keep <= V(0));
}

}  // namespace unetx::cpu
