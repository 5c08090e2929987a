// Single-threaded GEMMs for the CPU kernels that cut a convolution into many small matrix products inside their own
// at::parallel_for (winograd.cpp, conv_transpose2x2.cpp).
#pragma once
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

// The Fortran BLAS sgemm that torch's CPU library exports (MKL on x86 builds). ATen's own wrapper
// (at::native::cpublas::gemm) is not exported for float; weak, so that a torch built without BLAS still loads us
// and takes at::addmm_out instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace unetx::cpu {

// Column-major C (m x n, leading dimension ldc) = beta * C + op(A) op(B), op = transpose where t* is true.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_) {
    const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
    const float one = 1.f;
    sgemm_(ta ? "T" : "N", tb ? "T" : "N", &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  // row-major C^T (n x m) = op(B)^T op(A)^T
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto ct = at::from_blob(c, {n, m}, {ldc, 1}, opts);
  auto at_ = ta ? at::from_blob(const_cast<float*>(a), {k, m}, {lda, 1}, opts).t()
                : at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opts);  // op(A) (m x k)
  auto bt_ = tb ? at::from_blob(const_cast<float*>(b), {n, k}, {ldb, 1}, opts)
                : at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opts).t();  // op(B)^T (n x k)
  at::addmm_out(ct, ct, bt_, at_.t(), beta, 1.f);
}

// Row-major C (m x n, leading dimension ldc) = A (m x k) B (k x n), or += where `accumulate`: oneDNN's batch-reduce
// GEMM micro-kernel through ATen (JIT-compiled for the CPU, no packing of the operands; 1.2-1.45x MKL's sgemm on
// the small products of these kernels, BENCHMARKS.md; ATen falls back to its BLAS where oneDNN's micro-kernels are
// not built or the CPU lacks AVX2).
inline void block_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                       bool accumulate, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

}  // namespace unetx::cpu
