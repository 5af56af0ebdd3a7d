// Descriptors: everything that determines a plan, as plain integers. Python
// normalises user arguments (torch.nn.functional semantics) into these; the
// core validates them again before planning.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace lk {

enum class Activation { none, relu };

struct Conv2dDesc {
  DType dtype = DType::f32;
  int64_t N = 0, C = 0, H = 0, W = 0;  // input
  int64_t K = 0, R = 0, S = 0;         // filters, kernel height, width
  int64_t groups = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_left = 0, pad_bottom = 0, pad_right = 0;
  int64_t dil_h = 1, dil_w = 1;
  bool has_bias = false;
  Activation act = Activation::none;

  int64_t P() const { return (H + pad_top + pad_bottom - dil_h * (R - 1) - 1) / stride_h + 1; }
  int64_t Q() const { return (W + pad_left + pad_right - dil_w * (S - 1) - 1) / stride_w + 1; }
  int64_t Cg() const { return C / groups; }
  int64_t Kg() const { return K / groups; }
};

struct Pool2dDesc {
  DType dtype = DType::f32;
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t kh = 1, kw = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
  bool ceil_mode = false;

  static int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }
  static int64_t out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil) {
    const int64_t num = in + 2 * p - d * (k - 1) - 1;
    int64_t out = (ceil ? floor_div(num + s - 1, s) : floor_div(num, s)) + 1;
    // torch: the last window must start inside the input or the left padding.
    if (ceil && (out - 1) * s >= in + p) --out;
    return out;
  }
  int64_t P() const { return out_size(H, kh, stride_h, pad_h, dil_h, ceil_mode); }
  int64_t Q() const { return out_size(W, kw, stride_w, pad_w, dil_w, ceil_mode); }
};

struct LinearDesc {
  DType dtype = DType::f32;
  int64_t M = 0;  // rows of the input (all leading dimensions flattened)
  int64_t K = 0;  // in_features
  int64_t N = 0;  // out_features
  bool has_bias = false;
  Activation act = Activation::none;
};

}  // namespace lk
