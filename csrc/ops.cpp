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
  // Per-sample weight gradient of a 2-D convolution (zero padding; other padding modes are
  // applied to the input by the caller), never forming the unfolded input:
  //   out[n, o, c, i, j] = sum_{y, x} grad_outputs[n, o, y, x]
  //                        * activations[n, g C/groups + c, y sh + i dh - ph, x sw + j dw - pw]
  //   (g = o / (O / groups); out-of-range input positions read as 0)
  //   activations [N, C, H, W], grad_outputs [N, O, Ho, Wo] -> [N, O, C / groups, kh, kw]
  m.def(
      "psg_conv2d(Tensor activations, Tensor grad_outputs, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Per-sample squared Frobenius norm of that gradient G_n, never storing it:  -> [N]
  m.def(
      "psg_conv2d_sqnorm(Tensor activations, Tensor grad_outputs, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Per-sample dot products <G_n, vectors[j]>_F, vectors [m, O, C / groups, kh, kw]:  -> [N, m]
  m.def(
      "psg_conv2d_dot(Tensor activations, Tensor grad_outputs, Tensor vectors, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // Fused multi-column solver vector updates (rows = right-hand sides, e.g. tasks x columns).
  // In place on the (a!)/(b!)/(c!) arguments; rows with active[i] == false are left untouched.
  // CG step, per active row i (x, r, p, Ap [k, P]; curv_max, rz [k]; active [k] bool):
  //   pAp = p.Ap, pp = p.p, curv = pAp / max(pp, tiny), curv_max = max(curv_max, |curv|)
  //   neg = curv <= curv_tol * curv_max; alpha = neg ? 0 : rz / pAp
  //   x += alpha p, r -= alpha Ap; returns rr = r.r (0 for rows that did not step) and neg
  m.def(
      "cg_update_(Tensor(a!) x, Tensor(b!) r, Tensor(c!) curv_max, Tensor p, Tensor Ap, "
      "Tensor rz, Tensor active, float curv_tol) -> (Tensor, Tensor)");
  // CG direction, per active row: beta = rz_new / (rz_old == 0 ? 1 : rz_old); p = z + beta p
  m.def("cg_direction_(Tensor(a!) p, Tensor z, Tensor rz_new, Tensor rz_old, Tensor active) -> ()");
  // Neumann (LiSSA) step, per active row: r = b - Ax, rn = ||r||; then, if advance and
  // !(rn <= thr): x += inv_sigma r  (x_next = x + (b - A x) / sigma). Returns rn (0 if inactive).
  m.def(
      "neumann_step_(Tensor(a!) x, Tensor(b!) r, Tensor b, Tensor Ax, Tensor active, Tensor thr, "
      "float inv_sigma, bool advance) -> Tensor");
}
