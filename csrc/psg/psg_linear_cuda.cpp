// CUDA registration of metafluence::psg_linear (built only against a CUDA torch,
// METAFLUENCE_CUDA=ON). Compiled by the host compiler; the kernel lives in psg_linear_kernel.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include "psg/psg_linear_check.h"
#include "psg/psg_linear_kernel.h"

namespace metafluence {
namespace {

at::Tensor psg_linear_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs) {
  check_linear_inputs("psg_linear", activations, grad_outputs, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto a = activations.contiguous();
  const auto g = grad_outputs.contiguous();
  const int64_t N = a.size(0), T = a.size(1), I = a.size(2), O = g.size(2);
  auto out = at::empty({N, O, I}, a.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_linear_cuda", [&] {
    const cudaError_t err =
        launch_psg_linear(a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                          out.mutable_data_ptr<scalar_t>(), N, T, I, O, stream);
    TORCH_CHECK(err == cudaSuccess, "psg_linear CUDA launch failed: ", cudaGetErrorString(err));
  });
  return out;
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CUDA, m) { m.impl("psg_linear", &metafluence::psg_linear_cuda); }
