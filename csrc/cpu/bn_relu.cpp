// CPU kernels: the activation relu((x - mean[c]) * scale[c] + shift[c]) (BatchNorm + ReLU with the batch statistics
// and affine parameters folded into mean/scale/shift) with optional fused 2x2 average pooling, and the
// ops bn_relu / bn_relu_pool built on it.
//
// Memory traffic per element of x (T = element size):
//   forward:  read T (x), write T (z) and/or T/4 (p).       Saved for backward: nothing new (x is the caller's).
//   backward: read T (x) + T (grad_z) and/or T/4 (grad_p), write T (grad_x); grad_scale = sum(g * (x - mean)) (centred,
//             as BatchNorm's backward: no cancellation when |mean| >> std) and grad_shift = sum(g) reduced in the
//             same pass (double accumulators).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "cpu/kernels.h"

namespace unetx::cpu {
namespace {

struct Strides {
  int64_t n, c, h, w;
  explicit Strides(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  Strides() : n(0), c(0), h(0), w(0) {}
};

// Channels-last inputs iterate (n, h) rows with channels innermost; planar ones iterate (n, c) planes.
inline bool channels_last(const at::Tensor& x) {
  return x.size(1) > 1 && x.stride(1) == 1 && !x.is_contiguous();
}

template <typename acc_t>
struct Act {
  const acc_t* m;
  const acc_t* s;
  const acc_t* t;
  inline acc_t operator()(acc_t v, int64_t c) const {
    if (!s) return v;
    acc_t r = (v - m[c]) * s[c] + t[c];
    return r > acc_t(0) ? r : acc_t(0);
  }
};

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor* m, const at::Tensor* s, const at::Tensor* t, at::Tensor* z,
                  at::Tensor* p) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool pool = p != nullptr;
  const Strides xs(x), zs = z ? Strides(*z) : Strides(), ps = p ? Strides(*p) : Strides();
  const T* X = x.const_data_ptr<T>();
  T* Z = z ? z->data_ptr<T>() : nullptr;
  T* P = p ? p->data_ptr<T>() : nullptr;
  const Act<acc_t> f{m ? m->const_data_ptr<acc_t>() : nullptr, s ? s->const_data_ptr<acc_t>() : nullptr,
                     t ? t->const_data_ptr<acc_t>() : nullptr};
  const int64_t Ho = H / 2, Wo = W / 2;

  if (!channels_last(x)) {
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const T* xb = X + n * xs.n + c * xs.c;
        T* zb = Z ? Z + n * zs.n + c * zs.c : nullptr;
        if (!pool) {
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w) zb[h * zs.h + w * zs.w] = T(f(acc_t(xb[h * xs.h + w * xs.w]), c));
          continue;
        }
        T* pb = P + n * ps.n + c * ps.c;
        for (int64_t ho = 0; ho < Ho; ++ho) {
          const T* r0 = xb + 2 * ho * xs.h;
          const T* r1 = r0 + xs.h;
          for (int64_t wo = 0; wo < Wo; ++wo) {
            const int64_t i0 = 2 * wo * xs.w, i1 = i0 + xs.w;
            const acc_t v00 = f(acc_t(r0[i0]), c), v01 = f(acc_t(r0[i1]), c);
            const acc_t v10 = f(acc_t(r1[i0]), c), v11 = f(acc_t(r1[i1]), c);
            if (zb) {
              T* q = zb + 2 * ho * zs.h + 2 * wo * zs.w;
              q[0] = T(v00);
              q[zs.w] = T(v01);
              q[zs.h] = T(v10);
              q[zs.h + zs.w] = T(v11);
            }
            pb[ho * ps.h + wo * ps.w] = T((v00 + v01 + v10 + v11) * acc_t(0.25));
          }
        }
      }
    });
    return;
  }
  // channels-last: rows of W pixels with C contiguous channels each
  const int64_t rows = N * (pool ? Ho : H);
  at::parallel_for(0, rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = r / (pool ? Ho : H), h = r % (pool ? Ho : H);
      if (!pool) {
        const T* xr = X + n * xs.n + h * xs.h;
        T* zr = Z + n * zs.n + h * zs.h;
        for (int64_t w = 0; w < W; ++w) {
          const T* xp = xr + w * xs.w;
          T* zp = zr + w * zs.w;
          for (int64_t c = 0; c < C; ++c) zp[c * zs.c] = T(f(acc_t(xp[c * xs.c]), c));
        }
        continue;
      }
      const T* r0 = X + n * xs.n + 2 * h * xs.h;
      const T* r1 = r0 + xs.h;
      T* pr = P + n * ps.n + h * ps.h;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        const T* a0 = r0 + 2 * wo * xs.w;
        const T* a1 = a0 + xs.w;
        const T* b0 = r1 + 2 * wo * xs.w;
        const T* b1 = b0 + xs.w;
        T* pp = pr + wo * ps.w;
        T* q00 = Z ? Z + n * zs.n + 2 * h * zs.h + 2 * wo * zs.w : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t o = c * xs.c;
          const acc_t v00 = f(acc_t(a0[o]), c), v01 = f(acc_t(a1[o]), c);
          const acc_t v10 = f(acc_t(b0[o]), c), v11 = f(acc_t(b1[o]), c);
          if (q00) {
            T* q = q00 + c * zs.c;
            q[0] = T(v00);
            q[zs.w] = T(v01);
            q[zs.h] = T(v10);
            q[zs.h + zs.w] = T(v11);
          }
          pp[c * ps.c] = T((v00 + v01 + v10 + v11) * acc_t(0.25));
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor* gz, const at::Tensor* gp, const at::Tensor& x, const at::Tensor* m,
                   const at::Tensor* s, const at::Tensor* t, at::Tensor& gx, at::Tensor* gs, at::Tensor* gt) {
  using acc_t = at::opmath_type<T>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Strides xs(x), gxs(gx), gzs = gz ? Strides(*gz) : Strides(), gps = gp ? Strides(*gp) : Strides();
  const T* X = x.const_data_ptr<T>();
  const T* GZ = gz ? gz->const_data_ptr<T>() : nullptr;
  const T* GP = gp ? gp->const_data_ptr<T>() : nullptr;
  T* GX = gx.data_ptr<T>();
  const acc_t* MU = m ? m->const_data_ptr<acc_t>() : nullptr;
  const acc_t* S = s ? s->const_data_ptr<acc_t>() : nullptr;
  const acc_t* Tt = t ? t->const_data_ptr<acc_t>() : nullptr;

  // one element: returns the masked gradient g, sets xv = x - mean (centred), writes grad_x
  auto elem = [&](int64_t n, int64_t c, int64_t h, int64_t w, acc_t& xv) -> acc_t {
    acc_t g = GZ ? acc_t(GZ[n * gzs.n + c * gzs.c + h * gzs.h + w * gzs.w]) : acc_t(0);
    if (GP) g += acc_t(0.25) * acc_t(GP[n * gps.n + c * gps.c + (h / 2) * gps.h + (w / 2) * gps.w]);
    if (S) {
      xv = acc_t(X[n * xs.n + c * xs.c + h * xs.h + w * xs.w]) - MU[c];
      if (!(xv * S[c] + Tt[c] > acc_t(0))) g = acc_t(0);
      GX[n * gxs.n + c * gxs.c + h * gxs.h + w * gxs.w] = T(g * S[c]);
    } else {
      xv = acc_t(0);  // x is only a shape here (pure pooling backward): never read
      GX[n * gxs.n + c * gxs.c + h * gxs.h + w * gxs.w] = T(g);
    }
    return g;
  };

  std::vector<double> sum_gx, sum_g;
  if (!channels_last(x)) {
    sum_gx.assign(C, 0.0);
    sum_g.assign(C, 0.0);
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        double a1 = 0, a2 = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < H; ++h) {
            acc_t r1 = 0, r2 = 0;  // row partials in acc_t, the row total in double
            for (int64_t w = 0; w < W; ++w) {
              acc_t xv;
              const acc_t g = elem(n, c, h, w, xv);
              r1 += g * xv;
              r2 += g;
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
    const int64_t blocks = std::min<int64_t>(rows, 4 * at::get_num_threads());
    std::vector<double> part(2 * blocks * C, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t blk = b; blk < e; ++blk) {
        double* p1 = part.data() + 2 * blk * C;
        double* p2 = p1 + C;
        for (int64_t r = rows * blk / blocks; r < rows * (blk + 1) / blocks; ++r) {
          const int64_t n = r / H, h = r % H;
          for (int64_t w = 0; w < W; ++w)
            for (int64_t c = 0; c < C; ++c) {
              acc_t xv;
              const acc_t g = elem(n, c, h, w, xv);
              p1[c] += double(g * xv);
              p2[c] += double(g);
            }
        }
      }
    });
    sum_gx.assign(C, 0.0);
    sum_g.assign(C, 0.0);
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

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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

void activation_forward(const at::Tensor& x, const std::optional<at::Tensor>& mean,
                        const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, at::Tensor* z,
                        at::Tensor* p) {
  auto m = centre(mean, scale, x), s = as_acc(scale, x.scalar_type()), t = as_acc(shift, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.activation_forward", [&] {
    forward_impl<scalar_t>(x, m ? &*m : nullptr, s ? &*s : nullptr, t ? &*t : nullptr, z, p);
  });
}

void activation_backward(const at::Tensor* grad_z, const at::Tensor* grad_p, const at::Tensor& x,
                         const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, at::Tensor& grad_x, at::Tensor* grad_scale,
                         at::Tensor* grad_shift) {
  auto m = centre(mean, scale, x), s = as_acc(scale, x.scalar_type()), t = as_acc(shift, x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unetx.activation_backward", [&] {
    backward_impl<scalar_t>(grad_z, grad_p, x, m ? &*m : nullptr, s ? &*s : nullptr, t ? &*t : nullptr, grad_x,
                            grad_scale, grad_shift);
  });
}

// ------------------------------------------------------------------------------------------------ ops
namespace {

void check_bn_relu_args(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& mean, const char* op) {
  check_4d(y, op, "y");
  check_channel_vector(scale, y.size(1), y, op, "scale");
  check_channel_vector(shift, y.size(1), y, op, "shift");
  if (mean) check_channel_vector(*mean, y.size(1), y, op, "mean");
}

at::Tensor empty_in(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::empty(sizes, like.options().dtype(dtype).memory_format(layout_of(like)));
}

using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Runs the activation backward and returns (grad_y, grad_scale, grad_shift, grad_mean); grad_mean = -scale * grad_shift
// (undefined when no mean was given).
Grads4 activation_grads(const at::Tensor* gz, const at::Tensor* gp, const at::Tensor& yc, const at::Tensor& scale,
                        const at::Tensor& shift, const std::optional<at::Tensor>& mean) {
  auto gx = empty_in(yc, yc.sizes(), yc.scalar_type());
  auto opts = yc.options().dtype(acc_type(yc.scalar_type()));
  auto gs = at::empty({yc.size(1)}, opts), gt = at::empty({yc.size(1)}, opts);
  activation_backward(gz, gp, yc, mean, scale, shift, gx, &gs, &gt);
  at::Tensor gm;
  if (mean) gm = at::neg(at::mul(gt, scale.to(gt.scalar_type()))).to(mean->scalar_type());
  return std::make_tuple(gx, gs.to(scale.scalar_type()), gt.to(shift.scalar_type()), gm);
}

}  // namespace

at::Tensor bn_relu(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                   const std::optional<at::Tensor>& mean) {
  check_bn_relu_args(y, scale, shift, mean, "unetx.bn_relu");
  const auto yc = y.contiguous(layout_of(y));
  auto z = empty_in(yc, yc.sizes(), yc.scalar_type());
  activation_forward(yc, mean, scale, shift, &z, nullptr);
  return z;
}

Grads4 bn_relu_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                        const std::optional<at::Tensor>& mean) {
  check_bn_relu_args(y, scale, shift, mean, "unetx.bn_relu_backward");
  const auto yc = y.contiguous(layout_of(y));
  const auto gc = grad.contiguous(layout_of(yc));
  return activation_grads(&gc, nullptr, yc, scale, shift, mean);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_pool(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                                                const std::optional<at::Tensor>& mean) {
  check_bn_relu_args(y, scale, shift, mean, "unetx.bn_relu_pool");
  check_even(y, "unetx.bn_relu_pool");
  const auto yc = y.contiguous(layout_of(y));
  auto z = empty_in(yc, yc.sizes(), yc.scalar_type());
  auto p = empty_in(yc, {yc.size(0), yc.size(1), yc.size(2) / 2, yc.size(3) / 2}, yc.scalar_type());
  activation_forward(yc, mean, scale, shift, &z, &p);
  return {z, p};
}

Grads4 bn_relu_pool_backward(const at::Tensor& grad_z, const at::Tensor& grad_p, const at::Tensor& y,
                             const at::Tensor& scale, const at::Tensor& shift, const std::optional<at::Tensor>& mean) {
  check_bn_relu_args(y, scale, shift, mean, "unetx.bn_relu_pool_backward");
  const auto yc = y.contiguous(layout_of(y));
  const auto gz = grad_z.contiguous(layout_of(yc));
  const auto gp = grad_p.contiguous(layout_of(yc));
  return activation_grads(&gz, &gp, yc, scale, shift, mean);
}

}  // namespace unetx::cpu

TORCH_LIBRARY_IMPL(unetx, CPU, m) {
  m.impl("bn_relu", &unetx::cpu::bn_relu);
  m.impl("bn_relu_backward", &unetx::cpu::bn_relu_backward);
  m.impl("bn_relu_pool", &unetx::cpu::bn_relu_pool);
  m.impl("bn_relu_pool_backward", &unetx::cpu::bn_relu_pool_backward);
}
