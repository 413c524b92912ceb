// Geometry of a 2-D convolution as the psg_conv2d ops see it (plain struct, no torch headers, so
// the CUDA kernels can take it). Zero padding only: other padding modes are applied to the input
// by the caller, who then passes padding 0.
//   activations [N, C, H, W], grad_outputs [N, O, Ho, Wo], per-sample gradient
//   [N, O, C / groups, kh, kw] with Ho = (H + 2 ph - dh (kh - 1) - 1) / sh + 1 (same for Wo).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define MF_HOST_DEVICE __host__ __device__
#else
#define MF_HOST_DEVICE
#endif

namespace metafluence {

struct Conv2dGeom {
  int64_t N, C, H, W;  // activations
  int64_t O, Ho, Wo;   // grad_outputs
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups;

  MF_HOST_DEVICE int64_t cg() const { return C / groups; }      // input channels per group
  MF_HOST_DEVICE int64_t og() const { return O / groups; }      // output channels per group
  MF_HOST_DEVICE int64_t kg() const { return cg() * kh * kw; }  // weight entries per output channel
  MF_HOST_DEVICE int64_t T() const { return Ho * Wo; }          // output positions
  MF_HOST_DEVICE int64_t per_sample() const { return O * kg(); }  // P of the weight
};

}  // namespace metafluence
