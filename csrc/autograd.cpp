// Autograd of the public ops, registered for the Autograd key: one hand-written node per op in the
// shape of ATen's generated ones (torch/csrc/autograd/generated/Functions.h): typed SavedVariable
// fields, the other arguments as plain members, edges only to the differentiable inputs, and
// `apply` calling the backward op of the same name. The forward redispatches below autograd
// (torchvision's csrc/ops/autograd/ shape). torch::autograd::Function, used before, cost ~6 us of
// host time more per node (an IValue map for the non-tensor arguments, a gradient slot and an input
// record per argument, a node built even without grad; docs/design.md).
//
// What is saved is the memory story of the library: conv_stats (and conv_bn) keeps its raw input x,
// the prologue's in_scale/in_shift, the weight, its output y and the statistics; the normalised,
// activated input that fed the convolution is recomputed in backward. bn_add_relu keeps its inputs
// (already kept by the ops around it); conv_bias_act keeps its input, and its output only when it
// applies ReLU, ReLU6 or LeakyReLU (the mask); with SiLU or Hardswish (act_needs_z) it keeps its bias and
// residual to recompute the pre-activation. Saved outputs are saved after their history is set, as outputs (no
// reference cycle through the node), so a later in-place change of any saved tensor is caught.
//
// Not supported, as with torch::autograd::Function: forward-mode AD and functorch transforms (a
// clear error, check_supported), compiled autograd (Node's own error names the node).
#include <tuple>

#include <torch/library.h>

#include "autograd_node.h"
#include "kernels.h"

namespace fused_resnet_native::autograd {
namespace {

using torch::autograd::collect_next_edges;
using torch::autograd::compute_requires_grad;
using torch::autograd::set_history;

using ConvStatsSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, int64_t,
                                                        const Tensor&, IntList, IntList, IntList, int64_t);
using ConvStatsBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t,
    const Tensor&, const Tensor&, const Tensor&, IntList, IntList, IntList, int64_t, std::array<bool, 3>,
    c10::string_view);
using BnAddReluSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, int64_t, const OptTensor&);
using BnAddReluBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, std::array<bool, 4>, c10::string_view, const OptTensor&);
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

// Edges (x, in_scale, in_shift, weight); inputs the gradients of (y, mean, var).
struct ConvStatsBackward : Node {
  SavedVariable x_, in_scale_, in_shift_, weight_, y_, mean_;
  int64_t in_act = kActNone;
  ConvArgs conv;
  std::string name() const override { return "ConvStatsBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* s : {&x_, &in_scale_, &in_shift_, &weight_, &y_, &mean_}) s->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static auto backward = op<ConvStatsBackwardSig>("fused_resnet::conv_stats_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    const bool need_x = task_should_compute_output(0), need_scale = task_should_compute_output(1),
               need_shift = task_should_compute_output(2), need_w = task_should_compute_output(3);
    auto [gx, gs, gb, gw] = backward.call(
        or_zeros(*this, grads[0], 0), or_zeros(*this, grads[1], 1), or_zeros(*this, grads[2], 2), x_.unpack(),
        optional(in_scale_.unpack()), optional(in_shift_.unpack()), in_act, weight_.unpack(),
        y_.unpack(getptr()), mean_.unpack(getptr()), conv.stride, conv.padding, conv.dilation, conv.groups,
        {need_x, need_scale || need_shift, need_w}, router::name(conv.backend));
    return {if_needed(gx, need_x), if_needed(gs, need_scale), if_needed(gb, need_shift), if_needed(gw, need_w)};
  }
};

// One node for a training conv+BN: x, the prologue, the conv weight and the BN's affine parameters
// get their gradients from those of (y, scale, shift) in one backward op; mean and var are the
// batch statistics (saved for backward, not differentiable: gradients reach them through scale and
// shift). The running statistics the forward updated in place are buffers: no edge, nothing saved.
struct ConvBnBackward : Node {
  SavedVariable x_, in_scale_, in_shift_, weight_, bn_weight_, y_, mean_, var_;
  int64_t in_act = kActNone;
  double eps = 0.0;
  c10::ScalarType bn_bias_dtype = at::kFloat;
  ConvArgs conv;
  std::string name() const override { return "ConvBnBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* s : {&x_, &in_scale_, &in_shift_, &weight_, &bn_weight_, &y_, &mean_, &var_}) s->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static auto backward = op<ConvBnBackwardSig>("fused_resnet::conv_bn_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    bool need[6];
    for (size_t i = 0; i < 6; ++i) need[i] = task_should_compute_output(i);
    auto [gx, gis, gib, gw, gbw, gbb] = backward.call(
        or_zeros(*this, grads[0], 0), or_zeros(*this, grads[1], 1), or_zeros(*this, grads[2], 2), x_.unpack(),
        optional(in_scale_.unpack()), optional(in_shift_.unpack()), in_act, weight_.unpack(),
        optional(bn_weight_.unpack()), y_.unpack(getptr()), mean_.unpack(getptr()), var_.unpack(getptr()), eps,
        conv.stride, conv.padding, conv.dilation, conv.groups, {need[0], need[1] || need[2], need[3], need[4] || need[5]},
        router::name(conv.backend));
    // Each gradient in its input's dtype (BN parameters may be fp16/bf16).
    return {if_needed(gx, need[0]), if_needed(gis, need[1]), if_needed(gib, need[2]), if_needed(gw, need[3]),
            if_needed(gbw, need[4]), need[5] ? gbb.to(bn_bias_dtype) : Tensor()};
  }
};

// Edges (y, scale, shift, residual, res_scale, res_shift, gate); one output.
struct BnAddReluBackward : Node {
  SavedVariable y_, scale_, shift_, residual_, res_scale_, res_shift_, gate_;
  int64_t act = kActNone;
  int backend = router::kAuto;
  std::string name() const override { return "BnAddReluBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* s : {&y_, &scale_, &shift_, &residual_, &res_scale_, &res_shift_, &gate_}) s->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static auto backward = op<BnAddReluBackwardSig>("fused_resnet::bn_add_relu_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    bool need[7];
    for (size_t i = 0; i < 7; ++i) need[i] = task_should_compute_output(i);
    // The gate's gradient comes with the BN's affine ones (output_mask[1]).
    auto [gy, gs, gb, gr, grs, grb, gg] = backward.call(
        or_zeros(*this, grads[0], 0), y_.unpack(), optional(scale_.unpack()), optional(shift_.unpack()),
        optional(residual_.unpack()), optional(res_scale_.unpack()), optional(res_shift_.unpack()), act,
        {need[0], need[1] || need[2] || need[6], need[3], need[4] || need[5]}, router::name(backend),
        optional(gate_.unpack()));
    return {if_needed(gy, need[0]), if_needed(gs, need[1]), if_needed(gb, need[2]), if_needed(gr, need[3]),
            if_needed(grs, need[4]), if_needed(grb, need[5]), if_needed(gg, need[6])};
  }
};

// Edges (x, weight, bias, residual); an absent bias or residual has no edge. The bias and residual
// are saved only with SiLU and Hardswish, whose derivatives need the pre-activation, recomputed from them (an
// inference op's backward: nothing the size of the output is kept for it); ReLU/ReLU6/LeakyReLU keep
// the output for their mask (LeakyReLU's positive slope keeps z's sign, and z = 0 gives out = 0, the
// slope side in both: the output gives ATen's derivative exactly, with no conv recomputed in backward).
struct ConvBiasActBackward : Node {
  SavedVariable x_, weight_, out_, bias_, residual_;
  int64_t act = kActNone;
  ConvArgs conv;
  std::string name() const override { return "ConvBiasActBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* s : {&x_, &weight_, &out_, &bias_, &residual_}) s->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static auto backward = op<ConvBiasActBackwardSig>("fused_resnet::conv_bias_act_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    bool need[4];
    for (size_t i = 0; i < 4; ++i) need[i] = task_should_compute_output(i);
    const Tensor grad = or_zeros(*this, grads[0], 0);
    const Tensor x = x_.unpack(), weight = weight_.unpack();
    Tensor out = out_.unpack(getptr());
    if (act_needs_z(act)) {
      static auto forward = op<ConvBiasActSig>("fused_resnet::conv_bias_act");
      at::AutoDispatchBelowADInplaceOrView below;
      at::NoGradGuard no_grad;
      out = forward.call(x, weight, optional(bias_.unpack()), optional(residual_.unpack()), conv.stride,
                         conv.padding, conv.dilation, conv.groups, kActNone);
    }
    auto [gx, gw, gbias, gres] = backward.call(grad, x, weight, out.defined() ? out : grad, act, conv.stride,
                                               conv.padding, conv.dilation, conv.groups,
                                               {need[0], need[1], need[2], need[3]}, router::name(conv.backend));
    return {if_needed(gx, need[0]), if_needed(gw, need[1]), if_needed(gbias, need[2]), if_needed(gres, need[3])};
  }
};

// Edges (mean, var, weight, bias); inputs the gradients of (scale, shift).
struct BnFinalizeBackward : Node {
  SavedVariable mean_, var_, weight_;
  double eps = 0.0;
  c10::ScalarType bias_dtype = at::kFloat;
  std::string name() const override { return "BnFinalizeBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto* s : {&mean_, &var_, &weight_}) s->reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    static auto backward = op<BnFinalizeBackwardSig>("fused_resnet::bn_finalize_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    bool need[4];
    for (size_t i = 0; i < 4; ++i) need[i] = task_should_compute_output(i);
    auto [gm, gv, gw, gb] =
        backward.call(or_zeros(*this, grads[0], 0), or_zeros(*this, grads[1], 1), mean_.unpack(), var_.unpack(),
                      optional(weight_.unpack()), eps, {need[0], need[1], need[2], need[3]});
    // Each gradient in its input's dtype (BN parameters may be fp16/bf16).
    return {if_needed(gm, need[0]), if_needed(gv, need[1]), if_needed(gw, need[2]),
            need[3] ? gb.to(bias_dtype) : Tensor()};
  }
};

// The forwards, as ATen's generated autograd kernels: a node only when grad mode is on and a
// differentiable input requires grad, its edges, the inputs saved (their versions recorded), the op
// run below autograd (grad mode off, as torch::autograd::Function ran its forward: the Python
// backends' kernels see what they saw), then the differentiable outputs' history, then the saved
// outputs.

std::tuple<Tensor, Tensor, Tensor> conv_stats(const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t a,
                                              const Tensor& w, IntList st, IntList p, IntList d, int64_t g) {
  static auto forward = op<ConvStatsSig>("fused_resnet::conv_stats");
  check_supported("conv_stats", x, s, b, w);
  NodePtr<ConvStatsBackward> node;
  if (compute_requires_grad(x, s, b, w)) {
    node = make_node<ConvStatsBackward>();
    node->set_next_edges(collect_next_edges(x, s, b, w));
    node->x_ = SavedVariable(x, false);
    node->in_scale_ = SavedVariable(s, false);
    node->in_shift_ = SavedVariable(b, false);
    node->weight_ = SavedVariable(w, false);
    node->in_act = a;
    node->conv.set(st, p, d, g);
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    return forward.call(x, s, b, a, w, st, p, d, g);
  }();
  if (node) {
    set_history(std::get<0>(out), node);
    set_history(std::get<1>(out), node);
    set_history(std::get<2>(out), node);
    node->y_ = SavedVariable(std::get<0>(out), true);
    node->mean_ = SavedVariable(std::get<1>(out), true);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn(
    const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t a, const Tensor& w, const OptTensor& bw,
    const OptTensor& bb, const OptTensor& rm, const OptTensor& rv, const OptTensor& nbt, std::optional<double> mom,
    double eps, IntList st, IntList p, IntList d, int64_t g) {
  static auto forward = op<ConvBnSig>("fused_resnet::conv_bn");
  check_supported("conv_bn", x, s, b, w, bw, bb);
  NodePtr<ConvBnBackward> node;
  if (compute_requires_grad(x, s, b, w, bw, bb)) {
    node = make_node<ConvBnBackward>();
    node->set_next_edges(collect_next_edges(x, s, b, w, bw, bb));
    node->x_ = SavedVariable(x, false);
    node->in_scale_ = SavedVariable(s, false);
    node->in_shift_ = SavedVariable(b, false);
    node->weight_ = SavedVariable(w, false);
    node->bn_weight_ = SavedVariable(bw, false);
    if (bb.has_value() && bb->defined()) node->bn_bias_dtype = bb->scalar_type();
    node->in_act = a;
    node->eps = eps;
    node->conv.set(st, p, d, g);
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    return forward.call(x, s, b, a, w, bw, bb, rm, rv, nbt, mom, eps, st, p, d, g);
  }();
  if (node) {
    // (y, scale, shift) only: mean and var get no history, so they do not require grad.
    set_history(std::get<0>(out), node);
    set_history(std::get<1>(out), node);
    set_history(std::get<2>(out), node);
    node->y_ = SavedVariable(std::get<0>(out), true);
    node->mean_ = SavedVariable(std::get<3>(out), true);
    node->var_ = SavedVariable(std::get<4>(out), true);
  }
  return out;
}

Tensor bn_add_relu(const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res, const OptTensor& rs,
                   const OptTensor& rb, int64_t act, const OptTensor& gate) {
  static auto forward = op<BnAddReluSig>("fused_resnet::bn_add_relu");
  check_supported("bn_add_relu", y, s, b, res, rs, rb, gate);
  NodePtr<BnAddReluBackward> node;
  if (compute_requires_grad(y, s, b, res, rs, rb, gate)) {
    node = make_node<BnAddReluBackward>();
    node->set_next_edges(collect_next_edges(y, s, b, res, rs, rb, gate));
    node->y_ = SavedVariable(y, false);
    node->scale_ = SavedVariable(s, false);
    node->shift_ = SavedVariable(b, false);
    node->residual_ = SavedVariable(res, false);
    node->res_scale_ = SavedVariable(rs, false);
    node->res_shift_ = SavedVariable(rb, false);
    node->gate_ = SavedVariable(gate, false);
    node->act = act;
    node->backend = router::requested();
  }
  Tensor out = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    return forward.call(y, s, b, res, rs, rb, act, gate);
  }();
  if (node) set_history(out, node);
  return out;
}

Tensor conv_bias_act(const Tensor& x, const Tensor& w, const OptTensor& bias, const OptTensor& res, IntList st,
                     IntList p, IntList d, int64_t g, int64_t act) {
  static auto forward = op<ConvBiasActSig>("fused_resnet::conv_bias_act");
  check_supported("conv_bias_act", x, w, bias, res);
  NodePtr<ConvBiasActBackward> node;
  if (compute_requires_grad(x, w, bias, res)) {
    node = make_node<ConvBiasActBackward>();
    node->set_next_edges(collect_next_edges(x, w, bias, res));
    node->x_ = SavedVariable(x, false);
    node->weight_ = SavedVariable(w, false);
    node->act = act;
    if (act_needs_z(act)) {
      node->bias_ = SavedVariable(bias, false);
      node->residual_ = SavedVariable(res, false);
    }
    node->conv.set(st, p, d, g);
  }
  Tensor out = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    return forward.call(x, w, bias, res, st, p, d, g, act);
  }();
  if (node) {
    set_history(out, node);
    // The output is kept only for the ReLU/ReLU6/LeakyReLU mask: without them, a caller may modify it
    // in place.
    if (act != kActNone && !act_needs_z(act)) node->out_ = SavedVariable(out, true);
  }
  return out;
}

std::tuple<Tensor, Tensor> bn_finalize(const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                       const OptTensor& bias, double eps) {
  static auto forward = op<BnFinalizeSig>("fused_resnet::bn_finalize");
  check_supported("bn_finalize", mean, var, weight, bias);
  NodePtr<BnFinalizeBackward> node;
  if (compute_requires_grad(mean, var, weight, bias)) {
    node = make_node<BnFinalizeBackward>();
    node->set_next_edges(collect_next_edges(mean, var, weight, bias));
    node->mean_ = SavedVariable(mean, false);
    node->var_ = SavedVariable(var, false);
    node->weight_ = SavedVariable(weight, false);
    if (bias.has_value() && bias->defined()) node->bias_dtype = bias->scalar_type();
    node->eps = eps;
  }
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    at::NoGradGuard no_grad;
    return forward.call(mean, var, weight, bias, eps);
  }();
  if (node) {
    set_history(std::get<0>(out), node);
    set_history(std::get<1>(out), node);
  }
  return out;
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
