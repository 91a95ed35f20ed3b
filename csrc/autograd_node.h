// What every autograd node of the public ops shares (autograd.cpp): the conv arguments and the
// backend a node records at forward, and the steps of ATen's generated autograd kernels
// (torch/csrc/autograd/generated/VariableType*.cpp) that a hand-written node repeats.
#pragma once

#include <type_traits>

#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "router.h"

namespace fused_resnet_native::autograd {

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;
using IntList = c10::IntArrayRef;

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A new node as the torch being built holds nodes: intrusive_ptr since torch 2.13 (checked on
// 2.13 and 2.14), shared_ptr before (both branches depend on N, so only the taken one compiles).
template <class N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, Node>) {
    return c10::make_intrusive<N>();
  } else {
    return std::make_shared<N>();
  }
}
template <class N>
using NodePtr = decltype(make_node<N>());

// What torch::autograd::Function refused is refused here too, rather than silently dropped: a
// functorch transform (it has no rule for these ops) and forward-mode AD (no forward formula).
inline bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
inline bool has_tangent(const OptTensor& t) { return t.has_value() && has_tangent(*t); }
template <class... T>
void check_supported(const char* op_name, const T&... inputs) {
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) functorch->checkSupportsCppAutogradFunction();
  TORCH_CHECK_NOT_IMPLEMENTED(!(has_tangent(inputs) || ...), "fused_resnet::", op_name,
                              " has no forward-mode (jvp) derivative");
}

// The conv arguments and the backend of the forward, which the backward op gets again: the
// backend recorded here because autograd runs CUDA backward passes on its own threads, which do
// not see the caller's use_backend (docs/design.md, decision 3). Inline storage: no allocation.
struct ConvArgs {
  c10::SmallVector<int64_t, 2> stride, padding, dilation;
  int64_t groups = 1;
  int backend = router::kAuto;
  void set(IntList st, IntList p, IntList d, int64_t g) {
    stride.assign(st.begin(), st.end());
    padding.assign(p.begin(), p.end());
    dilation.assign(d.begin(), d.end());
    groups = g;
    backend = router::requested();
  }
};

// A gradient the loss does not reach comes undefined: zeros in the output's shape and dtype, as
// torch::autograd::Function made them (the backward ops take every gradient defined).
inline Tensor or_zeros(const Node& node, const Tensor& grad, size_t output) {
  return grad.defined() ? grad : node.input_metadata(output).zeros_like();
}
inline OptTensor optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
inline Tensor if_needed(const Tensor& grad, bool needed) { return needed ? grad : Tensor(); }

}  // namespace fused_resnet_native::autograd
