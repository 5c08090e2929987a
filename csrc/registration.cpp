// The unetx operator library: every op's schema (TORCH_LIBRARY, from ops.cpp), and the small pybind11 module that
// reports how the extension was built and switches on the CUDA kernels. Each device registers every op over its
// kernel table: cpu/registration.cpp (always), cuda/registration.cu (on request).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <memory>

#include "ops.h"

namespace py = pybind11;

#ifdef UNETX_WITH_CUDA
namespace unetx::cuda {
void register_kernels(torch::Library& lib);
}
#endif

TORCH_LIBRARY(unetx, m) { unetx::define_ops(m); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "unetx compiled kernels (ops are in torch.ops.unetx)";
  m.def("build_info", [] {
    py::dict d;
    d["torch_version"] = UNETX_TORCH_VERSION;
    d["compiler"] = UNETX_CXX_COMPILER;
#ifdef UNETX_WITH_CUDA
    d["cuda"] = true;
    d["nvcc_version"] = UNETX_NVCC_VERSION;
    d["cuda_archs"] = UNETX_CUDA_ARCHS;
#else
    d["cuda"] = false;
    d["nvcc_version"] = py::none();
    d["cuda_archs"] = "";
#endif
    return d;
  });
  m.def("register_cuda_kernels", [] {
#ifdef UNETX_WITH_CUDA
    static std::unique_ptr<torch::Library> lib;
    if (!lib) {
      lib = std::make_unique<torch::Library>(torch::Library::IMPL, "unetx", c10::DispatchKey::CUDA, __FILE__, __LINE__);
      unetx::cuda::register_kernels(*lib);
    }
    return true;
#else
    return false;
#endif
  }, "Register the CUDA kernels under the CUDA dispatch key (opt-in until verified on a GPU; see unetx.ops).");
}
