// Tiled CUDA kernel for psg_linear (no torch headers).
// Grid: x = in-tiles, y = out-tiles, z = samples (grid-stride over n when N > 65535).
// Each block computes a TILE_O x TILE_I tile of out[n], looping over T in chunks of TILE_T that
// are staged in shared memory. Thread (tx, ty) owns column i = tx and rows o = ty + k * ROWS_Y.
#include <algorithm>

#include "psg/psg_linear_kernel.h"

namespace metafluence {
namespace {

constexpr int TILE_I = 32;  // = blockDim.x (one warp along `in`: coalesced loads and stores)
constexpr int TILE_O = 32;
constexpr int ROWS_Y = 8;  // = blockDim.y; each thread accumulates TILE_O / ROWS_Y outputs
constexpr int TILE_T = 16;
constexpr int PER_THREAD = TILE_O / ROWS_Y;
constexpr unsigned kMaxGridYZ = 65535;

template <typename scalar_t>
__global__ void __launch_bounds__(TILE_I* ROWS_Y)
    psg_linear_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ gout,
                      scalar_t* __restrict__ out, int64_t N, int64_t T, int64_t I, int64_t O) {
  __shared__ scalar_t s_act[TILE_T][TILE_I];
  __shared__ scalar_t s_gout[TILE_T][TILE_O];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * TILE_I + tx;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TILE_I;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * TILE_O;

  for (int64_t n = blockIdx.z; n < N; n += gridDim.z) {
    const scalar_t* act_n = act + n * T * I;
    const scalar_t* gout_n = gout + n * T * O;
    scalar_t acc[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) acc[k] = scalar_t(0);

    for (int64_t t0 = 0; t0 < T; t0 += TILE_T) {
      // Stage act[n, t0:t0+TILE_T, i0:i0+TILE_I] and gout[n, t0:.., o0:..]; zero-pad the edges.
      for (int e = tid; e < TILE_T * TILE_I; e += TILE_I * ROWS_Y) {
        const int tt = e / TILE_I, ii = e % TILE_I;
        const int64_t t = t0 + tt, i = i0 + ii;
        s_act[tt][ii] = (t < T && i < I) ? act_n[t * I + i] : scalar_t(0);
      }
      for (int e = tid; e < TILE_T * TILE_O; e += TILE_I * ROWS_Y) {
        const int tt = e / TILE_O, oo = e % TILE_O;
        const int64_t t = t0 + tt, o = o0 + oo;
        s_gout[tt][oo] = (t < T && o < O) ? gout_n[t * O + o] : scalar_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int tt = 0; tt < TILE_T; ++tt) {
        const scalar_t a = s_act[tt][tx];
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) acc[k] += s_gout[tt][ty + k * ROWS_Y] * a;
      }
      __syncthreads();  // before the next chunk overwrites shared memory
    }

    const int64_t i = i0 + tx;
    if (i < I) {
#pragma unroll
      for (int k = 0; k < PER_THREAD; ++k) {
        const int64_t o = o0 + ty + k * ROWS_Y;
        if (o < O) out[(n * O + o) * I + i] = acc[k];
      }
    }
  }
}

template <typename scalar_t>
cudaError_t launch(const scalar_t* act, const scalar_t* gout, scalar_t* out, int64_t N, int64_t T,
                   int64_t I, int64_t O, cudaStream_t stream) {
  if (N <= 0 || I <= 0 || O <= 0) return cudaSuccess;  // empty output: nothing to launch
  if (T <= 0) return cudaMemsetAsync(out, 0, sizeof(scalar_t) * N * O * I, stream);
  const int64_t tiles_i = (I + TILE_I - 1) / TILE_I;
  const int64_t tiles_o = (O + TILE_O - 1) / TILE_O;
  if (tiles_i > 0x7fffffff || tiles_o > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 block(TILE_I, ROWS_Y);
  const dim3 grid(static_cast<unsigned>(tiles_i), static_cast<unsigned>(tiles_o),
                  static_cast<unsigned>(std::min<int64_t>(N, kMaxGridYZ)));
  psg_linear_kernel<scalar_t><<<grid, block, 0, stream>>>(act, gout, out, N, T, I, O);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_psg_linear(const float* act, const float* gout, float* out, int64_t N, int64_t T,
                              int64_t I, int64_t O, cudaStream_t stream) {
  return launch<float>(act, gout, out, N, T, I, O, stream);
}

cudaError_t launch_psg_linear(const double* act, const double* gout, double* out, int64_t N,
                              int64_t T, int64_t I, int64_t O, cudaStream_t stream) {
  return launch<double>(act, gout, out, N, T, I, O, stream);
}

}  // namespace metafluence
