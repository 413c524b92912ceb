// Argument checks common to the per-sample-gradient ops (psg_linear*, psg_conv2d*), used by their
// per-op check headers (psg_linear_check.h, psg_conv2d_check.h). Host-only: torch headers.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace metafluence {

// activations and grad_outputs of one dtype, on the device the kernel runs on (`cuda`: one CUDA
// device; else the CPU).
inline void check_psg_pair(const char* op, const at::Tensor& activations,
                           const at::Tensor& grad_outputs, bool cuda) {
  TORCH_CHECK(activations.scalar_type() == grad_outputs.scalar_type(), op,
              ": activations and grad_outputs must have the same dtype");
  if (cuda) {
    TORCH_CHECK(activations.is_cuda() && grad_outputs.is_cuda() &&
                    activations.device() == grad_outputs.device(),
                op, " (CUDA kernel): activations and grad_outputs must be on one CUDA device");
  } else {
    TORCH_CHECK(activations.device().is_cpu() && grad_outputs.device().is_cpu(), op,
                " (CPU kernel): activations and grad_outputs must be CPU tensors");
  }
}

// vectors of the dtype and device of activations (their shape is checked by the op).
inline void check_psg_vectors_like(const char* op, const at::Tensor& vectors,
                                   const at::Tensor& activations) {
  TORCH_CHECK(vectors.scalar_type() == activations.scalar_type(), op,
              ": vectors must have the dtype of activations");
  TORCH_CHECK(vectors.device() == activations.device(), op,
              ": vectors must be on the device of activations");
}

}  // namespace metafluence
