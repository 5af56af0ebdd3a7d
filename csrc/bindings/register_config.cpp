// Build and run-time configuration: threads, ISA level, what was compiled.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/cpu_features.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/plan_cache.h"
#include "core/plan_store.h"
#include "core/settings.h"
#include "cpu/layer_cache.h"
#include "cpu/machine.h"
#include "core/thread_pool.h"
#include "cpu/ukernels/ukernels.h"
#ifdef LK_WITH_CUDA
#include "cuda/device.h"
#endif

namespace lk::bindings {

namespace py = pybind11;

void register_config(py::module_& m) {
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", [](int64_t n) {
    if (n < 1 || n > kMaxThreads)
      throw py::value_error(cat("n: number of threads must be in [1, ", kMaxThreads, "], got ", n));
    py::gil_scoped_release release;
    set_num_threads(static_cast<int>(n));
  });
  m.def("available_cores", &available_cores);
  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); });
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); });
  m.def("set_isa_cap", [](const std::string& name) { set_isa_cap(isa_from_name(name)); });
  m.def("ukernel_names", [] {
    const auto& t = cpu::ukernels();
    py::dict d;
    const char* shapes[cpu::kGemmShapes] = {"wide", "tall", "narrow"};  // as lk.Conv2d(ukernel=...) names them
    for (int shape = 0; shape < cpu::kGemmShapes; ++shape) {
      d[py::str(cat("f32_gemm_", shapes[shape]))] = t.f32_gemm[shape].name;
      d[py::str(cat("f64_gemm_", shapes[shape]))] = t.f64_gemm[shape].name;
    }
    d["f32_maxpool_2x2s2"] = t.f32_maxpool.k2x2s2.name;
    d["f32_maxpool_s1"] = t.f32_maxpool.s1.name;
    d["f32_maxpool_s2"] = t.f32_maxpool.s2.name;
    d["f64_maxpool_2x2s2"] = t.f64_maxpool.k2x2s2.name;
    d["f64_maxpool_s1"] = t.f64_maxpool.s1.name;
    d["f64_maxpool_s2"] = t.f64_maxpool.s2.name;
    return d;
  });
  m.def("build_info", [] {
    py::dict d;
    d["compiler"] =
#if defined(__clang__)
        "clang " __clang_version__;
#elif defined(__GNUC__)
        "gcc " __VERSION__;
#else
        "unknown";
#endif
    d["build_type"] = LK_BUILD_TYPE;
#ifdef LK_HAVE_X86_KERNELS
    d["isa_kernels"] = py::make_tuple("generic", "avx2", "avx512");
#else
    d["isa_kernels"] = py::make_tuple("generic");
#endif
#ifdef LK_WITH_CUDA
    d["cuda"] = true;
    d["cuda_architectures"] = LK_CUDA_ARCHITECTURES;
    d["cuda_runtime_version"] = cuda::runtime_version();
#else
    d["cuda"] = false;
#endif
    return d;
  });
  m.def("plan_cache_info", [] {
    const PlanCacheStats s = plan_cache_stats();
    return py::make_tuple(s.hits, s.misses, s.evictions, s.size, s.capacity, s.create_ns * 1e-9);
  });
  m.def("plan_cache_clear", [] {
    plan_cache_clear();
    output_pool_trim();
  });
  m.def("layer_cache_info", [] {
    const cpu::LayerCacheStats s = cpu::layer_cache_stats();
    return py::make_tuple(s.hits, s.misses, s.layers, s.bytes, s.capacity);
  });
  m.def("layer_cache_clear", &cpu::layer_cache_clear);
  m.def("layer_cache_set_capacity", &cpu::layer_cache_set_capacity);
  m.def("output_pool_bytes", &output_pool_bytes);
  m.def("plan_store_path", &plan_store_path);
  m.def("get_scheduler", [] {
    const SchedulerSettings s = scheduler_settings();
    return py::make_tuple(s.memory_budget, s.memory_weight, s.autotune);
  });
  m.def("set_scheduler", [](int64_t memory_budget, double memory_weight, bool autotune) {
    set_scheduler_settings({memory_budget, memory_weight, autotune});
  });
  m.def("machine_model", [] {
    py::gil_scoped_release release;
    return cpu::machine_model().describe();
  });
  m.def("fma_peak_flops", [](int threads) {
    py::gil_scoped_release release;
    return cpu::fma_peak_flops(threads);
  });
  m.def("plan_cache_set_capacity", &plan_cache_set_capacity);
  m.def("cuda_devices", [] {
    py::list out;
#ifdef LK_WITH_CUDA
    for (const auto& dev : cuda::devices()) {
      py::dict d;
      d["name"] = dev.name;
      d["compute_capability"] = py::make_tuple(dev.major, dev.minor);
      d["sm_count"] = dev.sm_count;
      d["memory_bytes"] = dev.memory_bytes;
      out.append(d);
    }
#endif
    return out;
  });
}

}  // namespace lk::bindings
