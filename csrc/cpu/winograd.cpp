// CPU kernels: Winograd F(m x m, 3 x 3) convolution (m = 4 or 2) of a 3 x 3, stride-1, padding-1 convolution on
// dense channels-last float32 or bfloat16 operands: forward, input gradient and weight gradient. Operands and results
// are in their own dtype; the transforms, the tile products and every sum are float32 (bfloat16 values are read into
// float32 exactly, and results rounded once, as oneDNN's bfloat16 convolutions round theirs).
//
// With alpha = m + 2 and P = alpha^2 transform positions, the image is cut into m x m output tiles, each reading an
// alpha x alpha input window (zero outside the image). Per tile and channel
//     y = A^T [ (G g G^T) (.) (B^T d B) ] A,
// and the product (.) summed over input channels is, for each of the P positions, one GEMM over channels:
//     M[p] (tiles x Co) = V[p] (tiles x C) . U[p] (C x Co).
// F(4x4, 3x3) does 36 multiplications per 16 outputs where the direct convolution does 144 (4x fewer);
// F(2x2, 3x3) 16 per 4 (2.25x fewer), with a smaller rounding error (the error bound, measured, is in BENCHMARKS.md).
//
// The input gradient is the forward convolution of grad_y with the weight rotated by 180 degrees and its channel
// axes swapped. The weight gradient is the same bilinear form differentiated in g:
//     grad_g = G^T [ sum over tiles and pixels of (A dY A^T) (.) (B^T d B) ] G,
// i.e. for each position one GEMM over tiles, Z[p] (Co x C) += (A dY A^T)[p]^T . V[p], accumulated per thread.
//
// Cache blocking: tiles are processed in bands (R whole tile rows of one image): input transform -> P GEMMs ->
// output transform, with the band's transformed tensors (P * tiles * (C + Co) floats) sized to stay in the core's
// L2 cache, so the P/m^2 = 2.25x (m = 4) larger transformed tensors never go to memory. Bands run in parallel
// (at::parallel_for), each GEMM single-threaded inside it: oneDNN's JIT batch-reduce GEMM micro-kernel for the
// forward and input gradient (through ATen's cpublas::brgemm), MKL's sgemm for the weight gradient (whose operand
// the micro-kernel would need transposed). Where the transformed weight is too large to stay in cache, one large
// block at a time is split among the threads instead (by tiles for the transforms, by positions for the GEMMs).
//
// Fused input stage: where x is a layer's input stage (normalise + ReLU of the previous layer's pre-normalisation
// output, 2 x 2 average pool, upsample-concat), the forward and the weight gradient build each band's input rows
// (plus a one-row halo, rounded out to whole source rows) from the layer's own inputs into a per-thread buffer
// (StageRows), so the stage is never written to memory; about (R * m + 2) / (R * m) of the stage work is redone.
//
// Memory traffic: forward and input gradient read the input (or the stage's inputs) once and write the output once,
// plus the transformed weight (P * C * Co floats) read once per band (from cache where it fits). The weight gradient
// reads both operands once and writes the gradient once. Nothing is saved for backward.
//
// Transforms: the 1-D transforms written out with their common subexpressions (16 channels at a time, one AVX-512
// vector; the loops over the 16 lanes vectorise under -march=native), applied along rows then columns. The weight
// transforms (once per call, tiny) are computed in double precision.
//
// Non-finite values: a NaN or Inf in a tile's input window reaches every output of that tile that any of the
// window's pixels reaches in the direct convolution, and possibly more (the transforms mix the whole window), as
// NaN: where stock gives NaN or Inf, these kernels give NaN or Inf (an Inf may come out as NaN).
#include "cpu/vec.h"  // first: it sets the vector capability for ATen/cpu/vec

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

constexpr int kLanes = 16;  // channels per transform step: one AVX-512 vector of floats

// ---- the transform matrices (Lavin & Gray, points 0, +-1, +-2 for m = 4; 0, +-1 for m = 2)
template <int M>
struct Tile;

template <>
struct Tile<4> {
  static constexpr int A = 6;
  // G (A x 3): the filter transform, also the weight gradient's inverse transform (as G^T)
  static constexpr double G[6][3] = {{1.0 / 4, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                     {0, 0, 1}};
  // v = B^T d (A -> A): the input transform
  template <int VW>
  static inline void input(const float* __restrict d, int64_t ds, float* __restrict v, int64_t vs) {
#pragma omp simd
    for (int l = 0; l < VW; ++l) {
      const float d0 = d[l], d1 = d[ds + l], d2 = d[2 * ds + l], d3 = d[3 * ds + l], d4 = d[4 * ds + l],
                  d5 = d[5 * ds + l];
      v[l] = 4.f * d0 - 5.f * d2 + d4;
      v[vs + l] = (d3 + d4) - 4.f * (d1 + d2);
      v[2 * vs + l] = 4.f * (d1 - d2) + (d4 - d3);
      v[3 * vs + l] = 2.f * (d3 - d1) + (d4 - d2);
      v[4 * vs + l] = 2.f * (d1 - d3) + (d4 - d2);
      v[5 * vs + l] = 4.f * d1 - 5.f * d3 + d5;
    }
  }
  // y = A^T m (A -> M): the output transform
  template <int VW>
  static inline void output(const float* __restrict m, int64_t ms, float* __restrict y, int64_t ys) {
#pragma omp simd
    for (int l = 0; l < VW; ++l) {
      const float m0 = m[l], m1 = m[ms + l], m2 = m[2 * ms + l], m3 = m[3 * ms + l], m4 = m[4 * ms + l],
                  m5 = m[5 * ms + l];
      const float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
      y[l] = m0 + s12 + s34;
      y[ys + l] = d12 + 2.f * d34;
      y[2 * ys + l] = s12 + 4.f * s34;
      y[3 * ys + l] = d12 + 8.f * d34 + m5;
    }
  }
  // t = A dy (M -> A): the output gradient's transform for the weight gradient
  template <int VW>
  static inline void grad_output(const float* __restrict y, int64_t ys, float* __restrict t, int64_t ts) {
#pragma omp simd
    for (int l = 0; l < VW; ++l) {
      const float y0 = y[l], y1 = y[ys + l], y2 = y[2 * ys + l], y3 = y[3 * ys + l];
      const float e = y0 + y2, o = y1 + y3, e4 = y0 + 4.f * y2, o4 = 2.f * y1 + 8.f * y3;
      t[l] = y0;
      t[ts + l] = e + o;
      t[2 * ts + l] = e - o;
      t[3 * ts + l] = e4 + o4;
      t[4 * ts + l] = e4 - o4;
      t[5 * ts + l] = y3;
    }
  }
};

template <>
struct Tile<2> {
  static constexpr int A = 4;
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  template <int VW>
  static inline void input(const float* __restrict d, int64_t ds, float* __restrict v, int64_t vs) {
#pragma omp simd
    for (int l = 0; l < VW; ++l) {
      const float d0 = d[l], d1 = d[ds + l], d2 = d[2 * ds + l], d3 = d[3 * ds + l];
      v[l] = d0 - d2;
      v[vs + l] = d1 + d2;
      v[2 * vs + l] = d2 - d1;
      v[3 * vs + l] = d1 - d3;
    }
  }
  template <int VW>
  static inline void output(const float* __restrict m, int64_t ms, float* __restrict y, int64_t ys) {
#pragma omp simd
    for (int l = 0; l < VW; ++l) {
      const float m0 = m[l], m1 = m[ms + l], m2 = m[2 * ms + l], m3 = m[3 * ms + l];
      y[l] = m0 + m1 + m2;
      y[ys + l] = m1 - m2 - m3;
    }
  }
  template <int VW>
  static inline void grad_output(const float* __restrict y, int64_t ys, float* __restrict t, int64_t ts) {
#pragma omp simd
    for (int l = 0; l < VW; ++l) {
      const float y0 = y[l], y1 = y[ys + l];
      t[l] = y0;
      t[ts + l] = y0 + y1;
      t[2 * ts + l] = y0 - y1;
      t[3 * ts + l] = -y1;
    }
  }
};

// The tiling of one convolution: N images of H x W pixels, th x tw tiles of m x m outputs each.
struct Grid {
  int64_t N, H, W, th, tw, T;
  Grid(int64_t n, int64_t h, int64_t w, int m)
      : N(n), H(h), W(w), th((h + m - 1) / m), tw((w + m - 1) / m), T(n * th * tw) {}
};

// Tiles per block: the block's transformed input and output (P floats per tile and channel) within `budget`
// bytes, at least 8 tiles (GEMMs thinner than that are slower than the cache misses), and at most a fair share of
// the tiles per thread, so that every thread has work.
int64_t block_tiles(int64_t P, int64_t channels, int64_t T) {
  static const int64_t budget = [] {
    const char* s = std::getenv("UNETX_WINOGRAD_BLOCK_KIB");  // for tuning (bench/winograd.py --block-kib)
    const int64_t kib = s ? std::atoll(s) : 0;
    return (kib > 0 ? kib : 768) * 1024;
  }();
  const int64_t per_tile = P * channels * int64_t(sizeof(float));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t fair = (T + threads - 1) / threads;
  return std::max<int64_t>(1, std::min(fair, std::max<int64_t>(8, budget / per_tile)));
}

// Loads the alpha x alpha window at (h0, w0) of one image, channels [c, c + VW), zero outside the image; transforms
// it and stores position p = i * A + j at V + p * vs. Xi holds the image's rows from `lo` on (row h at
// Xi + (h - lo) * W * C): the whole image, or the rows of a band built for it (Source).
template <int M, int VW, typename T>
inline void input_tile(const T* Xi, int64_t lo, const Grid& g, int64_t C, int64_t h0, int64_t w0, int64_t c, float* V,
                       int64_t vs) {
  constexpr int A = Tile<M>::A;
  alignas(64) float d[A][A][VW], t[A][A][VW];
  const bool inside = h0 >= 0 && w0 >= 0 && h0 + A <= g.H && w0 + A <= g.W;
  for (int i = 0; i < A; ++i) {
    const int64_t h = h0 + i;
    for (int j = 0; j < A; ++j) {
      const int64_t w = w0 + j;
      if (inside || (h >= 0 && h < g.H && w >= 0 && w < g.W)) {
        const T* src = Xi + ((h - lo) * g.W + w) * C + c;
#pragma omp simd
        for (int l = 0; l < VW; ++l) d[i][j][l] = static_cast<float>(src[l]);
      } else {
#pragma omp simd
        for (int l = 0; l < VW; ++l) d[i][j][l] = 0.f;
      }
    }
  }
  for (int j = 0; j < A; ++j) Tile<M>::template input<VW>(&d[0][j][0], A * VW, &t[0][j][0], A * VW);
  for (int i = 0; i < A; ++i) Tile<M>::template input<VW>(&t[i][0][0], VW, V + i * A * vs + c, vs);
}

// Transforms the A x A products at Mp + p * ms (channels [c, c + VW)) back to the m x m outputs of the tile at
// (h0, w0) of image n, writing the ones inside the image; with BIAS plus bias[c + l], with RELU then relu'd (a NaN
// stays NaN, as torch.relu), both in float32 before the one rounding to T.
template <int M, int VW, bool BIAS, bool RELU, typename T>
inline void output_tile(const float* Mp, int64_t ms, const Grid& g, int64_t Co, int64_t n, int64_t h0, int64_t w0,
                        int64_t c, const float* bias, T* Y) {
  constexpr int A = Tile<M>::A;
  alignas(64) float t[M][A][VW], y[M][M][VW];
  for (int j = 0; j < A; ++j) Tile<M>::template output<VW>(Mp + j * ms + c, A * ms, &t[0][j][0], A * VW);
  for (int i = 0; i < M; ++i) Tile<M>::template output<VW>(&t[i][0][0], VW, &y[i][0][0], VW);
  // the epilogue on the float32 tile, apart from the stores: fused into the rounding loop below, the bfloat16 stores
  // stopped vectorising (2.4x slower layers)
  if constexpr (BIAS || RELU)
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < M; ++j) {
#pragma omp simd
        for (int l = 0; l < VW; ++l) {
          float v = y[i][j][l];
          if constexpr (BIAS) v += bias[c + l];
          if constexpr (RELU) v = v <= 0.f ? 0.f : v;
          y[i][j][l] = v;
        }
      }
  const int64_t hn = std::min<int64_t>(M, g.H - h0), wn = std::min<int64_t>(M, g.W - w0);
  for (int64_t i = 0; i < hn; ++i)
    for (int64_t j = 0; j < wn; ++j) {
      T* dst = Y + ((n * g.H + h0 + i) * g.W + w0 + j) * Co + c;
#pragma omp simd
      for (int l = 0; l < VW; ++l) dst[l] = static_cast<T>(y[i][j][l]);
    }
}

// Batch statistics of the forward's output, accumulated while it is written (training layers): every piece of work
// (a band, or a chunk of a shared block's tiles) sums its stored outputs' differences from its own pivot (its
// first output pixel, per channel) in float32, 16 tiles at a time, then in double; the pieces' (count, mean, M2)
// are merged in double (Chan et al.'s pairwise update), so a large mean cancels no more than in batch_stats.
class StatsSink {
 public:
  explicit StatsSink(int64_t Co) : Co_(Co), mean_(Co, 0.0), m2_(Co, 0.0) {}
  void merge(int64_t n, const double* mean, const double* m2) {
    std::lock_guard<std::mutex> lock(mu_);
    const double na = double(n_), nb = double(n), nn = na + nb;
    for (int64_t c = 0; c < Co_; ++c) {
      const double d = mean[c] - mean_[c];
      mean_[c] += d * nb / nn;
      m2_[c] += m2[c] + d * d * na * nb / nn;
    }
    n_ += n;
  }
  int64_t count() const { return n_; }
  double mean(int64_t c) const { return mean_[c]; }
  double var(int64_t c) const { return std::max(m2_[c] / double(n_), 0.0); }

 private:
  int64_t Co_, n_ = 0;
  std::vector<double> mean_, m2_;
  std::mutex mu_;
};

template <typename T>
class PieceStats {
 public:
  explicit PieceStats(int64_t Co) : Co_(Co), piv_(Co), s1_(Co), s2_(Co), d1_(Co), d2_(Co) {}
  // the outputs of the m x m tile at (h0, w0) of image n (those inside the image), just stored
  template <int M>
  void add_tile(const T* Y, const Grid& g, int64_t n, int64_t h0, int64_t w0) {
    const int64_t hn = std::min<int64_t>(M, g.H - h0), wn = std::min<int64_t>(M, g.W - w0);
    const T* first = Y + ((n * g.H + h0) * g.W + w0) * Co_;
    if (count_ == 0)
      for (int64_t c = 0; c < Co_; ++c) {
        const float v = static_cast<float>(first[c]);
        piv_[c] = std::isfinite(v) ? v : 0.f;  // an Inf pivot would make every difference Inf - Inf = NaN
      }
    const float* __restrict piv = piv_.data();
    float* __restrict s1 = s1_.data();
    float* __restrict s2 = s2_.data();
    for (int64_t i = 0; i < hn; ++i)
      for (int64_t j = 0; j < wn; ++j) {
        const T* __restrict y = first + (i * g.W + j) * Co_;
#pragma omp simd
        for (int64_t c = 0; c < Co_; ++c) {
          const float d = static_cast<float>(y[c]) - piv[c];
          s1[c] += d;
          s2[c] += d * d;
        }
      }
    count_ += hn * wn;
    if (++tiles_ % 16 == 0) spill();
  }
  // into the sink, and start again
  void flush(StatsSink& sink) {
    if (count_ == 0) return;
    spill();
    const double n = double(count_);
    for (int64_t c = 0; c < Co_; ++c) {
      const double m1 = d1_[c] / n;
      d2_[c] -= d1_[c] * m1;  // M2 about the piece's own mean
      d1_[c] = piv_[c] + m1;  // the piece's mean
    }
    sink.merge(count_, d1_.data(), d2_.data());
    std::fill(d1_.begin(), d1_.end(), 0.0);
    std::fill(d2_.begin(), d2_.end(), 0.0);
    count_ = tiles_ = 0;
  }

 private:
  void spill() {
    for (int64_t c = 0; c < Co_; ++c) d1_[c] += s1_[c], d2_[c] += s2_[c];
    std::fill(s1_.begin(), s1_.end(), 0.f);
    std::fill(s2_.begin(), s2_.end(), 0.f);
  }
  int64_t Co_, count_ = 0, tiles_ = 0;
  std::vector<float> piv_, s1_, s2_;
  std::vector<double> d1_, d2_;
};

// The forward's output epilogue: bias (float32, one per output channel) added and ReLU applied in the output
// transform, so that an eval layer (BatchNorm folded into weight and bias, ReLU fused) writes its output once; with
// `stats`, the output's batch statistics accumulated there too (training layers).
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
  StatsSink* stats = nullptr;
};

// Loads the m x m output gradient of the tile at (h0, w0) (zero outside the image), transforms it to A x A and
// stores position p at T + p * ts.
template <int M, int VW, typename T>
inline void grad_output_tile(const T* GY, const Grid& g, int64_t Co, int64_t n, int64_t h0, int64_t w0, int64_t c,
                             float* Tp, int64_t ts) {
  constexpr int A = Tile<M>::A;
  alignas(64) float y[M][M][VW], t[A][M][VW];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < M; ++j) {
      if (h0 + i < g.H && w0 + j < g.W) {
        const T* src = GY + ((n * g.H + h0 + i) * g.W + w0 + j) * Co + c;
#pragma omp simd
        for (int l = 0; l < VW; ++l) y[i][j][l] = static_cast<float>(src[l]);
      } else {
#pragma omp simd
        for (int l = 0; l < VW; ++l) y[i][j][l] = 0.f;
      }
    }
  for (int j = 0; j < M; ++j) Tile<M>::template grad_output<VW>(&y[0][j][0], M * VW, &t[0][j][0], M * VW);
  for (int i = 0; i < A; ++i) Tile<M>::template grad_output<VW>(&t[i][0][0], VW, Tp + i * A * ts + c, ts);
}

// Runs f<VW>(c) over channels [0, C): 16 at a time, then one at a time.
template <typename F>
inline void over_channels(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) f.template operator()<kLanes>(c);
  for (; c < C; ++c) f.template operator()<1>(c);
}

// U[p][ci][co] = (G w[co][ci] G^T)[p] for the forward (C = w.size(1) inputs, Co = w.size(0) outputs); with
// `adjoint`, the input gradient's weight: w rotated by 180 degrees, channel axes swapped (U[p][co][ci]). The weight
// is read in its own dtype T (float32 or bfloat16, converted exactly) and strides: a model's weights are often
// channels-last (module.to(memory_format=torch.channels_last)), and a contiguous float32 copy of them cost a
// weight-sized copy per call, two per layer and step.
template <int M, typename T>
at::Tensor transform_weight(const at::Tensor& weight, bool adjoint) {
  constexpr int A = Tile<M>::A, P = A * A;
  const int64_t O = weight.size(0), I = weight.size(1);
  const int64_t rows = adjoint ? O : I, cols = adjoint ? I : O;  // U[p] is rows x cols: GEMM inputs x outputs
  auto U = at::empty({P, rows, cols}, weight.options().dtype(at::kFloat));
  const T* Wp = weight.const_data_ptr<T>();
  const int64_t so = weight.stride(0), si = weight.stride(1);
  int64_t tap[9];  // offset of tap k = 3 * kh + kw within one [o][i] filter
  for (int k = 0; k < 9; ++k) tap[k] = (k / 3) * weight.stride(2) + (k % 3) * weight.stride(3);
  float* Up = U.data_ptr<float>();
  // row by row of U[p], vectorised over the row (cols): the 9 taps gathered into rows of g, then the two 1-D
  // transforms, each position's stores sequential
  at::parallel_for(0, rows, grain_for(9 * P * cols), [&](int64_t rb, int64_t re) {
    std::unique_ptr<double[]> g(new double[9 * cols]), t(new double[A * 3 * cols]);
    for (int64_t r = rb; r < re; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const T* src = Wp + (adjoint ? r : c) * so + (adjoint ? c : r) * si;
        for (int k = 0; k < 9; ++k)  // 180-degree rotation: 8 - k
          g[k * cols + c] = static_cast<float>(src[tap[adjoint ? 8 - k : k]]);
      }
      for (int x = 0; x < A; ++x)
        for (int bb = 0; bb < 3; ++bb) {
          double* __restrict tp = t.get() + (x * 3 + bb) * cols;
          const double *g0 = g.get() + bb * cols, *g1 = g0 + 3 * cols, *g2 = g0 + 6 * cols;
          const double c0 = Tile<M>::G[x][0], c1 = Tile<M>::G[x][1], c2 = Tile<M>::G[x][2];
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) tp[c] = c0 * g0[c] + c1 * g1[c] + c2 * g2[c];
        }
      for (int x = 0; x < A; ++x)
        for (int y = 0; y < A; ++y) {
          float* __restrict up = Up + ((x * A + y) * rows + r) * cols;
          const double *t0 = t.get() + x * 3 * cols, *t1 = t0 + cols, *t2 = t0 + 2 * cols;
          const double c0 = Tile<M>::G[y][0], c1 = Tile<M>::G[y][1], c2 = Tile<M>::G[y][2];
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) up[c] = float(c0 * t0[c] + c1 * t1[c] + c2 * t2[c]);
        }
    }
  });
  return U;
}

// Transformed weights kept across calls (hold_weight_transforms, cpu/kernels.h): for each held weight, the
// forward's U per tile size, computed by its first call and reused while the weight and its version stand. An eval
// layer's weight does not change between calls, and its transform is weight-sized work that dominates a call at
// the deepest levels (few tiles, most channels). Entries are found by the weight's TensorImpl: the weak reference
// keeps the address from being reused by another tensor while the entry stands.
// What a weight's values may change by without a new TensorImpl: an in-place op (its version) or `.data =` /
// set_() (its storage, shape, strides or dtype; no version bump).
struct WeightState {
  int64_t version = -1;
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  bool operator==(const WeightState&) const = default;
};

WeightState state_of(const at::Tensor& w) {
  return {int64_t(w._version()), w.const_data_ptr(), w.sizes().vec(), w.strides().vec(), w.scalar_type()};
}

struct HeldWeight {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
  at::Tensor U[2];          // tile 2, tile 4
  WeightState computed[2];  // the weight's state each U was computed from
  bool chosen[2] = {false, false};
};

std::mutex& held_mutex() {
  static std::mutex m;
  return m;
}

std::vector<HeldWeight>& held() {
  static std::vector<HeldWeight> h;
  return h;
}

// Under held_mutex: entries whose weight was freed go, with their transforms.
void drop_expired() {
  auto& h = held();
  h.erase(std::remove_if(h.begin(), h.end(), [](const HeldWeight& e) { return e.weight.expired(); }), h.end());
}

// The entry of `weight` (expired ones dropped first), or null; under held_mutex.
HeldWeight* held_entry(const at::Tensor& weight) {
  drop_expired();
  for (auto& e : held())
    if (e.weight._unsafe_get_target() == weight.unsafeGetTensorImpl()) return &e;
  return nullptr;
}

// The forward's transformed weight (not the adjoint's: held weights are eval weights, never differentiated); computed
// outside the lock, so that the transform's threads never wait on it.
template <int M, typename T>
at::Tensor forward_transform(const at::Tensor& weight) {
  const int slot = M == 4 ? 1 : 0;
  WeightState state;  // read before the transform: a change during it means another one
  {
    std::lock_guard<std::mutex> lock(held_mutex());
    HeldWeight* e = held_entry(weight);
    if (!e) return transform_weight<M, T>(weight, /*adjoint=*/false);  // not held (may be an inference tensor)
    state = state_of(weight);
    if (e->U[slot].defined() && e->computed[slot] == state) return e->U[slot];
  }
  auto U = transform_weight<M, T>(weight, /*adjoint=*/false);
  std::lock_guard<std::mutex> lock(held_mutex());
  if (HeldWeight* e = held_entry(weight)) e->U[slot] = U, e->computed[slot] = state;
  return U;
}

// Where the transformed weight (P * C * Co floats) is larger than this, a block's GEMMs would stream it from
// memory once per block: blocks are then made large and split among the threads by position instead (each
// position's slice of the weight read once per block).
int64_t streamed_weight_bytes() {
  static const int64_t bytes = [] {
    const char* s = std::getenv("UNETX_WINOGRAD_SHARED_KIB");  // for tuning
    const int64_t kib = s ? std::atoll(s) : 0;
    return (kib > 0 ? kib : 8192) * 1024;
  }();
  return bytes;
}

// The shared-block path, for the forward and the weight gradient alike: whether the transformed weight of P
// positions is streamed (see streamed_weight_bytes), and the tiles of one shared block: as many as the weight has
// floats per position / 256, so that its traffic stays below the GEMM's own.
bool weight_streamed(int64_t P, int64_t C, int64_t Co) {
  return P * C * Co * int64_t(sizeof(float)) > streamed_weight_bytes();
}

int64_t shared_block_tiles(const Grid& g, int64_t C, int64_t Co) {
  return std::min(g.T, std::max<int64_t>(256, C * Co / 256));
}

// The tiles of block `blk` (B tiles from tile blk * B): f(t, n, h0, w0) for each, the tile's index in the block,
// its image and its output origin.
template <int M, typename F>
inline void for_tiles(const Grid& g, int64_t t0, int64_t t1, int64_t first, F&& f) {
  const int64_t per_image = g.th * g.tw;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n = tile / per_image, ty = tile % per_image / g.tw, tx = tile % g.tw;
    f(tile - first, n, ty * M, tx * M);
  }
}

// The operand x of a forward or a weight gradient: dense [N, H, W, C] in memory, or a layer's input stage built
// from the layer's own inputs a band of rows at a time (StageRows: normalise + ReLU, 2 x 2 pool, upsample-concat)
// into a per-thread buffer that stays in cache, so the stage is never written to memory.
template <typename T>
struct Source {
  const T* X = nullptr;  // where rows is null
  const StageRows* rows = nullptr;
};

// Bands: R tile rows of one image, the unit of work of the band-wise paths; about `B` tiles each, and at least as
// many bands as threads where the image rows allow.
struct Bands {
  int64_t R, per_image, count;
};

Bands bands(const Grid& g, int64_t B) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t R = std::max<int64_t>(1, (B + g.tw / 2) / g.tw);
  R = std::min(R, std::max<int64_t>(1, g.N * g.th / threads));
  const int64_t per_image = (g.th + R - 1) / R;
  return {R, per_image, g.N * per_image};
}

// Rows of the buffer a band's input is built in: the band's R * m rows, one halo row on each side, rounded out to
// the source's alignment.
template <typename T>
int64_t band_buffer_rows(const Source<T>& src, const Grid& g, int64_t R, int M) {
  const int64_t align = std::max<int64_t>(1, src.rows->align);
  return std::min(g.H, R * M + 2 + 2 * (align - 1));
}

// Image n's input rows for tile rows [ty0, ty1): its rows in memory, or those rows built into `buf`; `lo` is the
// first row held.
template <int M, typename T>
inline const T* band_input(const Source<T>& src, const Grid& g, int64_t C, int64_t n, int64_t ty0, int64_t ty1, T* buf,
                           int64_t& lo) {
  if (!src.rows) {
    lo = 0;
    return src.X + n * g.H * g.W * C;
  }
  const int64_t align = std::max<int64_t>(1, src.rows->align);
  lo = std::max<int64_t>(0, ty0 * M - 1) / align * align;
  const int64_t hi = std::min(g.H, (std::min(g.H, ty1 * M + 1) + align - 1) / align * align);
  auto view = at::from_blob(buf, {1, C, hi - lo, g.W}, {(hi - lo) * g.W * C, 1, g.W * C, C},
                            at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  src.rows->fill(n, lo, hi, view);
  return buf;
}

// Floats between consecutive transform positions of a block's transformed tensors (`tiles` x `channels` each),
// padded by a cache line: unpadded, the stride is often a multiple of 4 KiB, and the P stores (loads) of one tile's
// transform would all fall in one L1 cache set.
inline int64_t position_stride(int64_t tiles, int64_t channels) {
  return tiles * channels + 16;
}

// The whole of x in memory (the paths that share one block among the threads, small images only): src.X, or the
// stage built image by image into `dense`.
template <typename T>
const T* whole_input(const Source<T>& src, const Grid& g, int64_t C, at::Tensor& dense) {
  if (!src.rows) return src.X;
  dense = at::empty(
      {g.N, C, g.H, g.W},
      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value).memory_format(at::MemoryFormat::ChannelsLast));
  for (int64_t n = 0; n < g.N; ++n) {
    auto image = dense.narrow(0, n, 1);
    src.rows->fill(n, 0, g.H, image);
  }
  return dense.const_data_ptr<T>();
}

// y = conv3x3(x, U) for x [N, H, W, C] and U [P, C, Co] (a transformed weight), y [N, H, W, Co].
template <int M, typename T>
void conv_impl(const Source<T>& src, const float* U, T* Y, const Grid& g, int64_t C, int64_t Co, Epilogue ep) {
  constexpr int A = Tile<M>::A, P = A * A;
  // one tile's outputs, all channels; then, with statistics, their sums (read back from L1) into `st`
  auto output = [&](const float* Mb, int64_t ms, int64_t t, int64_t n, int64_t h0, int64_t w0, PieceStats<T>* st) {
    auto tiles = [&]<bool BIAS, bool RELU>() {
      over_channels(Co, [&]<int VW>(int64_t c) {
        output_tile<M, VW, BIAS, RELU>(Mb + t * Co, ms, g, Co, n, h0, w0, c, ep.bias, Y);
      });
    };
    if (ep.bias && ep.relu)
      tiles.template operator()<true, true>();
    else if (ep.bias)
      tiles.template operator()<true, false>();
    else if (ep.relu)
      tiles.template operator()<false, true>();
    else
      tiles.template operator()<false, false>();
    if (st) st->template add_tile<M>(Y, g, n, h0, w0);
  };
  auto piece_stats = [&]() { return std::unique_ptr<PieceStats<T>>(ep.stats ? new PieceStats<T>(Co) : nullptr); };
  if (weight_streamed(P, C, Co)) {
    // shared blocks, each step split among the threads (by tiles, by positions, by tiles)
    at::Tensor dense;
    const T* X = whole_input(src, g, C, dense);
    const int64_t B = shared_block_tiles(g, C, Co);
    const int64_t vs = position_stride(B, C), ms = position_stride(B, Co);
    std::unique_ptr<float[]> V(new float[P * vs]), Mb(new float[P * ms]);
    for (int64_t t0 = 0; t0 < g.T; t0 += B) {
      const int64_t nb = std::min(B, g.T - t0);
      at::parallel_for(t0, t0 + nb, 1, [&](int64_t b, int64_t e) {
        for_tiles<M>(g, b, e, t0, [&](int64_t t, int64_t n, int64_t h0, int64_t w0) {
          const T* Xi = X + n * g.H * g.W * C;
          over_channels(
              C, [&]<int VW>(int64_t c) { input_tile<M, VW>(Xi, 0, g, C, h0 - 1, w0 - 1, c, V.get() + t * C, vs); });
        });
      });
      at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
        for (int64_t p = b; p < e; ++p)
          block_gemm(nb, Co, C, V.get() + p * vs, C, U + p * C * Co, Co, false, Mb.get() + p * ms, Co);
      });
      at::parallel_for(t0, t0 + nb, 1, [&](int64_t b, int64_t e) {
        auto st = piece_stats();
        for_tiles<M>(g, b, e, t0, [&](int64_t t, int64_t n, int64_t h0, int64_t w0) {
          output(Mb.get(), ms, t, n, h0, w0, st.get());
        });
        if (st) st->flush(*ep.stats);
      });
    }
    return;
  }
  // bands in parallel, each: its input rows (built, where the source is a stage) -> input transform -> P GEMMs ->
  // output transform, all within the thread's cache
  const Bands bd = bands(g, block_tiles(P, C + Co, g.T));
  const int64_t cap = bd.R * g.tw;
  at::parallel_for(0, bd.count, 1, [&](int64_t b0, int64_t b1) {
    const int64_t vs = position_stride(cap, C), ms = position_stride(cap, Co);
    std::unique_ptr<float[]> V(new float[P * vs]), Mb(new float[P * ms]);
    std::unique_ptr<T[]> rows(src.rows ? new T[band_buffer_rows(src, g, bd.R, M) * g.W * C] : nullptr);
    auto st = piece_stats();  // this thread's bands, one piece
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk / bd.per_image, ty0 = blk % bd.per_image * bd.R, ty1 = std::min(g.th, ty0 + bd.R);
      const int64_t nb = (ty1 - ty0) * g.tw;
      int64_t lo;
      const T* Xi = band_input<M>(src, g, C, n, ty0, ty1, rows.get(), lo);
      for (int64_t t = 0; t < nb; ++t) {
        const int64_t h0 = (ty0 + t / g.tw) * M, w0 = t % g.tw * M;
        over_channels(
            C, [&]<int VW>(int64_t c) { input_tile<M, VW>(Xi, lo, g, C, h0 - 1, w0 - 1, c, V.get() + t * C, vs); });
      }
      for (int64_t p = 0; p < P; ++p)
        block_gemm(nb, Co, C, V.get() + p * vs, C, U + p * C * Co, Co, false, Mb.get() + p * ms, Co);
      for (int64_t t = 0; t < nb; ++t) output(Mb.get(), ms, t, n, (ty0 + t / g.tw) * M, t % g.tw * M, st.get());
    }
    if (st) st->flush(*ep.stats);
  });
}

// grad_w [Co, C, 3, 3] (gw, any strides, T) of y = conv3x3(x, w) from gy [N, H, W, Co] and x [N, H, W, C].
template <int M, typename T>
void weight_grad_impl(const T* GY, const Source<T>& src, at::Tensor& gw, const Grid& g, int64_t C, int64_t Co) {
  constexpr int A = Tile<M>::A, P = A * A;
  // shared: one accumulator, large blocks split among the threads by position (see conv_impl); else one
  // accumulator per thread, each thread a contiguous range of bands
  const bool shared = weight_streamed(P, C, Co);
  const int64_t B = shared_block_tiles(g, C, Co);
  const Bands bd = bands(g, block_tiles(P, C + Co, g.T));
  const int64_t threads = shared ? 1 : std::min<int64_t>(at::get_num_threads(), bd.count);
  // Z[t][p] is Co x C (row-major), i.e. C x Co column-major for the BLAS; not zeroed: each accumulator's first
  // product overwrites it (beta 0, which BLAS defines as not reading it)
  auto Z = at::empty({threads, P, Co, C}, gw.options().dtype(at::kFloat));
  float* Zp = Z.data_ptr<float>();
  auto transform = [&](const T* Xi, int64_t lo, float* V, float* Tg, int64_t cap, int64_t t, int64_t n, int64_t h0,
                       int64_t w0) {
    const int64_t vs = position_stride(cap, C), ts = position_stride(cap, Co);
    over_channels(C, [&]<int VW>(int64_t c) { input_tile<M, VW>(Xi, lo, g, C, h0 - 1, w0 - 1, c, V + t * C, vs); });
    over_channels(Co, [&]<int VW>(int64_t c) { grad_output_tile<M, VW>(GY, g, Co, n, h0, w0, c, Tg + t * Co, ts); });
  };
  // Z[p] (C x Co, column-major) = beta Z[p] + V[p]^T (C x nb) . Tg[p] (nb x Co)
  auto gemms = [&](const float* V, const float* Tg, int64_t cap, float* Zt, int64_t nb, int64_t p0, int64_t p1,
                   float beta) {
    for (int64_t p = p0; p < p1; ++p)
      gemm(false, true, C, Co, nb, V + p * position_stride(cap, C), C, Tg + p * position_stride(cap, Co), Co, beta,
           Zt + p * Co * C, C);
  };
  if (shared) {
    at::Tensor dense;
    const T* X = whole_input(src, g, C, dense);
    std::unique_ptr<float[]> V(new float[P * position_stride(B, C)]), Tg(new float[P * position_stride(B, Co)]);
    for (int64_t t0 = 0; t0 < g.T; t0 += B) {
      const int64_t nb = std::min(B, g.T - t0);
      at::parallel_for(t0, t0 + nb, 1, [&](int64_t b, int64_t e) {
        for_tiles<M>(g, b, e, t0, [&](int64_t t, int64_t n, int64_t h0, int64_t w0) {
          transform(X + n * g.H * g.W * C, 0, V.get(), Tg.get(), B, t, n, h0, w0);
        });
      });
      const float beta = t0 == 0 ? 0.f : 1.f;
      at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) { gemms(V.get(), Tg.get(), B, Zp, nb, b, e, beta); });
    }
  } else {
    const int64_t cap = bd.R * g.tw;
    auto run = [&](int64_t tid) {
      // at least one band each (threads <= bd.count): every accumulator is written
      const int64_t b0 = bd.count * tid / threads, b1 = bd.count * (tid + 1) / threads;
      std::unique_ptr<float[]> V(new float[P * position_stride(cap, C)]), Tg(new float[P * position_stride(cap, Co)]);
      std::unique_ptr<T[]> rows(src.rows ? new T[band_buffer_rows(src, g, bd.R, M) * g.W * C] : nullptr);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n = blk / bd.per_image, ty0 = blk % bd.per_image * bd.R, ty1 = std::min(g.th, ty0 + bd.R);
        const int64_t nb = (ty1 - ty0) * g.tw;
        int64_t lo;
        const T* Xi = band_input<M>(src, g, C, n, ty0, ty1, rows.get(), lo);
        for (int64_t t = 0; t < nb; ++t)
          transform(Xi, lo, V.get(), Tg.get(), cap, t, n, (ty0 + t / g.tw) * M, t % g.tw * M);
        gemms(V.get(), Tg.get(), cap, Zp + tid * P * Co * C, nb, 0, P, blk == b0 ? 0.f : 1.f);
      }
    };
    if (threads <= 1) {
      run(0);
    } else {
      at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
        for (int64_t t = tb; t < te; ++t) run(t);
      });
    }
  }
  // gw[co][ci] = G^T (sum over threads of Z[t][.][co][ci]) G, in double, rounded to float32 and then to gw's dtype
  // (as a float32 result converted by .to()), written through gw's strides
  T* GW = gw.data_ptr<T>();
  const int64_t so = gw.stride(0), si = gw.stride(1), sh = gw.stride(2), sw = gw.stride(3);
  at::parallel_for(0, Co * C, grain_for(P * threads), [&](int64_t b, int64_t e) {
    for (int64_t oc = b; oc < e; ++oc) {
      double z[A][A];
      for (int p = 0; p < P; ++p) {
        double s = 0;
        for (int64_t t = 0; t < threads; ++t) s += Zp[(t * P + p) * Co * C + oc];
        z[p / A][p % A] = s;
      }
      double u[3][A];
      for (int k = 0; k < 3; ++k)
        for (int y = 0; y < A; ++y) {
          double s = 0;
          for (int x = 0; x < A; ++x) s += Tile<M>::G[x][k] * z[x][y];
          u[k][y] = s;
        }
      for (int k = 0; k < 3; ++k)
        for (int l = 0; l < 3; ++l) {
          double s = 0;
          for (int y = 0; y < A; ++y) s += u[k][y] * Tile<M>::G[y][l];
          GW[(oc / C) * so + (oc % C) * si + k * sh + l * sw] = static_cast<T>(float(s));
        }
    }
  });
}

void check_tile(int64_t m, const char* op) {
  TORCH_CHECK(m == 2 || m == 4, op, ": tile must be 2 or 4 (F(2x2,3x3) or F(4x4,3x3)), got ", m);
}

void check_operand(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": expected 4-D ", name, ", got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": expected float32 or bfloat16 ",
              name, ", got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na, const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " is ", a.scalar_type(), " but ", nb, " is ",
              b.scalar_type(), "; give both in one dtype");
}

void check_weight(const at::Tensor& w, const char* op) {
  check_operand(w, op, "weight");
  TORCH_CHECK(w.size(2) == 3 && w.size(3) == 3, op, ": expected a 3x3 weight, got shape ", w.sizes());
}

// With `rows`, x (the forward's) is a placeholder for its shape, its values built band by band (Source). `out`: the
// forward's output epilogue (bias, ReLU, batch statistics; Epilogue).
at::Tensor conv(const at::Tensor& x, const StageRows* rows, const at::Tensor& weight, int64_t m, bool adjoint,
                const char* op, const ConvEpilogue& out_ep = {}) {
  const at::Tensor* bias = out_ep.bias;
  const bool relu = out_ep.relu;
  check_tile(m, op);
  check_operand(x, op, adjoint ? "grad_y" : "x");
  check_weight(weight, op);
  const int64_t in = adjoint ? weight.size(0) : weight.size(1), out = adjoint ? weight.size(1) : weight.size(0);
  TORCH_CHECK(x.size(1) == in, op, ": weight ", weight.sizes(), " expects ", in, " channels in ",
              adjoint ? "grad_y" : "x", ", got ", x.sizes());
  check_same_dtype(x, weight, op, adjoint ? "grad_y" : "x", "weight");
  const auto xc = rows ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  auto y = at::empty({N, out, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  at::Tensor bias_f;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": expected a bias of shape [", out, "], got ",
                bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous();  // a bfloat16 bias exactly
  }
  const bool stats = out_ep.mean != nullptr;
  TORCH_INTERNAL_ASSERT(!stats || (out_ep.var && out_ep.mean->numel() == out && out_ep.var->numel() == out), op,
                        ": mean and var of one value per output channel");
  if (in == 0) {  // the output is the epilogue of zero
    y.zero_();
    if (bias) y.add_(bias_f.view({1, -1, 1, 1}));
    if (relu) y.relu_();
    if (stats) batch_stats(y, *out_ep.mean, *out_ep.var);
    return y;
  }
  const Grid g(N, H, W, int(m));
  StatsSink sink(stats ? out : 0);
  const Epilogue ep{bias ? bias_f.const_data_ptr<float>() : nullptr, relu, stats ? &sink : nullptr};
  // inputs and outputs in T; transforms, tile products and accumulation in float32
  with_io_type(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const Source<T> src{rows ? nullptr : xc.template const_data_ptr<T>(), rows};
    if (m == 4) {
      const auto U = adjoint ? transform_weight<4, T>(weight, true) : forward_transform<4, T>(weight);
      conv_impl<4>(src, U.template const_data_ptr<float>(), y.template data_ptr<T>(), g, in, out, ep);
    } else {
      const auto U = adjoint ? transform_weight<2, T>(weight, true) : forward_transform<2, T>(weight);
      conv_impl<2>(src, U.template const_data_ptr<float>(), y.template data_ptr<T>(), g, in, out, ep);
    }
  });
  if (stats) {
    TORCH_INTERNAL_ASSERT(sink.count() == N * H * W, op, ": statistics of ", sink.count(), " outputs, not ", N * H * W);
    auto mean = at::empty({out}, at::kDouble), var = at::empty({out}, at::kDouble);
    double* Mn = mean.data_ptr<double>();
    double* Vr = var.data_ptr<double>();
    bool finite = true;
    for (int64_t c = 0; c < out; ++c) {
      Mn[c] = sink.mean(c), Vr[c] = sink.var(c);
      finite = finite && std::isfinite(Mn[c]) && std::isfinite(Vr[c]);
    }
    if (finite) {
      out_ep.mean->copy_(mean);
      out_ep.var->copy_(var);
    } else {  // an Inf or NaN output: batch_stats's exact semantics (an Inf mean stays Inf, not Inf - Inf)
      batch_stats(y, *out_ep.mean, *out_ep.var);
    }
  }
  return y;
}

// With `like` (a weight of the gradient's shape), the gradient takes its layout where it is dense channels-last.
at::Tensor wino_weight_grad(const at::Tensor& grad_y, const at::Tensor& x, const StageRows* rows, int64_t tile,
                            const at::Tensor* like = nullptr) {
  const char* op = "unetx.winograd_conv3x3_weight_grad";
  check_tile(tile, op);
  check_operand(grad_y, op, "grad_y");
  check_operand(x, op, "x");
  TORCH_CHECK(grad_y.size(0) == x.size(0) && grad_y.size(2) == x.size(2) && grad_y.size(3) == x.size(3), op,
              ": grad_y ", grad_y.sizes(), " does not match x ", x.sizes(), " (a 'same' convolution's output)");
  check_same_dtype(grad_y, x, op, "grad_y", "x");
  const int64_t N = x.size(0), C = x.size(1), Co = grad_y.size(1), H = x.size(2), W = x.size(3);
  // accumulated in float32 whatever the operands' dtype, written in theirs
  const bool cl = like && like->sizes() == at::IntArrayRef{Co, C, 3, 3} && !like->is_contiguous() &&
                  like->is_contiguous(at::MemoryFormat::ChannelsLast);
  auto gw = at::empty({Co, C, 3, 3},
                      x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (gw.numel() == 0) return gw;
  if (N * H * W == 0) return gw.zero_();
  const auto gyc = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const auto xc = rows ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  const Grid g(N, H, W, int(tile));
  with_io_type(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const Source<T> src{rows ? nullptr : xc.template const_data_ptr<T>(), rows};
    if (tile == 4)
      weight_grad_impl<4>(gyc.template const_data_ptr<T>(), src, gw, g, C, Co);
    else
      weight_grad_impl<2>(gyc.template const_data_ptr<T>(), src, gw, g, C, Co);
  });
  return gw;
}

}  // namespace

at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight, int64_t tile) {
  return conv(x, nullptr, weight, tile, /*adjoint=*/false, "unetx.winograd_conv3x3");
}

at::Tensor winograd_conv3x3_input_grad(const at::Tensor& grad_y, const at::Tensor& weight, int64_t tile) {
  return conv(grad_y, nullptr, weight, tile, /*adjoint=*/true, "unetx.winograd_conv3x3_input_grad");
}

at::Tensor winograd_conv3x3_weight_grad(const at::Tensor& grad_y, const at::Tensor& x, int64_t tile) {
  return wino_weight_grad(grad_y, x, nullptr, tile);
}

void hold_weight_transforms(const at::Tensor& weight) {
  TORCH_CHECK(weight.defined() && weight.device().is_cpu(), "unetx.hold_weight_transforms: expected a CPU tensor, got ",
              weight.defined() ? weight.device().str() : std::string("an undefined tensor"));
  TORCH_CHECK(!weight.is_inference(), "unetx.hold_weight_transforms: an inference tensor has no version counter to ",
              "tell an in-place change by; hold a normal tensor (made outside torch.inference_mode)");
  std::lock_guard<std::mutex> lock(held_mutex());
  if (!held_entry(weight))
    held().push_back({c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(weight.getIntrusivePtr())});
}

void release_weight_transforms(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(held_mutex());
  if (HeldWeight* e = held_entry(weight)) held().erase(held().begin() + (e - held().data()));
}

// A tile chosen for any of the weight's input shapes stays held (a model predicting on images of two sizes may
// choose differently for each, and would otherwise transform again at every switch); tiles never chosen go.
void drop_unchosen_weight_transforms(const at::Tensor& weight, int64_t tile) {
  std::lock_guard<std::mutex> lock(held_mutex());
  if (HeldWeight* e = held_entry(weight))
    for (int slot = 0; slot < 2; ++slot) {
      e->chosen[slot] = e->chosen[slot] || tile == (slot == 1 ? 4 : 2);
      if (!e->chosen[slot]) e->U[slot].reset();
    }
}

std::pair<int64_t, int64_t> held_weight_transforms() {
  std::lock_guard<std::mutex> lock(held_mutex());
  drop_expired();
  int64_t bytes = 0;
  for (const auto& e : held())
    for (const auto& u : e.U)
      if (u.defined()) bytes += u.nbytes();
  return {int64_t(held().size()), bytes};
}

at::Tensor winograd3x3(const at::Tensor& a, const at::Tensor& b, int64_t op, int64_t tile, const StageRows* rows,
                       const ConvEpilogue& out) {
  TORCH_INTERNAL_ASSERT(op == 0 || (!out.bias && !out.relu && !out.mean),
                        "unetx: a Winograd epilogue is for the forward only");
  TORCH_INTERNAL_ASSERT(op == 2 || !out.layout_of, "unetx: layout_of is for the Winograd weight gradient only");
  switch (op) {
    case 0:
      return conv(a, rows, b, tile, /*adjoint=*/false, "unetx.winograd_conv3x3", out);
    case 1:
      return winograd_conv3x3_input_grad(a, b, tile);
    default:
      return wino_weight_grad(a, b, rows, tile, out.layout_of);
  }
}

}  // namespace unetx::cpu
