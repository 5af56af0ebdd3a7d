// ReLU backward, and softmax + cross-entropy (forward and backward) on an
// array of logits seen as outer x classes x inner (contiguous): the classes
// of line l = (o, i) are x[o][0..classes)[i], its target t[o][i] (int64).
#pragma once
#include <cstdint>

#include "cuda/stream.h"

namespace lk::cuda {

enum class Reduction { none = 0, mean = 1, sum = 2 };

// grad_input = grad_output where output > 0 (and where output is NaN), else
// 0, as torch's threshold_backward. n elements; grad_input may alias
// grad_output.
void relu_backward(const float* grad_output, const float* output, float* grad_input, int64_t n, Stream stream);
void relu_backward(const double* grad_output, const double* output, double* grad_input, int64_t n, Stream stream);

// loss: outer x inner losses (none), else one value. Line l's loss is
// logsumexp(x_l) - x_l[t_l], 0 where t_l == ignore_index; mean divides the
// sum by the lines not ignored (0 / 0 = NaN when all are, as torch). A
// target outside [0, classes) that is not ignore_index gives NaN (reporting
// it would need a synchronisation).
void cross_entropy(const float* x, const int64_t* target, float* loss, int64_t outer, int64_t classes,
                   int64_t inner, Reduction reduction, int64_t ignore_index, Stream stream);
void cross_entropy(const double* x, const int64_t* target, double* loss, int64_t outer, int64_t classes,
                   int64_t inner, Reduction reduction, int64_t ignore_index, Stream stream);

// grad_input (like x) = g_l (softmax(x_l) - onehot(t_l)), g_l = grad_loss[l]
// (none) or grad_loss[0] (sum) or grad_loss[0] / lines not ignored (mean); 0
// on ignored lines. grad_loss is read on the device: no synchronisation.
void cross_entropy_backward(const float* grad_loss, const float* x, const int64_t* target, float* grad_input,
                            int64_t outer, int64_t classes, int64_t inner, Reduction reduction,
                            int64_t ignore_index, Stream stream);
void cross_entropy_backward(const double* grad_loss, const double* x, const int64_t* target, double* grad_input,
                            int64_t outer, int64_t classes, int64_t inner, Reduction reduction,
                            int64_t ignore_index, Stream stream);

}  // namespace lk::cuda
