// unetx_cuda_host: every unetx op over the CUDA kernels run on the host (csrc/cuda/*.cu compiled by the host C++
// compiler with UNETX_HOST_EMULATION, see csrc/cuda/host_emulation.h), registered as torch.ops.unetx_cuda_host.* for
// CPU tensors through the same device-generic op layer (csrc/ops.cpp, csrc/conv_bn_relu.cpp) the real ops use.
// tests/cuda_host/test_kernels.py compares them with unetx.reference and with the CPU kernels (torch.ops.unetx.*).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "cuda/common.cuh"
#include "cuda/kernels.cuh"
#include "ops.h"

namespace unetx::cuda {
namespace {

// The same table as csrc/cuda/registration.cu.
const LayerKernels kKernels{
    activation_forward,
    activation_backward,
    upsample_forward,
    upsample_backward,
    batch_stats,
    fold_output_grad,
    /*to_planar=*/nullptr,
    /*weight_grad=*/nullptr,
    /*activation_backward_in_place=*/false,
    /*to_planar_min_channels=*/0,
};

}  // namespace
}  // namespace unetx::cuda

TORCH_LIBRARY(unetx_cuda_host, m) {
  unetx::define_ops(m);
}
TORCH_LIBRARY_IMPL(unetx_cuda_host, CPU, m) {
  unetx::register_ops(m, unetx::cuda::kKernels);
}

PYBIND11_MODULE(unetx_cuda_host, m) {
  m.doc() = "unetx's CUDA kernels run on the host by emulated threads (ops in torch.ops.unetx_cuda_host)";
  m.def(
      "kernel_launches", [] { return unetx::emu::Pool::get().launches(); },
      "Launches per CUDA kernel name since the last reset_kernel_launches().");
  m.def("reset_kernel_launches", [] { unetx::emu::Pool::get().reset_launches(); });
#if defined(__SANITIZE_ADDRESS__)
  m.attr("sanitizer") = "address";
#elif defined(__SANITIZE_THREAD__)
  m.attr("sanitizer") = "thread";
#else
  m.attr("sanitizer") = "";
#endif
}
