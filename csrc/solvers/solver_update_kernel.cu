// CUDA kernels for the fused solver vector updates (no torch headers). One block per row
// (grid-stride over rows beyond the grid limit); reductions accumulate in double.
#include <cfloat>
#include <cmath>

#include "solvers/solver_update_kernel.h"

namespace metafluence {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// Sum of two doubles over the block; every thread gets the result.
__device__ __forceinline__ double2 block_sum2(double a, double b, double2* smem) {
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = make_double2(a, b);
  __syncthreads();
  if (warp == 0) {
    double2 v = lane < (kThreads / 32) ? smem[lane] : make_double2(0.0, 0.0);
    for (int off = 16; off > 0; off >>= 1) {
      v.x += __shfl_down_sync(0xffffffffu, v.x, off);
      v.y += __shfl_down_sync(0xffffffffu, v.y, off);
    }
    if (lane == 0) smem[kThreads / 32] = v;
  }
  __syncthreads();
  const double2 out = smem[kThreads / 32];
  __syncthreads();  // smem is reused by the next call
  return out;
}

template <typename T>
__device__ __forceinline__ T tiny_of();
template <>
__device__ __forceinline__ float tiny_of<float>() {
  return FLT_MIN;
}
template <>
__device__ __forceinline__ double tiny_of<double>() {
  return DBL_MIN;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cg_update_kernel(T* __restrict__ x, T* __restrict__ r, T* __restrict__ cmax,
                     const T* __restrict__ p, const T* __restrict__ Ap, const T* __restrict__ rz,
                     const bool* __restrict__ active, double curv_tol, T* __restrict__ rr,
                     bool* __restrict__ neg, int64_t k, int64_t P) {
  __shared__ double2 smem[kThreads / 32 + 1];
  for (int64_t row = blockIdx.x; row < k; row += gridDim.x) {
    if (!active[row]) {
      if (threadIdx.x == 0) {
        rr[row] = T(0);
        neg[row] = false;
      }
      continue;
    }
    const T* pr = p + row * P;
    const T* ar = Ap + row * P;
    double s_pap = 0.0, s_pp = 0.0;
    for (int64_t j = threadIdx.x; j < P; j += kThreads) {
      const double pv = pr[j];
      s_pap += pv * static_cast<double>(ar[j]);
      s_pp += pv * pv;
    }
    const double2 s = block_sum2(s_pap, s_pp, smem);
    const T pap = static_cast<T>(s.x), pp = static_cast<T>(s.y);
    const T curv = pap / fmax(pp, tiny_of<T>());
    const T old = cmax[row];
    const T cm = (isnan(old) || isnan(curv)) ? static_cast<T>(NAN) : fmax(old, fabs(curv));
    const bool is_neg = curv <= static_cast<T>(curv_tol) * cm;
    __syncthreads();  // every thread has read cmax[row] before thread 0 writes it
    if (threadIdx.x == 0) {
      cmax[row] = cm;
      neg[row] = is_neg;
      if (is_neg) rr[row] = T(0);
    }
    if (is_neg) continue;
    const T a = rz[row] / pap;
    T* xr = x + row * P;
    T* rrow = r + row * P;
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < P; j += kThreads) {
      xr[j] = xr[j] + a * pr[j];
      const T rv = rrow[j] - a * ar[j];
      rrow[j] = rv;
      acc += static_cast<double>(rv) * rv;
    }
    const double2 t = block_sum2(acc, 0.0, smem);
    if (threadIdx.x == 0) rr[row] = static_cast<T>(t.x);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cg_direction_kernel(T* __restrict__ p, const T* __restrict__ z, const T* __restrict__ rz_new,
                        const T* __restrict__ rz_old, const bool* __restrict__ active, int64_t k,
                        int64_t P) {
  for (int64_t row = blockIdx.x; row < k; row += gridDim.x) {
    if (!active[row]) continue;
    const T old = rz_old[row];
    const T beta = rz_new[row] / (old == T(0) ? T(1) : old);
    T* pr = p + row * P;
    const T* zr = z + row * P;
    for (int64_t j = threadIdx.x; j < P; j += kThreads) pr[j] = zr[j] + beta * pr[j];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    neumann_step_kernel(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ b,
                        const T* __restrict__ Ax, const bool* __restrict__ active,
                        const T* __restrict__ thr, T inv_sigma, bool advance, T* __restrict__ rn,
                        int64_t k, int64_t P) {
  __shared__ double2 smem[kThreads / 32 + 1];
  for (int64_t row = blockIdx.x; row < k; row += gridDim.x) {
    if (!active[row]) {
      if (threadIdx.x == 0) rn[row] = T(0);
      continue;
    }
    T* rrow = r + row * P;
    const T* br = b + row * P;
    const T* axr = Ax + row * P;
    double acc = 0.0;
    for (int64_t j = threadIdx.x; j < P; j += kThreads) {
      const T rv = br[j] - axr[j];
      rrow[j] = rv;
      acc += static_cast<double>(rv) * rv;
    }
    const double2 s = block_sum2(acc, 0.0, smem);
    const T norm = static_cast<T>(sqrt(s.x));
    if (threadIdx.x == 0) rn[row] = norm;
    if (!advance || norm <= thr[row]) continue;
    T* xr = x + row * P;
    // each thread re-reads only the r entries it wrote itself: no barrier needed
    for (int64_t j = threadIdx.x; j < P; j += kThreads) xr[j] = xr[j] + inv_sigma * rrow[j];
  }
}

inline unsigned blocks_for(int64_t k) {
  return static_cast<unsigned>(k < kMaxBlocks ? (k > 0 ? k : 1) : kMaxBlocks);
}

}  // namespace

#define METAFLUENCE_SOLVER_LAUNCHERS(T)                                                            \
  cudaError_t launch_cg_update(T* x, T* r, T* curv_max, const T* p, const T* Ap, const T* rz,      \
                               const bool* active, double curv_tol, T* rr, bool* neg, int64_t k,   \
                               int64_t P, cudaStream_t stream) {                                   \
    if (k == 0) return cudaSuccess;                                                                \
    cg_update_kernel<T><<<blocks_for(k), kThreads, 0, stream>>>(x, r, curv_max, p, Ap, rz, active, \
                                                                curv_tol, rr, neg, k, P);          \
    return cudaGetLastError();                                                                     \
  }                                                                                                \
  cudaError_t launch_cg_direction(T* p, const T* z, const T* rz_new, const T* rz_old,              \
                                  const bool* active, int64_t k, int64_t P, cudaStream_t stream) { \
    if (k == 0 || P == 0) return cudaSuccess;                                                      \
    cg_direction_kernel<T>                                                                         \
        <<<blocks_for(k), kThreads, 0, stream>>>(p, z, rz_new, rz_old, active, k, P);              \
    return cudaGetLastError();                                                                     \
  }                                                                                                \
  cudaError_t launch_neumann_step(T* x, T* r, const T* b, const T* Ax, const bool* active,         \
                                  const T* thr, double inv_sigma, bool advance, T* rn, int64_t k,  \
                                  int64_t P, cudaStream_t stream) {                                \
    if (k == 0) return cudaSuccess;                                                                \
    neumann_step_kernel<T><<<blocks_for(k), kThreads, 0, stream>>>(                                \
        x, r, b, Ax, active, thr, static_cast<T>(inv_sigma), advance, rn, k, P);                   \
    return cudaGetLastError();                                                                     \
  }
METAFLUENCE_SOLVER_LAUNCHERS(float)
METAFLUENCE_SOLVER_LAUNCHERS(double)
#undef METAFLUENCE_SOLVER_LAUNCHERS

}  // namespace metafluence
