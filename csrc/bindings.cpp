// The pybind11 side of metafluence._C: build information only. The ops themselves are
// registered with the torch dispatcher by static registrars (csrc/ops.cpp and the
// csrc/<family>/*_cpu.cpp / *_cuda.cpp files) when this module is imported.
// No torch headers here: this TU stays cheap to compile.
#include <pybind11/pybind11.h>

#include <string>

#ifndef METAFLUENCE_TORCH_VERSION
#define METAFLUENCE_TORCH_VERSION ""
#endif
#ifndef METAFLUENCE_CUDA_MODE
#define METAFLUENCE_CUDA_MODE "OFF"
#endif
#ifndef METAFLUENCE_CUDA_VERSION
#define METAFLUENCE_CUDA_VERSION ""
#endif
#ifndef METAFLUENCE_CUDA_ARCHS
#define METAFLUENCE_CUDA_ARCHS ""
#endif
#ifndef METAFLUENCE_FAMILIES
#define METAFLUENCE_FAMILIES ""
#endif

namespace py = pybind11;

namespace {

#ifdef METAFLUENCE_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

py::list split_csv(const std::string& s) {
  py::list out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      if (!cur.empty()) out.append(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) out.append(cur);
  return out;
}

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "metafluence native extension (ops are registered under torch.ops.metafluence)";
  m.attr("with_cuda") = kWithCuda;
  m.def(
      "build_info",
      []() {
        const std::string cuda_mode = METAFLUENCE_CUDA_MODE;
        py::dict d;
        d["torch_version"] = METAFLUENCE_TORCH_VERSION;
        d["cuda_mode"] = cuda_mode;
        d["cuda_version"] = METAFLUENCE_CUDA_VERSION;
        d["cuda_archs"] = split_csv(METAFLUENCE_CUDA_ARCHS);
        d["compiler"] = compiler();
        d["kernel_families"] = split_csv(METAFLUENCE_FAMILIES);
        d["cpu_kernels"] = true;
        d["cuda_kernels_linked"] = kWithCuda;
        d["cuda_compile_only"] = cuda_mode == "COMPILE_ONLY";
        return d;
      },
      "Build information recorded when this module was compiled.");
}
