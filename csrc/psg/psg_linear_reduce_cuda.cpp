// CUDA registration of metafluence::psg_linear_sqnorm and metafluence::psg_linear_dot (built
// only against a CUDA torch, METAFLUENCE_CUDA=ON). Kernels: psg_linear_reduce_kernel.cu; they
// write per-tile partial sums in double, summed here over tiles and cast to the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include "psg/psg_linear_reduce_kernel.h"

namespace metafluence {
namespace {

void check_inputs(const char* op, const at::Tensor& activations, const at::Tensor& grad_outputs) {
  TORCH_CHECK(activations.dim() == 3, op, ": activations has ", activations.dim(),
              " dims, expected [N, T, in]");
  TORCH_CHECK(grad_outputs.dim() == 3, op, ": grad_outputs has ", grad_outputs.dim(),
              " dims, expected [N, T, out]");
  TORCH_CHECK(
      activations.size(0) == grad_outputs.size(0) && activations.size(1) == grad_outputs.size(1),
      op, ": activations ", activations.sizes(), " and grad_outputs ", grad_outputs.sizes(),
      " must agree on N and T");
  TORCH_CHECK(activations.scalar_type() == grad_outputs.scalar_type(), op,
              ": activations and grad_outputs must have the same dtype");
  TORCH_CHECK(activations.is_cuda() && grad_outputs.is_cuda() &&
                  activations.device() == grad_outputs.device(),
              op, " (CUDA kernel): inputs must be on the same CUDA device");
}

at::Tensor psg_linear_sqnorm_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs) {
  check_inputs("psg_linear_sqnorm", activations, grad_outputs);
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto a = activations.contiguous();
  const auto g = grad_outputs.contiguous();
  const int64_t N = a.size(0), T = a.size(1), I = a.size(2), O = g.size(2);
  if (N == 0 || I == 0 || O == 0) return at::zeros({N}, a.options());
  auto partial = at::empty({N, psg_reduce_tiles(I, O)}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_linear_sqnorm_cuda", [&] {
    const cudaError_t err =
        launch_psg_linear_sqnorm(a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                 partial.mutable_data_ptr<double>(), N, T, I, O, stream);
    TORCH_CHECK(err == cudaSuccess,
                "psg_linear_sqnorm CUDA launch failed: ", cudaGetErrorString(err));
  });
  return partial.sum(1).to(a.scalar_type());
}

at::Tensor psg_linear_dot_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs,
                               const at::Tensor& vectors) {
  check_inputs("psg_linear_dot", activations, grad_outputs);
  TORCH_CHECK(vectors.dim() == 3, "psg_linear_dot: vectors has ", vectors.dim(),
              " dims, expected [m, out, in]");
  TORCH_CHECK(vectors.size(1) == grad_outputs.size(2) && vectors.size(2) == activations.size(2),
              "psg_linear_dot: vectors ", vectors.sizes(), " expected [m, ", grad_outputs.size(2),
              ", ", activations.size(2), "] (m, out, in)");
  TORCH_CHECK(vectors.scalar_type() == activations.scalar_type(),
              "psg_linear_dot: vectors must have the dtype of activations");
  TORCH_CHECK(vectors.device() == activations.device(),
              "psg_linear_dot (CUDA kernel): vectors must be on the device of activations");
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto a = activations.contiguous();
  const auto g = grad_outputs.contiguous();
  const auto v = vectors.contiguous();
  const int64_t N = a.size(0), T = a.size(1), I = a.size(2), O = g.size(2), M = v.size(0);
  if (N == 0 || M == 0 || I == 0 || O == 0) return at::zeros({N, M}, a.options());
  const int64_t tiles = psg_reduce_tiles(I, O);
  auto partial = at::empty({N, tiles, M}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_linear_dot_cuda", [&] {
    const cudaError_t err = launch_psg_linear_dot(
        a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
        partial.mutable_data_ptr<double>(), N, T, I, O, M, stream);
    TORCH_CHECK(err == cudaSuccess, "psg_linear_dot CUDA launch failed: ", cudaGetErrorString(err));
  });
  return partial.sum(1).to(a.scalar_type());
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CUDA, m) {
  m.impl("psg_linear_sqnorm", &metafluence::psg_linear_sqnorm_cuda);
  m.impl("psg_linear_dot", &metafluence::psg_linear_dot_cuda);
}
