// bn_add_relu with a per-(sample, channel) gate (timm's SE, DropPath's per-sample keep-scale):
// out = act(gate * (y * scale + shift) + residual * res_scale + res_shift). The gate folds into
// per-(sample, channel) vectors gate*scale and gate*shift, and the device's per-channel kernels run
// unchanged (fused_ops.cpp's bn_add_relu and its backward, called as they are): on an NCHW tensor
// viewed as [1, N*C, H, W] (the same memory, one call; the residual's vectors tiled N times), on a
// single sample as it is (either layout: the kernels keep it), and on channels_last with more samples
// sample by sample (each sample [1, C, H, W] is dense; the outputs concatenated).
#include "fused_ops.h"

#include <vector>

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>

namespace fused_resnet_native {
namespace {

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Sample by sample only where the per-(sample, channel) view does not exist: channels_last
// (fused_resnet/_layout.py's rule) with more than one sample.
bool per_sample(const Tensor& y) {
  return y.size(0) > 1 && y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous();
}

// The per-channel vectors of the per-channel kernels, fp32 [N * C].
struct Folded {
  Tensor gate, scale, shift, res_scale, res_shift;  // gate: fp32 [N, C]
};

Folded fold(const Tensor& y, const OptTensor& scale, const OptTensor& shift, const OptTensor& res_scale,
            const OptTensor& res_shift, const Tensor& gate) {
  const int64_t n = y.size(0), c = y.size(1);
  Folded f;
  f.gate = gate.reshape({n, c}).to(at::kFloat);
  f.scale = (has(scale) ? f.gate * scale->to(at::kFloat) : f.gate).reshape({n * c}).contiguous();
  if (has(shift)) f.shift = (f.gate * shift->to(at::kFloat)).reshape({n * c});
  if (has(res_scale)) f.res_scale = res_scale->to(at::kFloat).repeat({n});
  if (has(res_shift)) f.res_shift = res_shift->to(at::kFloat).repeat({n});
  return f;
}

// [N, C, H, W] NCHW as [1, N*C, H, W] (a view of the dense tensor); one sample as it is: made NCHW, a
// channels_last one was copied twice and the output came back NCHW, against _layout.py's rule (at batch 1
// timm's SE-ResNet-50 in channels_last then ran NCHW from its first SE join on).
Tensor wide(const Tensor& t) {
  if (t.size(0) == 1) return t;
  return t.contiguous().view({1, t.size(0) * t.size(1), t.size(2), t.size(3)});
}

OptTensor slice(const Tensor& t, int64_t i, int64_t c) {
  return t.defined() ? OptTensor(t.narrow(0, i * c, c)) : std::nullopt;
}

Tensor cat_or_undefined(const std::vector<Tensor>& parts) {
  return parts.empty() || !parts.front().defined() ? Tensor() : at::cat(parts, 0);
}

}  // namespace

Tensor bn_add_relu_gated(const Kernels& k, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
                         const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act,
                         const Tensor& gate) {
  const Folded f = fold(y, scale, shift, res_scale, res_shift, gate);
  const Tensor res = has(residual) ? residual->to(y.scalar_type()) : Tensor();
  if (!per_sample(y)) {
    return bn_add_relu(k, wide(y), f.scale, opt(f.shift), res.defined() ? OptTensor(wide(res)) : std::nullopt,
                       opt(f.res_scale), opt(f.res_shift), act)
        .view(y.sizes());
  }
  const int64_t c = y.size(1);
  std::vector<Tensor> outs;
  for (int64_t i = 0; i < y.size(0); ++i) {
    outs.push_back(bn_add_relu(k, y.narrow(0, i, 1), slice(f.scale, i, c), slice(f.shift, i, c),
                               res.defined() ? OptTensor(res.narrow(0, i, 1)) : std::nullopt,
                               slice(f.res_scale, i, c), slice(f.res_shift, i, c), act));
  }
  return at::cat(outs, 0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_gated_backward(
    const Kernels& k, const Tensor& grad_out, const Tensor& y, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act,
    std::array<bool, 4> output_mask, const Tensor& gate) {
  const int64_t n = y.size(0), c = y.size(1);
  const Folded f = fold(y, scale, shift, res_scale, res_shift, gate);
  const Tensor res = has(residual) ? residual->to(y.scalar_type()) : Tensor();
  // The per-(sample, channel) gradients: sum(dz*y) and sum(dz) give those of scale, shift and gate;
  // the residual's sums are reduced over the samples.
  Tensor gy, gsy, gsz, gres, gsr, gsrz;
  if (!per_sample(y)) {
    const Tensor go = grad_out.to(y.scalar_type());
    std::tie(gy, gsy, gsz, gres, gsr, gsrz) = bn_add_relu_backward(
        k, wide(go), wide(y), f.scale, opt(f.shift), res.defined() ? OptTensor(wide(res)) : std::nullopt,
        opt(f.res_scale), opt(f.res_shift), act, output_mask);
    if (gy.defined()) gy = gy.view(y.sizes());
    if (gres.defined()) gres = gres.view(y.sizes());
  } else {
    std::vector<Tensor> parts[6];
    for (int64_t i = 0; i < n; ++i) {
      auto g = bn_add_relu_backward(k, grad_out.narrow(0, i, 1), y.narrow(0, i, 1), slice(f.scale, i, c),
                                    slice(f.shift, i, c), res.defined() ? OptTensor(res.narrow(0, i, 1)) : std::nullopt,
                                    slice(f.res_scale, i, c), slice(f.res_shift, i, c), act, output_mask);
      parts[0].push_back(std::get<0>(g));
      parts[1].push_back(std::get<1>(g));
      parts[2].push_back(std::get<2>(g));
      parts[3].push_back(std::get<3>(g));
      parts[4].push_back(std::get<4>(g));
      parts[5].push_back(std::get<5>(g));
    }
    gy = cat_or_undefined(parts[0]);
    gsy = cat_or_undefined(parts[1]);
    gsz = cat_or_undefined(parts[2]);
    gres = cat_or_undefined(parts[3]);
    gsr = cat_or_undefined(parts[4]);
    gsrz = cat_or_undefined(parts[5]);
  }
  Tensor gscale, gshift, ggate;
  if (output_mask[1]) {
    const Tensor sum_dz_y = gsy.view({n, c});  // the folded scale is always given: defined
    const Tensor sum_dz = gsz.defined() ? gsz.view({n, c}) : Tensor();
    if (has(scale)) gscale = (sum_dz_y * f.gate).sum(0);
    if (has(shift)) gshift = (sum_dz * f.gate).sum(0);
    // d out / d gate[n, c] = sum over the plane of dz * (y * scale + shift)
    Tensor gg = has(scale) ? sum_dz_y * scale->to(at::kFloat) : sum_dz_y;
    if (has(shift)) gg = gg + sum_dz * shift->to(at::kFloat);
    ggate = gg.reshape(gate.sizes()).to(gate.scalar_type());
  }
  const Tensor gres_scale = gsr.defined() ? gsr.view({n, c}).sum(0) : Tensor();
  const Tensor gres_shift = gsrz.defined() ? gsrz.view({n, c}).sum(0) : Tensor();
  return {gy, gscale, gshift, gres, gres_scale, gres_shift, ggate};
}

}  // namespace fused_resnet_native
