// bn_finalize (cuDNN frontend's BN-finalize node): a BatchNorm's per-channel scale and shift from
// its batch statistics and affine parameters, and its backward; the op bn_finalize and, inside
// conv_bn (conv_bn.cpp), the same math. C per-channel values: nothing to fuse, only host calls to
// save, so fp32 vectors on the CPU take one loop over the channels instead of ~6 ATen ops (~1 us
// each on the host); elsewhere the ATen composition. The loops do the ATen composition's fp32
// operations in its order (ATen's CPU kernels round each elementwise op once, as these do): the
// same bits as the separate ops, so that taking host calls away moves no result (measured: a
// loop in fp64 put a ResNet-18's second SGD step on another trajectory). fused_resnet/reference.py
// states the math.
#include <cmath>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "fused_ops.h"

namespace fused_resnet_native {
namespace {

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

bool cpu_f32(const Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous();
}
bool cpu_f32(const OptTensor& t) { return !has(t) || cpu_f32(*t); }
const float* data(const OptTensor& t) { return has(t) ? t->const_data_ptr<float>() : nullptr; }
Tensor empty_like_stats(const Tensor& like) { return at::empty({0}, like.options()); }

void check_stats(const Tensor& mean, const Tensor& var, const OptTensor& weight, const OptTensor& bias) {
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes() && var.scalar_type() == mean.scalar_type(),
              "fused_resnet: bn_finalize expects 1-D mean and var of one dtype, got ", mean.sizes(), " and ",
              var.sizes());
  for (const OptTensor* p : {&weight, &bias}) {
    TORCH_CHECK(!has(*p) || (*p)->sizes() == mean.sizes(), "fused_resnet: BN weight/bias of shape ", (*p)->sizes(),
                " for ", mean.size(0), " channels");
  }
}

// The per-channel backward on fp32 CPU vectors. With invstd = (var + eps)^-1/2, w the weight (1 if
// absent) and g = grad_scale - grad_shift * mean (scale reaches the loss directly and through
// shift = bias - mean * scale): grad_mean = -grad_shift * invstd * w, grad_var = -g * w * invstd^3 / 2,
// grad_weight = g * invstd, grad_bias = grad_shift. conv_bn then divides grad_mean by M
// (mean_divisor) and multiplies grad_var by 2 / M (var_factor), as conv_stats_backward does; 1 and
// 1 leave them as they are. Null outputs are not written.
void finalize_backward_loop(const Tensor& grad_scale, const Tensor& grad_shift, const Tensor& mean, const Tensor& var,
                            const OptTensor& weight, double eps, float* gm, float* gv, float* gw, float* gb,
                            float mean_divisor, float var_factor) {
  const float *dscale = grad_scale.const_data_ptr<float>(), *dshift = grad_shift.const_data_ptr<float>();
  const float *m = mean.const_data_ptr<float>(), *v = var.const_data_ptr<float>(), *w = data(weight);
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < mean.numel(); ++c) {
    const float invstd = 1.0f / std::sqrt(v[c] + e);
    const float g = dscale[c] - dshift[c] * m[c];
    if (gm != nullptr) gm[c] = -(dshift[c] * (w != nullptr ? invstd * w[c] : invstd)) / mean_divisor;
    if (gv != nullptr) {
      const float cube = invstd * invstd * invstd;
      gv[c] = (w != nullptr ? g * w[c] : g) * cube * -0.5f * var_factor;
    }
    if (gw != nullptr) gw[c] = g * invstd;
    if (gb != nullptr) gb[c] = dshift[c];
  }
}

bool fast(const Tensor& grad_scale, const Tensor& grad_shift, const Tensor& mean, const Tensor& var,
          const OptTensor& weight) {
  return cpu_f32(grad_scale) && cpu_f32(grad_shift) && cpu_f32(mean) && cpu_f32(var) && cpu_f32(weight) &&
         grad_scale.numel() == mean.numel() && grad_shift.numel() == mean.numel();
}

}  // namespace

std::tuple<Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                       const OptTensor& bias, double eps) {
  check_stats(mean, var, weight, bias);
  if (cpu_f32(mean) && cpu_f32(var) && cpu_f32(weight) && cpu_f32(bias)) {
    Tensor scale = at::empty_like(mean), shift = at::empty_like(mean);
    float *s = scale.data_ptr<float>(), *t = shift.data_ptr<float>();
    const float *m = mean.const_data_ptr<float>(), *v = var.const_data_ptr<float>();
    const float *w = data(weight), *b = data(bias);
    const float e = static_cast<float>(eps);
    for (int64_t c = 0; c < mean.numel(); ++c) {
      const float invstd = 1.0f / std::sqrt(v[c] + e);
      s[c] = w != nullptr ? invstd * w[c] : invstd;
      const float ms = m[c] * s[c];
      t[c] = b != nullptr ? b[c] - ms : -ms;
    }
    return {scale, shift};
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
  const bool want_weight = need_weight && has(weight);
  if (fast(grad_scale, grad_shift, mean, var, weight)) {
    const auto make = [&](bool needed) { return needed ? at::empty_like(mean) : empty_like_stats(mean); };
    Tensor gm = make(need_mean), gv = make(need_var), gw = make(want_weight), gb = make(need_bias);
    const auto ptr = [](Tensor& t, bool needed) { return needed ? t.data_ptr<float>() : nullptr; };
    finalize_backward_loop(grad_scale, grad_shift, mean, var, weight, eps, ptr(gm, need_mean), ptr(gv, need_var),
                           ptr(gw, want_weight), ptr(gb, need_bias), 1.0f, 1.0f);
    return {gm, gv, gw, gb};
  }
  const Tensor invstd = (var + eps).rsqrt();
  const Tensor w = has(weight) ? weight->to(mean.scalar_type()) : Tensor();
  const Tensor g = grad_scale - grad_shift * mean;
  Tensor grad_mean = need_mean ? -(grad_shift * (w.defined() ? invstd * w : invstd)) : empty_like_stats(mean);
  Tensor grad_var = need_var ? (w.defined() ? g * w : g) * (invstd * invstd * invstd) * -0.5 : empty_like_stats(var);
  Tensor grad_weight = want_weight ? (g * invstd).to(weight->scalar_type()) : empty_like_stats(mean);
  Tensor grad_bias = need_bias ? grad_shift.clone() : empty_like_stats(mean);
  return {grad_mean, grad_var, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward_terms(const Tensor& grad_scale, const Tensor& grad_shift,
                                                             const Tensor& mean, const Tensor& var,
                                                             const OptTensor& weight, double eps, double count,
                                                             bool need_affine) {
  const bool want_weight = need_affine && has(weight);
  if (fast(grad_scale, grad_shift, mean, var, weight)) {
    Tensor g_shift = at::empty_like(mean), g_scale = at::empty_like(mean);
    Tensor gw = want_weight ? at::empty_like(mean) : empty_like_stats(mean);
    Tensor gb = need_affine ? at::empty_like(mean) : empty_like_stats(mean);
    finalize_backward_loop(grad_scale, grad_shift, mean, var, weight, eps, g_shift.data_ptr<float>(),
                           g_scale.data_ptr<float>(), want_weight ? gw.data_ptr<float>() : nullptr,
                           need_affine ? gb.data_ptr<float>() : nullptr, static_cast<float>(count),
                           static_cast<float>(2.0 / count));
    return {g_shift, g_scale, gw, gb};
  }
  auto [gm, gv, gw, gb] = bn_finalize_backward(grad_scale, grad_shift, mean, var, weight, eps,
                                               {true, true, need_affine, need_affine});
  return {gm / count, gv * (2.0 / count), gw, gb};
}

}  // namespace fused_resnet_native

TORCH_LIBRARY_IMPL(fused_resnet, CompositeExplicitAutograd, m) {
  m.impl("bn_finalize", &fused_resnet_native::bn_finalize);
  m.impl("bn_finalize_backward", &fused_resnet_native::bn_finalize_backward);
}
