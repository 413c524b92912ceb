// Tiled implicit-GEMM CUDA kernel for psg_conv2d / _sqnorm / _dot (no torch headers).
// Grid: x = kernel-entry tiles, y = (group, output-channel tile), z = samples (grid-stride over
// n when N > 65535). Each block computes a kPsgConvTileO x kPsgConvTileK tile of G_n, looping
// over the output positions in chunks of TILE_T: the chunk of grad_outputs and the matching
// chunk of the unfolded input -- gathered from the input with zero padding, never stored in
// global memory -- are staged in shared memory. Thread (tx, ty) owns kernel entry k = k0 + tx and
// output channels o = o0 + ty + r ROWS_Y. Epilogues: store the tile, or reduce it (squared, or
// against each vector) to one double per block.
#include <algorithm>

#include "psg/psg_conv2d_kernel.h"

namespace metafluence {
namespace {

constexpr int TILE_K = kPsgConvTileK;
constexpr int TILE_O = kPsgConvTileO;
constexpr int ROWS_Y = 8;  // = blockDim.y
constexpr int TILE_T = 16;
constexpr int PER_THREAD = TILE_O / ROWS_Y;
constexpr int THREADS = TILE_K * ROWS_Y;
constexpr unsigned kMaxGridYZ = 65535;

enum Mode { kStore = 0, kSqnorm = 1, kDot = 2 };

// Sum of v over the block (THREADS threads); the result is valid in thread 0.
__device__ double block_sum(double v, double* s_red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int tid = threadIdx.y * TILE_K + threadIdx.x;
  __syncthreads();  // s_red may still be read by the previous call
  if ((tid & 31) == 0) s_red[tid >> 5] = v;
  __syncthreads();
  double s = 0.0;
  if (tid == 0)
    for (int w = 0; w < THREADS / 32; ++w) s += s_red[w];
  return s;
}

template <typename scalar_t, int MODE>
__global__ void __launch_bounds__(THREADS)
    psg_conv2d_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ gout,
                      const scalar_t* __restrict__ vec, scalar_t* __restrict__ out,
                      double* __restrict__ partial, int64_t M, Conv2dGeom g, int tiles_o) {
  __shared__ scalar_t s_g[TILE_T][TILE_O];
  __shared__ scalar_t s_u[TILE_T][TILE_K];
  __shared__ double s_red[THREADS / 32];

  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * TILE_K + tx;
  const int64_t cg = g.cg(), og = g.og(), kg = g.kg(), T = g.T(), kk = g.kh * g.kw;
  const int64_t gi = blockIdx.y / tiles_o;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y % tiles_o) * TILE_O;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * TILE_K;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t tiles = static_cast<int64_t>(gridDim.y) * gridDim.x;

  // the kernel entry this thread stages (column tid % TILE_K of the U chunk)
  const int64_t k_st = k0 + (tid % TILE_K);
  const int64_t c_st = k_st / kk, i_st = (k_st % kk) / g.kw, j_st = k_st % g.kw;

  for (int64_t n = blockIdx.z; n < g.N; n += gridDim.z) {
    const scalar_t* act_n = act + (n * g.C + gi * cg) * g.H * g.W;
    const scalar_t* gout_n = gout + (n * g.O + gi * og) * T;
    scalar_t acc[PER_THREAD];
#pragma unroll
    for (int r = 0; r < PER_THREAD; ++r) acc[r] = scalar_t(0);

    for (int64_t t0 = 0; t0 < T; t0 += TILE_T) {
      for (int e = tid; e < TILE_T * TILE_O; e += THREADS) {
        const int tt = e % TILE_T, oo = e / TILE_T;  // consecutive threads: consecutive t
        const int64_t t = t0 + tt, o = o0 + oo;
        s_g[tt][oo] = (t < T && o < og) ? gout_n[o * T + t] : scalar_t(0);
      }
      for (int e = tid; e < TILE_T * TILE_K; e += THREADS) {
        const int tt = e / TILE_K;  // e % TILE_K == tid % TILE_K: this thread's k_st
        const int64_t t = t0 + tt;
        scalar_t u = scalar_t(0);
        if (t < T && k_st < kg) {
          const int64_t ih = (t / g.Wo) * g.sh + i_st * g.dh - g.ph;
          const int64_t iw = (t % g.Wo) * g.sw + j_st * g.dw - g.pw;
          if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) u = act_n[(c_st * g.H + ih) * g.W + iw];
        }
        s_u[tt][e % TILE_K] = u;
      }
      __syncthreads();
#pragma unroll
      for (int tt = 0; tt < TILE_T; ++tt) {
        const scalar_t u = s_u[tt][tx];
#pragma unroll
        for (int r = 0; r < PER_THREAD; ++r) acc[r] += s_g[tt][ty + r * ROWS_Y] * u;
      }
      __syncthreads();  // before the next chunk overwrites shared memory
    }

    const int64_t k = k0 + tx;
    if (MODE == kStore) {
      if (k < kg) {
#pragma unroll
        for (int r = 0; r < PER_THREAD; ++r) {
          const int64_t o = o0 + ty + r * ROWS_Y;
          if (o < og) out[(n * g.O + gi * og + o) * kg + k] = acc[r];
        }
      }
    } else if (MODE == kSqnorm) {
      double s = 0.0;  // rows / columns past the edge hold exact zeros
#pragma unroll
      for (int r = 0; r < PER_THREAD; ++r) s += static_cast<double>(acc[r]) * acc[r];
      s = block_sum(s, s_red);
      if (tid == 0) partial[n * tiles + tile] = s;
    } else {
      for (int64_t j = 0; j < M; ++j) {
        double s = 0.0;
        if (k < kg) {
#pragma unroll
          for (int r = 0; r < PER_THREAD; ++r) {
            const int64_t o = o0 + ty + r * ROWS_Y;
            if (o < og) s += static_cast<double>(acc[r]) * vec[(j * g.O + gi * og + o) * kg + k];
          }
        }
        s = block_sum(s, s_red);
        if (tid == 0) partial[(n * tiles + tile) * M + j] = s;
      }
    }
  }
}

template <typename scalar_t, int MODE>
cudaError_t launch(const scalar_t* act, const scalar_t* gout, const scalar_t* vec, scalar_t* out,
                   double* partial, int64_t M, const Conv2dGeom& g, cudaStream_t stream) {
  if (g.N <= 0 || g.O <= 0 || g.kg() <= 0) return cudaSuccess;  // empty result
  const int64_t tiles_k = (g.kg() + TILE_K - 1) / TILE_K;
  const int64_t tiles_o = (g.og() + TILE_O - 1) / TILE_O;
  if (tiles_k > 0x7fffffff || g.groups * tiles_o > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 block(TILE_K, ROWS_Y);
  const dim3 grid(static_cast<unsigned>(tiles_k), static_cast<unsigned>(g.groups * tiles_o),
                  static_cast<unsigned>(std::min<int64_t>(g.N, kMaxGridYZ)));
  psg_conv2d_kernel<scalar_t, MODE>
      <<<grid, block, 0, stream>>>(act, gout, vec, out, partial, M, g, static_cast<int>(tiles_o));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_psg_conv2d(const float* act, const float* gout, float* out,
                              const Conv2dGeom& geom, cudaStream_t stream) {
  return launch<float, kStore>(act, gout, nullptr, out, nullptr, 0, geom, stream);
}
cudaError_t launch_psg_conv2d(const double* act, const double* gout, double* out,
                              const Conv2dGeom& geom, cudaStream_t stream) {
  return launch<double, kStore>(act, gout, nullptr, out, nullptr, 0, geom, stream);
}
cudaError_t launch_psg_conv2d_sqnorm(const float* act, const float* gout, double* partial,
                                     const Conv2dGeom& geom, cudaStream_t stream) {
  return launch<float, kSqnorm>(act, gout, nullptr, nullptr, partial, 0, geom, stream);
}
cudaError_t launch_psg_conv2d_sqnorm(const double* act, const double* gout, double* partial,
                                     const Conv2dGeom& geom, cudaStream_t stream) {
  return launch<double, kSqnorm>(act, gout, nullptr, nullptr, partial, 0, geom, stream);
}
cudaError_t launch_psg_conv2d_dot(const float* act, const float* gout, const float* vec,
                                  double* partial, int64_t M, const Conv2dGeom& geom,
                                  cudaStream_t stream) {
  return launch<float, kDot>(act, gout, vec, nullptr, partial, M, geom, stream);
}
cudaError_t launch_psg_conv2d_dot(const double* act, const double* gout, const double* vec,
                                  double* partial, int64_t M, const Conv2dGeom& geom,
                                  cudaStream_t stream) {
  return launch<double, kDot>(act, gout, vec, nullptr, partial, M, geom, stream);
}

}  // namespace metafluence
