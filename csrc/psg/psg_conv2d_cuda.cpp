// CUDA registration of metafluence::psg_conv2d, psg_conv2d_sqnorm and psg_conv2d_dot (built only
// against a CUDA torch, METAFLUENCE_CUDA=ON). Kernels: psg_conv2d_kernel.cu; the reductions
// write per-tile partial sums in double, summed here over tiles and cast to the input dtype.
// Argument checks are shared with the CPU kernel (psg_conv2d_check.h).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cuSPARSE/cuBLAS headers
#include <torch/library.h>

#include "psg/psg_conv2d_check.h"
#include "psg/psg_conv2d_kernel.h"

namespace metafluence {
namespace {

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor psg_conv2d_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Conv2dGeom g = check_conv2d_inputs("psg_conv2d", activations, grad_outputs, kernel_size,
                                           stride, padding, dilation, groups, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto a = activations.contiguous();
  const auto go = grad_outputs.contiguous();
  auto out = at::empty({g.N, g.O, g.cg(), g.kh, g.kw}, a.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_conv2d_cuda", [&] {
    check_launch("psg_conv2d",
                 launch_psg_conv2d(a.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(),
                                   out.mutable_data_ptr<scalar_t>(), g, stream));
  });
  return out;
}

at::Tensor psg_conv2d_sqnorm_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const Conv2dGeom g = check_conv2d_inputs("psg_conv2d_sqnorm", activations, grad_outputs,
                                           kernel_size, stride, padding, dilation, groups, true);
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto a = activations.contiguous();
  const auto go = grad_outputs.contiguous();
  if (g.N == 0 || g.O == 0 || g.kg() == 0) return at::zeros({g.N}, a.options());
  auto partial = at::empty({g.N, psg_conv2d_tiles(g)}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_conv2d_sqnorm_cuda", [&] {
    check_launch(
        "psg_conv2d_sqnorm",
        launch_psg_conv2d_sqnorm(a.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(),
                                 partial.mutable_data_ptr<double>(), g, stream));
  });
  return partial.sum(1).to(a.scalar_type());
}

at::Tensor psg_conv2d_dot_cuda(const at::Tensor& activations, const at::Tensor& grad_outputs,
                               const at::Tensor& vectors, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  const Conv2dGeom g = check_conv2d_inputs("psg_conv2d_dot", activations, grad_outputs, kernel_size,
                                           stride, padding, dilation, groups, true);
  check_conv2d_vectors("psg_conv2d_dot", vectors, g, activations);
  const c10::cuda::CUDAGuard guard(activations.device());
  const auto a = activations.contiguous();
  const auto go = grad_outputs.contiguous();
  const auto v = vectors.contiguous();
  const int64_t M = v.size(0);
  if (g.N == 0 || M == 0 || g.O == 0 || g.kg() == 0) return at::zeros({g.N, M}, a.options());
  auto partial = at::empty({g.N, psg_conv2d_tiles(g), M}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "psg_conv2d_dot_cuda", [&] {
    check_launch("psg_conv2d_dot",
                 launch_psg_conv2d_dot(a.const_data_ptr<scalar_t>(), go.const_data_ptr<scalar_t>(),
                                       v.const_data_ptr<scalar_t>(),
                                       partial.mutable_data_ptr<double>(), M, g, stream));
  });
  return partial.sum(1).to(a.scalar_type());
}

}  // namespace
}  // namespace metafluence

TORCH_LIBRARY_IMPL(metafluence, CUDA, m) {
  m.impl("psg_conv2d", &metafluence::psg_conv2d_cuda);
  m.impl("psg_conv2d_sqnorm", &metafluence::psg_conv2d_sqnorm_cuda);
  m.impl("psg_conv2d_dot", &metafluence::psg_conv2d_dot_cuda);
}
