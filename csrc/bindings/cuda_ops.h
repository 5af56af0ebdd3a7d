// The CUDA launchers on raw device pointers, for the Python dispatch of
// device arrays (lepton_kernels/_device.py), which has checked shapes,
// dtypes and devices and allocated the outputs. Pointers and streams are
// integers, as in the CUDA array interface. Each call makes the array's
// device current, takes its GPU plan from the plan cache (keyed by the
// device and its multiprocessor count), releases the GIL and enqueues: it
// never synchronises.
//
// Compiled into _core.cuda when the build has CUDA, and into
// _cuda_emu.device always, where the same code drives the emulated kernels
// over host memory (cuda/emu_runtime.cpp is the device runtime there).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "core/descriptors.h"
#include "core/plan_cache.h"
#include "cuda/activation.cuh"
#include "cuda/activation_backward.cuh"
#include "cuda/conv2d.cuh"
#include "cuda/conv2d_backward.cuh"
#include "cuda/conv_pool.cuh"
#include "cuda/linear.cuh"
#include "cuda/linear_backward.cuh"
#include "cuda/maxpool.cuh"
#include "cuda/maxpool_backward.cuh"
#include "cuda/optim.cuh"
#include "cuda/runtime.h"

namespace lk::cuda_bindings {

namespace py = pybind11;
using cuda::Stream;
using Ptr = uintptr_t;
// (N, C, H, W, K, R, S, groups, stride_h, stride_w, pad_top, pad_bottom,
//  pad_left, pad_right, dil_h, dil_w)
using ConvArgs = std::array<int64_t, 16>;
// (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, ceil_mode)
using PoolArgs = std::array<int64_t, 9>;

template <class T>
T* ptr(Ptr p) {
  return reinterpret_cast<T*>(p);
}
inline Stream stream_of(Ptr s) { return reinterpret_cast<Stream>(s); }

inline Conv2dDesc conv_desc(const ConvArgs& a, bool f64, bool has_bias, bool relu) {
  Conv2dDesc d;
  d.dtype = f64 ? DType::f64 : DType::f32;
  d.N = a[0], d.C = a[1], d.H = a[2], d.W = a[3], d.K = a[4], d.R = a[5], d.S = a[6], d.groups = a[7];
  d.stride_h = a[8], d.stride_w = a[9];
  d.pad_top = a[10], d.pad_bottom = a[11], d.pad_left = a[12], d.pad_right = a[13];
  d.dil_h = a[14], d.dil_w = a[15];
  d.has_bias = has_bias;
  d.act = relu ? Activation::relu : Activation::none;
  return d;
}

inline Pool2dDesc pool_desc(const PoolArgs& a) {
  Pool2dDesc d;
  d.kh = a[0], d.kw = a[1], d.stride_h = a[2], d.stride_w = a[3], d.pad_h = a[4], d.pad_w = a[5];
  d.dil_h = a[6], d.dil_w = a[7], d.ceil_mode = a[8] != 0;
  return d;
}

// GPU plans: the kernel (or fused tile) chosen for a descriptor on a device.
// Their ops are numbered apart from the CPU planner's.
enum GpuOp : int64_t { kGpuConv2d = 101, kGpuConvPool = 102, kGpuLinear = 103 };

inline PlanKey gpu_key(GpuOp op, DType dtype, int device) {
  PlanKey k;
  k.add(op).add(static_cast<int64_t>(dtype)).add(device).add(cuda::sm_count(device));
  k.add(cuda::compute_capability(device));
  return k;
}

inline void add_conv(PlanKey& k, const Conv2dDesc& d) {
  k.add(d.N).add(d.C).add(d.H).add(d.W).add(d.K).add(d.R).add(d.S).add(d.groups);
  k.add(d.stride_h).add(d.stride_w).add(d.pad_top).add(d.pad_bottom).add(d.pad_left).add(d.pad_right);
  k.add(d.dil_h).add(d.dil_w).add(d.has_bias).add(static_cast<int64_t>(d.act));
}

struct ConvPlan {
  cuda::ConvKernel kernel;
};
struct ConvPoolPlan {
  cuda::ConvPoolTile tile;
};
struct LinearPlan {
  cuda::LinearKernel kernel;
};

inline std::shared_ptr<const ConvPlan> conv_plan(const Conv2dDesc& d, int device) {
  PlanKey k = gpu_key(kGpuConv2d, d.dtype, device);
  add_conv(k, d);
  return cached<ConvPlan>(k, [&] { return std::make_shared<const ConvPlan>(ConvPlan{cuda::conv2d_kernel_for(d)}); });
}

inline std::shared_ptr<const ConvPoolPlan> conv_pool_plan(const Conv2dDesc& c, const Pool2dDesc& p, int device) {
  PlanKey k = gpu_key(kGpuConvPool, c.dtype, device);
  add_conv(k, c);
  k.add(p.kh).add(p.kw).add(p.stride_h).add(p.stride_w).add(p.pad_h).add(p.pad_w).add(p.dil_h).add(p.dil_w);
  k.add(p.ceil_mode);
  return cached<ConvPoolPlan>(k, [&] {
    return std::make_shared<const ConvPoolPlan>(
        ConvPoolPlan{cuda::conv_pool_tile(c, p, c.dtype == DType::f64, cuda::sm_count(device))});
  });
}

inline std::shared_ptr<const LinearPlan> linear_plan(const LinearDesc& d, int device) {
  PlanKey k = gpu_key(kGpuLinear, d.dtype, device);
  k.add(d.M).add(d.K).add(d.N).add(d.has_bias).add(static_cast<int64_t>(d.act));
  return cached<LinearPlan>(k,
                            [&] { return std::make_shared<const LinearPlan>(LinearPlan{cuda::linear_kernel_for(d)}); });
}

inline const char* conv_kernel_name(cuda::ConvKernel k) {
  return k == cuda::ConvKernel::direct ? "direct" : "implicit_gemm";
}

inline cuda::Reduction reduction_from(const std::string& name) {
  if (name == "none") return cuda::Reduction::none;
  if (name == "mean") return cuda::Reduction::mean;
  if (name == "sum") return cuda::Reduction::sum;
  throw py::value_error("reduction: expected 'none', 'mean' or 'sum', got '" + name + "'");
}

// Runs body(tag) with tag a float or double null pointer, by dtype.
template <class Body>
void by_dtype(bool f64, Body&& body) {
  if (f64) {
    body(static_cast<double*>(nullptr));
  } else {
    body(static_cast<float*>(nullptr));
  }
}

inline void register_cuda_ops(py::module_& m) {
  m.def("device_count", &cuda::device_count);
  m.def("current_device", &cuda::current_device);
  m.def(
      "pointer_device",
      [](Ptr p, const std::string& what) { return cuda::pointer_device(ptr<const void>(p), what.c_str()); },
      py::arg("ptr"), py::arg("what"), "The device that owns ptr; ValueError naming `what` for host memory.");
  m.def("sm_count", &cuda::sm_count, py::arg("device"));
  m.def(
      "stream_wait",
      [](int device, Ptr consumer, Ptr producer) {
        py::gil_scoped_release release;
        cuda::stream_wait(device, stream_of(consumer), stream_of(producer));
      },
      py::arg("device"), py::arg("consumer"), py::arg("producer"),
      "Orders later work on `consumer` after what `producer` has enqueued (an event, no host synchronisation).");

  // Plans, for explain and the tests.
  m.def(
      "conv2d_plan",
      [](bool f64, const ConvArgs& conv, bool has_bias, bool relu, int device) {
        const Conv2dDesc d = conv_desc(conv, f64, has_bias, relu);
        cuda::check_conv2d(d);
        return std::string(conv_kernel_name(conv_plan(d, device)->kernel));
      },
      py::arg("f64"), py::arg("conv"), py::arg("has_bias"), py::arg("relu"), py::arg("device"));
  m.def(
      "conv_pool_plan",
      [](bool f64, const ConvArgs& conv, const PoolArgs& pool, bool has_bias, bool relu, int device) {
        const Conv2dDesc c = conv_desc(conv, f64, has_bias, relu);
        const auto t = conv_pool_plan(c, pool_desc(pool), device)->tile;
        return py::make_tuple(t.rows, t.cols);
      },
      py::arg("f64"), py::arg("conv"), py::arg("pool"), py::arg("has_bias"), py::arg("relu"), py::arg("device"),
      "Pooled outputs per block of the fused kernel on this device; (0, 0) runs unfused.");

  m.def(
      "conv2d",
      [](bool f64, Ptr x, Ptr w, Ptr b, Ptr y, const ConvArgs& conv, bool relu, int device, Ptr stream) {
        const Conv2dDesc d = conv_desc(conv, f64, b != 0, relu);
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        cuda::check_conv2d(d);
        const auto plan = conv_plan(d, device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::conv2d(d, ptr<const T>(x), ptr<const T>(w), ptr<const T>(b), ptr<T>(y), stream_of(stream),
                       plan->kernel);
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("conv"), py::arg("relu"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "conv2d_max_pool2d",
      [](bool f64, Ptr x, Ptr w, Ptr b, Ptr y, const ConvArgs& conv, bool relu, const PoolArgs& pool, int device,
         Ptr stream) {
        const Conv2dDesc c = conv_desc(conv, f64, b != 0, relu);
        const Pool2dDesc p = pool_desc(pool);
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        const auto plan = conv_pool_plan(c, p, device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::conv2d_max_pool2d(c, p, ptr<const T>(x), ptr<const T>(w), ptr<const T>(b), ptr<T>(y),
                                  stream_of(stream), &plan->tile);
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("conv"), py::arg("relu"),
      py::arg("pool"), py::arg("device"), py::arg("stream"));

  m.def(
      "max_pool2d",
      [](bool f64, Ptr x, Ptr y, Ptr indices, const std::array<int64_t, 4>& shape, const PoolArgs& pool, int device,
         Ptr stream) {
        Pool2dDesc d = pool_desc(pool);
        d.dtype = f64 ? DType::f64 : DType::f32;
        d.N = shape[0], d.C = shape[1], d.H = shape[2], d.W = shape[3];
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::max_pool2d(d, ptr<const T>(x), ptr<T>(y), ptr<int64_t>(indices), stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("y"), py::arg("indices"), py::arg("shape"), py::arg("pool"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "linear",
      [](bool f64, Ptr x, Ptr w, Ptr b, Ptr y, int64_t M, int64_t K, int64_t N, bool relu, int device, Ptr stream) {
        LinearDesc d;
        d.dtype = f64 ? DType::f64 : DType::f32;
        d.M = M, d.K = K, d.N = N, d.has_bias = b != 0;
        d.act = relu ? Activation::relu : Activation::none;
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        const auto plan = linear_plan(d, device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::linear(d, ptr<const T>(x), ptr<const T>(w), ptr<const T>(b), ptr<T>(y), stream_of(stream),
                       plan->kernel);
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("w"), py::arg("b"), py::arg("y"), py::arg("M"), py::arg("K"),
      py::arg("N"), py::arg("relu"), py::arg("device"), py::arg("stream"));

  m.def(
      "relu",
      [](bool f64, Ptr x, Ptr y, int64_t n, int device, Ptr stream) {
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::relu(ptr<const T>(x), ptr<T>(y), n, stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("y"), py::arg("n"), py::arg("device"), py::arg("stream"));

  m.def(
      "softmax",
      [](bool f64, Ptr x, Ptr y, int64_t outer, int64_t dim, int64_t inner, bool log, int device, Ptr stream) {
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::softmax(ptr<const T>(x), ptr<T>(y), outer, dim, inner, log, stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("y"), py::arg("outer"), py::arg("dim"), py::arg("inner"), py::arg("log"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "conv2d_backward",
      [](bool f64, Ptr go, Ptr x, Ptr w, Ptr gi, Ptr gw, Ptr gb, const ConvArgs& conv, int device, Ptr stream) {
        const Conv2dDesc d = conv_desc(conv, f64, gb != 0, false);
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::conv2d_backward(d, ptr<const T>(go), ptr<const T>(x), ptr<const T>(w), ptr<T>(gi), ptr<T>(gw),
                                ptr<T>(gb), stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("grad_output"), py::arg("x"), py::arg("w"), py::arg("grad_input"),
      py::arg("grad_weight"), py::arg("grad_bias"), py::arg("conv"), py::arg("device"), py::arg("stream"));

  m.def(
      "max_pool2d_backward",
      [](bool f64, Ptr go, Ptr indices, Ptr gi, int64_t planes, int64_t HW, int64_t PQ, int device, Ptr stream) {
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::max_pool2d_backward(ptr<const T>(go), ptr<const int64_t>(indices), ptr<T>(gi), planes, HW, PQ,
                                    stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("grad_output"), py::arg("indices"), py::arg("grad_input"), py::arg("planes"),
      py::arg("HW"), py::arg("PQ"), py::arg("device"), py::arg("stream"));

  m.def(
      "linear_backward",
      [](bool f64, Ptr go, Ptr x, Ptr w, Ptr gi, Ptr gw, Ptr gb, int64_t M, int64_t K, int64_t N, int device,
         Ptr stream) {
        LinearDesc d;
        d.dtype = f64 ? DType::f64 : DType::f32;
        d.M = M, d.K = K, d.N = N;
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::linear_backward(d, ptr<const T>(go), ptr<const T>(x), ptr<const T>(w), ptr<T>(gi), ptr<T>(gw),
                                ptr<T>(gb), stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("grad_output"), py::arg("x"), py::arg("w"), py::arg("grad_input"),
      py::arg("grad_weight"), py::arg("grad_bias"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("device"),
      py::arg("stream"));

  m.def(
      "relu_backward",
      [](bool f64, Ptr go, Ptr y, Ptr gi, int64_t n, int device, Ptr stream) {
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::relu_backward(ptr<const T>(go), ptr<const T>(y), ptr<T>(gi), n, stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("grad_output"), py::arg("output"), py::arg("grad_input"), py::arg("n"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "cross_entropy",
      [](bool f64, Ptr x, Ptr target, Ptr loss, int64_t outer, int64_t classes, int64_t inner,
         const std::string& reduction, int64_t ignore_index, int device, Ptr stream) {
        const auto r = reduction_from(reduction);
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::cross_entropy(ptr<const T>(x), ptr<const int64_t>(target), ptr<T>(loss), outer, classes, inner, r,
                              ignore_index, stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("x"), py::arg("target"), py::arg("loss"), py::arg("outer"), py::arg("classes"),
      py::arg("inner"), py::arg("reduction"), py::arg("ignore_index"), py::arg("device"), py::arg("stream"));

  m.def(
      "cross_entropy_backward",
      [](bool f64, Ptr grad_loss, Ptr x, Ptr target, Ptr gi, int64_t outer, int64_t classes, int64_t inner,
         const std::string& reduction, int64_t ignore_index, int device, Ptr stream) {
        const auto r = reduction_from(reduction);
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::cross_entropy_backward(ptr<const T>(grad_loss), ptr<const T>(x), ptr<const int64_t>(target),
                                       ptr<T>(gi), outer, classes, inner, r, ignore_index, stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("grad_loss"), py::arg("x"), py::arg("target"), py::arg("grad_input"),
      py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("reduction"), py::arg("ignore_index"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "adam_step",
      [](bool f64, Ptr param, Ptr grad, Ptr exp_avg, Ptr exp_avg_sq, int64_t n, int64_t step, double lr,
         double beta1, double beta2, double eps, double weight_decay, int device, Ptr stream) {
        const cuda::AdamArgs a{step, lr, beta1, beta2, eps, weight_decay};
        py::gil_scoped_release release;
        cuda::DeviceGuard guard(device);
        by_dtype(f64, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          cuda::adam_step(ptr<T>(param), ptr<const T>(grad), ptr<T>(exp_avg), ptr<T>(exp_avg_sq), n, a,
                          stream_of(stream));
        });
      },
      py::arg("f64"), py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("n"),
      py::arg("step"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("device"), py::arg("stream"));
}

}  // namespace lk::cuda_bindings
