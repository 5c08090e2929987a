// The unetx ops, written once for every device: each op's argument checks, output allocation and composition live
// in csrc/ops.cpp (and csrc/conv_bn_relu.cpp for the fused layer) over a device's kernel table (LayerKernels); a
// device supplies only the table: csrc/cpu/registration.cpp, csrc/cuda/registration.cu, and the host-emulated CUDA
// kernels of tests/cuda_host/.
#pragma once
#include <torch/library.h>

#include "conv_bn_relu.h"

namespace unetx {

// Every op's schema, into a TORCH_LIBRARY(namespace) block.
void define_ops(torch::Library& m);

// Every op for one dispatch key (a TORCH_LIBRARY_IMPL block), over one device's kernels. `k` must outlive the
// registration (a namespace-scope constant).
void register_ops(torch::Library& m, const LayerKernels& k);

}  // namespace unetx
