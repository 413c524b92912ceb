// CUDA registrations of the fused solver vector updates (built only against a CUDA torch,
// METAFLUENCE_CUDA=ON). Kernels: solver_update_kernel.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "solvers/solver_update_check.h"
#include "solvers/solver_update_kernel.h"

namespace metafluence {
namespace {

struct MutCuda {  // contiguous working copy of a mutated argument, copied back at the end
  at::Tensor orig, work;
  explicit MutCuda(const at::Tensor& t) : orig(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(orig)) orig.copy_(work);
  }
};

#define MF_CHECK_LAUNCH(expr, name)                                                          \
  do {                                                                                       \
    const cudaError_t err = (expr);                                                          \
    TORCH_CHECK(err == cudaSuccess, name, " CUDA launch failed: ", cudaGetErrorString(err)); \
  } while (0)

std::tuple<at::Tensor, at::Tensor> cg_update_cuda(at::Tensor x, at::Tensor r, at::Tensor curv_max,
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
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(0), P = x.size(1);
  auto rr = at::empty({k}, x.options());
  auto neg = at::empty({k}, x.options().dtype(at::kBool));
  if (k == 0) return {rr, neg};
  MutCuda xm(x), rm(r), cm(curv_max);
  const auto pc = p.contiguous(), apc = Ap.contiguous(), rzc = rz.contiguous();
  const auto ac = active.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_update_cuda", [&] {
    MF_CHECK_LAUNCH(
        launch_cg_update(xm.work.mutable_data_ptr<scalar_t>(), rm.work.mutable_data_ptr<scalar_t>(),
                         cm.work.mutable_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(),
                         apc.const_data_ptr<scalar_t>(), rzc.const_data_ptr<scalar_t>(),
                         ac.const_data_ptr<bool>(), curv_tol, rr.mutable_data_ptr<scalar_t>(),
                         neg.mutable_data_ptr<bool>(), k, P, stream),
        op);
  });
  xm.finish();
  rm.finish();
  cm.finish();
  return {rr, neg};
}

void cg_direction_cuda(at::Tensor p, const at::Tensor& z, const at::Tensor& rz_new,
                       const at::Tensor& rz_old, const at::Tensor& active) {
  constexpr const char* op = "cg_direction_";
  check_solver_float(op, p);
  check_solver_rows(op, "z", z, p);
  check_solver_vec(op, "rz_new", rz_new, p, false);
  check_solver_vec(op, "rz_old", rz_old, p, false);
  check_solver_vec(op, "active", active, p, true);
  TORCH_CHECK(p.is_cuda(), op, " (CUDA kernel): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(p.device());
  const int64_t k = p.size(0), P = p.size(1);
  if (k == 0 || P == 0) return;
  MutCuda pm(p);
  const auto zc = z.contiguous(), nc = rz_new.contiguous(), oc = rz_old.contiguous();
  const auto ac = active.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_cuda", [&] {
    MF_CHECK_LAUNCH(
        launch_cg_direction(pm.work.mutable_data_ptr<scalar_t>(), zc.const_data_ptr<scalar_t>(),
                            nc.const_data_ptr<scalar_t>(), oc.const_data_ptr<scalar_t>(),
                            ac.const_data_ptr<bool>(), k, P, stream),
        op);
  });
  pm.finish();
}

at::Tensor neumann_step_cuda(at::Tensor x, at::Tensor r, const at::Tensor& b, const at::Tensor& Ax,
                             const at::Tensor& active, const at::Tensor& thr, double inv_sigma,
                             bool advance) {
  constexpr const char* op = "neumann_step_";
  check_solver_float(op, x);
  check_solver_rows(op, "r", r, x);
  check_solver_rows(op, "b", b, x);
  check_solver_rows(op, "Ax", Ax, x);
  check_solver_vec(op, "active", active, x, true);
  check_solver_vec(op, "thr", thr, x, false);
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t k = x.size(0), P = x.size(1);
  auto rn = at::empty({k}, x.options());
  if (k == 0) return rn;
  MutCuda xm(x), rm(r);
  const auto bc = b.contiguous(), axc = Ax.contiguous(), ac = active.contiguous();
  const auto tc = thr.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "neumann_step_cuda", [&] {
    MF_CHECK_LAUNCH(launch_neumann_step(
                        xm.work.mutable_data_ptr<scalar_t>(), rm.work.mutable_data_ptr<scalar_t>(),
                        bc.const_data_ptr<scalar_t>(), axc.const_data_ptr<scalar_t>(),
                        ac.const_data_ptr<bool>(), tc.const_data_ptr<scalar_t>(), inv_sigma,
                        advance, rn.mutable_data_ptr<scalar_t>(), k, P, stream),
                    op);
  });
  xm.finish();
  rm.finish();
  return rn;
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CUDA, m) {
  m.impl("cg_update_", &metafluence::cg_update_cuda);
  m.impl("cg_direction_", &metafluence::cg_direction_cuda);
  m.impl("neumann_step_", &metafluence::neumann_step_cuda);
}
