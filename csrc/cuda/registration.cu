// The CUDA kernels of every unetx op, registered under the CUDA dispatch key on request: csrc/registration.cpp's
// register_cuda_kernels() calls this when the user opts in (UNETX_CUDA_KERNELS=1, see unetx.ops), so kernels that
// have not been verified on a GPU are never enabled silently. Deliberately not a static TORCH_LIBRARY_IMPL.
#include <torch/library.h>

#include "cuda/kernels.cuh"

namespace unetx::cuda {

void register_kernels(torch::Library& lib) {
  lib.impl("bn_relu", &bn_relu);
  lib.impl("bn_relu_backward", &bn_relu_backward);
  lib.impl("bn_relu_pool", &bn_relu_pool);
  lib.impl("bn_relu_pool_backward", &bn_relu_pool_backward);
  lib.impl("avg_pool2x2", &avg_pool2x2);
  lib.impl("avg_pool2x2_backward", &avg_pool2x2_backward);
  lib.impl("upsample_concat", &upsample_concat);
  lib.impl("upsample_concat_backward", &upsample_concat_backward);
  lib.impl("conv_bn_relu", &conv_bn_relu);
  lib.impl("conv_bn_relu_backward", &conv_bn_relu_backward);
}

}  // namespace unetx::cuda
