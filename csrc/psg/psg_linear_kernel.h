// Plain CUDA launchers for psg_linear: raw pointers + sizes + stream, no torch headers, so they
// compile with nvcc against any torch (or none). Inputs must be contiguous.
//   act  [N, T, I], gout [N, T, O] -> out [N, O, I],  out[n,o,i] = sum_t gout[n,t,o] * act[n,t,i]
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace metafluence {

cudaError_t launch_psg_linear(const float* act, const float* gout, float* out, int64_t N, int64_t T,
                              int64_t I, int64_t O, cudaStream_t stream);
cudaError_t launch_psg_linear(const double* act, const double* gout, double* out, int64_t N,
                              int64_t T, int64_t I, int64_t O, cudaStream_t stream);

}  // namespace metafluence
