// The native conv_bn: a training conv+BN as one op forward and one backward (cuDNN frontend's
// conv -> BN statistics -> BN-finalize graph), composed of the native pieces: conv_stats (the conv
// with its input prologue and the statistics pass), the running-statistics update and the BN
// finalize (per-channel, bn_finalize.cpp); backward, the finalize's backward folded straight into
// the per-channel terms of conv_stats' backward (one host loop instead of ~10 small ATen ops).
// What it saves over three op calls is host time: dispatch, autograd nodes, per-channel ops.
#include <ATen/ATen.h>

#include "fused_ops.h"

namespace fused_resnet_native {
namespace {

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn(
    const Kernels& k, const Tensor& x, const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act,
    const Tensor& weight, const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps,
    IntList stride, IntList padding, IntList dilation, int64_t groups) {
  auto [y, mean, var] = conv_stats(k, x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups);
  if (has(running_mean) && has(running_var)) {
    TORCH_CHECK(has(num_batches_tracked), "fused_resnet: conv_bn updates running statistics with num_batches_tracked");
    update_running_stats_(*running_mean, *running_var, *num_batches_tracked, mean, var, y.numel() / y.size(1),
                          momentum);
  }
  auto [scale, shift] = bn_finalize(mean, var, bn_weight, bn_bias, eps);
  return {y, scale, shift, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_backward(
    const Kernels& k, const Tensor& grad_y, const Tensor& grad_scale, const Tensor& grad_shift, const Tensor& x,
    const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act, const Tensor& weight,
    const OptTensor& bn_weight, const Tensor& y, const Tensor& mean, const Tensor& var, double eps, IntList stride,
    IntList padding, IntList dilation, int64_t groups, std::array<bool, 4> output_mask) {
  const auto [need_x, need_affine, need_w, need_bn] = output_mask;
  const double count = static_cast<double>(std::max<int64_t>(y.numel() / std::max<int64_t>(y.size(1), 1), 1));
  // grad_scale/grad_shift arrive in the statistics dtype (fp32 here); a direct call may pass others.
  const auto stat = [&](const Tensor& t) { return t.to(mean.scalar_type()); };
  auto [g_shift, g_scale, grad_bn_weight, grad_bn_bias] =
      bn_backward_terms(stat(grad_scale), stat(grad_shift), mean, var, bn_weight, eps, count, need_bn);
  if (grad_bn_weight.numel() > 0) grad_bn_weight = grad_bn_weight.to(bn_weight->scalar_type());
  auto [grad_x, grad_in_scale, grad_in_shift, grad_w] =
      conv_stats_backward_folded(k, grad_y, g_shift, g_scale, x, in_scale, in_shift, in_act, weight, y, mean, stride,
                                 padding, dilation, groups, {need_x, need_affine, need_w});
  return {grad_x, grad_in_scale, grad_in_shift, grad_w, grad_bn_weight, grad_bn_bias};
}

}  // namespace fused_resnet_native
