// The unetx operator library: every op's schema (TORCH_LIBRARY), and the small pybind11 module that reports how the
// extension was built and switches on the CUDA kernels. Kernels register per dispatch key in cpu/*.cpp, cuda/*.cu.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <memory>

namespace py = pybind11;

#ifdef UNETX_WITH_CUDA
namespace unetx::cuda {
void register_kernels(torch::Library& lib);
}
#endif

TORCH_LIBRARY(unetx, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // bn_relu: relu((y - mean) * scale + shift); mean defaults to 0. Backward returns (y, scale, shift, mean) grads.
  m.def("bn_relu(Tensor y, Tensor scale, Tensor shift, Tensor? mean=None) -> Tensor", tags);
  m.def("bn_relu_backward(Tensor grad, Tensor y, Tensor scale, Tensor shift, Tensor? mean=None)"
        " -> (Tensor, Tensor, Tensor, Tensor)", tags);
  m.def("bn_relu_pool(Tensor y, Tensor scale, Tensor shift, Tensor? mean=None) -> (Tensor, Tensor)", tags);
  m.def("bn_relu_pool_backward(Tensor grad_z, Tensor grad_p, Tensor y, Tensor scale, Tensor shift, Tensor? mean=None)"
        " -> (Tensor, Tensor, Tensor, Tensor)", tags);
  m.def("avg_pool2x2(Tensor x) -> Tensor", tags);
  m.def("avg_pool2x2_backward(Tensor grad) -> Tensor", tags);
  m.def("upsample_concat(Tensor skip, Tensor x, str mode) -> Tensor", tags);
  m.def("upsample_concat_backward(Tensor grad, int skip_channels, str mode) -> (Tensor, Tensor)", tags);
  m.def("conv_bn_relu(Tensor x, Tensor? x_scale, Tensor? x_shift, bool x_pool, Tensor? x2, str x2_mode,"
        " Tensor weight, Tensor? bias, bool transposed, bool stats, bool relu, Tensor? x_mean=None)"
        " -> (Tensor, Tensor, Tensor)", tags);
  m.def("conv_bn_relu_backward(Tensor grad_y, Tensor? grad_mean, Tensor? grad_var, Tensor x, Tensor? x_scale,"
        " Tensor? x_shift, bool x_pool, Tensor? x2, str x2_mode, Tensor weight, bool has_bias, bool transposed,"
        " Tensor y, Tensor mean, bool relu, bool[4] output_mask, Tensor? x_mean=None)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", tags);
}

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
