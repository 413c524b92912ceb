// Plain CUDA launchers for psg_conv2d, psg_conv2d_sqnorm and psg_conv2d_dot: raw pointers +
// geometry + stream, no torch headers, so they compile with nvcc against any torch (or none).
// Inputs must be contiguous: act [N, C, H, W], gout [N, O, Ho, Wo], vec [M, O, Cg, kh, kw].
//   G_n[o, c, i, j] = sum_{y, x} gout[n, o, y, x] * act[n, g Cg + c, y sh + i dh - ph, x sw + j dw
//   - pw] psg:    out[n] = G_n                                                   [N, O, Cg, kh, kw]
//   sqnorm: partial[n, tile]    = sum over the tile of G_n^2               [N, tiles]
//   dot:    partial[n, tile, j] = sum over the tile of G_n * vec[j]        [N, tiles, M]
// with tiles = psg_conv2d_tiles(geom) (per group: kPsgConvTileO output channels x
// kPsgConvTileK kernel entries); the caller sums the partials over tiles (double).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "psg/psg_conv2d_geom.h"

namespace metafluence {

constexpr int kPsgConvTileK = 32;  // = blockDim.x: one kernel entry per thread
constexpr int kPsgConvTileO = 32;  // output channels per block (kPsgConvTileO / 8 per thread)

inline int64_t psg_conv2d_tiles(const Conv2dGeom& g) {
  return g.groups * ((g.og() + kPsgConvTileO - 1) / kPsgConvTileO) *
         ((g.kg() + kPsgConvTileK - 1) / kPsgConvTileK);
}

cudaError_t launch_psg_conv2d(const float* act, const float* gout, float* out,
                              const Conv2dGeom& geom, cudaStream_t stream);
cudaError_t launch_psg_conv2d(const double* act, const double* gout, double* out,
                              const Conv2dGeom& geom, cudaStream_t stream);
cudaError_t launch_psg_conv2d_sqnorm(const float* act, const float* gout, double* partial,
                                     const Conv2dGeom& geom, cudaStream_t stream);
cudaError_t launch_psg_conv2d_sqnorm(const double* act, const double* gout, double* partial,
                                     const Conv2dGeom& geom, cudaStream_t stream);
cudaError_t launch_psg_conv2d_dot(const float* act, const float* gout, const float* vec,
                                  double* partial, int64_t M, const Conv2dGeom& geom,
                                  cudaStream_t stream);
cudaError_t launch_psg_conv2d_dot(const double* act, const double* gout, const double* vec,
                                  double* partial, int64_t M, const Conv2dGeom& geom,
                                  cudaStream_t stream);

}  // namespace metafluence
