// The CUDA kernels of csrc/cuda/bn_relu.cu compiled by the host C++ compiler under the CUDA emulation
// (csrc/cuda/host_emulation.h): the same kernel bodies and launch code, run by emulated threads on CPU tensors.
#include "cuda/bn_relu.cu"
