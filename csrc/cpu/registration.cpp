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
};

}  // namespace
}  // namespace unetx::cpu

TORCH_LIBRARY_IMPL(unetx, CPU, m) {
  unetx::register_ops(m, unetx::cpu::kKernels);
}
