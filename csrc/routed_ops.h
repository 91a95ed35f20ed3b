// The public ops' kernels for one device (CPU, CUDA): check the arguments, choose the backend
// (router.h), run the native kernel of fused_ops.h or the Python one. Gradients not computed come
// back as empty tensors, as the schemas say (fused_resnet/_library.py), whichever backend ran.
#pragma once

#include <array>
#include <string>
#include <tuple>

#include <ATen/Functions.h>

#include "checks.h"
#include "fused_ops.h"
#include "router.h"

namespace fused_resnet_native {

// The backend that runs this call: native where asked (or auto) and its kernels take the dtype,
// else the name handed to Python (a backend named explicitly whose kernel does not cover the
// arguments falls back to the reference there; see fused_resnet/_backend.py).
struct Choice {
  bool native;
  std::string python;
};

inline bool native_dtype(const Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kBFloat16 || d == at::kHalf;
}

inline Choice choose(int backend, const Tensor& activation, const char* kernel) {
  if ((backend == router::kAuto || backend == router::kNative) && native_dtype(activation)) {
    if (router::tracing()) router::record(kernel, "native");
    return {true, {}};
  }
  return {false, backend == router::kNative ? "reference" : router::name(backend)};
}

// A backward op's choice: the backend its forward recorded, passed on to Python as it is; none
// (a direct call) is the one in force.
inline Choice choose_recorded(c10::string_view backend, const Tensor& activation, const char* kernel) {
  const std::string name(backend);
  if (name.empty()) return choose(router::requested(), activation, kernel);
  Choice c = choose(router::from_name(name), activation, kernel);
  if (!c.native && router::from_name(name) == router::kPython) c.python = name;
  return c;
}

// An output of a native kernel that is a view of an input (a gradient passed through unchanged)
// is copied: the dispatcher and autograd rely on op outputs aliasing nothing.
inline Tensor unaliased(Tensor out, std::initializer_list<const Tensor*> inputs) {
  if (!out.defined()) return out;
  for (const Tensor* in : inputs) {
    if (in->defined() && out.is_alias_of(*in)) return out.clone();
  }
  return out;
}

inline Tensor or_empty(const Tensor& t, const at::TensorOptions& options) {
  return t.defined() ? t : at::empty({0}, options);
}

template <class Device>
struct Routed {
  using I = Impls<Device>;

  static std::tuple<Tensor, Tensor, Tensor> conv_stats(const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t r,
                                                       const Tensor& w, IntList st, IntList p, IntList d, int64_t g) {
    checks::conv(x, w, st, p, d, g);
    checks::per_channel("in_scale", s, x.size(1), x);
    checks::per_channel("in_shift", b, x.size(1), x);
    checks::act("in_act", r);
    const Choice c = choose(router::requested(), x, "conv_stats");
    if (!c.native) return router::call_python<std::tuple<Tensor, Tensor, Tensor>>("conv_stats", c.python.c_str(), x, s, b, r, w, st, p, d, g);
    router::NoAutocast no_autocast;
    return I::conv_stats_(x, s, b, r, w, st, p, d, g);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> conv_stats_backward(
      const Tensor& gy, const Tensor& gm, const Tensor& gv, const Tensor& x, const OptTensor& s, const OptTensor& b,
      int64_t r, const Tensor& w, const Tensor& y, const Tensor& mean, IntList st, IntList p, IntList d, int64_t g,
      std::array<bool, 3> mask, c10::string_view backend) {
    checks::act("in_act", r);
    const Choice c = choose_recorded(backend, x, "conv_stats_backward");
    if (!c.native) {
      return router::call_python<std::tuple<Tensor, Tensor, Tensor, Tensor>>(
          "conv_stats_backward", c.python.c_str(), gy, gm, gv, x, s, b, r, w, y, mean, st, p, d, g, mask);
    }
    router::NoAutocast no_autocast;
    auto [gx, gs, gb, gw] = I::conv_stats_backward_(gy, gm, gv, x, s, b, r, w, y, mean, st, p, d, g, mask);
    return {or_empty(gx, x.options()), or_empty(gs, mean.options()), or_empty(gb, mean.options()),
            or_empty(gw, w.options())};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn(
      const Tensor& x, const OptTensor& s, const OptTensor& b, int64_t r, const Tensor& w, const OptTensor& bw,
      const OptTensor& bb, const OptTensor& rm, const OptTensor& rv, const OptTensor& nbt, std::optional<double> mom,
      double eps, IntList st, IntList p, IntList d, int64_t g) {
    checks::conv(x, w, st, p, d, g);
    checks::per_channel("in_scale", s, x.size(1), x);
    checks::per_channel("in_shift", b, x.size(1), x);
    checks::act("in_act", r);
    const std::pair<const char*, const OptTensor*> vectors[] = {
        {"BN weight", &bw}, {"BN bias", &bb}, {"running_mean", &rm}, {"running_var", &rv}};
    for (const auto& [name, t] : vectors) {
      TORCH_CHECK(!checks::has(*t) || ((*t)->dim() == 1 && (*t)->size(0) == w.size(0)), "fused_resnet: ", name,
                  " must have shape (", w.size(0), ",), got ", (*t)->sizes());
    }
    const auto out = checks::conv_output_size(x, w, st, p, d);
    TORCH_CHECK_VALUE(out[0] * out[2] * out[3] != 1,
                      "Expected more than 1 value per channel when training, got input size ", out);
    const Choice c = choose(router::requested(), x, "conv_bn");
    if (!c.native) {
      return router::call_python<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>>(
          "conv_bn", c.python.c_str(), x, s, b, r, w, bw, bb, rm, rv, nbt, mom, eps, st, p, d, g);
    }
    router::NoAutocast no_autocast;
    return I::conv_bn_(x, s, b, r, w, bw, bb, rm, rv, nbt, mom, eps, st, p, d, g);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_bn_backward(
      const Tensor& gy, const Tensor& gs, const Tensor& gb, const Tensor& x, const OptTensor& s, const OptTensor& b,
      int64_t r, const Tensor& w, const OptTensor& bw, const Tensor& y, const Tensor& mean, const Tensor& var, double eps,
      IntList st, IntList p, IntList d, int64_t g, std::array<bool, 4> mask, c10::string_view backend) {
    checks::act("in_act", r);
    const Choice c = choose_recorded(backend, x, "conv_bn_backward");
    if (!c.native) {
      return router::call_python<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>(
          "conv_bn_backward", c.python.c_str(), gy, gs, gb, x, s, b, r, w, bw, y, mean, var, eps, st, p, d, g, mask);
    }
    router::NoAutocast no_autocast;
    auto [gx, gis, gib, gw, gbw, gbb] = I::conv_bn_backward_(gy, gs, gb, x, s, b, r, w, bw, y, mean, var, eps, st, p,
                                                             d, g, mask);
    return {or_empty(gx, x.options()), or_empty(gis, mean.options()), or_empty(gib, mean.options()),
            or_empty(gw, w.options()), or_empty(gbw, mean.options()), or_empty(gbb, mean.options())};
  }

  static Tensor bn_add_relu(const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res,
                            const OptTensor& rs, const OptTensor& rb, int64_t act, const OptTensor& gate) {
    checks::activation("input", y);
    checks::per_channel("scale", s, y.size(1), y);
    checks::per_channel("shift", b, y.size(1), y);
    checks::residual(res, y, y.sizes());
    TORCH_CHECK(checks::has(res) || (!checks::has(rs) && !checks::has(rb)),
                "fused_resnet: res_scale/res_shift given without a residual");
    checks::per_channel("res_scale", rs, y.size(1), y);
    checks::per_channel("res_shift", rb, y.size(1), y);
    checks::act("act", act);
    checks::gate(gate, y);
    const Choice c = choose(router::requested(), y, "bn_add_relu");
    if (!c.native) {
      return router::call_python<Tensor>("bn_add_relu", c.python.c_str(), y, s, b, res, rs, rb, act, gate);
    }
    router::NoAutocast no_autocast;
    const Tensor* residual = checks::has(res) ? &*res : &y;
    if (checks::has(gate)) return unaliased(I::bn_add_relu_gated_(y, s, b, res, rs, rb, act, *gate), {&y, residual});
    return unaliased(I::bn_add_relu_(y, s, b, res, rs, rb, act), {&y, residual});
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_backward(
      const Tensor& go, const Tensor& y, const OptTensor& s, const OptTensor& b, const OptTensor& res,
      const OptTensor& rs, const OptTensor& rb, int64_t act, std::array<bool, 4> mask, c10::string_view backend,
      const OptTensor& gate) {
    checks::act("act", act);
    const Choice c = choose_recorded(backend, y, "bn_add_relu_backward");
    if (!c.native) {
      return router::call_python<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>>(
          "bn_add_relu_backward", c.python.c_str(), go, y, s, b, res, rs, rb, act, mask, gate);
    }
    router::NoAutocast no_autocast;
    Tensor gy, gs, gb, gr, grs, grb, gg;
    if (checks::has(gate)) {
      std::tie(gy, gs, gb, gr, grs, grb, gg) = I::bn_add_relu_gated_backward_(go, y, s, b, res, rs, rb, act, mask,
                                                                               *gate);
    } else {
      std::tie(gy, gs, gb, gr, grs, grb) = I::bn_add_relu_backward_(go, y, s, b, res, rs, rb, act, mask);
    }
    const auto stat = y.options().dtype(checks::stat_dtype(y.scalar_type()));
    return {or_empty(unaliased(gy, {&go}), y.options()), or_empty(gs, stat), or_empty(gb, stat),
            or_empty(unaliased(gr, {&go, &gy}), y.options()), or_empty(grs, stat), or_empty(grb, stat),
            or_empty(gg, stat)};
  }

  static Tensor conv_bias_act(const Tensor& x, const Tensor& w, const OptTensor& bias, const OptTensor& res,
                              IntList st, IntList p, IntList d, int64_t g, int64_t act) {
    checks::conv(x, w, st, p, d, g);
    checks::per_channel("bias", bias, w.size(0), x);
    if (checks::has(res)) checks::residual(res, x, checks::conv_output_size(x, w, st, p, d));
    checks::act("act", act);
    const Choice c = choose(router::requested(), x, "conv_bias_act");
    if (!c.native) return router::call_python<Tensor>("conv_bias_act", c.python.c_str(), x, w, bias, res, st, p, d, g, act);
    router::NoAutocast no_autocast;
    return I::conv_bias_act_(x, w, bias, res, st, p, d, g, act);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bias_act_backward(
      const Tensor& go, const Tensor& x, const Tensor& w, const Tensor& out, int64_t act, IntList st, IntList p,
      IntList d, int64_t g, std::array<bool, 4> mask, c10::string_view backend) {
    checks::act("act", act);
    const Choice c = choose_recorded(backend, x, "conv_bias_act_backward");
    if (!c.native) {
      return router::call_python<std::tuple<Tensor, Tensor, Tensor, Tensor>>(
          "conv_bias_act_backward", c.python.c_str(), go, x, w, out, act, st, p, d, g, mask);
    }
    router::NoAutocast no_autocast;
    auto [gx, gw, gbias, gres] = I::conv_bias_act_backward_(go, x, w, out, act, st, p, d, g, mask);
    const auto stat = x.options().dtype(checks::stat_dtype(x.scalar_type()));
    return {or_empty(gx, x.options()), or_empty(gw, w.options()), or_empty(gbias, stat),
            or_empty(unaliased(gres, {&go, &out}), out.options())};
  }

  static void update_running_stats(const Tensor& rm, const Tensor& rv, const Tensor& nbt, const Tensor& mean,
                                   const Tensor& var, int64_t count, std::optional<double> momentum) {
    TORCH_CHECK_VALUE(count >= 2, "Expected more than 1 value per channel when training, got ", count);
    const Choice c = choose(router::requested(), mean, "update_running_stats_");
    if (!c.native) {
      router::call_python<void>("update_running_stats_", c.python.c_str(), rm, rv, nbt, mean, var, count, momentum);
      return;
    }
    I::update_running_stats(rm, rv, nbt, mean, var, count, momentum);
  }
};

template <class Device>
void register_routed(torch::Library& m) {
  using R = Routed<Device>;
  m.impl("conv_stats", &R::conv_stats);
  m.impl("conv_stats_backward", &R::conv_stats_backward);
  m.impl("conv_bn", &R::conv_bn);
  m.impl("conv_bn_backward", &R::conv_bn_backward);
  m.impl("bn_add_relu", &R::bn_add_relu);
  m.impl("bn_add_relu_backward", &R::bn_add_relu_backward);
  m.impl("conv_bias_act", &R::conv_bias_act);
  m.impl("conv_bias_act_backward", &R::conv_bias_act_backward);
  m.impl("update_running_stats_", &R::update_running_stats);
}

}  // namespace fused_resnet_native
