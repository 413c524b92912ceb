// Argument checks shared by the CPU and CUDA registrations of the fused solver updates
// (cg_update_, cg_direction_, neumann_step_). Host-only: includes torch headers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace metafluence {

// rows [k, P] of the reference dtype and device
inline void check_solver_rows(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " has ", t.dim(), " dims, expected [k, P]");
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected ",
              like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

// per-row vector [k]: dtype of `like` (or bool if is_bool)
inline void check_solver_vec(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& like, bool is_bool) {
  const int64_t k = like.size(0);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == k, op, ": ", name, " has shape ", t.sizes(),
              ", expected [", k, "]");
  if (is_bool) {
    TORCH_CHECK(t.scalar_type() == at::kBool, op, ": ", name, " has dtype ", t.scalar_type(),
                ", expected bool");
  } else {
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ",
                t.scalar_type(), ", expected ", like.scalar_type());
  }
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", expected ",
              like.device());
}

inline void check_solver_float(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, op, ": x has ", x.dim(), " dims, expected [k, P]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": dtype ",
              x.scalar_type(), " not supported (float32, float64)");
}

}  // namespace metafluence
