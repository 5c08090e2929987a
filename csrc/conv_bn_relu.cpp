// Device-generic composition of the fused layer (see conv_bn_relu.h).
#include "conv_bn_relu.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/sum.h>
#include <ATen/record_function.h>

#include "common/checks.h"
#include "common/layout.h"
#include "cpu/algo_choice.h"

namespace unetx {
namespace {

constexpr const char* kOp = "unetx.conv_bn_relu";

struct Geometry {
  int64_t N, C1, C2, H, W;  // H, W: the spatial size the convolution sees
  int64_t k;
  Upsample mode;
};

Geometry check_args(const at::Tensor& x, const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool,
                    const OptTensor& x2, c10::string_view x2_mode, const at::Tensor& weight, const OptTensor& bias,
                    bool transposed) {
  check_4d(x, kOp, "x");
  TORCH_CHECK(x_scale.has_value() == x_shift.has_value(), kOp, ": x_scale and x_shift must be given together");
  if (x_scale) {
    check_channel_vector(*x_scale, x.size(1), x, kOp, "x_scale");
    check_channel_vector(*x_shift, x.size(1), x, kOp, "x_shift");
  }
  if (x_pool) check_even(x, kOp);
  Geometry g{x.size(0),
             x.size(1),
             0,
             x_pool ? x.size(2) / 2 : x.size(2),
             x_pool ? x.size(3) / 2 : x.size(3),
             0,
             parse_upsample(x2_mode, kOp)};
  if (x2) {
    check_4d(*x2, kOp, "x2");
    check_same(x, *x2, kOp, "x", "x2");
    const int64_t f = g.mode == Upsample::None ? 1 : 2;
    TORCH_CHECK(x2->size(0) == g.N && f * x2->size(2) == g.H && f * x2->size(3) == g.W, kOp, ": x2 of shape ",
                x2->sizes(), " upsampled ", f, "x does not match the skip input's spatial size [", g.N, ", *, ", g.H,
                ", ", g.W, "]");
    g.C2 = x2->size(1);
  }
  TORCH_CHECK(weight.dim() == 4, kOp, ": expected a 4-D weight, got shape ", weight.sizes());
  check_same(x, weight, kOp, "x", "weight");
  g.k = weight.size(3);
  TORCH_CHECK(weight.size(2) == g.k, kOp, ": expected a square kernel, got weight ", weight.sizes());
  const int64_t in_ch = transposed ? weight.size(0) : weight.size(1);
  const int64_t out_ch = transposed ? weight.size(1) : weight.size(0);
  TORCH_CHECK(in_ch == g.C1 + g.C2, kOp, ": weight ", weight.sizes(), " expects ", in_ch, " input channels, but x has ",
              g.C1, (g.C2 ? " and x2 has " : ""), (g.C2 ? std::to_string(g.C2) : std::string()), " (total ",
              g.C1 + g.C2, ")");
  TORCH_CHECK(transposed || g.k % 2 == 1, kOp, ": 'same' convolution needs an odd kernel size, got ", g.k);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_ch, kOp, ": expected bias of shape [", out_ch, "], got ",
                bias->sizes());
    check_same(x, *bias, kOp, "x", "bias");
  }
  return g;
}

at::Tensor input_stage(const LayerKernels& k, const Geometry& g, const at::Tensor& x, const OptTensor& mean,
                       const OptTensor& scale, const OptTensor& shift, bool pool, const OptTensor& x2,
                       at::MemoryFormat mf) {
  if (!scale && !pool && !x2) return x;
  // each pass's event names a tensor of its layer, so that a profile with record_shapes tells layers of different
  // shapes apart (bench/bf16_passes.py --step pairs their calls across precisions); the inputs are built only while
  // a RecordFunction callback such as a profiler is active
  RECORD_FUNCTION("unetx::input_stage", std::vector<c10::IValue>({x}));
  auto a = at::empty({g.N, g.C1 + g.C2, g.H, g.W}, x.options().memory_format(mf));
  auto a1 = a.narrow(1, 0, g.C1);
  if (!scale && !pool)  // an activated x (eval) into its channel slice: as x2's copy, in rows where the device can
    k.upsample_forward(x, Upsample::None, a1);
  else if (pool)
    k.activation_forward(x, mean, scale, shift, nullptr, &a1);
  else
    k.activation_forward(x, mean, scale, shift, &a1, nullptr);
  if (x2) {
    auto a2 = a.narrow(1, g.C1, g.C2);
    k.upsample_forward(*x2, g.mode, a2);
  }
  return a;
}

// Whether the layer's input stage can be built a band of rows at a time (StageRows): there is a stage to build (an
// identity stage is x itself), and it is not bilinearly upsampled, whose edge rows clamp to the image's edge.
bool stage_by_rows_possible(const Geometry& g, const OptTensor& scale, bool pool, const OptTensor& x2) {
  return (scale || pool || x2) && g.mode != Upsample::Bilinear;
}

// The input stage of input_stage, rows [lo, hi) of image n at a time (StageRows), for the consumers that build it
// in cache-sized pieces: the CPU weight gradient, the Winograd forward and weight gradient.
StageRows stage_rows(const LayerKernels& k, const Geometry& g, const at::Tensor& x, const OptTensor& mean,
                     const OptTensor& scale, const OptTensor& shift, bool pool, const OptTensor& x2) {
  const int64_t f = pool ? 2 : 1, u = g.mode == Upsample::None ? 1 : 2;
  return StageRows{
      [&k, g, &x, &mean, &scale, &shift, pool, &x2, f, u](int64_t n, int64_t lo, int64_t hi, at::Tensor& out) {
        auto a1 = out.narrow(1, 0, g.C1);
        const auto xs = x.narrow(0, n, 1).narrow(2, f * lo, f * (hi - lo));
        if (!scale && !pool)
          k.upsample_forward(xs, Upsample::None, a1);
        else
          k.activation_forward(xs, mean, scale, shift, pool ? nullptr : &a1, pool ? &a1 : nullptr);
        if (x2) {
          auto a2 = out.narrow(1, g.C1, g.C2);
          k.upsample_forward(x2->narrow(0, n, 1).narrow(2, lo / u, (hi - lo) / u), g.mode, a2);
        }
      },
      u};
}

void check_mean(const OptTensor& x_mean, const OptTensor& x_scale, const at::Tensor& x) {
  if (!x_mean) return;
  TORCH_CHECK(x_scale.has_value(), kOp, ": x_mean needs x_scale and x_shift");
  check_channel_vector(*x_mean, x.size(1), x, kOp, "x_mean");
}

// The backward's own arguments: grad_y (and y, where it is read) of the forward output's shape, x's device and dtype;
// mean, grad_mean, grad_var one value per output channel on x's device. Without these a wrong shape reaches the
// convolution backend's or the kernels' indexing, and a tensor on another device comes back as a mixed result.
void check_backward_args(const Geometry& g, const at::Tensor& x, const at::Tensor& weight, bool transposed,
                         const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var,
                         const at::Tensor& y, const at::Tensor& mean, bool relu) {
  const char* op = "unetx.conv_bn_relu_backward";
  const int64_t out_ch = transposed ? weight.size(1) : weight.size(0), f = transposed ? g.k : 1;
  const std::vector<int64_t> out{g.N, out_ch, f * g.H, f * g.W};
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(out), op, ": expected grad_y of shape ", at::IntArrayRef(out),
              " (the forward's output), got ", grad_y.sizes());
  check_same(x, grad_y, op, "x", "grad_y");
  const bool through_stats = (grad_mean && grad_mean->defined()) || (grad_var && grad_var->defined());
  TORCH_CHECK(y.device() == x.device(), op, ": x is on ", x.device(), " but y is on ", y.device(),
              "; move both to the same device");
  if (through_stats || relu) {
    TORCH_CHECK(y.sizes() == at::IntArrayRef(out), op, ": expected y of shape ", at::IntArrayRef(out),
                " (the forward's output), got ", y.sizes());
    check_same(x, y, op, "x", "y");
  }
  for (const auto& [v, name] : {std::pair{&grad_mean, "grad_mean"}, std::pair{&grad_var, "grad_var"}})
    if (*v && (*v)->defined()) check_channel_vector(**v, out_ch, x, op, name);
  TORCH_CHECK(mean.device() == x.device(), op, ": x is on ", x.device(), " but mean is on ", mean.device(),
              "; move both to the same device");
  if (grad_var && grad_var->defined()) check_channel_vector(mean, out_ch, x, op, "mean");
}

// The layout of the forward's output: x's, or channels_last when the weight is (what the fake impl promises). The
// backward works in it even where y itself was not saved (transposed convolutions, the head).
at::MemoryFormat output_layout(const at::Tensor& x, const at::Tensor& weight) {
  return layout_of(weight) == at::MemoryFormat::ChannelsLast ? at::MemoryFormat::ChannelsLast : layout_of(x);
}

struct ConvParams {
  std::vector<int64_t> stride, padding;
  ConvParams(int64_t k, bool transposed)
      : stride(transposed ? std::vector<int64_t>{k, k} : std::vector<int64_t>{1, 1}),
        padding(transposed ? std::vector<int64_t>{0, 0} : std::vector<int64_t>{k / 2, k / 2}) {}
};

// Below this many multiply-adds (the direct convolution's) Winograd is not even measured: a small convolution's
// time is its overheads, and measuring three candidates costs more than any of them could save.
constexpr double kWinogradMinMacs = 5e7;

// Whether the device's Winograd kernels are candidates for this 3 x 3 convolution (LayerKernels::winograd3x3):
// float32 or bfloat16 (computed in float32 either way), channels-last operands, stride-1 'same', unless
// UNETX_WINOGRAD=0; UNETX_WINOGRAD=1 makes them candidates for small convolutions too (tests).
bool winograd_candidate(const LayerKernels& k, const Geometry& g, const at::Tensor& a, const at::Tensor& weight,
                        bool transposed) {
  if (!k.winograd3x3 || transposed || g.k != 3) return false;
  const char* env = std::getenv("UNETX_WINOGRAD");
  if (env && std::strcmp(env, "0") == 0) return false;
  const auto dt = a.scalar_type();
  if ((dt != at::kFloat && dt != at::kBFloat16) || weight.scalar_type() != dt ||
      !a.is_contiguous(at::MemoryFormat::ChannelsLast))
    return false;
  const double macs = double(g.N) * g.H * g.W * (g.C1 + g.C2) * weight.size(0) * 9;
  return (env && std::strcmp(env, "1") == 0) || macs >= kWinogradMinMacs;
}

// Runs `stock` (ATen's convolution, forward or input gradient) or a Winograd kernel (op 0 or 1 of
// LayerKernels::winograd3x3 on operands p, q), whichever measures fastest for this shape (cpu/algo_choice.h;
// UNETX_CONV_ALGO=conv3x3_forward=winograd4 and the like force one). ATen's is first: the most accurate wins ties.
// A forward's epilogue `ep` (ConvEpilogue: the bias, which ATen's convolution adds; an eval layer's ReLU; a training
// layer's batch statistics) is applied in the Winograd kernels' output transform, and to `stock`'s output by the
// device's passes, inside its timing. With `rows` (a forward whose input is a stage), p is a placeholder: the
// Winograd kernels build the stage band by band, `stock` builds it whole.
template <typename Stock>
at::Tensor fastest_conv3x3(const LayerKernels& k, const Geometry& g, int64_t op, const at::Tensor& p,
                           const at::Tensor& q, int64_t out_ch, const ConvEpilogue& ep, const StageRows* rows,
                           Stock&& stock) {
  at::Tensor out[3];
  // each candidate's own statistics, so that the ones returned are of the output returned
  at::Tensor mean[3], var[3];
  auto own = [&](size_t i) {
    ConvEpilogue e = ep;
    if (ep.mean) {
      mean[i] = at::empty_like(*ep.mean), var[i] = at::empty_like(*ep.var);
      e.mean = &mean[i], e.var = &var[i];
    }
    return e;
  };
  std::vector<AlgoCandidate> c{{"onednn", [&](bool) {
                                  const ConvEpilogue e = own(0);
                                  out[0] = stock();
                                  if (e.relu) out[0].relu_();
                                  if (e.mean) {
                                    RECORD_FUNCTION("unetx::batch_stats", std::vector<c10::IValue>({out[0]}));
                                    k.batch_stats(out[0], *e.mean, *e.var);
                                  }
                                  return true;
                                }}};
  for (const int64_t tile : {int64_t(4), int64_t(2)}) {
    const size_t i = c.size();
    c.push_back({"winograd" + std::to_string(tile), [&, i, tile](bool) {
                   RECORD_FUNCTION("unetx::winograd", {});  // a profile's convolution time (bench/profile.py)
                   out[i] = k.winograd3x3(p, q, op, tile, rows, own(i));
                   return true;
                 }});
  }
  const int ran = run_fastest(op == 0 ? "conv3x3_forward" : "conv3x3_input_grad",
                              algo_key(c10::toString(p.scalar_type()), at::get_num_threads(), g.N, g.C1 + g.C2, out_ch,
                                       g.H, g.W, rows != nullptr, ep.bias != nullptr, ep.relu, ep.mean != nullptr,
                                       q.size(0)),  // the weight's output channels (out_ch is C for op 1)
                              c);
  TORCH_INTERNAL_ASSERT(ran >= 0, "unetx: no 3x3 convolution candidate applied");
  if (op == 0 && k.drop_unchosen_weight_transforms)
    k.drop_unchosen_weight_transforms(q, ran == 0 ? 0 : c[ran].name == "winograd4" ? 4 : 2);
  if (ep.mean) {
    *ep.mean = mean[ran];
    *ep.var = var[ran];
  }
  return out[ran];
}

// The device's row-GEMM kernels of a layer that is one GEMM per pixel row (LayerKernels::conv_transpose2x2 for a
// 2 x 2 transposed layer, ::conv1x1 for a 1 x 1 one), where they are candidates: channels-last operands of one
// floating dtype (float32, bfloat16, float16). Names: the families of its forward and input gradient, its candidate
// name in the weight_grad family (beside the device's own "gemm" weight gradient of a 1 x 1 layer), its profile event.
struct PixelGemm {
  std::optional<at::Tensor> (*run)(const at::Tensor& a, const at::Tensor& b, const OptTensor& bias,
                                   int64_t op) = nullptr;
  const char* forward = nullptr;
  const char* input_grad = nullptr;
  const char* weight_grad = nullptr;
  const char* event = nullptr;
  explicit operator bool() const { return run != nullptr; }
};

PixelGemm pixel_gemm(const LayerKernels& k, const Geometry& g, const at::Tensor& a, const at::Tensor& weight,
                     bool transposed) {
  const auto st = a.scalar_type();
  if (weight.scalar_type() != st || (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) ||
      !a.is_contiguous(at::MemoryFormat::ChannelsLast))
    return {};
  if (transposed && g.k == 2 && k.conv_transpose2x2)
    return {k.conv_transpose2x2, "convT2x2_forward", "convT2x2_input_grad", "gemm", "unetx::conv_transpose2x2"};
  if (!transposed && g.k == 1 && k.conv1x1)
    return {k.conv1x1, "conv1x1_forward", "conv1x1_input_grad", "gemm1x1", "unetx::conv1x1"};
  return {};
}

// Runs `stock` (ATen's convolution pass) or the device's row-GEMM kernel `pg` (op 0 forward, 1 input gradient on
// p, q), whichever measures faster for this shape (cpu/algo_choice.h; ATen's first, so it wins ties).
template <typename Stock>
at::Tensor fastest_pixel_gemm(const PixelGemm& pg, const Geometry& g, int64_t op, const at::Tensor& p,
                              const at::Tensor& q, const OptTensor& bias, int64_t out_ch, Stock&& stock) {
  at::Tensor out[2];
  std::vector<AlgoCandidate> c{{"onednn",
                                [&](bool) {
                                  out[0] = stock();
                                  return true;
                                }},
                               {"gemm", [&](bool) {
                                  RECORD_FUNCTION(pg.event, {});  // convolution in a profile
                                  auto r = pg.run(p, q, bias, op);
                                  if (!r) return false;
                                  out[1] = *r;
                                  return true;
                                }}};
  const int ran = run_fastest(
      op == 0 ? pg.forward : pg.input_grad,
      algo_key(c10::toString(p.scalar_type()), at::get_num_threads(), g.N, g.C1 + g.C2, out_ch, g.H, g.W, q.size(0),
               q.size(1)),  // the weight's channels (out_ch is C for op 1)
      c);
  TORCH_INTERNAL_ASSERT(ran >= 0, "unetx: no row-GEMM convolution candidate applied");
  return out[ran];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward(const LayerKernels& k, const at::Tensor& x,
                                                                    const OptTensor& x_scale, const OptTensor& x_shift,
                                                                    bool x_pool, const OptTensor& x2,
                                                                    c10::string_view x2_mode, const at::Tensor& weight,
                                                                    const OptTensor& bias, bool transposed, bool stats,
                                                                    bool relu, const OptTensor& x_mean) {
  const Geometry g = check_args(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, bias, transposed);
  check_mean(x_mean, x_scale, x);
  TORCH_CHECK(!(stats && relu), kOp,
              ": stats (training BatchNorm) and relu (eval, BatchNorm folded) exclude each other");
  const auto mf = layout_of(x);
  const auto xc = x.contiguous(mf);
  const OptTensor x2c = x2 ? OptTensor(x2->contiguous(mf)) : std::nullopt;
  // The stage in memory only for ATen's convolution: where a Winograd kernel may run, it builds the stage band by
  // band from x (and x2) itself, so the stage is never written to memory; elsewhere (no Winograd kernels on the
  // device, transposed or 1 x 1 layers) the stage is built whole at once, with no placeholder beside it.
  const bool by_rows = k.winograd3x3 && !transposed && g.k == 3 && stage_by_rows_possible(g, x_scale, x_pool, x2c);
  at::Tensor a;
  auto stage = [&] {
    if (!a.defined()) a = input_stage(k, g, xc, x_mean, x_scale, x_shift, x_pool, x2c, mf);
    return a;
  };
  const auto shape = by_rows ? at::empty({g.N, g.C1 + g.C2, g.H, g.W}, xc.options().memory_format(mf)) : stage();
  const ConvParams cp(g.k, transposed);
  // Where the Winograd candidates build the stage band by band (by_rows), ATen's convolution builds it whole on
  // every call, measured runs included: a kept stage would leave it out of all but the first measured run, and the
  // measured choice would not count the pass this path pays in every step.
  auto stock = [&] {
    const at::Tensor s = by_rows ? input_stage(k, g, xc, x_mean, x_scale, x_shift, x_pool, x2c, mf) : stage();
    return at::convolution(s, weight, bias, cp.stride, cp.padding, {1, 1}, transposed, {0, 0}, 1);
  };
  at::Tensor y;
  const auto acc_opts = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor mean, var;
  if (stats) mean = at::empty({weight.size(transposed ? 1 : 0)}, acc_opts), var = at::empty_like(mean);
  bool epilogue_done = false;  // the ReLU / batch statistics, where the convolution computed them
  if (winograd_candidate(k, g, shape, weight, transposed)) {
    const StageRows rows = stage_rows(k, g, xc, x_mean, x_scale, x_shift, x_pool, x2c);
    const ConvEpilogue ep{bias ? &*bias : nullptr, relu, stats ? &mean : nullptr, stats ? &var : nullptr};
    y = fastest_conv3x3(k, g, 0, shape, weight, weight.size(0), ep, by_rows ? &rows : nullptr, stock);
    epilogue_done = true;
  } else if (const auto pg = pixel_gemm(k, g, shape, weight, transposed)) {
    y = fastest_pixel_gemm(pg, g, 0, stage(), weight, bias, weight.size(transposed ? 1 : 0), stock);
  } else {
    y = stock();
  }
  // The backend picks y's layout from a's (and weight's) suggested format, which for degenerate shapes (a of shape
  // (N, 1, 1, 1)) or backends (cuDNN in float64) is not x's. Pin it to what the fake impl promises: x's layout, or
  // channels_last when the weight is; a no-op whenever the backend already chose it.
  y = y.contiguous(output_layout(x, weight));
  if (relu && !epilogue_done) y.relu_();
  if (!stats) return {y, at::empty({0}, y.options()), at::empty({0}, y.options())};
  TORCH_CHECK_VALUE(y.numel() / y.size(1) > 1, kOp,  // ValueError, as nn.BatchNorm2d raises
                    ": Expected more than 1 value per channel when training, got input size ", y.sizes(),
                    " (batch statistics need batch * height * width > 1)");
  y = y.contiguous(layout_of(y));
  if (!epilogue_done) {
    RECORD_FUNCTION("unetx::batch_stats", std::vector<c10::IValue>({y}));
    k.batch_stats(y, mean, var);
  }
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const LayerKernels& k, const at::Tensor& grad_y, const OptTensor& grad_mean, const OptTensor& grad_var,
    const at::Tensor& x, const OptTensor& x_scale, const OptTensor& x_shift, bool x_pool, const OptTensor& x2,
    c10::string_view x2_mode, const at::Tensor& weight, bool has_bias, bool transposed, const at::Tensor& y,
    const at::Tensor& mean, bool relu, std::array<bool, 4> output_mask, const OptTensor& x_mean) {
  const OptTensor no_bias;
  const Geometry g = check_args(x, x_scale, x_shift, x_pool, x2, x2_mode, weight, no_bias, transposed);
  check_mean(x_mean, x_scale, x);
  check_backward_args(g, x, weight, transposed, grad_y, grad_mean, grad_var, y, mean, relu);
  const auto mf = layout_of(x);
  const auto xc = x.contiguous(mf);
  const OptTensor x2c = x2 ? OptTensor(x2->contiguous(mf)) : std::nullopt;

  // 1. the gradient reaching the conv output: through the fused ReLU and/or the batch statistics
  const auto ymf = output_layout(x, weight);
  at::Tensor gy = grad_y.contiguous(ymf);
  const bool through_stats = (grad_mean && grad_mean->defined()) || (grad_var && grad_var->defined());
  if (through_stats || relu) {
    const auto yc = y.contiguous(ymf);
    const double M = double(yc.numel() / yc.size(1));
    const auto acc = acc_type(yc.scalar_type());
    at::Tensor a, b, m;
    if (grad_mean && grad_mean->defined()) a = at::div(grad_mean->to(acc), M).contiguous();
    if (grad_var && grad_var->defined()) {
      b = at::mul(grad_var->to(acc), 2.0 / M).contiguous();
      m = mean.to(acc).contiguous();
    }
    auto out = at::empty(yc.sizes(), yc.options().memory_format(ymf));
    {
      RECORD_FUNCTION("unetx::fold_output_grad", std::vector<c10::IValue>({gy}));
      k.fold_output_grad(gy, yc, b.defined() ? &m : nullptr, a.defined() ? &a : nullptr, b.defined() ? &b : nullptr,
                         relu, out);
    }
    gy = out;
  }

  // 2. the convolution's backward, on the recomputed input stage. The input gradient is ATen's or a kernel of the
  // device (below); the weight (and bias) gradient is whichever of the device's candidates measures fastest for this
  // layer's shape and dtype (cpu/algo_choice.h): the device's own weight gradient (LayerKernels::weight_grad),
  // ATen's on the operands as they are, ATen's on planar copies of them (LayerKernels::to_planar), ATen's on float32
  // copies of bfloat16 / float16 ones (LayerKernels::widened_weight_grad), Winograd's, or the row GEMMs of a 2 x 2
  // transposed or 1 x 1 layer (PixelGemm).
  const bool need_x = output_mask[0], need_x2 = output_mask[1] && x2.has_value();
  const bool need_a = need_x || need_x2;
  const bool try_own_gw = k.weight_grad && output_mask[2] && !transposed && mf == at::MemoryFormat::ChannelsLast &&
                          ymf == at::MemoryFormat::ChannelsLast;
  // The device's weight gradient builds the recomputed input stage itself, a few rows at a time (see StageRows),
  // where there is a stage to build; not under bilinear upsampling, whose edge rows clamp to the image's edge.
  const bool stage_by_rows = try_own_gw && stage_by_rows_possible(g, x_scale, x_pool, x2c);
  const StageRows rows = stage_rows(k, g, xc, x_mean, x_scale, x_shift, x_pool, x2c);
  auto placeholder = [&] { return at::empty({g.N, g.C1 + g.C2, g.H, g.W}, xc.options().memory_format(mf)); };
  at::Tensor a = output_mask[2] && !stage_by_rows ? input_stage(k, g, xc, x_mean, x_scale, x_shift, x_pool, x2c, mf)
                                                  : placeholder();
  // the whole stage, for the candidates that need it in memory
  auto stage = [&]() -> at::Tensor {
    return stage_by_rows ? input_stage(k, g, xc, x_mean, x_scale, x_shift, x_pool, x2c, mf) : a;
  };
  const ConvParams cp(g.k, transposed);
  const int64_t out_ch = transposed ? weight.size(1) : weight.size(0);
  // Planar copies: k x k (k > 1) channels-last layers on a device with to_planar (LayerKernels::to_planar).
  const bool can_split = k.to_planar != nullptr && output_mask[2] && ymf == at::MemoryFormat::ChannelsLast && g.k > 1;
  at::Tensor ga, gw, gb_;
  // The input gradient alone (the weight gradient is chosen below): ATen's, or a Winograd or row-GEMM kernel where
  // one measures faster for this shape (fastest_conv3x3, fastest_pixel_gemm).
  if (need_a) {
    auto stock = [&] {
      return std::get<0>(at::convolution_backward(gy, a, weight, std::nullopt, cp.stride, cp.padding, {1, 1},
                                                  transposed, {0, 0}, 1, {true, false, false}));
    };
    if (winograd_candidate(k, g, gy, weight, transposed))
      ga = fastest_conv3x3(k, g, 1, gy, weight, g.C1 + g.C2, ConvEpilogue{}, nullptr, stock);
    else if (const auto pg = pixel_gemm(k, g, gy, weight, transposed))
      ga = fastest_pixel_gemm(pg, g, 1, gy, weight, std::nullopt, g.C1 + g.C2, stock);
    else
      ga = stock();
  }
  // The bias gradient is grad_y summed, whichever weight gradient runs: the backends' own is no faster, and
  // oneDNN's for a bfloat16 transposed convolution is a scalar reference loop that doubles that layer's
  // weight-gradient time (BENCHMARKS.md, "Transposed-convolution bias gradient").
  if (has_bias && output_mask[3]) gb_ = gy.sum({0, 2, 3});
  if (output_mask[2]) {
    at::Tensor own, aten, planar;
    const std::array<bool, 3> w_mask{false, true, false};
    std::vector<AlgoCandidate> own_c, planar_c;
    const AlgoCandidate aten_c{
        "onednn", [&](bool) {
          aten = std::get<1>(at::convolution_backward(gy, stage(), weight, std::nullopt, cp.stride, cp.padding, {1, 1},
                                                      transposed, {0, 0}, 1, w_mask));
          return true;
        }};
    if (try_own_gw)
      own_c.push_back({"gemm", [&](bool) {
                         RECORD_FUNCTION("unetx::weight_grad", {});
                         std::optional<at::Tensor> r;
                         if (stage_by_rows) {
                           r = k.weight_grad(gy, a, &rows, g.k);
                         } else {
                           r = k.weight_grad(gy, a, nullptr, g.k);
                         }
                         if (!r) return false;
                         own = *r;
                         return true;
                       }});
    if (can_split)
      planar_c.push_back({"onednn_planar", [&](bool only) {
                            constexpr auto planar_mf = at::MemoryFormat::Contiguous;
                            at::Tensor gy_p, a_p;
                            {
                              RECORD_FUNCTION("unetx::to_planar", std::vector<c10::IValue>({gy}));
                              gy_p = k.to_planar(gy);
                              // the only run: free each channels-last operand once its planar copy exists, so
                              // peak memory stays one operand above the unsplit backward's
                              if (only) gy = at::Tensor();
                              a_p = k.to_planar(stage());
                              if (only) a = at::Tensor();
                            }
                            planar = std::get<1>(at::convolution_backward(gy_p, a_p, weight.contiguous(planar_mf),
                                                                          std::nullopt, cp.stride, cp.padding, {1, 1},
                                                                          transposed, {0, 0}, 1, w_mask));
                            return true;
                          }});
    // Winograd weight gradients (float32 3 x 3; LayerKernels::winograd3x3), from to_planar_min_channels input
    // channels; each builds the stage band by band where it can, else whole; its measured time includes that.
    std::vector<AlgoCandidate> wino_c;
    at::Tensor wino[2];
    if (winograd_candidate(k, g, gy, weight, transposed) && g.C1 + g.C2 >= k.to_planar_min_channels) {
      for (const int64_t tile : {int64_t(4), int64_t(2)}) {
        at::Tensor* slot = &wino[tile == 4 ? 0 : 1];
        wino_c.push_back({"winograd" + std::to_string(tile), [&, slot, tile](bool) {
                            RECORD_FUNCTION("unetx::winograd", {});
                            ConvEpilogue ep;
                            ep.layout_of = &weight;
                            *slot = stage_by_rows ? k.winograd3x3(gy, a, 2, tile, &rows, ep)
                                                  : k.winograd3x3(gy, stage(), 2, tile, nullptr, ep);
                            return true;
                          }});
      }
    }
    // The device's row-GEMM kernel of a 2 x 2 transposed or a 1 x 1 layer (PixelGemm).
    at::Tensor pixel;
    std::vector<AlgoCandidate> pixel_c;
    if (const auto pg = pixel_gemm(k, g, gy, weight, transposed))
      pixel_c.push_back({pg.weight_grad, [&, pg](bool) {
                           RECORD_FUNCTION(pg.event, {});
                           auto r = pg.run(gy, stage(), std::nullopt, 2);
                           if (!r) return false;
                           pixel = *r;
                           return true;
                         }});
    // ATen's on float32 copies of bfloat16 / float16 operands (LayerKernels::widened_weight_grad)
    at::Tensor widened;
    std::vector<AlgoCandidate> widened_c;
    const auto low = weight.scalar_type();
    if (k.widened_weight_grad && (low == at::kBFloat16 || low == at::kHalf))
      widened_c.push_back({"onednn_float32", [&](bool only) {
                             // the only run: free each low-precision operand once its float32 copy exists
                             const auto gy32 = gy.to(at::kFloat);
                             if (only) gy = at::Tensor();
                             const auto a32 = stage().to(at::kFloat);
                             if (only) a = at::Tensor();
                             const auto w32 = std::get<1>(
                                 at::convolution_backward(gy32, a32, weight.to(at::kFloat), std::nullopt, cp.stride,
                                                          cp.padding, {1, 1}, transposed, {0, 0}, 1, w_mask));
                             // rounded once, straight into the parameter's strides
                             widened = at::empty_like(weight).copy_(w32);
                             return true;
                           }});
    // List order is the preference on ties and where a measurement is cut short: the device's own kernels from
    // LayerKernels::to_planar_min_channels input channels, ATen's channels-last one below.
    std::vector<AlgoCandidate> cands;
    std::vector<at::Tensor*> slots;
    const bool own_first = g.C1 + g.C2 >= k.to_planar_min_channels;
    auto add = [&](const std::vector<AlgoCandidate>& c, at::Tensor* slot) {
      for (const auto& cand : c) cands.push_back(cand), slots.push_back(slot);
    };
    if (own_first) add(own_c, &own), add(planar_c, &planar);
    cands.push_back(aten_c), slots.push_back(&aten);
    if (!own_first) add(own_c, &own), add(planar_c, &planar);
    add(pixel_c, &pixel);
    add(widened_c, &widened);
    // Winograd last: on a tie the more accurate kernels win
    for (size_t i = 0; i < wino_c.size(); ++i) cands.push_back(wino_c[i]), slots.push_back(&wino[i]);
    const std::string key = algo_key(c10::toString(xc.scalar_type()), at::get_num_threads(), g.N, g.C1, g.C2, g.H, g.W,
                                     out_ch, g.k, transposed, x_pool, x_scale.has_value(), static_cast<int>(g.mode),
                                     output_mask[2], has_bias && output_mask[3]);
    const int ran = run_fastest("weight_grad", key, cands);
    TORCH_INTERNAL_ASSERT(ran >= 0, "unetx: no weight gradient candidate applied");
    gw = *slots[ran];
  }
  // The backend picks the weight gradient's layout from the input's (oneDNN's bf16 one differs from its float32
  // one in the strides of size-1 dimensions); the gradient takes its parameter's exact strides, as the fake impl
  // and the fallback return it, so that autograd accumulates it without another copy.
  if (gw.defined() && gw.strides() != weight.strides()) gw = at::empty_like(weight, gw.options()).copy_(gw);

  // 3. the input stage's backward: one pass for the skip/previous-layer part, one for the upsampled part
  at::Tensor gx, gs, gt, gx2, gm;
  if (need_x) {
    const bool staged = x_scale || x_pool || x2;
    auto ga1 = staged ? ga.narrow(1, 0, g.C1) : ga;
    if (!x_scale && !x_pool) {
      gx = ga1.contiguous(mf);
    } else {
      // Without pooling or a concatenation, ga is a temporary of exactly x's shape and each element of gx depends
      // on the same element of ga only: overwrite it rather than fault in a fresh activation-sized tensor, where the
      // device's kernel allows it (LayerKernels::activation_backward_in_place).
      const bool in_place = k.activation_backward_in_place && !x_pool && !x2 && ga.sizes() == xc.sizes() &&
                            ga.scalar_type() == xc.scalar_type() && ga.is_contiguous(mf);
      gx = in_place ? ga : at::empty(xc.sizes(), xc.options().memory_format(mf));
      at::Tensor* gsp = nullptr;
      at::Tensor* gtp = nullptr;
      if (x_scale) {
        auto opts = xc.options().dtype(acc_type(xc.scalar_type()));
        gs = at::empty({g.C1}, opts);
        gt = at::empty({g.C1}, opts);
        gsp = &gs;
        gtp = &gt;
      }
      {
        RECORD_FUNCTION("unetx::activation_backward", std::vector<c10::IValue>({xc}));
        k.activation_backward(x_pool ? nullptr : &ga1, x_pool ? &ga1 : nullptr, xc, x_mean, x_scale, x_shift, gx, gsp,
                              gtp);
      }
      if (x_mean) gm = at::neg(at::mul(gt, x_scale->to(gt.scalar_type()))).to(x_mean->scalar_type());
      if (x_scale) {
        gs = gs.to(x_scale->scalar_type());
        gt = gt.to(x_shift->scalar_type());
      }
    }
  }
  if (need_x2) {
    gx2 = at::empty(x2c->sizes(), x2c->options().memory_format(mf));
    {
      RECORD_FUNCTION("unetx::upsample_backward", std::vector<c10::IValue>({gx2}));
      k.upsample_backward(ga.narrow(1, g.C1, g.C2), g.mode, gx2);
    }
  }
  return std::make_tuple(gx, gs, gt, gx2, gw, gb_, gm);
}

}  // namespace unetx
