// Device-generic implementation of the native ops (see fused_ops.h): ATen's convolution plus the
// device's fused kernels for everything around it. (Their fake implementations, for FakeTensor,
// torch.compile and opcheck, are those of the public ops: fused_resnet/backends/native/_fakes.py.)
#include "fused_ops.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include <ATen/Functions.h>
#include <ATen/TensorOperators.h>

namespace fused_resnet_native {
namespace {

bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// The layout rule of fused_resnet/_layout.py: channels_last iff the main input is, and not also
// NCHW-contiguous.
bool is_nhwc(const Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// ATen's CPU convolution backward (oneDNN) corrupts memory for some 1x1 strided convolutions of
// channels_last inputs (torch 2.13 and 2.14; eager conv2d's backward too; fused_resnet/_conv_backward.py
// says more). Unpadded and ungrouped (a ResNet's downsample), such a conv is a 1x1 stride-1 conv of
// the input's every s-th pixel, i.e. a matrix product over channels on those rows: its backward here
// is two products, grad_w = g^T a_sub and grad_a_sub = g w, scattered into a zero grad_a. That avoids
// both oneDNN's bug and the NCHW detour, whose three layout transposes of full activations cost more
// than the products (~1 ms each at a CIFAR ResNet's 32x16x32x32, 2-3% of its training step).
// Otherwise (padded, grouped) the backward runs on NCHW copies, where ATen is right.
std::tuple<Tensor, Tensor> strided_pointwise_backward(const Tensor& g, const Tensor& a, const Tensor& w,
                                                      IntList stride, bool need_input, bool need_w) {
  const int64_t cin = a.size(1), cout = w.size(0);
  const Tensor a_sub = a.slice(2, 0, a.size(2), stride[0]).slice(3, 0, a.size(3), stride[1]);
  TORCH_CHECK(a_sub.size(2) == g.size(2) && a_sub.size(3) == g.size(3),
              "fused_resnet_native: strided 1x1 conv backward: gradient of unexpected size");
  // channels_last [N, C, H, W] is [N, H, W, C] in memory: rows of channels.
  const Tensor g_rows = g.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, cout});
  const Tensor w_mat = w.reshape({cout, cin});
  Tensor grad_a, grad_w;
  if (need_w) {
    const Tensor a_rows = a_sub.permute({0, 2, 3, 1}).reshape({-1, cin});  // a copy: every s-th pixel
    grad_w = at::mm(g_rows.t(), a_rows).reshape({cout, cin, 1, 1});
  }
  if (need_input) {
    grad_a = at::zeros_like(a, at::MemoryFormat::ChannelsLast);
    const Tensor rows = at::mm(g_rows, w_mat);  // [N * Ho * Wo, Cin]
    grad_a.slice(2, 0, a.size(2), stride[0])
        .slice(3, 0, a.size(3), stride[1])
        .copy_(rows.view({g.size(0), g.size(2), g.size(3), cin}).permute({0, 3, 1, 2}));
  }
  return {grad_a, grad_w};
}

std::tuple<Tensor, Tensor> conv_backward(const Tensor& g, const Tensor& a, const Tensor& w, IntList stride,
                                         IntList padding, IntList dilation, int64_t groups, bool need_input,
                                         bool need_w) {
  const bool nchw_only = a.device().is_cpu() && w.size(2) == 1 && w.size(3) == 1 &&
                         (stride[0] > 1 || stride[1] > 1) && !a.is_contiguous();
  if (nchw_only && groups == 1 && padding[0] == 0 && padding[1] == 0 &&
      a.is_contiguous(at::MemoryFormat::ChannelsLast))
    return strided_pointwise_backward(g, a, w, stride, need_input, need_w);
  auto [gi, gw, unused] = at::convolution_backward(nchw_only ? g.contiguous() : g, nchw_only ? a.contiguous() : a,
                                                   nchw_only ? w.contiguous() : w, std::nullopt, stride, padding,
                                                   dilation, false, {0, 0}, groups, {need_input, need_w, false});
  return {gi, gw};
}

at::MemoryFormat format(bool nhwc) { return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }

Tensor dense(const Tensor& t, bool nhwc) { return t.contiguous(format(nhwc)); }

// A prologue's input as the kernels read it, with its batch stride (0: dense). A channel prefix
// x[:, :C] of a dense NCHW tensor (a DenseNet layer's input, a slice of the block's feature
// buffer) keeps every (n, c) plane dense: kernels with Kernels::strided_nchw_y read it in place
// rather than through a dense copy the prologue would only read once more (twice in backward).
std::pair<Tensor, int64_t> prologue_input(const Kernels& k, const Tensor& x, bool nhwc) {
  if (k.strided_nchw_y && !nhwc && x.dim() == 4 && !x.is_contiguous()) {
    const int64_t hw = x.size(2) * x.size(3);
    if (x.stride(3) == 1 && x.stride(2) == x.size(3) && x.stride(1) == hw && x.stride(0) > x.size(1) * hw)
      return {x, x.stride(0)};
  }
  return {dense(x, nhwc), 0};
}

DType tag(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fused_resnet_native: unsupported dtype ", t.scalar_type(),
                  " (float32, bfloat16, float16; the reference backend handles float64)");
  }
}

Shape shape_of(const Tensor& t, bool nhwc) {
  TORCH_CHECK(t.dim() == 4, "fused_resnet_native: expected a 4-D activation, got ", t.sizes());
  return Shape{t.size(0), t.size(1), t.size(2) * t.size(3), nhwc};
}

const void* cptr(const Tensor& t) { return t.const_data_ptr(); }
void* mptr(const Tensor& t) { return t.mutable_data_ptr(); }
float* fptr(const Tensor& t) { return static_cast<float*>(mptr(t)); }

// Keeps the dense fp32 copies of per-channel vectors alive while a kernel reads them.
struct PerChannel {
  std::vector<Tensor> keep;
  const float* operator()(const OptTensor& t) {
    if (!has(t)) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1,
                "fused_resnet_native: per-channel tensors must be 1-D float32, got ", t->scalar_type(), " ",
                t->sizes());
    keep.push_back(t->contiguous());
    return static_cast<const float*>(cptr(keep.back()));
  }
};

at::ScalarType conv_dtype(const Kernels& k, at::ScalarType t) {
  return (k.half_conv_in_fp32 && (t == at::kBFloat16 || t == at::kHalf)) ? at::kFloat : t;
}

// Tests set FUSED_RESNET_NATIVE_POISON=1 to fill every output with NaN before a kernel writes it,
// so that an element a kernel fails to write cannot pass for a correct one.
Tensor maybe_poison(Tensor t) {
  static const char* const name = "FUSED_RESNET_NATIVE_POISON";
  const char* v = std::getenv(name);
  if (v != nullptr && v[0] == '1') t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

Tensor empty_act(const Tensor& like, at::ScalarType dtype, bool nhwc) {
  return maybe_poison(at::empty(like.sizes(), like.options().dtype(dtype).memory_format(format(nhwc))));
}

Tensor empty_channels(const Tensor& like, int64_t c) {
  return maybe_poison(at::empty({c}, like.options().dtype(at::kFloat)));
}

Tensor workspace(const Kernels& k, const Shape& s, const Tensor& like) {
  return at::empty({std::max<int64_t>(k.workspace_floats(s), 1)}, like.options().dtype(at::kFloat));
}

bool identity_prologue(const OptTensor& s, const OptTensor& b, int64_t act) { return !has(s) && !has(b) && act == kActNone; }

// act(x * s + b) in the convolution's dtype: a transient, freed once the conv has read it.
// `x_batch_stride` as prologue_input returns it.
Tensor prologue(const Kernels& k, const Tensor& x, int64_t x_batch_stride, const OptTensor& s, const OptTensor& b,
                int64_t act, at::ScalarType cdt, bool nhwc) {
  if (identity_prologue(s, b, act)) return dense(x, nhwc).to(cdt);
  Tensor a = empty_act(x, cdt, nhwc);
  PerChannel pc;
  ApplyArgs args;
  args.shape = shape_of(x, nhwc);
  args.y = cptr(x);
  args.y_dtype = tag(x);
  args.y_batch_stride = x_batch_stride;
  args.scale = pc(s);
  args.shift = pc(b);
  args.out = mptr(a);
  args.out_dtype = tag(a);
  args.act = static_cast<int>(act);
  if (args.shape.numel() > 0) k.apply(args);
  return a;
}

Tensor convolution(const Tensor& a, const Tensor& weight, IntList stride, IntList padding, IntList dilation,
                   int64_t groups) {
  return at::convolution(a, weight.to(a.scalar_type()), std::nullopt, stride, padding, dilation, false, {0, 0},
                         groups);
}

std::tuple<Tensor, Tensor> batch_stats(const Kernels& k, const Tensor& y, bool nhwc) {
  Shape s = shape_of(y, nhwc);
  Tensor mean = empty_channels(y, s.c), var = empty_channels(y, s.c);
  if (s.per_channel() == 0) {  // as torch.var_mean of an empty tensor
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  Tensor ws = workspace(k, s, y);
  StatsArgs args;
  args.shape = s;
  args.y = cptr(y);
  args.dtype = tag(y);
  args.mean = fptr(mean);
  args.var = fptr(var);
  args.workspace = fptr(ws);
  k.stats(args);
  return {mean, var};
}

Tensor zeros_if_empty(const Tensor& t, const Tensor& like, int64_t c) {
  return (t.defined() && t.numel() > 0) ? t.to(at::kFloat) : at::zeros({c}, like.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> conv_stats(const Kernels& k, const Tensor& x_, const OptTensor& in_scale,
                                              const OptTensor& in_shift, int64_t in_act, const Tensor& weight,
                                              IntList stride, IntList padding, IntList dilation, int64_t groups) {
  const bool nhwc = is_nhwc(x_);
  const auto [x, x_stride] = prologue_input(k, x_, nhwc);
  tag(x);
  Tensor a = prologue(k, x, x_stride, in_scale, in_shift, in_act, conv_dtype(k, x.scalar_type()), nhwc);
  Tensor y = dense(convolution(a, weight, stride, padding, dilation, groups).to(x.scalar_type()), nhwc);
  auto [mean, var] = batch_stats(k, y, nhwc);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_stats_backward(
    const Kernels& k, const Tensor& grad_y, const Tensor& grad_mean, const Tensor& grad_var, const Tensor& x,
    const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act, const Tensor& weight, const Tensor& y,
    const Tensor& mean, IntList stride, IntList padding, IntList dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const int64_t c = y.size(1);
  const double count = static_cast<double>(std::max<int64_t>(y.numel() / std::max<int64_t>(c, 1), 1));
  return conv_stats_backward_folded(k, grad_y, zeros_if_empty(grad_mean, y, c) / count,
                                    zeros_if_empty(grad_var, y, c) * (2.0 / count), x, in_scale, in_shift, in_act,
                                    weight, y, mean, stride, padding, dilation, groups, output_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_stats_backward_folded(
    const Kernels& k, const Tensor& grad_y, const Tensor& g_shift, const Tensor& g_scale, const Tensor& x_,
    const OptTensor& in_scale, const OptTensor& in_shift, int64_t in_act, const Tensor& weight, const Tensor& y_,
    const Tensor& mean, IntList stride, IntList padding, IntList dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const auto [need_x, need_affine, need_w] = output_mask;
  const bool nhwc = is_nhwc(x_);
  const auto [x, x_stride] = prologue_input(k, x_, nhwc);
  const Tensor y = dense(y_, nhwc);
  const at::ScalarType cdt = conv_dtype(k, x.scalar_type());
  const Shape ys = shape_of(y, nhwc);

  // g = grad_y + g_shift + g_scale * (y - mean): one pass, straight into the conv dtype.
  PerChannel pc;
  Tensor g = empty_act(y, cdt, nhwc);
  Tensor gy = dense(grad_y.to(y.scalar_type()), nhwc);
  ApplyArgs args;
  args.shape = ys;
  args.y = cptr(y);
  args.y_dtype = tag(y);
  args.centre = pc(mean);
  args.scale = pc(g_scale);
  args.shift = pc(g_shift);
  args.res = cptr(gy);
  args.res_dtype = tag(gy);
  args.out = mptr(g);
  args.out_dtype = tag(g);
  if (ys.numel() > 0) k.apply(args);

  Tensor a = prologue(k, x, x_stride, in_scale, in_shift, in_act, cdt, nhwc);
  const bool need_input = need_x || need_affine;
  auto [grad_a, grad_w] = conv_backward(g, a, weight.to(cdt), stride, padding, dilation, groups, need_input, need_w);
  a.reset();
  g.reset();
  Tensor grad_x, grad_scale, grad_shift;
  if (need_input && identity_prologue(in_scale, in_shift, in_act)) {
    if (need_x) grad_x = dense(grad_a.to(x.scalar_type()), nhwc);
  } else if (need_input) {
    // The prologue's backward: the activation's derivative at the recomputed x * in_scale + in_shift,
    // grad_x = dz * in_scale, and the per-channel sums for in_scale / in_shift, in one pass over grad_a and x.
    Tensor ga = dense(grad_a, nhwc);
    Shape xs = shape_of(x, nhwc);
    if (need_x) grad_x = empty_act(x, x.scalar_type(), nhwc);
    if (need_affine && has(in_scale)) grad_scale = empty_channels(x, xs.c);
    if (need_affine && has(in_shift)) grad_shift = empty_channels(x, xs.c);
    Tensor ws = workspace(k, xs, x);
    ApplyBackwardArgs b;
    b.shape = xs;
    b.grad = cptr(ga);
    b.grad_dtype = tag(ga);
    b.y = cptr(x);
    b.y_dtype = tag(x);
    b.y_batch_stride = x_stride;
    b.scale = pc(in_scale);
    b.shift = pc(in_shift);
    b.act = static_cast<int>(in_act);
    if (grad_x.defined()) {
      b.grad_y = mptr(grad_x);
      b.grad_y_dtype = tag(grad_x);
    }
    if (grad_scale.defined()) b.sum_dz_y = fptr(grad_scale);
    if (grad_shift.defined()) b.sum_dz = fptr(grad_shift);
    b.workspace = fptr(ws);
    if (xs.numel() > 0) {
      k.apply_backward(b);
    } else {
      if (grad_scale.defined()) grad_scale.zero_();
      if (grad_shift.defined()) grad_shift.zero_();
    }
  }
  // The weight's gradient in the weight's own dtype and layout, as autograd accumulates it.
  grad_w = need_w ? grad_w.to(weight.scalar_type()).contiguous(weight.suggest_memory_format()) : Tensor();
  return {grad_x, grad_scale, grad_shift, grad_w};
}

Tensor bn_add_relu(const Kernels& k, const Tensor& y_, const OptTensor& scale, const OptTensor& shift,
                   const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act) {
  const bool nhwc = is_nhwc(y_);
  const Tensor y = dense(y_, nhwc);
  Tensor res = has(residual) ? dense(residual->to(y.scalar_type()), nhwc) : Tensor();
  Tensor out = empty_act(y, y.scalar_type(), nhwc);
  PerChannel pc;
  ApplyArgs args;
  args.shape = shape_of(y, nhwc);
  args.y = cptr(y);
  args.y_dtype = tag(y);
  args.scale = pc(scale);
  args.shift = pc(shift);
  if (res.defined()) {
    args.res = cptr(res);
    args.res_dtype = tag(res);
    args.res_scale = pc(res_scale);
    args.res_shift = pc(res_shift);
  }
  args.out = mptr(out);
  args.out_dtype = tag(out);
  args.act = static_cast<int>(act);
  if (args.shape.numel() > 0) k.apply(args);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_backward(
    const Kernels& k, const Tensor& grad_out, const Tensor& y_, const OptTensor& scale, const OptTensor& shift,
    const OptTensor& residual, const OptTensor& res_scale, const OptTensor& res_shift, int64_t act,
    std::array<bool, 4> output_mask) {
  const auto [need_y, need_affine, need_res, need_res_affine] = output_mask;
  const bool nhwc = is_nhwc(y_);
  const Tensor y = dense(y_, nhwc);
  const Tensor go = dense(grad_out.to(y.scalar_type()), nhwc);
  const bool with_res = has(residual);
  const Tensor res = with_res ? dense(residual->to(y.scalar_type()), nhwc) : Tensor();
  const Shape s = shape_of(y, nhwc);
  Tensor gy, gscale, gshift, gres, gres_scale, gres_shift;
  if (need_y) gy = empty_act(y, y.scalar_type(), nhwc);
  if (need_affine && has(scale)) gscale = empty_channels(y, s.c);
  if (need_affine && has(shift)) gshift = empty_channels(y, s.c);
  if (with_res && need_res) gres = empty_act(y, y.scalar_type(), nhwc);
  if (with_res && need_res_affine && has(res_scale)) gres_scale = empty_channels(y, s.c);
  // sum(dz) is both shifts' gradient: computed once.
  const bool want_sum_dz = gshift.defined() || (with_res && need_res_affine && has(res_shift));
  Tensor sum_dz = gshift.defined() ? gshift : (want_sum_dz ? empty_channels(y, s.c) : Tensor());

  PerChannel pc;
  ApplyBackwardArgs b;
  b.shape = s;
  b.grad = cptr(go);
  b.grad_dtype = tag(go);
  b.y = cptr(y);
  b.y_dtype = tag(y);
  b.scale = pc(scale);
  b.shift = pc(shift);
  if (with_res) {
    b.res = cptr(res);
    b.res_scale = pc(res_scale);
    b.res_shift = pc(res_shift);
  }
  b.act = static_cast<int>(act);
  if (gy.defined()) {
    b.grad_y = mptr(gy);
    b.grad_y_dtype = tag(gy);
  }
  if (gres.defined()) b.grad_res = mptr(gres);
  if (gscale.defined()) b.sum_dz_y = fptr(gscale);
  if (sum_dz.defined()) b.sum_dz = fptr(sum_dz);
  if (gres_scale.defined()) b.sum_dz_res = fptr(gres_scale);
  Tensor ws = workspace(k, s, y);
  b.workspace = fptr(ws);
  if (s.numel() > 0) {
    k.apply_backward(b);
  } else {
    for (Tensor* t : {&gscale, &sum_dz, &gres_scale}) {
      if (t->defined()) t->zero_();
    }
  }
  if (with_res && need_res_affine && has(res_shift)) gres_shift = gshift.defined() ? sum_dz.clone() : sum_dz;
  return {gy, gscale, gshift, gres, gres_scale, gres_shift};
}

Tensor conv_bias_act(const Kernels& k, const Tensor& x_, const Tensor& weight, const OptTensor& bias,
                     const OptTensor& residual, IntList stride, IntList padding, IntList dilation, int64_t groups,
                     int64_t act) {
  const bool nhwc = is_nhwc(x_);
  const Tensor x = dense(x_, nhwc);
  tag(x);
  const at::ScalarType cdt = conv_dtype(k, x.scalar_type());
  Tensor y = dense(convolution(x.to(cdt), weight, stride, padding, dilation, groups), nhwc);
  if (!has(bias) && !has(residual) && act == kActNone) return y.to(x.scalar_type());
  // The epilogue: bias, residual and activation in one pass, in place when the conv ran in x's dtype.
  Tensor out = y.scalar_type() == x.scalar_type() ? y : empty_act(y, x.scalar_type(), nhwc);
  Tensor res = has(residual) ? dense(residual->to(x.scalar_type()), nhwc) : Tensor();
  PerChannel pc;
  ApplyArgs args;
  args.shape = shape_of(y, nhwc);
  args.y = cptr(y);
  args.y_dtype = tag(y);
  args.shift = pc(bias);
  if (res.defined()) {
    args.res = cptr(res);
    args.res_dtype = tag(res);
  }
  args.out = mptr(out);
  args.out_dtype = tag(out);
  args.act = static_cast<int>(act);
  if (args.shape.numel() > 0) k.apply(args);
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_bias_act_backward(
    const Kernels& k, const Tensor& grad_out, const Tensor& x_, const Tensor& weight, const Tensor& out_, int64_t act,
    IntList stride, IntList padding, IntList dilation, int64_t groups, std::array<bool, 4> output_mask) {
  const auto [need_x, need_w, need_bias, need_res] = output_mask;
  const bool nhwc = is_nhwc(x_);
  const Tensor x = dense(x_, nhwc);
  const at::ScalarType cdt = conv_dtype(k, x.scalar_type());
  const bool nhwc_out = nhwc;  // the output followed x's layout
  const Tensor out = dense(out_, nhwc_out);
  const Tensor go = dense(grad_out.to(out.scalar_type()), nhwc_out);
  const Shape s = shape_of(out, nhwc_out);
  Tensor dz, grad_bias, grad_res;
  if (need_bias) grad_bias = empty_channels(out, s.c);
  if (need_res) grad_res = empty_act(out, out.scalar_type(), nhwc_out);
  const bool need_conv = need_x || need_w;
  if (act == kActNone && !need_bias && !need_res) {
    dz = go.to(cdt);
  } else {
    // dz = act_bwd(grad_out, out) (`out`: the output for ReLU/ReLU6/LeakyReLU, the pre-activation for
    // SiLU/Hardswish; see csrc/autograd.cpp), written once in the conv's dtype (and once as the
    // residual's gradient), with sum(dz) for the bias, in one pass.
    if (need_conv) dz = empty_act(out, cdt, nhwc_out);
    PerChannel pc;
    ApplyBackwardArgs b;
    b.shape = s;
    b.grad = cptr(go);
    b.grad_dtype = tag(go);
    b.y = cptr(out);
    b.y_dtype = tag(out);
    b.act = static_cast<int>(act);
    if (dz.defined()) {
      b.grad_y = mptr(dz);
      b.grad_y_dtype = tag(dz);
    }
    if (grad_res.defined()) b.grad_res = mptr(grad_res);
    if (grad_bias.defined()) b.sum_dz = fptr(grad_bias);
    Tensor ws = workspace(k, s, out);
    b.workspace = fptr(ws);
    if (s.numel() > 0) k.apply_backward(b);
    else if (grad_bias.defined()) grad_bias.zero_();
  }
  Tensor grad_x, grad_w;
  if (need_conv) {
    auto [gx, gw] = conv_backward(dz, x.to(cdt), weight.to(cdt), stride, padding, dilation, groups, need_x, need_w);
    if (need_x) grad_x = dense(gx.to(x.scalar_type()), nhwc);
    if (need_w) grad_w = gw.to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  }
  return {grad_x, grad_w, grad_bias, grad_res};
}

}  // namespace fused_resnet_native
