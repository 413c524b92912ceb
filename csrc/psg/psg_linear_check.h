// Argument checks shared by the CPU and CUDA registrations of psg_linear, psg_linear_sqnorm and
// psg_linear_dot (host-only: includes torch headers). Each failure names the argument.
//   activations [N, T, in], grad_outputs [N, T, out], vectors [m, out, in]
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "psg/psg_check.h"

namespace metafluence {

// activations / grad_outputs of one dtype, agreeing on N and T. `cuda` selects the device the
// kernel runs on (CPU tensors otherwise).
inline void check_linear_inputs(const char* op, const at::Tensor& activations,
                                const at::Tensor& grad_outputs, bool cuda) {
  TORCH_CHECK(activations.dim() == 3, op, ": activations has ", activations.dim(),
              " dims, expected [N, T, in]");
  TORCH_CHECK(grad_outputs.dim() == 3, op, ": grad_outputs has ", grad_outputs.dim(),
              " dims, expected [N, T, out]");
  TORCH_CHECK(
      activations.size(0) == grad_outputs.size(0) && activations.size(1) == grad_outputs.size(1),
      op, ": activations ", activations.sizes(), " and grad_outputs ", grad_outputs.sizes(),
      " must agree on N and T");
  check_psg_pair(op, activations, grad_outputs, cuda);
}

// vectors [m, out, in] of the dtype and device of activations.
inline void check_linear_vectors(const char* op, const at::Tensor& vectors,
                                 const at::Tensor& activations, const at::Tensor& grad_outputs) {
  TORCH_CHECK(vectors.dim() == 3, op, ": vectors has ", vectors.dim(),
              " dims, expected [m, out, in]");
  TORCH_CHECK(vectors.size(1) == grad_outputs.size(2) && vectors.size(2) == activations.size(2), op,
              ": vectors ", vectors.sizes(), " expected [m, ", grad_outputs.size(2), ", ",
              activations.size(2), "] (m, out, in)");
  check_psg_vectors_like(op, vectors, activations);
}

}  // namespace metafluence
