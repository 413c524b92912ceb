// CPU implementation of metafluence::psg_linear_sqnorm and metafluence::psg_linear_dot.
//   G_n = sum_t grad_outputs[n, t, :]^T (outer) activations[n, t, :]        [out, in]
//   psg_linear_sqnorm: out[n]    = ||G_n||_F^2
//   psg_linear_dot:    out[n, j] = <G_n, vectors[j]>_F
// G_n is never stored: it is produced kRows output rows at a time into a small per-thread
// buffer (kRows x in), reduced against itself or against vectors[:, rows, :], then discarded.
// For the squared norm the Gram ("ghost") form
//   ||G_n||^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')
// is used instead when it needs fewer flops (T (T + 1) / 2 (in + out) < T in out).
// Reductions are accumulated in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "psg/psg_linear_check.h"
#include "psg/psg_linear_reduce_cpu.h"

namespace metafluence {
namespace {

at::Tensor psg_linear_sqnorm_cpu(const at::Tensor& activations, const at::Tensor& grad_outputs) {
  check_linear_inputs("psg_linear_sqnorm", activations, grad_outputs, /*cuda=*/false);
  const auto a = activations.contiguous();
  const auto g = grad_outputs.contiguous();
  const int64_t N = a.size(0), T = a.size(1), I = a.size(2), O = g.size(2);
  auto out = at::zeros({N}, a.options());
  if (N == 0 || T == 0 || I == 0 || O == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_linear_sqnorm_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool gram = psg_reduce_cpu::use_gram(T, I, O);
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> buf(gram ? 0 : psg_reduce_cpu::kRows * I);
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* a_n = ap + n * T * I;
        const scalar_t* g_n = gp + n * T * O;
        double s = gram ? psg_reduce_cpu::sqnorm_gram(a_n, g_n, T, I, O)
                        : psg_reduce_cpu::sqnorm_rows(a_n, g_n, T, I, O, buf.data());
        op[n] = static_cast<scalar_t>(s);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CPU, m) {
  m.impl("psg_linear_sqnorm", &metafluence::psg_linear_sqnorm_cpu);
}
