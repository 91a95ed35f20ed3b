// conv_bias_act on the CPU by oneDNN itself: the convolution with bias, residual add and ReLU as
// oneDNN post-ops, and the weight reordered once into oneDNN's blocked layout and cached.
#pragma once

#include <optional>

#include "../fused_ops.h"

namespace fused_resnet_native::cpu {

// relu?(conv(x, weight) + bias + residual) through oneDNN, or nullopt where this path does not
// apply (autograd on, an inference-mode weight, dtypes other than float32, an empty batch, a conv
// too small to gain, a weight seen for the first time, a torch without oneDNN or with it
// disabled); the caller then runs the generic composition.
//
// Why: eager PyTorch reorders every conv weight into oneDNN's blocked layout on every call, which
// on small batches (serving) costs as much as the convolution itself in the deep layers, and it
// writes the conv output before BN, ReLU and the residual add read it back. Here the reorder is
// done once per weight version and bias/residual/ReLU are applied while the output is still in
// registers: one write of the output, no read-back.
std::optional<Tensor> onednn_conv_bias_act(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                           const OptTensor& residual, IntList stride, IntList padding,
                                           IntList dilation, int64_t groups, bool relu);

// The number of reordered weights held (one per live weight tensor that came back unchanged),
// and a way to drop them (tests, memory).
int64_t packed_weight_count();
void clear_packed_weights();

}  // namespace fused_resnet_native::cpu
