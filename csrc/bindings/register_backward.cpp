// The backward ops and the Adam update: check, release the GIL, call the core.
// Inputs of any layout are read through C-contiguous views (a copy only when
// the array is not one already); outputs are new C-contiguous arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <vector>

#include "bindings/arrays.h"
#include "cpu/backward.h"
#include "cpu/conv2d.h"

namespace lk::bindings {

namespace {

using I2 = std::array<int64_t, 2>;
using I4 = std::array<int64_t, 4>;
using Mask = std::array<bool, 3>;

// What the kernels read: C order, element-aligned.
constexpr int kContiguousAligned =
    static_cast<int>(py::array::c_style) | static_cast<int>(py::detail::npy_api::NPY_ARRAY_ALIGNED_);

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// `a` as a C-contiguous float array of `ndim` dimensions (ndim < 0: any) and
// the dtype of `like` (when given).
py::array float_array(const py::array& a, const char* name, int ndim, const py::array* like = nullptr) {
  if (!is_f32(a) && !is_f64(a))
    throw py::type_error(cat(name, ": expected dtype float32 or float64, got ", dtype_str(a)));
  if (like && !a.dtype().equal(like->dtype()))
    throw py::type_error(cat(name, ": dtype ", dtype_str(a), " does not match grad_output dtype ", dtype_str(*like)));
  LK_CHECK(ndim < 0 || a.ndim() == ndim, name, ": expected ", ndim, " dimensions, got ", a.ndim());
  return py::array::ensure(a, kContiguousAligned);
}

py::array int64_array(const py::array& a, const char* name) {
  if (!a.dtype().equal(py::dtype::of<int64_t>()))
    throw py::type_error(cat(name, ": expected dtype int64, got ", dtype_str(a)));
  return py::array::ensure(a, kContiguousAligned);
}

void check_shape(const py::array& a, const char* name, const std::vector<int64_t>& shape) {
  bool ok = static_cast<size_t>(a.ndim()) == shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
  if (ok) return;
  std::string want = "(", got = "(";
  for (size_t i = 0; i < shape.size(); ++i) want += cat(i ? ", " : "", shape[i]);
  for (py::ssize_t i = 0; i < a.ndim(); ++i) got += cat(i ? ", " : "", a.shape(i));
  throw std::invalid_argument(cat(name, ": expected shape ", want, "), got ", got, ")"));
}

template <class T>
const T* cptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}

template <class T>
T* out_ptr(std::optional<py::array_t<T>>& a) {
  return a ? a->mutable_data() : nullptr;
}

py::object or_none(const py::object& a) { return a; }

template <class T>
py::tuple grads_tuple(std::optional<py::array_t<T>>& a, std::optional<py::array_t<T>>& b,
                      std::optional<py::array_t<T>>& c) {
  auto obj = [](std::optional<py::array_t<T>>& x) -> py::object { return x ? or_none(*x) : py::none(); };
  return py::make_tuple(obj(a), obj(b), obj(c));
}

struct ConvBackwardArgs {
  py::array gy, x, w;
  Conv2dDesc d;
};

// The convolution's descriptor from the input and weight, checked like the forward op.
ConvBackwardArgs conv_backward_args(const py::array& grad_output, const py::array& input, const py::array& weight,
                                    I2 stride, I4 padding, I2 dilation, int64_t groups) {
  ConvBackwardArgs a;
  a.gy = float_array(grad_output, "grad_output", 4);
  a.x = float_array(input, "input", 4, &a.gy);
  a.w = float_array(weight, "weight", 4, &a.gy);
  Conv2dDesc& d = a.d;
  d.dtype = is_f32(a.gy) ? DType::f32 : DType::f64;
  d.N = a.x.shape(0), d.C = a.x.shape(1), d.H = a.x.shape(2), d.W = a.x.shape(3);
  d.K = a.w.shape(0), d.R = a.w.shape(2), d.S = a.w.shape(3);
  d.groups = groups;
  d.stride_h = stride[0], d.stride_w = stride[1];
  d.pad_top = padding[0], d.pad_bottom = padding[1], d.pad_left = padding[2], d.pad_right = padding[3];
  d.dil_h = dilation[0], d.dil_w = dilation[1];
  cpu::validate(d);
  LK_CHECK(a.w.shape(1) * groups == d.C, "weight: expected ", d.C / groups, " input channels per group, got ",
           a.w.shape(1));
  return a;
}

template <class T>
py::tuple conv_backward_typed(const ConvBackwardArgs& a, const cpu::ConvGradSource<T>& src, Mask mask) {
  const Conv2dDesc& d = a.d;
  std::optional<py::array_t<T>> gx, gw, gb;
  if (mask[0]) gx.emplace(new_array<T>({d.N, d.C, d.H, d.W}));
  if (mask[1]) gw.emplace(new_array<T>({d.K, d.Cg(), d.R, d.S}));
  if (mask[2]) gb.emplace(new_array<T>({d.K}));
  T *gxp = out_ptr(gx), *gwp = out_ptr(gw), *gbp = out_ptr(gb);
  {
    py::gil_scoped_release release;
    cpu::conv2d_backward<T>(d, src, cptr<T>(a.x), cptr<T>(a.w), gxp, gwp, gbp);
  }
  return grads_tuple(gx, gw, gb);
}

py::tuple conv2d_backward(py::array grad_output, py::array input, py::array weight, I2 stride, I4 padding,
                          I2 dilation, int64_t groups, Mask mask) {
  ConvBackwardArgs a = conv_backward_args(grad_output, input, weight, stride, padding, dilation, groups);
  check_shape(a.gy, "grad_output", {a.d.N, a.d.K, a.d.P(), a.d.Q()});
  if (a.d.dtype == DType::f32) {
    cpu::ConvGradSource<float> src;
    src.grad = cptr<float>(a.gy);
    return conv_backward_typed<float>(a, src, mask);
  }
  cpu::ConvGradSource<double> src;
  src.grad = cptr<double>(a.gy);
  return conv_backward_typed<double>(a, src, mask);
}

template <class T>
cpu::ConvGradSource<T> pooled_source(const py::array& gy, const py::array& idx, const py::array& out, bool relu) {
  cpu::ConvGradSource<T> src;
  src.pooled_grad = cptr<T>(gy);
  src.indices = cptr<int64_t>(idx);
  src.pooled_out = relu ? cptr<T>(out) : nullptr;
  src.pooled_plane = gy.shape(2) * gy.shape(3);
  src.relu = relu;
  return src;
}

py::tuple conv2d_max_pool2d_backward(py::array grad_output, py::array input, py::array weight, py::array output,
                                     py::array indices, I2 stride, I4 padding, I2 dilation, int64_t groups,
                                     const std::string& activation, Mask mask) {
  ConvBackwardArgs a = conv_backward_args(grad_output, input, weight, stride, padding, dilation, groups);
  LK_CHECK(activation == "relu" || activation == "none", "activation: expected None or 'relu', got '", activation,
           "'");
  const bool relu = activation == "relu";
  const std::vector<int64_t> pooled{a.gy.shape(0), a.gy.shape(1), a.gy.shape(2), a.gy.shape(3)};
  LK_CHECK(pooled[0] == a.d.N && pooled[1] == a.d.K, "grad_output: expected ", a.d.N, " images of ", a.d.K,
           " channels, got shape (", pooled[0], ", ", pooled[1], ", ", pooled[2], ", ", pooled[3], ")");
  py::array idx = int64_array(indices, "indices");
  check_shape(idx, "indices", pooled);
  py::array out = float_array(output, "output", 4, &a.gy);
  check_shape(out, "output", pooled);
  if (a.d.dtype == DType::f32) return conv_backward_typed<float>(a, pooled_source<float>(a.gy, idx, out, relu), mask);
  return conv_backward_typed<double>(a, pooled_source<double>(a.gy, idx, out, relu), mask);
}

template <class T>
py::tuple linear_backward_typed(const py::array& gy, const py::array& x, const py::array& w, Mask mask) {
  const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
  std::optional<py::array_t<T>> gx, gw, gb;
  if (mask[0]) gx.emplace(new_array<T>({M, K}));
  if (mask[1]) gw.emplace(new_array<T>({N, K}));
  if (mask[2]) gb.emplace(new_array<T>({N}));
  T *gxp = out_ptr(gx), *gwp = out_ptr(gw), *gbp = out_ptr(gb);
  {
    py::gil_scoped_release release;
    cpu::linear_backward<T>(M, K, N, cptr<T>(gy), cptr<T>(x), cptr<T>(w), gxp, gwp, gbp);
  }
  return grads_tuple(gx, gw, gb);
}

py::tuple linear_backward(py::array grad_output, py::array input, py::array weight, Mask mask) {
  py::array gy = float_array(grad_output, "grad_output", 2);
  py::array x = float_array(input, "input", 2, &gy);
  py::array w = float_array(weight, "weight", 2, &gy);
  LK_CHECK(w.shape(1) == x.shape(1), "weight: expected ", x.shape(1), " input features, got ", w.shape(1));
  check_shape(gy, "grad_output", {x.shape(0), w.shape(0)});
  return is_f32(gy) ? linear_backward_typed<float>(gy, x, w, mask) : linear_backward_typed<double>(gy, x, w, mask);
}

template <class T>
py::array max_pool2d_backward_typed(const py::array& gy, const py::array& idx, int64_t N, int64_t C, int64_t H,
                                    int64_t W) {
  auto gx = new_array<T>({N, C, H, W});
  T* p = gx.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::max_pool2d_backward<T>(N * C, gy.shape(2) * gy.shape(3), H * W, cptr<T>(gy), cptr<int64_t>(idx), p);
  }
  return gx;
}

py::array max_pool2d_backward(py::array grad_output, py::array indices, I4 input_shape) {
  py::array gy = float_array(grad_output, "grad_output", 4);
  py::array idx = int64_array(indices, "indices");
  check_shape(idx, "indices", {gy.shape(0), gy.shape(1), gy.shape(2), gy.shape(3)});
  const auto [N, C, H, W] = input_shape;
  LK_CHECK(N == gy.shape(0) && C == gy.shape(1), "input_shape: batch and channels (", N, ", ", C,
           ") do not match grad_output's (", gy.shape(0), ", ", gy.shape(1), ")");
  LK_CHECK(H > 0 && W > 0, "input_shape: expected positive height and width");
  return is_f32(gy) ? max_pool2d_backward_typed<float>(gy, idx, N, C, H, W)
                    : max_pool2d_backward_typed<double>(gy, idx, N, C, H, W);
}

template <class T>
py::array relu_backward_typed(const py::array& gy, const py::array& y) {
  std::vector<py::ssize_t> shape(gy.shape(), gy.shape() + gy.ndim());
  auto gx = new_array<T>(shape);
  T* p = gx.mutable_data();
  const int64_t n = gy.size();
  {
    py::gil_scoped_release release;
    cpu::relu_backward<T>(n, cptr<T>(gy), cptr<T>(y), p);
  }
  return gx;
}

py::array relu_backward(py::array grad_output, py::array output) {
  py::array gy = float_array(grad_output, "grad_output", -1);
  py::array y = float_array(output, "output", gy.ndim(), &gy);
  check_shape(y, "output", std::vector<int64_t>(gy.shape(), gy.shape() + gy.ndim()));
  return is_f32(gy) ? relu_backward_typed<float>(gy, y) : relu_backward_typed<double>(gy, y);
}

cpu::Reduction reduction_from(const std::string& r) {
  if (r == "mean") return cpu::Reduction::mean;
  if (r == "sum") return cpu::Reduction::sum;
  if (r == "none") return cpu::Reduction::none;
  throw std::invalid_argument(cat("reduction: expected 'mean', 'sum' or 'none', got '", r, "'"));
}

void check_logits(const py::array& x, const py::array& t) {
  check_shape(t, "target", {x.shape(0)});
  LK_CHECK(x.shape(1) > 0, "input: expected at least one class, got shape (", x.shape(0), ", 0)");
}

template <class T>
py::array cross_entropy_typed(const py::array& x, const py::array& t, cpu::Reduction red, int64_t ignore_index) {
  const int64_t N = x.shape(0), C = x.shape(1);
  std::vector<double> rows(static_cast<size_t>(N));
  int64_t counted = 0;
  {
    py::gil_scoped_release release;
    counted = cpu::cross_entropy_rows<T>(N, C, cptr<T>(x), cptr<int64_t>(t), ignore_index, rows.data());
  }
  if (red == cpu::Reduction::none) {
    auto y = new_array<T>({N});
    T* p = y.mutable_data();
    for (int64_t i = 0; i < N; ++i) p[i] = static_cast<T>(rows[i]);
    return y;
  }
  double s = 0;
  for (double v : rows) s += v;
  // torch: the mean over the rows counted; no row counted gives 0/0 = NaN.
  if (red == cpu::Reduction::mean) s /= static_cast<double>(counted);
  auto y = new_array<T>({});
  *y.mutable_data() = static_cast<T>(s);
  return y;
}

py::array cross_entropy(py::array input, py::array target, const std::string& reduction, int64_t ignore_index) {
  py::array x = float_array(input, "input", 2);
  py::array t = int64_array(target, "target");
  check_logits(x, t);
  const cpu::Reduction red = reduction_from(reduction);
  return is_f32(x) ? cross_entropy_typed<float>(x, t, red, ignore_index)
                   : cross_entropy_typed<double>(x, t, red, ignore_index);
}

template <class T>
py::array cross_entropy_backward_typed(const py::array& g, const py::array& x, const py::array& t,
                                       cpu::Reduction red, int64_t ignore_index) {
  const int64_t N = x.shape(0), C = x.shape(1);
  const int64_t* tp = cptr<int64_t>(t);
  double divisor = 1;
  if (red == cpu::Reduction::mean) {
    int64_t counted = 0;
    for (int64_t i = 0; i < N; ++i) counted += tp[i] != ignore_index;
    divisor = static_cast<double>(counted);  // 0: every row is ignored and gets 0 anyway
  }
  auto gx = new_array<T>({N, C});
  T* p = gx.mutable_data();
  {
    py::gil_scoped_release release;
    cpu::cross_entropy_backward<T>(N, C, cptr<T>(g), red == cpu::Reduction::none ? 1 : 0, divisor, cptr<T>(x), tp,
                                   ignore_index, p);
  }
  return gx;
}

py::array cross_entropy_backward(py::array grad_loss, py::array input, py::array target, const std::string& reduction,
                                 int64_t ignore_index) {
  py::array x = float_array(input, "input", 2);
  py::array t = int64_array(target, "target");
  check_logits(x, t);
  const cpu::Reduction red = reduction_from(reduction);
  py::array g = float_array(grad_loss, "grad_loss", red == cpu::Reduction::none ? 1 : 0);
  if (!g.dtype().equal(x.dtype()))
    throw py::type_error(cat("grad_loss: dtype ", dtype_str(g), " does not match input dtype ", dtype_str(x)));
  if (red == cpu::Reduction::none) check_shape(g, "grad_loss", {x.shape(0)});
  return is_f32(x) ? cross_entropy_backward_typed<float>(g, x, t, red, ignore_index)
                   : cross_entropy_backward_typed<double>(g, x, t, red, ignore_index);
}

// Arrays updated in place must be the caller's own memory: C-contiguous and writeable.
void check_state(const py::array& a, const py::array& param, const char* name, bool writeable) {
  if (!a.dtype().equal(param.dtype()))
    throw py::type_error(cat(name, ": dtype ", dtype_str(a), " does not match param dtype ", dtype_str(param)));
  check_shape(a, name, std::vector<int64_t>(param.shape(), param.shape() + param.ndim()));
  if (writeable) {
    LK_CHECK((a.flags() & py::array::c_style) != 0, name, ": must be C-contiguous (it is updated in place)");
    LK_CHECK((a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0, name, ": must be aligned");
    LK_CHECK(a.writeable(), name, ": array is read-only");
  }
}

template <class T>
void adam_typed(py::array& param, const py::array& grad, py::array& m, py::array& v, const cpu::AdamParams& p) {
  T* pp = static_cast<T*>(param.mutable_data());
  T* mp = static_cast<T*>(m.mutable_data());
  T* vp = static_cast<T*>(v.mutable_data());
  const T* gp = cptr<T>(grad);
  const int64_t n = param.size();
  py::gil_scoped_release release;
  cpu::adam_step<T>(n, pp, gp, mp, vp, p);
}

void adam_step(py::array param, py::array grad, py::array exp_avg, py::array exp_avg_sq, int64_t step, double lr,
               double beta1, double beta2, double eps, double weight_decay) {
  if (!is_f32(param) && !is_f64(param))
    throw py::type_error(cat("param: expected dtype float32 or float64, got ", dtype_str(param)));
  check_state(param, param, "param", true);
  check_state(exp_avg, param, "exp_avg", true);
  check_state(exp_avg_sq, param, "exp_avg_sq", true);
  check_state(grad, param, "grad", false);
  py::array g = py::array::ensure(grad, kContiguousAligned);
  // The state must not alias the gradient or each other: the kernel reads
  // and writes them in one pass.
  auto overlaps = [](const py::array& a, const py::array& b) {
    const char* a0 = static_cast<const char*>(a.data());
    const char* b0 = static_cast<const char*>(b.data());
    return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
  };
  const std::pair<const py::array*, const char*> arrays[] = {
      {&param, "param"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}, {&g, "grad"}};
  for (int i = 0; i < 4; ++i)
    for (int j = i + 1; j < 4; ++j)
      LK_CHECK(!overlaps(*arrays[i].first, *arrays[j].first), arrays[j].second, ": must not share memory with ",
               arrays[i].second);
  LK_CHECK(step >= 1, "step: must be at least 1, got ", step);
  LK_CHECK(lr >= 0, "lr: must be non-negative, got ", lr);
  LK_CHECK(eps >= 0, "eps: must be non-negative, got ", eps);
  LK_CHECK(beta1 >= 0 && beta1 < 1, "beta1: must be in [0, 1), got ", beta1);
  LK_CHECK(beta2 >= 0 && beta2 < 1, "beta2: must be in [0, 1), got ", beta2);
  LK_CHECK(weight_decay >= 0, "weight_decay: must be non-negative, got ", weight_decay);
  const cpu::AdamParams p{lr, beta1, beta2, eps, weight_decay, step};
  if (is_f32(param))
    adam_typed<float>(param, g, exp_avg, exp_avg_sq, p);
  else
    adam_typed<double>(param, g, exp_avg, exp_avg_sq, p);
}

}  // namespace

void register_backward(py::module_& m) {
  using namespace pybind11::literals;
  m.def("conv2d_backward", &conv2d_backward, "grad_output"_a.noconvert(), "input"_a.noconvert(),
        "weight"_a.noconvert(), "stride"_a, "padding"_a, "dilation"_a, "groups"_a, "output_mask"_a);
  m.def("conv2d_max_pool2d_backward", &conv2d_max_pool2d_backward, "grad_output"_a.noconvert(),
        "input"_a.noconvert(), "weight"_a.noconvert(), "output"_a.noconvert(), "indices"_a.noconvert(), "stride"_a,
        "padding"_a, "dilation"_a, "groups"_a, "activation"_a, "output_mask"_a);
  m.def("linear_backward", &linear_backward, "grad_output"_a.noconvert(), "input"_a.noconvert(),
        "weight"_a.noconvert(), "output_mask"_a);
  m.def("max_pool2d_backward", &max_pool2d_backward, "grad_output"_a.noconvert(), "indices"_a.noconvert(),
        "input_shape"_a);
  m.def("relu_backward", &relu_backward, "grad_output"_a.noconvert(), "output"_a.noconvert());
  m.def("cross_entropy", &cross_entropy, "input"_a.noconvert(), "target"_a.noconvert(), "reduction"_a,
        "ignore_index"_a);
  m.def("cross_entropy_backward", &cross_entropy_backward, "grad_loss"_a.noconvert(), "input"_a.noconvert(),
        "target"_a.noconvert(), "reduction"_a, "ignore_index"_a);
  m.def("adam_step", &adam_step, "param"_a.noconvert(), "grad"_a.noconvert(), "exp_avg"_a.noconvert(),
        "exp_avg_sq"_a.noconvert(), "step"_a, "lr"_a, "beta1"_a, "beta2"_a, "eps"_a, "weight_decay"_a);
}

}  // namespace lk::bindings
