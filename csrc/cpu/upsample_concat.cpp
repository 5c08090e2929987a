// CPU kernels: 2x upsampling (nearest, bilinear align_corners=False) written straight into its channel slice of a
// concatenation buffer, and its adjoint: the kernels of the op upsample_concat = cat([skip, upsample2x(x)], dim=1)
// (csrc/ops.cpp).
//
// Memory traffic: forward reads skip once and x once (each x element is read by 4 outputs, from cache), writes the
// buffer once: no intermediate upsampled tensor. Backward reads grad once, writes grad_skip and grad_x.
// Saves nothing for backward (shapes only).
#include "cpu/vec.h"  // first: selects ATen's vector capability

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cstring>
#include <vector>

#include "common/checks.h"
#include "common/layout.h"
#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

struct Tap {
  int64_t i0, i1;
  float w0, w1;
};

std::vector<Tap> taps(int64_t out, int64_t in, Upsample mode) {
  std::vector<Tap> t(out);
  for (int64_t o = 0; o < out; ++o) {
    if (mode == Upsample::None) {
      t[o] = {o, o, 1.f, 0.f};
    } else if (mode == Upsample::Nearest) {
      t[o] = {o / 2, o / 2, 1.f, 0.f};
    } else {
      bilinear_taps(o, in, t[o].i0, t[o].i1, t[o].w0, t[o].w1);
    }
  }
  return t;
}

// For each input index k: the outputs that read it and with what total weight (at most 5 for 2x).
struct Adjoint {
  std::vector<int64_t> start;  // offsets into o / w, size in + 1
  std::vector<int64_t> o;
  std::vector<float> w;
};

Adjoint adjoint(int64_t out, int64_t in, Upsample mode) {
  Adjoint a;
  a.start.push_back(0);
  for (int64_t k = 0; k < in; ++k) {
    for (int64_t o = std::max<int64_t>(0, 2 * k - 2); o <= std::min<int64_t>(out - 1, 2 * k + 2); ++o) {
      const float wt = mode == Upsample::None      ? (o == k ? 1.f : 0.f)
                       : mode == Upsample::Nearest ? (o / 2 == k ? 1.f : 0.f)
                                                   : bilinear_weight(o, k, in);
      if (wt != 0.f) {
        a.o.push_back(o);
        a.w.push_back(wt);
      }
    }
    a.start.push_back(static_cast<int64_t>(a.o.size()));
  }
  return a;
}

// Channels-last rows, arguments by value (see bn_relu.cpp's pixels_map: vector stores may alias what a caller's
// by-reference lambda captures point to). The bits of a copy are moved, not converted: Vectorized<T> of any T.
template <typename T>
inline void copy_channels(const T* src, T* dst, int64_t C) {
  using RV = at::vec::Vectorized<T>;
  int64_t c = 0;
  for (; c + RV::size() <= C; c += RV::size()) RV::loadu(src + c).store(dst + c);
  if (c < C) RV::loadu(src + c, C - c).store(dst + c, C - c);
}
// W pixels of C channels: out pixel j = in pixel j (pixel strides is, os)
template <typename T>
inline void copy_pixels(const T* in, int64_t is, T* out, int64_t os, int64_t W, int64_t C) {
  for (int64_t j = 0; j < W; ++j) copy_channels(in + j * is, out + j * os, C);
}
// nearest 2x along the row: out pixels 2j and 2j + 1 = in pixel j, for the w input pixels
template <typename T>
inline void nearest_row(const T* in, int64_t is, T* out, int64_t os, int64_t w, int64_t C) {
  using RV = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < w; ++j) {
    const T* src = in + j * is;
    T* d0 = out + 2 * j * os;
    T* d1 = d0 + os;
    int64_t c = 0;
    for (; c + RV::size() <= C; c += RV::size()) {
      const RV v = RV::loadu(src + c);
      v.store(d0 + c);
      v.store(d1 + c);
    }
    if (c < C) {
      const RV v = RV::loadu(src + c, C - c);
      v.store(d0 + c, C - c);
      v.store(d1 + c, C - c);
    }
  }
}
// bilinear 2x along the row from input rows r0 (weight w0) and r1 (w1): out pixel j from the taps tw[j]
template <typename T>
inline void bilinear_row(const T* r0, const T* r1, int64_t is, T* out, int64_t os, const Tap* tw, int64_t W, int64_t C,
                         float w0, float w1) {
  using V = typename Lanes<T>::V;
  const auto chunk = [=](auto lanes, int64_t j, int64_t c, int64_t n) {
    using LL = decltype(lanes);
    const Tap t = tw[j];
    const auto x00 = LL::load(r0 + t.i0 * is + c, n), x01 = LL::load(r0 + t.i1 * is + c, n);
    const auto x10 = LL::load(r1 + t.i0 * is + c, n), x11 = LL::load(r1 + t.i1 * is + c, n);
    const V aw0(w0), aw1(w1), bw0(t.w0), bw1(t.w1);
    auto o = x00;
    for (int u = 0; u < LL::kNV; ++u) {
      const V top = at::vec::fmadd(bw1, x01.v[u], bw0 * x00.v[u]);
      const V bot = at::vec::fmadd(bw1, x11.v[u], bw0 * x10.v[u]);
      o.v[u] = at::vec::fmadd(aw1, bot, aw0 * top);
    }
    LL::store(out + j * os + c, o, n);
  };
  for_pixel_chunks<T>(W, C, chunk);
}

template <typename T>
void forward_impl(const at::Tensor& x, Upsample mode, at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3), H = out.size(2), W = out.size(3);
  const auto th = taps(H, h, mode), tw = taps(W, w, mode);
  const T* X = x.const_data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t xn = x.stride(0), xc = x.stride(1), xh = x.stride(2), xw = x.stride(3);
  const int64_t on = out.stride(0), oc = out.stride(1), oh = out.stride(2), ow = out.stride(3);
  auto value = [&](const T* xb, int64_t i, int64_t j, int64_t cstride) -> T {
    const Tap& a = th[i];
    const Tap& b = tw[j];
    if (mode == Upsample::Nearest) return xb[a.i0 * xh + b.i0 * xw];
    (void)cstride;
    const acc_t top = acc_t(b.w0) * acc_t(xb[a.i0 * xh + b.i0 * xw]) + acc_t(b.w1) * acc_t(xb[a.i0 * xh + b.i1 * xw]);
    const acc_t bot = acc_t(b.w0) * acc_t(xb[a.i1 * xh + b.i0 * xw]) + acc_t(b.w1) * acc_t(xb[a.i1 * xh + b.i1 * xw]);
    return T(acc_t(a.w0) * top + acc_t(a.w1) * bot);
  };
  if (!is_channels_last(x)) {
    at::parallel_for(0, N * C, grain_for(H * W), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const T* xb = X + n * xn + c * xc;
        T* ob = O + n * on + c * oc;
        for (int64_t i = 0; i < H; ++i)
          for (int64_t j = 0; j < W; ++j) ob[i * oh + j * ow] = value(xb, i, j, 0);
      }
    });
  } else if (xc == 1 && (oc == 1 || C == 1)) {
    // channels-last with contiguous channels on both sides: each output pixel is a copy (none, nearest) or a weighted
    // sum of 4 input pixels (bilinear), C channels at a time; one output row per task item
    at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / H, i = r % H;
        const Tap& a = th[i];
        T* orow = O + n * on + i * oh;
        if (mode == Upsample::None) {
          copy_pixels(X + n * xn + i * xh, xw, orow, ow, W, C);
        } else if (mode == Upsample::Nearest) {
          nearest_row(X + n * xn + a.i0 * xh, xw, orow, ow, w, C);
        } else {
          bilinear_row(X + n * xn + a.i0 * xh, X + n * xn + a.i1 * xh, xw, orow, ow, tw.data(), W, C, a.w0, a.w1);
        }
      }
    });
  } else {
    at::parallel_for(0, N * H, grain_for(W * C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / H, i = r % H;
        for (int64_t j = 0; j < W; ++j) {
          T* op = O + n * on + i * oh + j * ow;
          for (int64_t c = 0; c < C; ++c) op[c * oc] = value(X + n * xn + c * xc, i, j, xc);
        }
      }
    });
  }
}

// The adjoints below read a gradient whose pixels may be wider than the C channels they read (conv_bn_relu's
// gradient of its concatenated stage): they ask for the pixels kPixelsAhead input pixels ahead (prefetch_pixels).
constexpr int64_t kPixelsAhead = 2;

// nearest's adjoint along a row: in pixel j = the sum of the 2 x 2 output block (2j, 2j + 1) x (row, row + 1)
// (g: pixel stride gw, row stride gh), for w input pixels; arguments by value, as above
template <typename T>
inline void block_sum_row(const T* g, int64_t gw, int64_t gh, T* out, int64_t os, int64_t w, int64_t C) {
  const auto chunk = [=](auto lanes, int64_t j, int64_t c, int64_t n) {
    using LL = decltype(lanes);
    const T* a = g + 2 * j * gw + c;
    if (c == 0 && j + kPixelsAhead < w) {
      prefetch_pixels(a + 2 * kPixelsAhead * gw, gw, 2, C);
      prefetch_pixels(a + 2 * kPixelsAhead * gw + gh, gw, 2, C);
    }
    auto s = LL::load(a, n);
    const auto b = LL::load(a + gw, n), d = LL::load(a + gh, n), e = LL::load(a + gh + gw, n);
    for (int u = 0; u < LL::kNV; ++u) s.v[u] = (s.v[u] + b.v[u]) + (d.v[u] + e.v[u]);
    LL::store(out + j * os + c, s, n);
  };
  for_pixel_chunks<T>(w, C, chunk);
}
// the adjoint of a separable upsampling for one input row: in pixel l = sum over the np output rows ro[p] (weight
// rw[p]) of sum over the output pixels of a.o / a.w that read l; g is image n's gradient (row stride gh, pixel gw)
template <typename T>
inline void adjoint_row(const T* g, int64_t gh, int64_t gw, const int64_t* ro, const float* rw, int64_t np,
                        const Adjoint& a, T* out, int64_t os, int64_t w, int64_t C) {
  using V = typename Lanes<T>::V;
  const int64_t* st = a.start.data();
  const int64_t* co = a.o.data();
  const float* cw = a.w.data();
  const auto chunk = [=](auto lanes, int64_t l, int64_t c, int64_t n) {
    using LL = decltype(lanes);
    if (c == 0 && l + kPixelsAhead < w) {
      const int64_t q0 = st[l + kPixelsAhead], nq = st[l + kPixelsAhead + 1] - q0;
      for (int64_t p = 0; p < np; ++p) prefetch_pixels(g + ro[p] * gh + co[q0] * gw, gw, nq, C);
    }
    typename LL::Pack s;
    for (int u = 0; u < LL::kNV; ++u) s.v[u] = V(0);
    for (int64_t p = 0; p < np; ++p) {
      typename LL::Pack row;
      for (int u = 0; u < LL::kNV; ++u) row.v[u] = V(0);
      const T* gr = g + ro[p] * gh + c;
      for (int64_t q = st[l]; q < st[l + 1]; ++q) {
        const auto v = LL::load(gr + co[q] * gw, n);
        const V wq(cw[q]);
        for (int u = 0; u < LL::kNV; ++u) row.v[u] = at::vec::fmadd(wq, v.v[u], row.v[u]);
      }
      const V wp(rw[p]);
      for (int u = 0; u < LL::kNV; ++u) s.v[u] = at::vec::fmadd(wp, row.v[u], s.v[u]);
    }
    LL::store(out + l * os + c, s, n);
  };
  for_pixel_chunks<T>(w, C, chunk);
}

template <typename T>
void backward_impl(const at::Tensor& grad, Upsample mode, at::Tensor& gx) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = gx.size(0), C = gx.size(1), h = gx.size(2), w = gx.size(3), H = grad.size(2), W = grad.size(3);
  const auto ah = adjoint(H, h, mode), aw = adjoint(W, w, mode);
  const T* G = grad.const_data_ptr<T>();
  T* GX = gx.data_ptr<T>();
  const int64_t gn = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gw = grad.stride(3);
  const int64_t xn = gx.stride(0), xc = gx.stride(1), xh = gx.stride(2), xw = gx.stride(3);
  auto value = [&](const T* gb, int64_t k, int64_t l) -> T {
    acc_t s = 0;
    for (int64_t p = ah.start[k]; p < ah.start[k + 1]; ++p) {
      acc_t row = 0;
      const T* gr = gb + ah.o[p] * gh;
      for (int64_t q = aw.start[l]; q < aw.start[l + 1]; ++q) row += acc_t(aw.w[q]) * acc_t(gr[aw.o[q] * gw]);
      s += acc_t(ah.w[p]) * row;
    }
    return T(s);
  };
  if (!is_channels_last(gx)) {
    at::parallel_for(0, N * C, grain_for(h * w * 4), [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const T* gb = G + n * gn + c * gc;
        T* xb = GX + n * xn + c * xc;
        for (int64_t k = 0; k < h; ++k)
          for (int64_t l = 0; l < w; ++l) xb[k * xh + l * xw] = value(gb, k, l);
      }
    });
  } else if (gc == 1 && (xc == 1 || C == 1)) {
    // channels-last with contiguous channels on both sides: each input pixel's gradient is a weighted sum of the
    // output pixels that read it (none: the pixel; nearest: its 2 x 2 block), C channels at a time; one input row
    // per task item
    at::parallel_for(0, N * h, grain_for(w * C * 4), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / h, k = r % h;
        T* xrow = GX + n * xn + k * xh;
        if (mode == Upsample::None) {
          copy_pixels(G + n * gn + k * gh, gw, xrow, xw, w, C);
        } else if (mode == Upsample::Nearest) {
          block_sum_row(G + n * gn + 2 * k * gh, gw, gh, xrow, xw, w, C);
        } else {
          const int64_t p0 = ah.start[k], np = ah.start[k + 1] - p0;
          adjoint_row(G + n * gn, gh, gw, ah.o.data() + p0, ah.w.data() + p0, np, aw, xrow, xw, w, C);
        }
      }
    });
  } else {
    at::parallel_for(0, N * h, grain_for(w * C * 4), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / h, k = r % h;
        for (int64_t l = 0; l < w; ++l)
          for (int64_t c = 0; c < C; ++c) GX[n * xn + c * xc + k * xh + l * xw] = value(G + n * gn + c * gc, k, l);
      }
    });
  }
}

}  // namespace

namespace {

bool channels_innermost(const at::Tensor& t) {
  return t.dim() == 4 && is_channels_last(t) && (t.size(1) == 1 || t.stride(1) == 1);
}

// Mode None is a copy (conv_bn_relu's concatenation of a same-size x2 into its stage, and its gradient back out of
// the stage's channel slice): the channels-last rows of forward_impl / backward_impl where both sides have contiguous
// channels, ATen's copy_ otherwise (which into or out of a channel slice is slower, most in bfloat16).
bool copies_as_rows(const at::Tensor& from, const at::Tensor& to) {
  return is_channels_last(from) && is_channels_last(to) && from.stride(1) == 1 && to.stride(1) == 1;
}

// upsample_concat in one pass over each row of the concatenation (LayerKernels::upsample_concat_forward): per output
// row, the skip's pixels, then the upsampled x's, into the row's channels [0, C1) and [C1, C1 + C2).
template <typename T>
void concat_forward_impl(const at::Tensor& skip, const at::Tensor& x, Upsample mode, at::Tensor& out) {
  const int64_t N = out.size(0), C1 = skip.size(1), C2 = x.size(1), H = out.size(2), W = out.size(3);
  const int64_t h = x.size(2), w = x.size(3);
  const auto th = taps(H, h, mode), tw = taps(W, w, mode);
  const T* S = skip.const_data_ptr<T>();
  const T* X = x.const_data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t sn = skip.stride(0), sh = skip.stride(2), sw = skip.stride(3);
  const int64_t xn = x.stride(0), xh = x.stride(2), xw = x.stride(3);
  const int64_t on = out.stride(0), oh = out.stride(2), ow = out.stride(3);
  at::parallel_for(0, N * H, grain_for(W * (C1 + C2)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / H, i = r % H;
      T* orow = O + n * on + i * oh;
      copy_pixels(S + n * sn + i * sh, sw, orow, ow, W, C1);
      const Tap& a = th[i];
      if (mode == Upsample::None)
        copy_pixels(X + n * xn + i * xh, xw, orow + C1, ow, W, C2);
      else if (mode == Upsample::Nearest)
        nearest_row(X + n * xn + a.i0 * xh, xw, orow + C1, ow, w, C2);
      else
        bilinear_row(X + n * xn + a.i0 * xh, X + n * xn + a.i1 * xh, xw, orow + C1, ow, tw.data(), W, C2, a.w0, a.w1);
    }
  });
}

// Its adjoint (LayerKernels::upsample_concat_backward), one row of grad_x at a time: the gradient rows that belong
// to it (row k of grad_x: grad rows k (none) or 2k and 2k + 1) copied into grad_skip, then grad_x's row from the
// grad rows that read it (nearest: those two; bilinear: up to four, the others' own rows copied by their tasks).
template <typename T>
void concat_backward_impl(const at::Tensor& grad, Upsample mode, at::Tensor& gs, at::Tensor& gx) {
  const int64_t N = grad.size(0), C1 = gs.size(1), C2 = gx.size(1), H = grad.size(2), W = grad.size(3);
  const int64_t h = gx.size(2), w = gx.size(3);
  const int64_t f = mode == Upsample::None ? 1 : 2;
  const auto ah = adjoint(H, h, mode), aw = adjoint(W, w, mode);
  const T* G = grad.const_data_ptr<T>();
  T* GS = gs.data_ptr<T>();
  T* GX = gx.data_ptr<T>();
  const int64_t gn = grad.stride(0), gh = grad.stride(2), gw = grad.stride(3);
  const int64_t sn = gs.stride(0), sh = gs.stride(2), sw = gs.stride(3);
  const int64_t xn = gx.stride(0), xh = gx.stride(2), xw = gx.stride(3);
  at::parallel_for(0, N * h, grain_for(f * f * w * (C1 + C2)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / h, k = r % h;
      const T* gimg = G + n * gn;
      for (int64_t i = f * k; i < f * k + f; ++i) copy_pixels(gimg + i * gh, gw, GS + n * sn + i * sh, sw, W, C1);
      T* xrow = GX + n * xn + k * xh;
      if (mode == Upsample::None) {
        copy_pixels(gimg + k * gh + C1, gw, xrow, xw, w, C2);
      } else if (mode == Upsample::Nearest) {
        block_sum_row(gimg + 2 * k * gh + C1, gw, gh, xrow, xw, w, C2);
      } else {
        const int64_t p0 = ah.start[k], np = ah.start[k + 1] - p0;
        adjoint_row(gimg + C1, gh, gw, ah.o.data() + p0, ah.w.data() + p0, np, aw, xrow, xw, w, C2);
      }
    }
  });
}

}  // namespace

bool upsample_concat_forward(const at::Tensor& skip, const at::Tensor& x, Upsample mode, at::Tensor& out) {
  if (!channels_innermost(skip) || !channels_innermost(x) || !is_channels_last(out) || out.stride(1) != 1) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.upsample_concat_forward",
                                  [&] { concat_forward_impl<scalar_t>(skip, x, mode, out); });
  return true;
}

bool upsample_concat_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_skip, at::Tensor& grad_x) {
  if (!is_channels_last(grad) || grad.stride(1) != 1 || !channels_innermost(grad_skip) || !channels_innermost(grad_x))
    return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "unetx.upsample_concat_backward",
                                  [&] { concat_backward_impl<scalar_t>(grad, mode, grad_skip, grad_x); });
  return true;
}

void upsample_forward(const at::Tensor& x, Upsample mode, at::Tensor& out) {
  if (mode == Upsample::None && !copies_as_rows(x, out)) {
    out.copy_(x);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.upsample_forward",
                                  [&] { forward_impl<scalar_t>(x, mode, out); });
}

void upsample_backward(const at::Tensor& grad, Upsample mode, at::Tensor& grad_x) {
  if (mode == Upsample::None && !copies_as_rows(grad, grad_x)) {
    grad_x.copy_(grad);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "unetx.upsample_backward",
                                  [&] { backward_impl<scalar_t>(grad, mode, grad_x); });
}

}  // namespace unetx::cpu
