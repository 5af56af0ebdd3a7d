// The backward (training) passes: gradients of conv2d, the fused
// conv -> activation -> max-pool, linear, max-pool and ReLU, the fused
// softmax cross-entropy, and the Adam update. torch.nn.functional / autograd
// semantics. Every array here is C-contiguous (the bindings make it so);
// outputs are written whole, inputs are never modified.
#pragma once
#include <cstdint>

#include "core/descriptors.h"

namespace lk::cpu {

// Where dL/d(convolution output) comes from.
template <class T>
struct ConvGradSource {
  // N x K x P x Q, or null when it is scattered from a max-pool:
  const T* grad = nullptr;
  // The pooled gradient and its maxima's positions (N x K x PP x PQ, indices
  // flattened over the P x Q plane), and with relu the pooled output: its
  // value is the activated convolution output where the maximum was, so it
  // masks the gradient as ReLU's backward does (zero where output <= 0).
  const T* pooled_grad = nullptr;
  const int64_t* indices = nullptr;
  const T* pooled_out = nullptr;
  int64_t pooled_plane = 0;  // PP * PQ
  bool relu = false;
};

// x: N x C x H x W, w: K x C/groups x R x S. Outputs: grad_input like x,
// grad_weight like w, grad_bias K entries; each may be null (not wanted).
template <class T>
void conv2d_backward(const Conv2dDesc& d, const ConvGradSource<T>& src, const T* x, const T* w, T* grad_input,
                     T* grad_weight, T* grad_bias);

// y = x W^T + b with x: M x K, W: N x K. Outputs may be null.
template <class T>
void linear_backward(int64_t M, int64_t K, int64_t N, const T* grad_out, const T* x, const T* w, T* grad_input,
                     T* grad_weight, T* grad_bias);

// grad_input (planes x HW) = 0, then grad_input[plane][indices[e]] += grad[e]
// for the PQ entries of every plane. Indices outside [0, HW) raise.
template <class T>
void max_pool2d_backward(int64_t planes, int64_t PQ, int64_t HW, const T* grad, const int64_t* indices,
                         T* grad_input);

// grad_input = grad where output > 0, else 0 (torch's threshold_backward:
// zero where output <= 0, so a NaN output passes the gradient on).
template <class T>
void relu_backward(int64_t n, const T* grad, const T* output, T* grad_input);

enum class Reduction { none, mean, sum };

// Per-row losses logsumexp(x_i) - x_i[t_i] of N x C logits (0 for rows whose
// target is ignore_index) into loss_rows, and the number of rows counted.
// Targets outside [0, C) other than ignore_index raise.
template <class T>
int64_t cross_entropy_rows(int64_t N, int64_t C, const T* x, const int64_t* target, int64_t ignore_index,
                           double* loss_rows);

// (softmax(x_i) - onehot(t_i)) * scale_i, scale_i = grad[i] (grad_stride 1,
// reduction none) or grad[0] / divisor (grad_stride 0); ignored rows 0.
template <class T>
void cross_entropy_backward(int64_t N, int64_t C, const T* grad, int64_t grad_stride, double divisor, const T* x,
                            const int64_t* target, int64_t ignore_index, T* grad_input);

struct AdamParams {
  double lr, beta1, beta2, eps, weight_decay;
  int64_t step;  // from 1
};

// torch.optim.Adam (no amsgrad), in place on param, exp_avg, exp_avg_sq.
template <class T>
void adam_step(int64_t n, T* param, const T* grad, T* exp_avg, T* exp_avg_sq, const AdamParams& p);

}  // namespace lk::cpu
