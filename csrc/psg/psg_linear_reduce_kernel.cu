// CUDA kernels for psg_linear_sqnorm and psg_linear_dot (no torch headers).
// Grid: x = in-tiles, y = out-tiles, z = samples (grid-stride over n when N > 65535).
// Block: kPsgReduceTileI threads; thread tx owns column i = i0 + tx of G_n and accumulates the
// kPsgReduceTileO rows o0 .. o0 + TILE_O of that column in registers while looping over T
// (act[n, t, i] is a coalesced load; gout[n, t, o0:o0+TILE_O] is the same for every thread of
// the block and is staged through shared memory in chunks of TILE_T positions). The tile of G_n
// is then reduced (with itself, or with vec[j] for every j) and the block sum is written to its
// own slot of `partial` in double: no atomics, deterministic.
#include <algorithm>

#include "psg/psg_linear_reduce_kernel.h"

namespace metafluence {
namespace {

constexpr int TILE_I = kPsgReduceTileI;
constexpr int TILE_O = kPsgReduceTileO;
constexpr int TILE_T = 32;
constexpr int WARPS = TILE_I / 32;
constexpr unsigned kMaxGridYZ = 65535;

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of v over the block; the result is valid in thread 0. `red` holds WARPS doubles.
__device__ __forceinline__ double block_sum(double v, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w];
  }
  __syncthreads();  // red is reused by the next call
  return s;
}

// acc[k] = G_n[o0 + k, i] for k < TILE_O (0 outside the matrix).
template <typename scalar_t>
__device__ __forceinline__ void tile_column(const scalar_t* __restrict__ act_n,
                                            const scalar_t* __restrict__ gout_n, int64_t T,
                                            int64_t I, int64_t O, int64_t o0, int64_t i,
                                            scalar_t (&acc)[TILE_O], scalar_t (*s_g)[TILE_O]) {
#pragma unroll
  for (int k = 0; k < TILE_O; ++k) acc[k] = scalar_t(0);
  for (int64_t t0 = 0; t0 < T; t0 += TILE_T) {
    for (int e = threadIdx.x; e < TILE_T * TILE_O; e += TILE_I) {
      const int tt = e / TILE_O, kk = e % TILE_O;
      const int64_t t = t0 + tt, o = o0 + kk;
      s_g[tt][kk] = (t < T && o < O) ? gout_n[t * O + o] : scalar_t(0);
    }
    __syncthreads();
    const int64_t t_end = T - t0 < TILE_T ? T - t0 : TILE_T;
    if (i < I) {
      for (int tt = 0; tt < t_end; ++tt) {
        const scalar_t a = act_n[(t0 + tt) * I + i];
#pragma unroll
        for (int k = 0; k < TILE_O; ++k) acc[k] += s_g[tt][k] * a;
      }
    }
    __syncthreads();  // before the next chunk overwrites s_g
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(TILE_I)
    psg_linear_sqnorm_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ gout,
                             double* __restrict__ partial, int64_t N, int64_t T, int64_t I,
                             int64_t O) {
  __shared__ scalar_t s_g[TILE_T][TILE_O];
  __shared__ double red[WARPS];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * TILE_I + threadIdx.x;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * TILE_O;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    scalar_t acc[TILE_O];
    tile_column(act + n * T * I, gout + n * T * O, T, I, O, o0, i, acc, s_g);
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < TILE_O; ++k) s += static_cast<double>(acc[k]) * acc[k];
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[n * tiles + tile] = s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(TILE_I)
    psg_linear_dot_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ gout,
                          const scalar_t* __restrict__ vec, double* __restrict__ partial, int64_t N,
                          int64_t T, int64_t I, int64_t O, int64_t M) {
  __shared__ scalar_t s_g[TILE_T][TILE_O];
  __shared__ double red[WARPS];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * TILE_I + threadIdx.x;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * TILE_O;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    scalar_t acc[TILE_O];
    tile_column(act + n * T * I, gout + n * T * O, T, I, O, o0, i, acc, s_g);
    for (int64_t j = 0; j < M; ++j) {
      double s = 0.0;
      if (i < I) {
        const scalar_t* v_j = vec + j * O * I;
#pragma unroll
        for (int k = 0; k < TILE_O; ++k) {
          const int64_t o = o0 + k;
          if (o < O) s += static_cast<double>(acc[k]) * v_j[o * I + i];
        }
      }
      s = block_sum(s, red);
      if (threadIdx.x == 0) partial[(n * tiles + tile) * M + j] = s;
    }
  }
}

inline bool grid_for(int64_t N, int64_t I, int64_t O, dim3* grid) {
  const int64_t tiles_i = (I + TILE_I - 1) / TILE_I;
  const int64_t tiles_o = (O + TILE_O - 1) / TILE_O;
  if (tiles_i > 0x7fffffff || tiles_o > kMaxGridYZ) return false;
  *grid = dim3(static_cast<unsigned>(tiles_i), static_cast<unsigned>(tiles_o),
               static_cast<unsigned>(std::min<int64_t>(N, kMaxGridYZ)));
  return true;
}

template <typename scalar_t>
cudaError_t launch_sqnorm(const scalar_t* act, const scalar_t* gout, double* partial, int64_t N,
                          int64_t T, int64_t I, int64_t O, cudaStream_t stream) {
  if (N <= 0 || I <= 0 || O <= 0) return cudaSuccess;  // nothing to write
  dim3 grid;
  if (!grid_for(N, I, O, &grid)) return cudaErrorInvalidConfiguration;
  // T == 0 runs too: every tile of G_n is zero and the partial sums are written as 0
  psg_linear_sqnorm_kernel<scalar_t><<<grid, TILE_I, 0, stream>>>(act, gout, partial, N, T, I, O);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_dot(const scalar_t* act, const scalar_t* gout, const scalar_t* vec,
                       double* partial, int64_t N, int64_t T, int64_t I, int64_t O, int64_t M,
                       cudaStream_t stream) {
  if (N <= 0 || I <= 0 || O <= 0 || M <= 0) return cudaSuccess;
  dim3 grid;
  if (!grid_for(N, I, O, &grid)) return cudaErrorInvalidConfiguration;
  psg_linear_dot_kernel<scalar_t>
      <<<grid, TILE_I, 0, stream>>>(act, gout, vec, partial, N, T, I, O, M);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_psg_linear_sqnorm(const float* act, const float* gout, double* partial,
                                     int64_t N, int64_t T, int64_t I, int64_t O,
                                     cudaStream_t stream) {
  return launch_sqnorm<float>(act, gout, partial, N, T, I, O, stream);
}
cudaError_t launch_psg_linear_sqnorm(const double* act, const double* gout, double* partial,
                                     int64_t N, int64_t T, int64_t I, int64_t O,
                                     cudaStream_t stream) {
  return launch_sqnorm<double>(act, gout, partial, N, T, I, O, stream);
}
cudaError_t launch_psg_linear_dot(const float* act, const float* gout, const float* vec,
                                  double* partial, int64_t N, int64_t T, int64_t I, int64_t O,
                                  int64_t M, cudaStream_t stream) {
  return launch_dot<float>(act, gout, vec, partial, N, T, I, O, M, stream);
}
cudaError_t launch_psg_linear_dot(const double* act, const double* gout, const double* vec,
                                  double* partial, int64_t N, int64_t T, int64_t I, int64_t O,
                                  int64_t M, cudaStream_t stream) {
  return launch_dot<double>(act, gout, vec, partial, N, T, I, O, M, stream);
}

}  // namespace metafluence
