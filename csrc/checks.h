// Argument checks of the public ops, run before any backend's kernel: bad input gets the error
// nn.Conv2d / nn.BatchNorm2d users know (the same messages and exception types as
// fused_resnet/_checks.py, which the ops' fakes run under torch.compile and export).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace fused_resnet_native::checks {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

inline at::ScalarType stat_dtype(at::ScalarType activation) {
  return activation == at::kDouble ? at::kDouble : at::kFloat;
}

inline void activation(const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "fused_resnet: expected 4-D (N, C, H, W) ", name, ", got shape ", t.sizes());
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, "fused_resnet: ",
                   name, " has dtype ", dtype_name(d), "; supported: float16, bfloat16, float32, float64");
}

inline void same(const char* name, const Tensor& t, const Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), "fused_resnet: ", name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device(), "; move them to one device");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fused_resnet: ", like_name, " type (",
              dtype_name(like.scalar_type()), ") and ", name, " type (", dtype_name(t.scalar_type()),
              ") should be the same");
}

inline void per_channel(const char* name, const OptTensor& t, int64_t channels, const Tensor& act) {
  if (!has(t)) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, "fused_resnet: ", name, " must have shape (", channels,
              ",), got ", t->sizes());
  const auto expected = stat_dtype(act.scalar_type());
  TORCH_CHECK(t->scalar_type() == expected && t->device() == act.device(), "fused_resnet: ", name, " must be ",
              dtype_name(expected), " on ", act.device(), " for ", dtype_name(act.scalar_type()),
              " activations, got ", dtype_name(t->scalar_type()), " on ", t->device());
}

// An activation code (kernels.h: 0 none, 1 ReLU, 2 ReLU6, 3 SiLU, 4 Hardswish, 5 LeakyReLU(0.01),
// 6 LeakyReLU(0.1)).
inline void act(const char* name, int64_t code) {
  TORCH_CHECK_VALUE(code >= 0 && code < kActCount, "fused_resnet: ", name,
                    " must be an activation code (0 none, 1 relu, 2 relu6, 3 silu, 4 hardswish, 5 leaky_relu,"
                    " 6 leaky_relu_0.1), got ", code);
}

inline std::vector<int64_t> conv_output_size(const Tensor& x, const Tensor& w, c10::IntArrayRef stride,
                                             c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  std::vector<int64_t> out{x.size(0), w.size(0), 0, 0};
  for (int d = 0; d < 2; ++d) {
    out[d + 2] = (x.size(d + 2) + 2 * padding[d] - dilation[d] * (w.size(d + 2) - 1) - 1) / stride[d] + 1;
  }
  return out;
}

inline void conv(const Tensor& x, const Tensor& w, c10::IntArrayRef stride, c10::IntArrayRef padding,
                 c10::IntArrayRef dilation, int64_t groups) {
  activation("input", x);
  same("weight", w, x, "input");
  TORCH_CHECK(w.dim() == 4, "fused_resnet: expected 4-D conv weight, got shape ", w.sizes());
  TORCH_CHECK(groups >= 1 && x.size(1) == w.size(1) * groups && w.size(0) % groups == 0,
              "fused_resnet: conv weight of shape ", w.sizes(), " with groups=", groups, " expects ",
              w.size(1) * groups, " input channels, but got input of shape ", x.sizes());
  const bool valid = stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 &&
                     stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0;
  TORCH_CHECK(valid, "fused_resnet: invalid conv stride ", stride, ", padding ", padding, " or dilation ", dilation);
  for (int d = 2; d < 4; ++d) {
    const int64_t k = dilation[d - 2] * (w.size(d) - 1) + 1;
    TORCH_CHECK(x.size(d) + 2 * padding[d - 2] >= k, "fused_resnet: input of shape ", x.sizes(),
                " is smaller than the (dilated) kernel ", k, " after padding ", padding);
  }
}

inline void residual(const OptTensor& r, const Tensor& like, c10::IntArrayRef shape) {
  if (!has(r)) return;
  same("residual", *r, like, "main branch");
  TORCH_CHECK(r->sizes() == shape, "fused_resnet: residual of shape ", r->sizes(), " does not match the main branch ",
              shape, "; a downsample module is needed when stride or channels change");
}

// bn_add_relu's gate: a per-(sample, channel) factor of shape (N, C) or (N, C, 1, 1), in the
// activation's dtype or its statistics dtype, on its device.
inline void gate(const OptTensor& g, const Tensor& y) {
  if (!has(g)) return;
  const bool shaped = (g->dim() == 2 || (g->dim() == 4 && g->size(2) == 1 && g->size(3) == 1)) &&
                      g->size(0) == y.size(0) && g->size(1) == y.size(1);
  TORCH_CHECK(shaped, "fused_resnet: gate must have shape (", y.size(0), ", ", y.size(1), ") or (", y.size(0), ", ",
              y.size(1), ", 1, 1) (per sample and channel), got ", g->sizes());
  TORCH_CHECK(g->device() == y.device(), "fused_resnet: gate is on ", g->device(), " but input is on ", y.device());
  TORCH_CHECK(g->scalar_type() == y.scalar_type() || g->scalar_type() == stat_dtype(y.scalar_type()),
              "fused_resnet: gate must be ", dtype_name(y.scalar_type()), " or ",
              dtype_name(stat_dtype(y.scalar_type())), " for ", dtype_name(y.scalar_type()), " activations, got ",
              dtype_name(g->scalar_type()));
}

}  // namespace fused_resnet_native::checks
