// CPU implementation of metafluence::psg_linear.
//   out[n, o, i] = sum_t grad_outputs[n, t, o] * activations[n, t, i]
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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
  TORCH_CHECK(activations.dim() == 3, "psg_linear: activations has ", activations.dim(),
              " dims, expected [N, T, in]");
  TORCH_CHECK(grad_outputs.dim() == 3, "psg_linear: grad_outputs has ", grad_outputs.dim(),
              " dims, expected [N, T, out]");
  TORCH_CHECK(
      activations.size(0) == grad_outputs.size(0) && activations.size(1) == grad_outputs.size(1),
      "psg_linear: activations ", activations.sizes(), " and grad_outputs ", grad_outputs.sizes(),
      " must agree on N and T");
  TORCH_CHECK(activations.scalar_type() == grad_outputs.scalar_type(),
              "psg_linear: activations and grad_outputs must have the same dtype");
  TORCH_CHECK(activations.device().is_cpu() && grad_outputs.device().is_cpu(),
              "psg_linear (CPU kernel): inputs must be CPU tensors");
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
