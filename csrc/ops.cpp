// Every metafluence op schema is declared here, once. Implementations register beside their
// kernels: TORCH_LIBRARY_IMPL(metafluence, CPU, m) in csrc/<family>/<op>_cpu.cpp and
// TORCH_LIBRARY_IMPL(metafluence, CUDA, m) in csrc/<family>/<op>_cuda.cpp.
// Fake (shape) impls and autograd formulas are registered from Python (metafluence/ops/).
#include <torch/library.h>

TORCH_LIBRARY(metafluence, m) {
  // Per-sample weight gradient of a linear map:
  //   out[n] = sum_t grad_outputs[n, t, :]^T (outer) activations[n, t, :]
  //   activations [N, T, in], grad_outputs [N, T, out] -> [N, out, in]
  m.def("psg_linear(Tensor activations, Tensor grad_outputs) -> Tensor");
  // Per-sample squared Frobenius norm of that gradient, never storing it:
  //   out[n] = || sum_t grad_outputs[n, t, :]^T (outer) activations[n, t, :] ||_F^2   -> [N]
  m.def("psg_linear_sqnorm(Tensor activations, Tensor grad_outputs) -> Tensor");
  // Per-sample dot products of that gradient with m vectors [m, out, in]:
  //   out[n, j] = sum_t grad_outputs[n, t, :]^T vectors[j] activations[n, t, :]          -> [N, m]
  m.def("psg_linear_dot(Tensor activations, Tensor grad_outputs, Tensor vectors) -> Tensor");
}
