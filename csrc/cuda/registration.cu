// The CUDA kernel table: every unetx op (csrc/ops.cpp, csrc/conv_bn_relu.cpp) over the kernels of this directory,
// registered under the CUDA dispatch key on request: csrc/registration.cpp's register_cuda_kernels() calls this when
// the user opts in (UNETX_CUDA_KERNELS=1, see unetx.ops), so kernels that have not been verified on a GPU are never
// enabled silently. Deliberately not a static TORCH_LIBRARY_IMPL.
//
// Memory traffic around the fused layer's convolution, per element (T = element size): the input stage reads x (T)
// and writes the staged input a (T; skipped when there is nothing to stage); the statistics read y once (T).
// Backward recomputes a (T read + T write), folds the statistics' and ReLU's gradient into grad_y (2T read, T
// write), and runs the input stage's backward (reads x and grad_a, writes grad_x: 3T).
#include <torch/library.h>

#include "cuda/kernels.cuh"
#include "ops.h"

namespace unetx::cuda {
namespace {

const LayerKernels kKernels{
    activation_forward,
    activation_backward,
    upsample_forward,
    upsample_backward,
    batch_stats,
    fold_output_grad,
    /*to_planar=*/nullptr,  // cuDNN prefers NHWC throughout
    /*weight_grad=*/nullptr,
    /*activation_backward_in_place=*/false,  // not verified for grad_x == grad_z
    /*to_planar_min_channels=*/0,
};

}  // namespace

void register_kernels(torch::Library& lib) {
  register_ops(lib, kKernels);
}

}  // namespace unetx::cuda
