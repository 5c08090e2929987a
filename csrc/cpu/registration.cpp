// The CPU kernel table: every unetx op (csrc/ops.cpp, csrc/conv_bn_relu.cpp) registered for the CPU dispatch key
// over the kernels of this directory.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "ops.h"

namespace unetx::cpu {
namespace {

const LayerKernels kKernels{
    activation_forward,
    activation_backward,
    upsample_forward,
    upsample_backward,
    batch_stats,
    fold_output_grad,
    to_planar,
    weight_grad,
    /*activation_backward_in_place=*/true,  // written for grad_x == grad_z (see bn_relu.cpp)
    /*to_planar_min_channels=*/kPlanarWeightGradMinChannels,
    /*winograd3x3=*/winograd3x3,
    /*conv_transpose2x2=*/conv_transpose2x2_op,
    /*conv1x1=*/conv1x1_op,
    /*upsample_concat_forward=*/upsample_concat_forward,
    /*upsample_concat_backward=*/upsample_concat_backward,
    /*widened_weight_grad=*/true,
    /*drop_unchosen_weight_transforms=*/drop_unchosen_weight_transforms,
};

}  // namespace
}  // namespace unetx::cpu

TORCH_LIBRARY_IMPL(unetx, CPU, m) {
  unetx::register_ops(m, unetx::cpu::kKernels);
  m.impl("winograd_conv3x3", unetx::cpu::winograd_conv3x3);
  m.impl("winograd_conv3x3_input_grad", unetx::cpu::winograd_conv3x3_input_grad);
  m.impl("winograd_conv3x3_weight_grad", unetx::cpu::winograd_conv3x3_weight_grad);
}

// CPU-only ops, for tests and measurements of the kernels conv_bn_relu may choose (cpu/kernels.h): Winograd
// convolutions of a 3 x 3 'same' convolution and its two gradients.
TORCH_LIBRARY_FRAGMENT(unetx, m) {
  m.def("winograd_conv3x3(Tensor x, Tensor weight, int tile=4) -> Tensor");
  m.def("winograd_conv3x3_input_grad(Tensor grad_y, Tensor weight, int tile=4) -> Tensor");
  m.def("winograd_conv3x3_weight_grad(Tensor grad_y, Tensor x, int tile=4) -> Tensor");
}
