// The native ops, written once for every device: ATen's convolution (oneDNN on the CPU, cuDNN on
// the GPU) with everything around it (prologue, statistics, epilogue, backward reductions) done
// by the device's fused kernels, given as a `Kernels` table. routed_ops.h binds them
// to a dispatch key; Device::kernels() returns the table.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kernels.h"

namespace fused_resnet_native {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using IntList = c10::IntArrayRef;

std::tuple<Tensor, Tensor, Tensor> conv_stats(const Kernels& k, const Tensor& x, const OptTensor& in_scale,
                                              const OptTensor& in_shift, int64_t in_act, const Tensor& weight,
                                              IntList stride, IntList padding, IntList dilation, int64_t groups);

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_stats_backward(
    const Kernels& k, const Tensor& grad_y, const Tensor& grad_mean, const Tensor& grad_var, const Tensor& x,
    const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act, const Tensor& weight, const Tensor& y,
    const Tensor& mean, IntList stride, IntList padding, IntList dilation, int64_t groups,
    std::array<bool, 3> output_mask);

// conv_stats_backward with the statistics' gradients already folded into per-channel terms (fp32 [C]):
// the conv output's gradient is grad_y + g_shift + g_scale * (y - mean) (conv_bn's backward forms them).
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_stats_backward_folded(
    const Kernels& k, const Tensor& grad_y, const Tensor& g_shift, const Tensor& g_scale, const Tensor& x,
    const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act, const Tensor& weight, const Tensor& y,
    const Tensor& mean, IntList stride, IntList padding, IntList dilation, int64_t groups,
    std::array<bool, 3> output_mask);

// conv_bn (conv_bn.cpp): conv_stats, the running-statistics update, the BN finalize; and its backward.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn(
    const Kernels& k, const Tensor& x, const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act,
    const Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps,
    IntList stride, IntList padding, IntList dilation, int64_t groups);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_backward(
    const Kernels& k, const Tensor& grad_y, const Tensor& grad_scale, const Tensor& grad_shift, const Tensor& x,
    const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act, const Tensor& weight,
    const OptTensor& bn_weight, const Tensor& y, const Tensor& mean, const Tensor& var, double eps, IntList stride,
    IntList padding, IntList dilation, int64_t groups, std::array<bool, 4> output_mask);

// The BN finalize and its backward (bn_finalize.cpp), on any device; one loop over the channels for
// fp32 vectors on the CPU. bn_backward_terms gives what conv_stats_backward_folded takes: with M values
// per channel, g_shift = grad_mean / M and g_scale = 2 grad_var / M; then grad_bn_weight, grad_bn_bias.
std::tuple<Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                       const OptTensor& bias, double eps);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_backward(const Tensor& grad_scale, const Tensor& grad_shift,
                                                                const Tensor& mean, const Tensor& var,
                                                                const OptTensor& weight, double eps,
                                                                std::array<bool, 4> mask);
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward_terms(const Tensor& grad_scale, const Tensor& grad_shift,
                                                             const Tensor& mean, const Tensor& var,
                                                             const OptTensor& weight, double eps, double count,
                                                             bool need_affine);

Tensor bn_add_relu(const Kernels& k, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
                   const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_backward(
    const Kernels& k, const Tensor& grad_out, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act,
    std::array<bool, 4> output_mask);

// bn_add_relu with a per-(sample, channel) gate ((N, C) or (N, C, 1, 1)) multiplying the BN's output
// (csrc/gate.cpp, on the kernels above); the backward's last output is the gate's gradient.
Tensor bn_add_relu_gated(const Kernels& k, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
                         const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act,
                         const Tensor& gate);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_gated_backward(
    const Kernels& k, const Tensor& grad_out, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act,
    std::array<bool, 4> output_mask, const Tensor& gate);

Tensor conv_bias_act(const Kernels& k, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                     const OptTensor& residual, IntList stride, IntList padding, IntList dilation, int64_t groups,
                     int64_t act);

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bias_act_backward(
    const Kernels& k, const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& out, int64_t act,
    IntList stride, IntList padding, IntList dilation, int64_t groups, std::array<bool, 4> output_mask);

void update_running_stats_(const Tensor& running_mean, const Tensor& running_var, const Tensor& num_batches_tracked,
                           const Tensor& mean, const Tensor& var, int64_t count, std::optional<double> momentum);

// Thin adapters from the dispatcher's calling convention to the functions above, per device.
template <class Device>
struct Impls {
  static std::tuple<Tensor, Tensor, Tensor> conv_stats_(const Tensor& x, const OptTensor& s, const OptTensor& b,
                                                         int64_t r, const Tensor& w, IntList st, IntList p, IntList d,
                                                         int64_t g) {
    typename Device::Guard guard(x);
    return conv_stats(Device::kernels(), x, s, b, r, w, st, p, d, g);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> conv_stats_backward_(
      const Tensor& gy, const Tensor& gm, const Tensor& gv, const Tensor& x, const OptTensor& s, const OptTensor& b,
      int64_t r, const Tensor& w, const Tensor& y, const Tensor& mean, IntList st, IntList p, IntList d, int64_t g,
      std::array<bool, 3> mask) {
    typename Device::Guard guard(x);
    return conv_stats_backward(Device::kernels(), gy, gm, gv, x, s, b, r, w, y, mean, st, p, d, g, mask);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_(
      const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t r, const Tensor& w, const OptTensor& bw,
      const OptTensor& bb, const OptTensor& rm, const OptTensor& rv, const OptTensor& nbt, std::optional<double> mom,
      double eps, IntList st, IntList p, IntList d, int64_t g) {
    typename Device::Guard guard(x);
    return conv_bn(Device::kernels(), x, s, b, r, w, bw, bb, rm, rv, nbt, mom, eps, st, p, d, g);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_backward_(
      const Tensor& gy, const Tensor& gs, const Tensor& gb, const Tensor& x, const OptTensor& s, const OptTensor& b,
      int64_t r, const Tensor& w, const OptTensor& bw, const Tensor& y, const Tensor& mean, const Tensor& var, double eps,
      IntList st, IntList p, IntList d, int64_t g, std::array<bool, 4> mask) {
    typename Device::Guard guard(x);
    return conv_bn_backward(Device::kernels(), gy, gs, gb, x, s, b, r, w, bw, y, mean, var, eps, st, p, d, g, mask);
  }
  static Tensor bn_add_relu_(const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res,
                             const OptTensor& rs, const OptTensor& rb, int64_t act) {
    typename Device::Guard guard(y);
    return bn_add_relu(Device::kernels(), y, s, b, res, rs, rb, act);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_backward_(
      const Tensor& go, const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res,
      const OptTensor& rs, const OptTensor& rb, int64_t act, std::array<bool, 4> mask) {
    typename Device::Guard guard(y);
    return bn_add_relu_backward(Device::kernels(), go, y, s, b, res, rs, rb, act, mask);
  }
  static Tensor bn_add_relu_gated_(const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res,
                                   const OptTensor& rs, const OptTensor& rb, int64_t act, const Tensor& gate) {
    typename Device::Guard guard(y);
    return bn_add_relu_gated(Device::kernels(), y, s, b, res, rs, rb, act, gate);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_gated_backward_(
      const Tensor& go, const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res,
      const OptTensor& rs, const OptTensor& rb, int64_t act, std::array<bool, 4> mask, const Tensor& gate) {
    typename Device::Guard guard(y);
    return bn_add_relu_gated_backward(Device::kernels(), go, y, s, b, res, rs, rb, act, mask, gate);
  }
  static Tensor conv_bias_act_(const Tensor& x, const Tensor& w, const OptTensor& bias, const OptTensor& res,
                               IntList st, IntList p, IntList d, int64_t g, int64_t act) {
    typename Device::Guard guard(x);
    return conv_bias_act(Device::kernels(), x, w, bias, res, st, p, d, g, act);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bias_act_backward_(
      const Tensor& go, const Tensor& x, const Tensor& w, const Tensor& out, int64_t act, IntList st, IntList p,
      IntList d, int64_t g, std::array<bool, 4> mask) {
    typename Device::Guard guard(x);
    return conv_bias_act_backward(Device::kernels(), go, x, w, out, act, st, p, d, g, mask);
  }
  static void update_running_stats(const Tensor& rm, const Tensor& rv, const Tensor& nbt, const Tensor& mean,
                                   const Tensor& var, int64_t count, std::optional<double> momentum) {
    typename Device::Guard guard(mean);
    update_running_stats_(rm, rv, nbt, mean, var, count, momentum);
  }
};


// Device guard that does nothing (CPU).
struct NoGuard {
  explicit NoGuard(const Tensor&) {}
};

}  // namespace fused_resnet_native
