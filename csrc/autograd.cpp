// Autograd of the public ops, one torch::autograd::Function each, registered for the Autograd key
// (torchvision's csrc/ops/autograd/ shape): forward redispatches below autograd, backward calls the
// backward op of the same name, on the backend the forward asked for (autograd runs CUDA backward
// passes on its own threads, which do not see the caller's use_backend).
//
// What is saved is the memory story of the library: conv_stats (and conv_bn) keeps its raw input x,
// the prologue's in_scale/in_shift, the weight, its output y and the statistics; the normalised,
// activated input that fed the convolution is recomputed in backward. bn_add_relu keeps its inputs
// (already kept by the ops around it); conv_bias_act keeps its input, and its output only when it
// applies ReLU or ReLU6 (the mask); with SiLU it keeps its bias and residual to recompute the
// pre-activation.
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "kernels.h"
#include "router.h"

namespace fused_resnet_native::autograd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using IntList = c10::IntArrayRef;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using ConvStatsSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                                        const Tensor&, IntList, IntList, IntList, int64_t);
using ConvStatsBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
    const Tensor&, const Tensor&, const Tensor&, IntList, IntList, IntList, int64_t, std::array<bool, 3>,
    c10::string_view);
using BnAddReluSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, int64_t);
using BnAddReluBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, std::array<bool, 4>, c10::string_view);
using ConvBiasActSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, IntList, IntList,
                              IntList, int64_t, int64_t);
using ConvBiasActBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, IntList, IntList, IntList, int64_t,
    std::array<bool, 4>, c10::string_view);

using ConvBnSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const OptTensor&, const OptTensor&, int64_t, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, std::optional<double>, double, IntList, IntList, IntList,
    int64_t);
using ConvBnBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
    const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&, double, IntList, IntList, IntList,
    int64_t, std::array<bool, 4>, c10::string_view);
using BnFinalizeSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                 double);
using BnFinalizeBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                         const Tensor&, const OptTensor&, double,
                                                                         std::array<bool, 4>);

Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Which of the tensor arguments (in order; `saved` holds each, undefined for an absent optional
// one) need a gradient: autograd numbers only the tensors that were given.
std::vector<bool> needs_grad(AutogradContext* ctx, const std::vector<Tensor>& tensors) {
  std::vector<bool> needs;
  size_t edge = 0;
  for (const Tensor& t : tensors) needs.push_back(t.defined() && ctx->needs_input_grad(edge++));
  return needs;
}
OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
Tensor if_needed(const Tensor& grad, bool needed) { return needed ? grad : Tensor(); }

void save_conv(AutogradContext* ctx, IntList stride, IntList padding, IntList dilation, int64_t groups) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["backend"] = std::string(router::name(router::requested()));
}

struct Conv {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
  std::string backend;
  explicit Conv(AutogradContext* ctx)
      : stride(ctx->saved_data["stride"].toIntVector()),
        padding(ctx->saved_data["padding"].toIntVector()),
        dilation(ctx->saved_data["dilation"].toIntVector()),
        groups(ctx->saved_data["groups"].toInt()),
        backend(ctx->saved_data["backend"].toStringRef()) {}
};

struct ConvStats : public torch::autograd::Function<ConvStats> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& in_scale,
                               const OptTensor& in_shift, int64_t in_act, const Tensor& weight, IntList stride,
                               IntList padding, IntList dilation, int64_t groups) {
    static auto conv_stats = op<ConvStatsSig>("fused_resnet::conv_stats");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, var] = conv_stats.call(x, in_scale, in_shift, in_act, weight, stride, padding, dilation, groups);
    ctx->save_for_backward({x, or_undefined(in_scale), or_undefined(in_shift), weight, y, mean});
    save_conv(ctx, stride, padding, dilation, groups);
    ctx->saved_data["in_act"] = in_act;
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto conv_stats_backward = op<ConvStatsBackwardSig>("fused_resnet::conv_stats_backward");
    const auto saved = ctx->get_saved_variables();
    const Conv conv(ctx);
    const auto need = needs_grad(ctx, {saved[0], saved[1], saved[2], saved[3]});
    const bool need_x = need[0], need_scale = need[1], need_shift = need[2], need_w = need[3];
    auto [gx, gs, gb, gw] = conv_stats_backward.call(
        grads[0], grads[1], grads[2], saved[0], optional(saved[1]), optional(saved[2]),
        ctx->saved_data["in_act"].toInt(), saved[3], saved[4], saved[5], conv.stride, conv.padding, conv.dilation,
        conv.groups, {need_x, need_scale || need_shift, need_w}, conv.backend);
    return {if_needed(gx, need_x), if_needed(gs, need_scale), if_needed(gb, need_shift), Tensor(),
            if_needed(gw, need_w), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// One node for a training conv+BN: x, the prologue, the conv weight and the BN's affine parameters
// get their gradients from those of (y, scale, shift) in one backward op; mean and var are the
// batch statistics (saved for backward, not differentiable: gradients reach them through scale and
// shift). The running statistics the forward updated in place are buffers: nothing flows to them.
struct ConvBn : public torch::autograd::Function<ConvBn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& in_scale,
                               const OptTensor& in_shift, int64_t in_act, const Tensor& weight,
                               const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                               std::optional<double> momentum, double eps, IntList stride, IntList padding,
                               IntList dilation, int64_t groups) {
    static auto conv_bn = op<ConvBnSig>("fused_resnet::conv_bn");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, scale, shift, mean, var] =
        conv_bn.call(x, in_scale, in_shift, in_act, weight, bn_weight, bn_bias, running_mean, running_var,
                     num_batches_tracked, momentum, eps, stride, padding, dilation, groups);
    ctx->save_for_backward({x, or_undefined(in_scale), or_undefined(in_shift), weight, or_undefined(bn_weight),
                            or_undefined(bn_bias), y, mean, var});
    ctx->mark_non_differentiable({mean, var});
    // No zeros made for the statistics' (never defined) gradients: ~2 us of host time a call.
    ctx->set_materialize_grads(false);
    save_conv(ctx, stride, padding, dilation, groups);
    ctx->saved_data["in_act"] = in_act;
    ctx->saved_data["eps"] = eps;
    return {y, scale, shift, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto conv_bn_backward = op<ConvBnBackwardSig>("fused_resnet::conv_bn_backward");
    const auto s = ctx->get_saved_variables();
    const Conv conv(ctx);
    const auto need = needs_grad(ctx, {s[0], s[1], s[2], s[3], s[4], s[5]});
    // A (y, scale, shift) output the loss does not reach has an undefined gradient: zeros.
    const Tensor& mean = s[7];
    const Tensor gy = grads[0].defined() ? grads[0] : at::zeros_like(s[6]);
    const Tensor gscale = grads[1].defined() ? grads[1] : at::zeros_like(mean);
    const Tensor gshift = grads[2].defined() ? grads[2] : at::zeros_like(mean);
    auto [gx, gis, gib, gw, gbw, gbb] = conv_bn_backward.call(
        gy, gscale, gshift, s[0], optional(s[1]), optional(s[2]), ctx->saved_data["in_act"].toInt(),
        s[3], optional(s[4]), s[6], s[7], s[8], ctx->saved_data["eps"].toDouble(), conv.stride, conv.padding,
        conv.dilation, conv.groups, {need[0], need[1] || need[2], need[3], need[4] || need[5]}, conv.backend);
    // Each gradient in its input's dtype, as autograd requires (BN parameters may be fp16/bf16).
    return {if_needed(gx, need[0]), if_needed(gis, need[1]), if_needed(gib, need[2]), Tensor(),
            if_needed(gw, need[3]), if_needed(gbw, need[4]), need[5] ? gbb.to(s[5].scalar_type()) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct BnAddRelu : public torch::autograd::Function<BnAddRelu> {
  static variable_list forward(AutogradContext* ctx, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
                               const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift,
                               int64_t act) {
    static auto bn_add_relu = op<BnAddReluSig>("fused_resnet::bn_add_relu");
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = bn_add_relu.call(y, scale, shift, residual, res_scale, res_shift, act);
    ctx->save_for_backward({y, or_undefined(scale), or_undefined(shift), or_undefined(residual),
                            or_undefined(res_scale), or_undefined(res_shift)});
    ctx->saved_data["act"] = act;
    ctx->saved_data["backend"] = std::string(router::name(router::requested()));
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bn_add_relu_backward = op<BnAddReluBackwardSig>("fused_resnet::bn_add_relu_backward");
    const auto s = ctx->get_saved_variables();
    const auto need = needs_grad(ctx, s);
    auto [gy, gs, gb, gr, grs, grb] = bn_add_relu_backward.call(
        grads[0], s[0], optional(s[1]), optional(s[2]), optional(s[3]), optional(s[4]), optional(s[5]),
        ctx->saved_data["act"].toInt(), {need[0], need[1] || need[2], need[3], need[4] || need[5]},
        ctx->saved_data["backend"].toStringRef());
    return {if_needed(gy, need[0]), if_needed(gs, need[1]), if_needed(gb, need[2]), if_needed(gr, need[3]),
            if_needed(grs, need[4]), if_needed(grb, need[5]), Tensor()};
  }
};

struct ConvBiasAct : public torch::autograd::Function<ConvBiasAct> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                               const OptTensor& residual, IntList stride, IntList padding, IntList dilation,
                               int64_t groups, int64_t act) {
    static auto conv_bias_act = op<ConvBiasActSig>("fused_resnet::conv_bias_act");
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor out = conv_bias_act.call(x, weight, bias, residual, stride, padding, dilation, groups, act);
    // ReLU/ReLU6 keep the output for their mask (without an activation a caller may modify it in
    // place). SiLU's derivative needs the pre-activation: its backward recomputes it from the inputs
    // (an inference op's backward; nothing the size of the output is kept for it).
    const bool recompute = act == kActSilu;
    ctx->save_for_backward({x, weight, (act == kActRelu || act == kActRelu6) ? out : Tensor(),
                            recompute ? or_undefined(bias) : Tensor(), recompute ? or_undefined(residual) : Tensor()});
    save_conv(ctx, stride, padding, dilation, groups);
    ctx->saved_data["act"] = act;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["has_residual"] = residual.has_value() && residual->defined();
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto conv_bias_act_backward = op<ConvBiasActBackwardSig>("fused_resnet::conv_bias_act_backward");
    const auto s = ctx->get_saved_variables();
    const Conv conv(ctx);
    // Stand-ins for the bias and residual, which are not saved: only whether they were given counts.
    const Tensor given = s[0];
    const auto need = needs_grad(ctx, {s[0], s[1], ctx->saved_data["has_bias"].toBool() ? given : Tensor(),
                                       ctx->saved_data["has_residual"].toBool() ? given : Tensor()});
    const int64_t act = ctx->saved_data["act"].toInt();
    Tensor out = s[2];
    if (act == kActSilu) {
      static auto conv_bias_act = op<ConvBiasActSig>("fused_resnet::conv_bias_act");
      at::AutoDispatchBelowADInplaceOrView below;
      out = conv_bias_act.call(s[0], s[1], optional(s[3]), optional(s[4]), conv.stride, conv.padding, conv.dilation,
                               conv.groups, kActNone);
    }
    auto [gx, gw, gbias, gres] = conv_bias_act_backward.call(
        grads[0], s[0], s[1], out.defined() ? out : grads[0], act, conv.stride,
        conv.padding, conv.dilation, conv.groups, {need[0], need[1], need[2], need[3]}, conv.backend);
    return {if_needed(gx, need[0]), if_needed(gw, need[1]), if_needed(gbias, need[2]), if_needed(gres, need[3]),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct BnFinalize : public torch::autograd::Function<BnFinalize> {
  static variable_list forward(AutogradContext* ctx, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
    static auto bn_finalize = op<BnFinalizeSig>("fused_resnet::bn_finalize");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [scale, shift] = bn_finalize.call(mean, var, weight, bias, eps);
    ctx->save_for_backward({mean, var, or_undefined(weight), or_undefined(bias)});
    ctx->saved_data["eps"] = eps;
    return {scale, shift};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bn_finalize_backward = op<BnFinalizeBackwardSig>("fused_resnet::bn_finalize_backward");
    const auto s = ctx->get_saved_variables();
    const auto need = needs_grad(ctx, s);
    auto [gm, gv, gw, gb] = bn_finalize_backward.call(grads[0], grads[1], s[0], s[1], optional(s[2]),
                                                      ctx->saved_data["eps"].toDouble(),
                                                      {need[0], need[1], need[2], need[3]});
    // Each gradient in its input's dtype, as autograd requires (BN parameters may be fp16/bf16).
    return {if_needed(gm, need[0]), if_needed(gv, need[1]), if_needed(gw, need[2]),
            need[3] ? gb.to(s[3].scalar_type()) : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                       const OptTensor& bias, double eps) {
  auto out = BnFinalize::apply(mean, var, weight, bias, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor> conv_stats(const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t r,
                                              const Tensor& w, IntList st, IntList p, IntList d, int64_t g) {
  auto out = ConvStats::apply(x, s, b, r, w, st, p, d, g);
  return {out[0], out[1], out[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn(
    const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t r, const Tensor& w, const OptTensor& bw,
    const OptTensor& bb, const OptTensor& rm, const OptTensor& rv, const OptTensor& nbt, std::optional<double> mom,
    double eps, IntList st, IntList p, IntList d, int64_t g) {
  auto out = ConvBn::apply(x, s, b, r, w, bw, bb, rm, rv, nbt, mom, eps, st, p, d, g);
  return {out[0], out[1], out[2], out[3], out[4]};
}

Tensor bn_add_relu(const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res, const OptTensor& rs,
                   const OptTensor& rb, int64_t act) {
  return BnAddRelu::apply(y, s, b, res, rs, rb, act)[0];
}

Tensor conv_bias_act(const Tensor& x, const Tensor& w, const OptTensor& bias, const OptTensor& res, IntList st,
                     IntList p, IntList d, int64_t g, int64_t act) {
  return ConvBiasAct::apply(x, w, bias, res, st, p, d, g, act)[0];
}

}  // namespace
}  // namespace fused_resnet_native::autograd

TORCH_LIBRARY_IMPL(fused_resnet, Autograd, m) {
  m.impl("conv_stats", &fused_resnet_native::autograd::conv_stats);
  m.impl("conv_bn", &fused_resnet_native::autograd::conv_bn);
  m.impl("bn_add_relu", &fused_resnet_native::autograd::bn_add_relu);
  m.impl("conv_bias_act", &fused_resnet_native::autograd::conv_bias_act);
  m.impl("bn_finalize", &fused_resnet_native::autograd::bn_finalize);
}
