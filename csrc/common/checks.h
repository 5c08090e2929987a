// Argument checks shared by every device's entry points: errors are raised here, at the boundary, with the
// offending sizes in the message.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>
#include <string>
#include <string_view>

#include "common/upsample2x.h"

namespace unetx {

inline void check_4d(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": expected ", name, " to be a 4-D (N, C, H, W) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": expected ", name, " to be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* na, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", na, " is on ", a.device(), " but ", nb, " is on ", b.device(),
              "; move both to the same device");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " is ", a.scalar_type(), " but ", nb, " is ",
              b.scalar_type(), "; use one dtype (or torch.autocast)");
}

inline void check_channel_vector(const at::Tensor& v, int64_t channels, const at::Tensor& x, const char* op,
                                 const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == channels, op, ": expected ", name, " of shape [", channels,
              "] (one value per channel), got ", v.sizes());
  TORCH_CHECK(v.device() == x.device(), op, ": ", name, " is on ", v.device(), " but the input is on ", x.device());
  TORCH_CHECK(v.is_floating_point(), op, ": expected ", name, " to be floating-point, got ", v.scalar_type());
}

inline void check_even(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, op,
              ": 2x2 pooling needs an even height and width, got input of shape ", x.sizes(),
              "; pad or crop to even size (unetx.UNet pads its input for you)");
}

inline Upsample parse_upsample(std::string_view mode, const char* op) {
  if (mode == "none") return Upsample::None;
  if (mode == "nearest") return Upsample::Nearest;
  if (mode == "bilinear") return Upsample::Bilinear;
  TORCH_CHECK(false, op, ": upsampling mode must be 'none', 'nearest' or 'bilinear', got '", std::string(mode), "'");
}

// Memory format a kernel works in: channels_last if the input is (or behaves like) channels_last.
inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return x.suggest_memory_format();
}

}  // namespace unetx
