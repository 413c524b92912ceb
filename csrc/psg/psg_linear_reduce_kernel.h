// Plain CUDA launchers for psg_linear_sqnorm and psg_linear_dot: raw pointers + sizes + stream,
// no torch headers. Inputs must be contiguous.
//   act [N, T, I], gout [N, T, O], vec [M, O, I]; G_n = sum_t gout[n, t, :]^T act[n, t, :]
// Both write per-tile partial sums in double; the caller sums them over tiles:
//   sqnorm: partial[n, tile]    = sum over the tile of G_n^2                 [N, tiles]
//   dot:    partial[n, tile, j] = sum over the tile of G_n * vec[j]           [N, tiles, M]
// with tiles = psg_reduce_tiles(I, O) (tiles of kPsgReduceTileO rows x kPsgReduceTileI columns).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace metafluence {

constexpr int kPsgReduceTileI = 128;  // = threads per block, one column of the tile each
constexpr int kPsgReduceTileO = 16;   // rows of G_n held in registers per thread

inline int64_t psg_reduce_tiles(int64_t I, int64_t O) {
  return ((I + kPsgReduceTileI - 1) / kPsgReduceTileI) *
         ((O + kPsgReduceTileO - 1) / kPsgReduceTileO);
}

cudaError_t launch_psg_linear_sqnorm(const float* act, const float* gout, double* partial,
                                     int64_t N, int64_t T, int64_t I, int64_t O,
                                     cudaStream_t stream);
cudaError_t launch_psg_linear_sqnorm(const double* act, const double* gout, double* partial,
                                     int64_t N, int64_t T, int64_t I, int64_t O,
                                     cudaStream_t stream);
cudaError_t launch_psg_linear_dot(const float* act, const float* gout, const float* vec,
                                  double* partial, int64_t N, int64_t T, int64_t I, int64_t O,
                                  int64_t M, cudaStream_t stream);
cudaError_t launch_psg_linear_dot(const double* act, const double* gout, const double* vec,
                                  double* partial, int64_t N, int64_t T, int64_t I, int64_t O,
                                  int64_t M, cudaStream_t stream);

}  // namespace metafluence
