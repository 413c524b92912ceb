// Argument checks shared by the CPU and CUDA registrations of psg_conv2d, psg_conv2d_sqnorm and
// psg_conv2d_dot (host-only: includes torch headers). Each failure names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "psg/psg_check.h"
#include "psg/psg_conv2d_geom.h"

namespace metafluence {

inline void check_conv2d_pair(const char* op, const char* name, at::IntArrayRef v, int64_t lo) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " has ", v.size(), " entries, expected 2 (h, w)");
  TORCH_CHECK(v[0] >= lo && v[1] >= lo, op, ": ", name, " = ", v, ", expected entries >= ", lo);
}

// Validates the inputs of the three ops and returns their geometry. `cuda` selects the device
// the kernel runs on (CPU tensors otherwise).
inline Conv2dGeom check_conv2d_inputs(const char* op, const at::Tensor& activations,
                                      const at::Tensor& grad_outputs, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups, bool cuda) {
  TORCH_CHECK(activations.dim() == 4, op, ": activations has ", activations.dim(),
              " dims, expected [N, C, H, W]");
  TORCH_CHECK(grad_outputs.dim() == 4, op, ": grad_outputs has ", grad_outputs.dim(),
              " dims, expected [N, O, Ho, Wo]");
  TORCH_CHECK(activations.size(0) == grad_outputs.size(0), op, ": activations ",
              activations.sizes(), " and grad_outputs ", grad_outputs.sizes(), " must agree on N");
  check_psg_pair(op, activations, grad_outputs, cuda);
  const auto dtype = activations.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype ", dtype,
              " not supported (float32, float64)");
  check_conv2d_pair(op, "kernel_size", kernel_size, 1);
  check_conv2d_pair(op, "stride", stride, 1);
  check_conv2d_pair(op, "padding", padding, 0);
  check_conv2d_pair(op, "dilation", dilation, 1);
  Conv2dGeom g{};
  g.N = activations.size(0);
  g.C = activations.size(1);
  g.H = activations.size(2);
  g.W = activations.size(3);
  g.O = grad_outputs.size(1);
  g.Ho = grad_outputs.size(2);
  g.Wo = grad_outputs.size(3);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  TORCH_CHECK(groups >= 1, op, ": groups = ", groups, ", expected >= 1");
  TORCH_CHECK(g.C % groups == 0, op, ": groups = ", groups, " does not divide the ", g.C,
              " channels of activations");
  TORCH_CHECK(g.O % groups == 0, op, ": groups = ", groups, " does not divide the ", g.O,
              " channels of grad_outputs");
  const int64_t span_h = g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1;
  const int64_t span_w = g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1;
  const int64_t want_h = span_h < 0 ? 0 : span_h / g.sh + 1;
  const int64_t want_w = span_w < 0 ? 0 : span_w / g.sw + 1;
  TORCH_CHECK(g.Ho == want_h && g.Wo == want_w, op, ": grad_outputs ", grad_outputs.sizes(),
              " has spatial size [", g.Ho, ", ", g.Wo, "], expected [", want_h, ", ", want_w,
              "] for activations ", activations.sizes(), ", kernel_size ", kernel_size, ", stride ",
              stride, ", padding ", padding, ", dilation ", dilation);
  return g;
}

// vectors [m, O, C / groups, kh, kw] of the dtype and device of activations.
inline void check_conv2d_vectors(const char* op, const at::Tensor& vectors, const Conv2dGeom& g,
                                 const at::Tensor& activations) {
  TORCH_CHECK(vectors.dim() == 5, op, ": vectors has ", vectors.dim(),
              " dims, expected [m, O, C / groups, kh, kw]");
  TORCH_CHECK(vectors.size(1) == g.O && vectors.size(2) == g.cg() && vectors.size(3) == g.kh &&
                  vectors.size(4) == g.kw,
              op, ": vectors ", vectors.sizes(), " expected [m, ", g.O, ", ", g.cg(), ", ", g.kh,
              ", ", g.kw, "] (m, O, C / groups, kh, kw)");
  check_psg_vectors_like(op, vectors, activations);
}

}  // namespace metafluence
