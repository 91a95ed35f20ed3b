// bn_finalize (cuDNN frontend's BN-finalize node): a BatchNorm's per-channel scale and shift from
// its batch statistics and affine parameters, one op forward and one backward instead of a chain
// of small autograd ops. The same ATen composition on every device (C per-channel values:
// nothing to fuse, only host calls to save); fused_resnet/reference.py states the math.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace fused_resnet_native {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

std::tuple<Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                       const OptTensor& bias, double eps) {
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes() && var.scalar_type() == mean.scalar_type(),
              "fused_resnet: bn_finalize expects 1-D mean and var of one dtype, got ", mean.sizes(), " and ",
              var.sizes());
  for (const OptTensor* p : {&weight, &bias}) {
    TORCH_CHECK(!has(*p) || (*p)->sizes() == mean.sizes(), "fused_resnet: BN weight/bias of shape ", (*p)->sizes(),
                " for ", mean.size(0), " channels");
  }
  Tensor scale = (var + eps).rsqrt();
  if (has(weight)) scale = scale * weight->to(mean.scalar_type());
  Tensor shift = has(bias) ? bias->to(mean.scalar_type()) - mean * scale : -(mean * scale);
  return {scale, shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_finalize_backward(const Tensor& grad_scale, const Tensor& grad_shift,
                                                                const Tensor& mean, const Tensor& var,
                                                                const OptTensor& weight, double eps,
                                                                std::array<bool, 4> mask) {
  const auto [need_mean, need_var, need_weight, need_bias] = mask;
  const Tensor invstd = (var + eps).rsqrt();
  const Tensor w = has(weight) ? weight->to(mean.scalar_type()) : Tensor();
  // d/d(scale), all of it: scale reaches the loss directly and through shift = bias - mean * scale.
  const Tensor g = grad_scale - grad_shift * mean;
  const auto empty = [&](const Tensor& like) { return at::empty({0}, like.options()); };
  Tensor grad_mean = need_mean ? -(grad_shift * (w.defined() ? invstd * w : invstd)) : empty(mean);
  Tensor grad_var = need_var ? (w.defined() ? g * w : g) * (invstd * invstd * invstd) * -0.5 : empty(var);
  Tensor grad_weight = need_weight && has(weight) ? (g * invstd).to(weight->scalar_type()) : empty(mean);
  Tensor grad_bias = need_bias ? grad_shift.clone() : empty(mean);
  return {grad_mean, grad_var, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fused_resnet_native

TORCH_LIBRARY_IMPL(fused_resnet, CompositeExplicitAutograd, m) {
  m.impl("bn_finalize", &fused_resnet_native::bn_finalize);
  m.impl("bn_finalize_backward", &fused_resnet_native::bn_finalize_backward);
}
