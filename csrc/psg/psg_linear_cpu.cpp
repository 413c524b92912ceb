// CPU implementation of metafluence::psg_linear.
//   out[n, o, i] = sum_t grad_outputs[n, t, o] * activations[n, t, i]
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "psg/psg_linear_check.h"

namespace metafluence {
namespace {

template <typename scalar_t>
void psg_linear_cpu_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ gout,
                           scalar_t* __restrict__ out, int64_t N, int64_t T, int64_t I, int64_t O) {
  // One work item = one output row (n, o): out[n, o, :] = sum_t gout[n, t, o] * act[n, t, :].
  // Parallel over N * O rows so that N = 1 still uses every core; the inner loop over `in` is
  // contiguous and vectorises.
  const int64_t rows = N * O;
  const int64_t work_per_row = std::max<int64_t>(1, T * I);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / O;
      const int64_t o = r % O;
      scalar_t* __restrict__ dst = out + r * I;  // out is zero-initialised
      const scalar_t* a_n = act + n * T * I;
      const scalar_t* g_n = gout + n * T * O;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t g = g_n[t * O + o];
        const scalar_t* __restrict__ a = a_n + t * I;
        for (int64_t i = 0; i < I; ++i) dst[i] += g * a[i];
      }
    }
  });
}

at::Tensor psg_linear_cpu(const at::Tensor& activations, const at::Tensor& grad_outputs) {
  check_linear_inputs("psg_linear", activations, grad_outputs, /*cuda=*/false);
  const auto a = activations.contiguous();
  const auto g = grad_outputs.contiguous();
  const int64_t N = a.size(0), T = a.size(1), I = a.size(2), O = g.size(2);
  auto out = at::zeros({N, O, I}, a.options());
  if (N == 0 || O == 0 || I == 0 || T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_linear_cpu", [&] {
    psg_linear_cpu_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                    out.mutable_data_ptr<scalar_t>(), N, T, I, O);
  });
  return out;
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CPU, m) { m.impl("psg_linear", &metafluence::psg_linear_cpu); }
