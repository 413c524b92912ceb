// Shared CPU helpers for psg_linear_sqnorm / psg_linear_dot (header-only, included by the
// *_cpu.cpp files of both ops). See psg_linear_sqnorm_cpu.cpp for the formulas.
#pragma once
#include <algorithm>
#include <cstdint>

namespace metafluence {
namespace psg_reduce_cpu {

constexpr int64_t kRows = 8;  // output rows of G_n produced at once (buffer kRows x in)

// Gram form when it needs fewer multiply-adds: T(T+1)/2 (I+O) < T I O.
inline bool use_gram(int64_t T, int64_t I, int64_t O) {
  return static_cast<double>(T + 1) * 0.5 * static_cast<double>(I + O) <
         static_cast<double>(I) * static_cast<double>(O);
}

// rows[k, :] = sum_t g[t, o0 + k] * a[t, :] for k < r (rows zeroed here).
template <typename scalar_t>
inline void make_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ g, int64_t T,
                      int64_t I, int64_t O, int64_t o0, int64_t r, scalar_t* __restrict__ rows) {
  std::fill(rows, rows + r * I, scalar_t(0));
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* __restrict__ at = a + t * I;
    const scalar_t* __restrict__ gt = g + t * O + o0;
    for (int64_t k = 0; k < r; ++k) {
      const scalar_t gk = gt[k];
      if (gk == scalar_t(0)) continue;  // ReLU / max-pool gradients are often sparse
      scalar_t* __restrict__ row = rows + k * I;
      for (int64_t i = 0; i < I; ++i) row[i] += gk * at[i];
    }
  }
}

template <typename scalar_t>
inline double dot_d(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t len) {
  // four partial sums in the input precision, combined in double
  scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    s0 += x[i] * y[i];
    s1 += x[i + 1] * y[i + 1];
    s2 += x[i + 2] * y[i + 2];
    s3 += x[i + 3] * y[i + 3];
  }
  double s = static_cast<double>(s0) + s1 + s2 + s3;
  for (; i < len; ++i) s += static_cast<double>(x[i]) * y[i];
  return s;
}

template <typename scalar_t>
double sqnorm_rows(const scalar_t* a, const scalar_t* g, int64_t T, int64_t I, int64_t O,
                   scalar_t* buf) {
  double total = 0.0;
  for (int64_t o0 = 0; o0 < O; o0 += kRows) {
    const int64_t r = std::min(kRows, O - o0);
    make_rows(a, g, T, I, O, o0, r, buf);
    total += dot_d(buf, buf, r * I);
  }
  return total;
}

template <typename scalar_t>
double sqnorm_gram(const scalar_t* a, const scalar_t* g, int64_t T, int64_t I, int64_t O) {
  double total = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t u = 0; u <= t; ++u) {
      const double gg = dot_d(g + t * O, g + u * O, O);
      if (gg == 0.0) continue;
      const double aa = dot_d(a + t * I, a + u * I, I);
      total += (t == u ? 1.0 : 2.0) * aa * gg;
    }
  }
  return total;
}

}  // namespace psg_reduce_cpu
}  // namespace metafluence
