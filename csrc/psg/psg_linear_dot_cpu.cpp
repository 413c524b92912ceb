// CPU implementation of metafluence::psg_linear_dot:
//   out[n, j] = <G_n, vectors[j]>_F = sum_t grad_outputs[n, t, :]^T vectors[j] activations[n, t, :]
// with G_n = sum_t g_t a_t^T produced kRows rows at a time (never stored whole; see
// psg_linear_sqnorm_cpu.cpp). Cost per sample: T in out + m in out multiply-adds.
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

at::Tensor psg_linear_dot_cpu(const at::Tensor& activations, const at::Tensor& grad_outputs,
                              const at::Tensor& vectors) {
  check_linear_inputs("psg_linear_dot", activations, grad_outputs, /*cuda=*/false);
  check_linear_vectors("psg_linear_dot", vectors, activations, grad_outputs);
  const auto a = activations.contiguous();
  const auto g = grad_outputs.contiguous();
  const auto v = vectors.contiguous();
  const int64_t N = a.size(0), T = a.size(1), I = a.size(2), O = g.size(2), M = v.size(0);
  auto out = at::zeros({N, M}, a.options());
  if (N == 0 || M == 0 || T == 0 || I == 0 || O == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_linear_dot_cpu", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t kRows = psg_reduce_cpu::kRows;
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> buf(kRows * I);
      std::vector<double> acc(M);
      for (int64_t n = n0; n < n1; ++n) {
        const scalar_t* a_n = ap + n * T * I;
        const scalar_t* g_n = gp + n * T * O;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t o0 = 0; o0 < O; o0 += kRows) {
          const int64_t r = std::min(kRows, O - o0);
          psg_reduce_cpu::make_rows(a_n, g_n, T, I, O, o0, r, buf.data());
          for (int64_t j = 0; j < M; ++j) {
            // rows o0 .. o0 + r of vectors[j] are contiguous: one dot of length r * in
            acc[j] += psg_reduce_cpu::dot_d(buf.data(), vp + (j * O + o0) * I, r * I);
          }
        }
        for (int64_t j = 0; j < M; ++j) op[n * M + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CPU, m) {
  m.impl("psg_linear_dot", &metafluence::psg_linear_dot_cpu);
}
