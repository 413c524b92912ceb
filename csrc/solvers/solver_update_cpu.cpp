// CPU implementations of the fused solver vector updates (see csrc/ops.cpp for the formulas):
// metafluence::cg_update_, metafluence::cg_direction_, metafluence::neumann_step_.
//
// Work is split into (row, chunk) items of kChunk elements, so one row (k = 1) still uses every
// core; a reduction is two passes over the items (partial sums in double, per-row combination in
// a fixed order: deterministic for a given thread count and chunk size). Mutated arguments that
// are not contiguous are updated through a contiguous copy that is copied back.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "solvers/solver_update_check.h"

namespace metafluence {
namespace {

constexpr int64_t kChunk = 16384;

inline int64_t chunks_per_row(int64_t P) { return std::max<int64_t>(1, (P + kChunk - 1) / kChunk); }

template <typename T>
inline T nan_max(T a, T b) {  // torch.maximum semantics: NaN propagates
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<T>::quiet_NaN();
  return std::max(a, b);
}

// Writable contiguous view of a mutated argument; `finish` copies back if it was a copy.
struct Mut {
  at::Tensor orig, work;
  explicit Mut(const at::Tensor& t) : orig(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(orig)) orig.copy_(work);
  }
};

template <typename scalar_t>
void cg_update_kernel(scalar_t* x, scalar_t* r, scalar_t* cmax, const scalar_t* p,
                      const scalar_t* Ap, const scalar_t* rz, const bool* active, double curv_tol,
                      scalar_t* rr, bool* neg, int64_t k, int64_t P) {
  const int64_t C = chunks_per_row(P);
  const int64_t items = k * C;
  std::vector<double> part(2 * items, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / C;
      if (!active[row]) continue;
      const int64_t lo = (i % C) * kChunk, hi = std::min(P, lo + kChunk);
      const scalar_t* pr = p + row * P;
      const scalar_t* ar = Ap + row * P;
      double s_pap = 0.0, s_pp = 0.0;
#pragma omp simd reduction(+ : s_pap, s_pp)
      for (int64_t j = lo; j < hi; ++j) {
        const double pv = pr[j];
        s_pap += pv * static_cast<double>(ar[j]);
        s_pp += pv * pv;
      }
      part[2 * i] = s_pap;
      part[2 * i + 1] = s_pp;
    }
  });
  std::vector<scalar_t> alpha(k, scalar_t(0));
  std::vector<char> step(k, 0);
  const scalar_t tiny = std::numeric_limits<scalar_t>::min();
  for (int64_t row = 0; row < k; ++row) {
    rr[row] = scalar_t(0);
    neg[row] = false;
    if (!active[row]) continue;
    double s_pap = 0.0, s_pp = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      s_pap += part[2 * (row * C + c)];
      s_pp += part[2 * (row * C + c) + 1];
    }
    const scalar_t pap = static_cast<scalar_t>(s_pap), pp = static_cast<scalar_t>(s_pp);
    const scalar_t curv = pap / std::max(pp, tiny);
    const scalar_t cm = nan_max(cmax[row], std::abs(curv));
    cmax[row] = cm;
    const bool is_neg = curv <= static_cast<scalar_t>(curv_tol) * cm;
    neg[row] = is_neg;
    if (!is_neg) {
      step[row] = 1;
      alpha[row] = rz[row] / pap;
    }
  }
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / C;
      part[2 * i] = 0.0;
      if (!step[row]) continue;
      const int64_t lo = (i % C) * kChunk, hi = std::min(P, lo + kChunk);
      const scalar_t a = alpha[row];
      scalar_t* __restrict__ xr = x + row * P;
      scalar_t* __restrict__ rrow = r + row * P;
      const scalar_t* __restrict__ pr = p + row * P;
      const scalar_t* __restrict__ ar = Ap + row * P;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = lo; j < hi; ++j) {
        xr[j] = xr[j] + a * pr[j];
        const scalar_t rv = rrow[j] - a * ar[j];
        rrow[j] = rv;
        s += static_cast<double>(rv) * rv;
      }
      part[2 * i] = s;
    }
  });
  for (int64_t row = 0; row < k; ++row) {
    if (!step[row]) continue;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += part[2 * (row * C + c)];
    rr[row] = static_cast<scalar_t>(s);
  }
}

std::tuple<at::Tensor, at::Tensor> cg_update_cpu(at::Tensor x, at::Tensor r, at::Tensor curv_max,
                                                 const at::Tensor& p, const at::Tensor& Ap,
                                                 const at::Tensor& rz, const at::Tensor& active,
                                                 double curv_tol) {
  constexpr const char* op = "cg_update_";
  check_solver_float(op, x);
  check_solver_rows(op, "r", r, x);
  check_solver_rows(op, "p", p, x);
  check_solver_rows(op, "Ap", Ap, x);
  check_solver_vec(op, "curv_max", curv_max, x, false);
  check_solver_vec(op, "rz", rz, x, false);
  check_solver_vec(op, "active", active, x, true);
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): inputs must be CPU tensors");
  const int64_t k = x.size(0), P = x.size(1);
  auto rr = at::empty({k}, x.options());
  auto neg = at::empty({k}, x.options().dtype(at::kBool));
  if (k == 0) return {rr, neg};
  Mut xm(x), rm(r), cm(curv_max);
  const auto pc = p.contiguous(), apc = Ap.contiguous(), rzc = rz.contiguous();
  const auto ac = active.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_cpu", [&] {
    cg_update_kernel<scalar_t>(
        xm.work.mutable_data_ptr<scalar_t>(), rm.work.mutable_data_ptr<scalar_t>(),
        cm.work.mutable_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(),
        apc.const_data_ptr<scalar_t>(), rzc.const_data_ptr<scalar_t>(), ac.const_data_ptr<bool>(),
        curv_tol, rr.mutable_data_ptr<scalar_t>(), neg.mutable_data_ptr<bool>(), k, P);
  });
  xm.finish();
  rm.finish();
  cm.finish();
  return {rr, neg};
}

template <typename scalar_t>
void cg_direction_kernel(scalar_t* p, const scalar_t* z, const scalar_t* rz_new,
                         const scalar_t* rz_old, const bool* active, int64_t k, int64_t P) {
  const int64_t C = chunks_per_row(P);
  at::parallel_for(0, k * C, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / C;
      if (!active[row]) continue;
      const scalar_t old = rz_old[row];
      const scalar_t beta = rz_new[row] / (old == scalar_t(0) ? scalar_t(1) : old);
      const int64_t lo = (i % C) * kChunk, hi = std::min(P, lo + kChunk);
      scalar_t* __restrict__ pr = p + row * P;
      const scalar_t* __restrict__ zr = z + row * P;
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) pr[j] = zr[j] + beta * pr[j];
    }
  });
}

void cg_direction_cpu(at::Tensor p, const at::Tensor& z, const at::Tensor& rz_new,
                      const at::Tensor& rz_old, const at::Tensor& active) {
  constexpr const char* op = "cg_direction_";
  check_solver_float(op, p);
  check_solver_rows(op, "z", z, p);
  check_solver_vec(op, "rz_new", rz_new, p, false);
  check_solver_vec(op, "rz_old", rz_old, p, false);
  check_solver_vec(op, "active", active, p, true);
  TORCH_CHECK(p.device().is_cpu(), op, " (CPU kernel): inputs must be CPU tensors");
  const int64_t k = p.size(0), P = p.size(1);
  if (k == 0 || P == 0) return;
  Mut pm(p);
  const auto zc = z.contiguous(), nc = rz_new.contiguous(), oc = rz_old.contiguous();
  const auto ac = active.contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_cpu", [&] {
    cg_direction_kernel<scalar_t>(pm.work.mutable_data_ptr<scalar_t>(),
                                  zc.const_data_ptr<scalar_t>(), nc.const_data_ptr<scalar_t>(),
                                  oc.const_data_ptr<scalar_t>(), ac.const_data_ptr<bool>(), k, P);
  });
  pm.finish();
}

template <typename scalar_t>
void neumann_step_kernel(scalar_t* x, scalar_t* r, const scalar_t* b, const scalar_t* Ax,
                         const bool* active, const scalar_t* thr, scalar_t inv_sigma, bool advance,
                         scalar_t* rn, int64_t k, int64_t P) {
  const int64_t C = chunks_per_row(P);
  const int64_t items = k * C;
  std::vector<double> part(items, 0.0);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / C;
      if (!active[row]) continue;
      const int64_t lo = (i % C) * kChunk, hi = std::min(P, lo + kChunk);
      scalar_t* __restrict__ rrow = r + row * P;
      const scalar_t* __restrict__ br = b + row * P;
      const scalar_t* __restrict__ axr = Ax + row * P;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = lo; j < hi; ++j) {
        const scalar_t rv = br[j] - axr[j];
        rrow[j] = rv;
        s += static_cast<double>(rv) * rv;
      }
      part[i] = s;
    }
  });
  std::vector<char> adv(k, 0);
  for (int64_t row = 0; row < k; ++row) {
    rn[row] = scalar_t(0);
    if (!active[row]) continue;
    double s = 0.0;
    for (int64_t c = 0; c < C; ++c) s += part[row * C + c];
    rn[row] = static_cast<scalar_t>(std::sqrt(s));
    adv[row] = advance && !(rn[row] <= thr[row]);
  }
  if (!advance) return;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / C;
      if (!adv[row]) continue;
      const int64_t lo = (i % C) * kChunk, hi = std::min(P, lo + kChunk);
      scalar_t* __restrict__ xr = x + row * P;
      const scalar_t* __restrict__ rrow = r + row * P;
#pragma omp simd
      for (int64_t j = lo; j < hi; ++j) xr[j] = xr[j] + inv_sigma * rrow[j];
    }
  });
}

at::Tensor neumann_step_cpu(at::Tensor x, at::Tensor r, const at::Tensor& b, const at::Tensor& Ax,
                            const at::Tensor& active, const at::Tensor& thr, double inv_sigma,
                            bool advance) {
  constexpr const char* op = "neumann_step_";
  check_solver_float(op, x);
  check_solver_rows(op, "r", r, x);
  check_solver_rows(op, "b", b, x);
  check_solver_rows(op, "Ax", Ax, x);
  check_solver_vec(op, "active", active, x, true);
  check_solver_vec(op, "thr", thr, x, false);
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU kernel): inputs must be CPU tensors");
  const int64_t k = x.size(0), P = x.size(1);
  auto rn = at::empty({k}, x.options());
  if (k == 0) return rn;
  Mut xm(x), rm(r);
  const auto bc = b.contiguous(), axc = Ax.contiguous(), ac = active.contiguous();
  const auto tc = thr.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neumann_step_cpu", [&] {
    neumann_step_kernel<scalar_t>(
        xm.work.mutable_data_ptr<scalar_t>(), rm.work.mutable_data_ptr<scalar_t>(),
        bc.const_data_ptr<scalar_t>(), axc.const_data_ptr<scalar_t>(), ac.const_data_ptr<bool>(),
        tc.const_data_ptr<scalar_t>(), static_cast<scalar_t>(inv_sigma), advance,
        rn.mutable_data_ptr<scalar_t>(), k, P);
  });
  xm.finish();
  rm.finish();
  return rn;
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CPU, m) {
  m.impl("cg_update_", &metafluence::cg_update_cpu);
  m.impl("cg_direction_", &metafluence::cg_direction_cpu);
  m.impl("neumann_step_", &metafluence::neumann_step_cpu);
}
