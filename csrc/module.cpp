// The Python module flextron._C. Importing it runs the TORCH_LIBRARY
// registrations in registration.cpp; the module itself only reports how the
// extension was built and what this CPU offers (read by `python -m flextron.ops.info`).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#ifndef FLEXTRON_TORCH_VERSION
#define FLEXTRON_TORCH_VERSION "unknown"
#endif
#ifndef FLEXTRON_CUDA_ARCHS
#define FLEXTRON_CUDA_ARCHS ""
#endif
#ifndef FLEXTRON_CUDA_VERSION
#define FLEXTRON_CUDA_VERSION ""
#endif
#ifndef FLEXTRON_CUTLASS_VERSION
#define FLEXTRON_CUTLASS_VERSION ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Flextron compiled extension: registers torch.ops.flextron.*";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = std::string(FLEXTRON_TORCH_VERSION);
#ifdef FLEXTRON_WITH_CUDA
    info["cuda_built"] = true;
#else
    info["cuda_built"] = false;
#endif
    info["cuda_version"] = std::string(FLEXTRON_CUDA_VERSION);
    info["cuda_archs"] = std::string(FLEXTRON_CUDA_ARCHS);
#ifdef FLEXTRON_WITH_SM90
    info["sm90_kernels"] = true;  // CUTLASS 3.x wgmma/TMA kernels, run on sm_90 devices
#else
    info["sm90_kernels"] = false;
#endif
    info["cutlass_version"] = std::string(FLEXTRON_CUTLASS_VERSION);
    return info;
  }, "How this extension was built: torch/CUDA/CUTLASS versions and CUDA archs.");
  m.def("cpu_features", [] {
    py::dict features;
#if defined(__x86_64__) || defined(__i386__)
    features["avx2_fma"] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    features["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
    features["avx512_bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
    features["avx512_vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
#else
    for (const char* name : {"avx2_fma", "avx512bw", "avx512_bf16", "avx512_vnni"}) features[name] = false;
#endif
    return features;
  }, "The instruction sets of this CPU that the CPU kernels use (all False off x86).");
}
