// Plain CUDA launchers for the fused solver vector updates (no torch headers). All row tensors
// [k, P] are contiguous; per-row vectors [k]; `active` / `neg` are bool. Formulas: csrc/ops.cpp.
// One block per row: a block reduction, the per-row scalar logic, then the update pass.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace metafluence {

#define METAFLUENCE_SOLVER_LAUNCHERS(T)                                                           \
  cudaError_t launch_cg_update(T* x, T* r, T* curv_max, const T* p, const T* Ap, const T* rz,     \
                               const bool* active, double curv_tol, T* rr, bool* neg, int64_t k,  \
                               int64_t P, cudaStream_t stream);                                   \
  cudaError_t launch_cg_direction(T* p, const T* z, const T* rz_new, const T* rz_old,             \
                                  const bool* active, int64_t k, int64_t P, cudaStream_t stream); \
  cudaError_t launch_neumann_step(T* x, T* r, const T* b, const T* Ax, const bool* active,        \
                                  const T* thr, double inv_sigma, bool advance, T* rn, int64_t k, \
                                  int64_t P, cudaStream_t stream);
METAFLUENCE_SOLVER_LAUNCHERS(float)
METAFLUENCE_SOLVER_LAUNCHERS(double)
#undef METAFLUENCE_SOLVER_LAUNCHERS

}  // namespace metafluence
