// CPU kernels: the activation relu((x - mean[c]) * scale[c] + shift[c]) (BatchNorm + ReLU with the batch statistics
// and affine parameters folded into mean/scale/shift) with optional fused 2x2 average pooling, the kernels
// of the ops bn_relu / bn_relu_pool / avg_pool2x2 (csrc/ops.cpp).
//
// Memory traffic per element of x (T = element size):
//   forward:  read T (x), write T (z) and/or T/4 (p).       Saved for backward: nothing new (x is the caller's).
//   backward: read T (x) + T (grad_z) and/or T/4 (grad_p), write T (grad_x); grad_scale = sum(g * (x - mean)) (centred,
//             as BatchNorm's backward: no cancellation when |mean| >> std) and grad_shift = sum(g) reduced in the
//             same pass (double accumulators).
#include "cpu/vec.h"  // first: selects ATen's vector capability

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  Strides() : n(0), c(0), h(0), w(0) {}
};

// Channels-last tensors iterate (n, h) rows with channels innermost; planar ones iterate (n, c) planes with the
// width innermost. Either way the innermost stride is 1 (the callers make it so), which lets the loops vectorise.

inline void check_inner_unit(const at::Tensor& t, bool cl) {
  TORCH_INTERNAL_ASSERT(t.size(cl ? 1 : 3) == 1 || t.stride(cl ? 1 : 3) == 1,
                        "unetx: kernel needs a unit inner stride");
}

// f(v) = relu((v - m) * s + t) when ACT, else v
template <bool ACT, typename acc_t>
inline acc_t act(acc_t v, acc_t m, acc_t s, acc_t t) {
  if constexpr (ACT) {
    const acc_t r = (v - m) * s + t;
    return r <= acc_t(0) ? acc_t(0) : r;  // NaN stays NaN, as torch.relu
  } else {
    return v;
  }
}

// act() on a pack's lanes: params m, s, t per lane (a Lanes pack; x may be a HalfLanes pack, its first vector)
template <bool ACT, typename P, typename Q>
inline P act_v(P x, const Q& m, const Q& s, const Q& t) {
  if constexpr (ACT) {
    for (int j = 0; j < int(sizeof(x.v) / sizeof(x.v[0])); ++j)
      x.v[j] = relu_keep_nan(at::vec::fmadd(x.v[j] - m.v[j], s.v[j], t.v[j]));
  }
  return x;
}
template <typename P>
inline P add4_quarter(const P& a, const P& b, const P& c, const P& d) {
  using V = std::decay_t<decltype(a.v[0])>;
  P r;
  for (int j = 0; j < int(sizeof(a.v) / sizeof(a.v[0])); ++j) r.v[j] = (a.v[j] + b.v[j] + c.v[j] + d.v[j]) * V(0.25);
  return r;
}

// out[w * os + c] = f(c, n)(in[w * is + c]) for W pixels of C channels: whole kSize-channel chunks, then the partial
// one (n < kSize lanes, its op made once; with_tail_lanes). f(c, n) returns the op on chunk [c, c + n), a generic
// callable of a Lanes or HalfLanes pack. Everything the loop reads is an argument or captured by value: the vector
// stores may alias any memory, so values reached through a caller's by-reference captures would be reloaded after
// every store.
template <typename T, typename F>
inline void pixels_map(const T* in, int64_t is, T* out, int64_t os, int64_t W, int64_t C, F f) {
  using L = Lanes<T>;
  const int64_t full = C - C % L::kSize;
  with_tail_lanes<T>(C, [=](auto lanes, int64_t nt) {
    using LT = decltype(lanes);
    const auto tail = f(full, nt);  // nt == 0: masked loads of nothing, never used
    for (int64_t w = 0; w < W; ++w) {
      const T* ip = in + w * is;
      T* op = out + w * os;
      for (int64_t c = 0; c < full; c += L::kSize) L::store(op + c, f(c, L::kSize)(L::load(ip + c)));
      if (nt) LT::store(op + full, tail(LT::load(ip + full, nt)), nt);
    }
  });
}

// One pooled output row: for Wo output pixels, each input pixel of its 2 x 2 window (x: pixel stride xw, row stride
// xh) through f(c, n) (as pixels_map), into z (when given) and averaged into p. Arguments by value, as pixels_map.
template <typename T, typename F>
inline void pool_pixels(const T* x, int64_t xw, int64_t xh, T* p, int64_t pw, T* z, int64_t zw, int64_t zh, int64_t Wo,
                        int64_t C, F f) {
  using L = Lanes<T>;
  const auto chunk = [=](auto lanes, const auto& op, int64_t wo, int64_t c, int64_t n) {
    using LL = decltype(lanes);
    const T* a0 = x + 2 * wo * xw + c;
    const auto v00 = op(LL::load(a0, n)), v01 = op(LL::load(a0 + xw, n));
    const auto v10 = op(LL::load(a0 + xh, n)), v11 = op(LL::load(a0 + xh + xw, n));
    if (z) {
      T* q = z + 2 * wo * zw + c;
      LL::store(q, v00, n);
      LL::store(q + zw, v01, n);
      LL::store(q + zh, v10, n);
      LL::store(q + zh + zw, v11, n);
    }
    LL::store(p + wo * pw + c, add4_quarter(v00, v01, v10, v11), n);
  };
  const int64_t full = C - C % L::kSize;
  with_tail_lanes<T>(C, [=](auto lanes, int64_t nt) {
    const auto tail = f(full, nt);  // nt == 0: masked loads of nothing, never used
    for (int64_t wo = 0; wo < Wo; ++wo) {
      for (int64_t c = 0; c < full; c += L::kSize) chunk(L{}, f(c, L::kSize), wo, c, L::kSize);
      if (nt) chunk(lanes, tail, wo, full, nt);
    }
  });
}

template <typename T, bool ACT>
void forward_loops(const at::Tensor& x, const float* M, const float* S, const float* Tt, const double* Md,
                   const double* Sd, const double* Td, at::Tensor* z, at::Tensor* p) {
  using acc_t = at::opmath_type<T>;
  using L = Lanes<T>;
  using Pk = typename L::Pack;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool pool = p != nullptr;
  const bool cl = is_channels_last(x);
  const Strides xs(x), zs = z ? Strides(*z) : Strides(), ps = p ? Strides(*p) : Strides();
  const T* X = x.const_data_ptr<T>();
  T* Z = z ? z->data_ptr<T>() : nullptr;
  T* P = p ? p->data_ptr<T>() : nullptr;
  // per-channel parameters in acc_t
  const acc_t* m;
  const acc_t* s;
  const acc_t* t;
  if constexpr (std::is_same_v<acc_t, double>) {
    m = Md, s = Sd, t = Td;
  } else {
    m = M, s = S, t = Tt;
  }
  const int64_t Ho = H / 2, Wo = W / 2;

  if (!cl) {
    at::parallel_for(0, N * C, grain_for(H * W), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const acc_t mc = ACT ? m[c] : acc_t(0), sc = ACT ? s[c] : acc_t(1), tc = ACT ? t[c] : acc_t(0);
        const T* xb = X + n * xs.n + c * xs.c;
        if (!pool) {
          T* zb = Z + n * zs.n + c * zs.c;
          const Pk mv = L::broadcast(mc), sv = L::broadcast(sc), tv = L::broadcast(tc);
          for (int64_t h = 0; h < H; ++h) {
            const T* __restrict__ xr = xb + h * xs.h;
            T* __restrict__ zr = zb + h * zs.h;
            for (int64_t w = 0; w < W; w += L::kSize)
              L::store(zr + w, act_v<ACT>(L::load(xr + w, W - w), mv, sv, tv), W - w);
          }
          continue;
        }
        T* pb = P + n * ps.n + c * ps.c;
        T* zb = Z ? Z + n * zs.n + c * zs.c : nullptr;
        for (int64_t ho = 0; ho < Ho; ++ho) {
          const T* __restrict__ r0 = xb + 2 * ho * xs.h;
          const T* __restrict__ r1 = r0 + xs.h;
          T* __restrict__ pr = pb + ho * ps.h;
          if (zb) {
            T* __restrict__ z0 = zb + 2 * ho * zs.h;
            T* __restrict__ z1 = z0 + zs.h;
            for (int64_t wo = 0; wo < Wo; ++wo) {
              const acc_t v00 = act<ACT>(acc_t(r0[2 * wo]), mc, sc, tc),
                          v01 = act<ACT>(acc_t(r0[2 * wo + 1]), mc, sc, tc);
              const acc_t v10 = act<ACT>(acc_t(r1[2 * wo]), mc, sc, tc),
                          v11 = act<ACT>(acc_t(r1[2 * wo + 1]), mc, sc, tc);
              z0[2 * wo] = T(v00);
              z0[2 * wo + 1] = T(v01);
              z1[2 * wo] = T(v10);
              z1[2 * wo + 1] = T(v11);
              pr[wo] = T((v00 + v01 + v10 + v11) * acc_t(0.25));
            }
          } else {
#pragma omp simd
            for (int64_t wo = 0; wo < Wo; ++wo) {
              const acc_t v00 = act<ACT>(acc_t(r0[2 * wo]), mc, sc, tc),
                          v01 = act<ACT>(acc_t(r0[2 * wo + 1]), mc, sc, tc);
              const acc_t v10 = act<ACT>(acc_t(r1[2 * wo]), mc, sc, tc),
                          v11 = act<ACT>(acc_t(r1[2 * wo + 1]), mc, sc, tc);
              pr[wo] = T((v00 + v01 + v10 + v11) * acc_t(0.25));
            }
          }
        }
      }
    });
    return;
  }
  // channels-last: rows of W pixels with C contiguous channels each
  const int64_t rows = N * (pool ? Ho : H);
  // the parameters in the order the pixel loops load them (Lanes::par_order)
  std::vector<acc_t> mo, so, to;
  if constexpr (ACT) mo = L::par_order(m, C), so = L::par_order(s, C), to = L::par_order(t, C);
  // the activation of channels [c, c + nc), its parameters loaded once (pixels_map, pool_pixels)
  const auto act_chunk = [m = mo.data(), s = so.data(), t = to.data()](int64_t c, int64_t nc) {
    Pk mv, sv, tv;
    if constexpr (ACT) mv = L::load_par(m + c, nc), sv = L::load_par(s + c, nc), tv = L::load_par(t + c, nc);
    return [mv, sv, tv](const auto& v) { return act_v<ACT>(v, mv, sv, tv); };
  };
  at::parallel_for(0, rows, grain_for((pool ? 4 : 1) * W * C), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / (pool ? Ho : H), h = r % (pool ? Ho : H);
      if (!pool)
        pixels_map(X + n * xs.n + h * xs.h, xs.w, Z + n * zs.n + h * zs.h, zs.w, W, C, act_chunk);
      else
        pool_pixels(X + n * xs.n + 2 * h * xs.h, xs.w, xs.h, P + n * ps.n + h * ps.h, ps.w,
                    Z ? Z + n * zs.n + 2 * h * zs.h : nullptr, zs.w, zs.h, Wo, C, act_chunk);
    }
  });
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor* m, const at::Tensor* s, const at::Tensor* t, at::Tensor* z,
                  at::Tensor* p) {
  using acc_t = at::opmath_type<T>;
  const bool cl = is_channels_last(x);
  check_inner_unit(x, cl);
  if (z) check_inner_unit(*z, cl);
  if (p) check_inner_unit(*p, cl);
  const acc_t* M = s ? m->const_data_ptr<acc_t>() : nullptr;
  const acc_t* S = s ? s->const_data_ptr<acc_t>() : nullptr;
  const acc_t* Tt = s ? t->const_data_ptr<acc_t>() : nullptr;
  const auto cast_f = [](const acc_t* v) { return reinterpret_cast<const float*>(v); };
  const auto cast_d = [](const acc_t* v) { return reinterpret_cast<const double*>(v); };
  if (s)
    forward_loops<T, true>(x, cast_f(M), cast_f(S), cast_f(Tt), cast_d(M), cast_d(S), cast_d(Tt), z, p);
  else
    forward_loops<T, false>(x, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, z, p);
}

// One vector of the activation's backward: g masked where the recomputed pre-activation (x - m) * s + t <= 0 (a NaN
// one passes g), returned times s; sum(g * (x - m)) and sum(g) accumulated into v1 and v2 (the centred grad_scale and
// grad_shift sums).
template <typename V>
inline V act_backward_v(const V& x, const V& g, const V& m, const V& s, const V& t, V& v1, V& v2) {
  const V d = x - m;
  const V gg = mask_le0(at::vec::fmadd(d, s, t), g);
  v1 = at::vec::fmadd(gg, d, v1);
  v2 = v2 + gg;
  return gg * s;
}

// The channels-last backward of channels [0, n) (n <= LL::kSize) of one row of W pixels, pointers at the chunk's
// first channel and pixel strides: g = gz + gp(pooled position) / 4 (each optional), masked by the recomputed
// pre-activation (x; without x, gx = g), gx = g * s; the row's sums of g * (x - m) and g per lane into l1 / l2
// (LL::kSize lanes each). Arguments by value: see pixels_map. gx may be gz (no __restrict__).
template <typename LL, typename T, typename Q>
inline void backward_pixels(const T* gz, int64_t gzw, const T* gp, int64_t gpw, const T* x, int64_t xw, T* gx,
                            int64_t gxw, int64_t W, int64_t n, const Q& mv, const Q& sv, const Q& tv,
                            typename LL::acc_t* l1, typename LL::acc_t* l2) {
  using V = typename LL::V;
  using Pk = typename LL::Pack;
  Pk v1, v2;
  for (int j = 0; j < LL::kNV; ++j) v1.v[j] = v2.v[j] = V(0);
  // avg_pool2x2's backward (only gp): both pixels of a pair take the same value, converted and rounded once (the
  // conversions are most of a bfloat16 pass where the CPU has no instruction for them)
  const int64_t step = (gp && !gz && !x) ? 2 : 1;
  for (int64_t w = 0; w < W; w += step) {
    Pk g;
    if (gz) {
      g = LL::load(gz + w * gzw, n);
    } else {
      for (int j = 0; j < LL::kNV; ++j) g.v[j] = V(0);
    }
    if (gp) {
      const Pk q = LL::load(gp + (w / 2) * gpw, n);
      for (int j = 0; j < LL::kNV; ++j) g.v[j] = at::vec::fmadd(V(0.25), q.v[j], g.v[j]);
    }
    if (!x) {
      LL::store(gx + w * gxw, g, n);
      if (step == 2 && w + 1 < W) LL::store(gx + (w + 1) * gxw, g, n);
      continue;
    }
    const Pk xv = LL::load(x + w * xw, n);
    Pk out;
    for (int j = 0; j < LL::kNV; ++j)
      out.v[j] = act_backward_v(xv.v[j], g.v[j], mv.v[j], sv.v[j], tv.v[j], v1.v[j], v2.v[j]);
    LL::store(gx + w * gxw, out, n);
  }
  LL::store_acc(l1, v1);
  LL::store_acc(l2, v2);
}

// Backward, one (n, c) row of W elements (planar) or one pixel's C channels (channels-last) at a time. gx may be
// gz itself (conv_bn_relu overwrites its input gradient): each row / pixel of gz is read into g before gx's is
// written, and neither pointer is __restrict__.
// g = grad_z + grad_p / 4 (grad_p indexed by the pooled position), masked by the recomputed pre-activation.
template <typename T>
void backward_impl(const at::Tensor* gz, const at::Tensor* gp, const at::Tensor& x, const at::Tensor* m,
                   const at::Tensor* s, const at::Tensor* t, at::Tensor& gx, at::Tensor* gs, at::Tensor* gt) {
  using acc_t = at::opmath_type<T>;
  using L = Lanes<T>;
  using Pk = typename L::Pack;
  using V = typename L::V;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool cl = is_channels_last(x);
  check_inner_unit(gx, cl);
  if (s) check_inner_unit(x, cl);
  if (gz) check_inner_unit(*gz, cl);
  if (gp) check_inner_unit(*gp, cl);
  const Strides xs(x), gxs(gx), gzs = gz ? Strides(*gz) : Strides(), gps = gp ? Strides(*gp) : Strides();
  const T* X = x.const_data_ptr<T>();
  const T* GZ = gz ? gz->const_data_ptr<T>() : nullptr;
  const T* GP = gp ? gp->const_data_ptr<T>() : nullptr;
  T* GX = gx.data_ptr<T>();
  const acc_t* MU = s ? m->const_data_ptr<acc_t>() : nullptr;
  const acc_t* S = s ? s->const_data_ptr<acc_t>() : nullptr;
  const acc_t* Tt = s ? t->const_data_ptr<acc_t>() : nullptr;
  const bool act_on = S != nullptr;

  std::vector<double> sum_gx(C, 0.0), sum_g(C, 0.0);
  if (!cl) {
    at::parallel_for(0, C, grain_for(N * H * W), [&](int64_t b, int64_t e) {
      std::vector<acc_t> g(W);
      for (int64_t c = b; c < e; ++c) {
        const acc_t mc = act_on ? MU[c] : acc_t(0), sc = act_on ? S[c] : acc_t(1), tc = act_on ? Tt[c] : acc_t(0);
        const Pk mv = L::broadcast(mc), sv = L::broadcast(sc), tv = L::broadcast(tc);
        double a1 = 0, a2 = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < H; ++h) {
            acc_t* __restrict__ gr = g.data();
            if (GZ) {
              const T* gzr = GZ + n * gzs.n + c * gzs.c + h * gzs.h;
              widen_row(gzr, gr, W);
            } else {
              std::fill(g.begin(), g.end(), acc_t(0));
            }
            if (GP) {
              const T* __restrict__ gpr = GP + n * gps.n + c * gps.c + (h / 2) * gps.h;
              for (int64_t w = 0; w < W; ++w) gr[w] += acc_t(0.25) * acc_t(gpr[w / 2]);
            }
            T* gxr = GX + n * gxs.n + c * gxs.c + h * gxs.h;
            if (!act_on) {
              narrow_row(gr, gxr, W);
              continue;
            }
            const T* __restrict__ xr = X + n * xs.n + c * xs.c + h * xs.h;
            // a row in acc_t (kSize lanes, then the scalar tail), rows summed in double
            Pk v1 = L::broadcast(0), v2 = L::broadcast(0);
            int64_t w = 0;
            for (; w + L::kSize <= W; w += L::kSize) {
              const Pk xv = L::load(xr + w), gin = L::load_acc(gr + w);
              Pk out;
              for (int j = 0; j < L::kNV; ++j)
                out.v[j] = act_backward_v(xv.v[j], gin.v[j], mv.v[j], sv.v[j], tv.v[j], v1.v[j], v2.v[j]);
              L::store(gxr + w, out);
            }
            acc_t lanes1[L::kSize], lanes2[L::kSize];
            L::store_acc(lanes1, v1);
            L::store_acc(lanes2, v2);
            acc_t r1 = 0, r2 = 0;
            for (int64_t j = 0; j < L::kSize; ++j) r1 += lanes1[j], r2 += lanes2[j];
            for (; w < W; ++w) {
              const acc_t xv = acc_t(xr[w]) - mc;
              const acc_t gv = xv * sc + tc <= acc_t(0) ? acc_t(0) : gr[w];
              gxr[w] = T(gv * sc);
              r1 += gv * xv;
              r2 += gv;
            }
            a1 += r1;
            a2 += r2;
          }
        sum_gx[c] = a1;
        sum_g[c] = a2;
      }
    });
  } else {
    const int64_t rows = N * H;
    const int64_t blocks = reduction_blocks(rows, rows * W * C, at::get_num_threads());
    std::vector<double> part(2 * blocks * C, 0.0);
    const int64_t full = C - C % L::kSize;
    const auto tail_lanes = [C](auto f) { with_tail_lanes<T>(C, [&](auto lanes, int64_t) { f(lanes); }); };
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        double* p1 = part.data() + 2 * blk * C;
        double* p2 = p1 + C;
        for (int64_t r = rows * blk / blocks; r < rows * (blk + 1) / blocks; ++r) {
          const int64_t n = r / H, h = r % H;
          // channels kSize at a time across the row's pixels, the row's sums in registers (the row stays in
          // cache across the channel chunks), then into double
          const T* gzr = GZ ? GZ + n * gzs.n + h * gzs.h : nullptr;
          const T* gpr = GP ? GP + n * gps.n + (h / 2) * gps.h : nullptr;
          const T* xr = act_on ? X + n * xs.n + h * xs.h : nullptr;
          T* gxr = GX + n * gxs.n + h * gxs.h;
          const auto chunk = [&](auto lanes, int64_t c, int64_t nc) {
            Pk mv, sv, tv;
            if (act_on) mv = L::load_acc(MU + c, nc), sv = L::load_acc(S + c, nc), tv = L::load_acc(Tt + c, nc);
            acc_t l1[L::kSize], l2[L::kSize];
            backward_pixels<decltype(lanes)>(gzr ? gzr + c : nullptr, gzs.w, gpr ? gpr + c : nullptr, gps.w,
                                             xr ? xr + c : nullptr, xs.w, gxr + c, gxs.w, W, nc, mv, sv, tv, l1, l2);
            if (!act_on) return;
            for (int64_t u = 0; u < std::min<int64_t>(nc, L::kSize); ++u) {
              p1[c + u] += l1[u];
              p2[c + u] += l2[u];
            }
          };
          for (int64_t c = 0; c < full; c += L::kSize) chunk(L{}, c, L::kSize);
          if (full < C) tail_lanes([&](auto lanes) { chunk(lanes, full, C - full); });
        }
      }
    });
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        sum_gx[c] += part[2 * blk * C + c];
        sum_g[c] += part[2 * blk * C + C + c];
      }
  }
  if (gs) {
    acc_t* GS = gs->data_ptr<acc_t>();
    acc_t* GT = gt->data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      GS[c] = acc_t(sum_gx[c]);
      GT[c] = acc_t(sum_g[c]);
    }
  }
}

std::optional<at::Tensor> as_acc(const std::optional<at::Tensor>& v, at::ScalarType t) {
  if (!v) return std::nullopt;
  return v->to(acc_type(t)).contiguous();
}

// The centre: the given per-channel mean, or zeros where only scale/shift were given.
std::optional<at::Tensor> centre(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& scale,
                                 const at::Tensor& x) {
  if (!scale) return std::nullopt;
  if (mean) return as_acc(mean, x.scalar_type());
  return at::zeros({x.size(1)}, x.options().dtype(acc_type(x.scalar_type())));
}

}  // namespace

// The kernels' precondition, established here: every tensor has a unit innermost stride in x's iteration order
// (channels for channels-last, width for planar). Inputs that lack it are copied; an output that lacks it (a
// one-channel slice of a channels-last buffer) is computed into a temporary and copied into place.
namespace {
bool inner_unit(const at::Tensor& t, bool cl) {
  return t.size(cl ? 1 : 3) == 1 || t.stride(cl ? 1 : 3) == 1;
}
at::MemoryFormat format_of(bool cl) {
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}
at::Tensor unit_input(const at::Tensor& t, bool cl) {
  return inner_unit(t, cl) ? t : t.contiguous(format_of(cl));
}
}  // namespace

void activation_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, at::Tensor* z,
                        at::Tensor* p) {
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = unit_input(x_in, cl);
  auto m = centre(mean, scale, x), s = as_acc(scale, x.scalar_type()), t = as_acc(shift, x.scalar_type());
  at::Tensor zt, pt;
  at::Tensor* zk = z;
  at::Tensor* pk = p;
  if (z && !inner_unit(*z, cl)) zt = at::empty(z->sizes(), z->options().memory_format(format_of(cl))), zk = &zt;
  if (p && !inner_unit(*p, cl)) pt = at::empty(p->sizes(), p->options().memory_format(format_of(cl))), pk = &pt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.activation_forward", [&] {
    forward_impl<scalar_t>(x, m ? &*m : nullptr, s ? &*s : nullptr, t ? &*t : nullptr, zk, pk);
  });
  if (zt.defined()) z->copy_(zt);
  if (pt.defined()) p->copy_(pt);
}

void activation_backward(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x_in,
                         const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, at::Tensor& grad_x, at::Tensor* grad_scale,
                         at::Tensor* grad_shift) {
  const bool cl = is_channels_last(x_in);
  const at::Tensor x = scale ? unit_input(x_in, cl) : x_in;  // without scale x is only a shape
  at::Tensor gz, gp;
  if (grad_z) gz = unit_input(*grad_z, cl);
  if (grad_p) gp = unit_input(*grad_p, cl);
  auto m = centre(mean, scale, x), s = as_acc(scale, x.scalar_type()), t = as_acc(shift, x.scalar_type());
  at::Tensor gxt;
  at::Tensor* gxk = &grad_x;
  if (!inner_unit(grad_x, cl))
    gxt = at::empty(grad_x.sizes(), grad_x.options().memory_format(format_of(cl))), gxk = &gxt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.activation_backward", [&] {
    backward_impl<scalar_t>(grad_z ? &gz : nullptr, grad_p ? &gp : nullptr, x, m ? &*m : nullptr, s ? &*s : nullptr,
                            t ? &*t : nullptr, *gxk, grad_scale, grad_shift);
  });
  if (gxt.defined()) grad_x.copy_(gxt);
}

}  // namespace unetx::cpu
