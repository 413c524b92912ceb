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

#include "psg/psg_linear_check.h"
#include "psg/psg_linear_reduce_kernel.h"

namespace metafluence {
namespace {

at::Tensor psg_linear_sqnorm_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs) {
  check_linear_inputs("psg_linear_sqnorm", activations, grad_outputs, /*cuda=*/true);
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
  check_linear_inputs("psg_linear_dot", activations, grad_outputs, /*cuda=*/true);
  check_linear_vectors("psg_linear_dot", vectors, activations, grad_outputs);
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
