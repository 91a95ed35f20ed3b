// conv_bias_act through oneDNN's post-ops with cached weight reorders (see onednn_conv.h).
//
// ATen exposes oneDNN's fused convolution as the ops mkldnn::_convolution_pointwise (unary post-op)
// and its .binary overload (add a tensor, then an optional unary post-op), and the weight reorder as
// mkldnn::_reorder_convolution_weight: the ops torch.compile's CPU freezing pass uses. They are
// looked up and called boxed through the dispatcher, so nothing here depends on their C++ signature
// (which has changed between torch versions) and a torch built without oneDNN simply has no path.
#include "onednn_conv.h"

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <c10/util/intrusive_ptr.h>

namespace fused_resnet_native::cpu {
namespace {

struct OneDnnOps {
  std::optional<c10::OperatorHandle> unary, binary, reorder;
  bool available() const { return unary && binary && reorder; }
};

// The op, if this torch has it with a CPU kernel and the number of arguments it had from torch 2.0
// to 2.13 (another would mean another schema: the path is then off, not called wrongly).
std::optional<c10::OperatorHandle> cpu_op(const char* name, const char* overload, size_t arguments) {
  auto op = c10::Dispatcher::singleton().findSchema({name, overload});
  if (op && op->hasKernelForDispatchKey(c10::DispatchKey::CPU) && op->schema().arguments().size() == arguments) {
    return op;
  }
  return std::nullopt;
}

const OneDnnOps& onednn_ops() {
  static const OneDnnOps ops = [] {
    OneDnnOps o;
    if (!at::hasMKLDNN()) return o;
    o.unary = cpu_op("mkldnn::_convolution_pointwise", "", 10);
    o.binary = cpu_op("mkldnn::_convolution_pointwise", "binary", 13);
    o.reorder = cpu_op("mkldnn::_reorder_convolution_weight", "", 6);
    return o;
  }();
  return ops;
}

Tensor call(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

std::vector<int64_t> vec(IntList v) { return v.vec(); }

// A reordered weight is valid while the tensor it came from is alive, still has the same storage,
// has not been written in place (its version counter moves on every in-place write, through any
// view) and the convolution geometry is the same. The weak references make a dead tensor's entry
// a miss even if a new tensor is later allocated at the same address.
struct PackedWeight {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> source;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  uint32_t version = 0;
  std::vector<int64_t> geometry;
  Tensor packed;  // undefined until the weight is seen a second time, unchanged
};

// Bounds the entries of tensors that die without being looked up again: each insert sweeps the
// dead ones, and past this many live ones the cache starts over.
constexpr size_t kMaxEntries = 4096;

std::mutex cache_mutex;
std::unordered_map<const c10::TensorImpl*, PackedWeight>& cache() {
  static auto* entries = new std::unordered_map<const c10::TensorImpl*, PackedWeight>();  // never destroyed:
  return *entries;  // a static destructor could run after torch's allocators are gone
}

std::vector<int64_t> geometry_of(const Tensor& w, at::MemoryFormat format, IntList stride, IntList padding,
                                 IntList dilation, int64_t groups) {
  std::vector<int64_t> g;
  for (IntList part : {w.sizes(), w.strides(), stride, padding, dilation}) {
    g.insert(g.end(), part.begin(), part.end());
    g.push_back(-1);  // separator: parts of different lengths cannot collide
  }
  g.push_back(w.storage_offset());
  g.push_back(groups);
  g.push_back(static_cast<int64_t>(w.scalar_type()));
  g.push_back(static_cast<int64_t>(format));
  return g;
}

bool matches(const PackedWeight& e, const Tensor& w, uint32_t version, const std::vector<int64_t>& geometry) {
  return !e.source.expired() && !e.storage.expired() &&
         e.storage._unsafe_get_target() == w.storage().unsafeGetStorageImpl() && e.version == version &&
         e.geometry == geometry;
}

// `w` reordered for an input `x` of layout `format`, or undefined the first time this weight (in
// this version and geometry) is seen. A weight is reordered only when it comes back unchanged:
// one that is new on every call (folded inside a torch.compile graph, say) would pay the reorder
// and oneDNN's per-call setup each time for nothing, so it keeps the generic path. The entry is
// kept under `w` itself, not under the dense copy in `format` that is reordered (a new tensor on
// every call).
Tensor packed_weight(const OneDnnOps& ops, const Tensor& w, at::MemoryFormat format, const Tensor& x, IntList stride,
                     IntList padding, IntList dilation, int64_t groups) {
  const uint32_t version = w.unsafeGetTensorImpl()->version_counter().current_version();
  std::vector<int64_t> geometry = geometry_of(w, format, stride, padding, dilation, groups);
  const c10::TensorImpl* key = w.unsafeGetTensorImpl();
  std::unique_lock<std::mutex> lock(cache_mutex);
  auto& entries = cache();
  auto it = entries.find(key);
  if (it == entries.end() || !matches(it->second, w, version, geometry)) {
    for (auto e = entries.begin(); e != entries.end();) {
      e = e->second.source.expired() ? entries.erase(e) : std::next(e);
    }
    if (entries.size() >= kMaxEntries) entries.clear();
    entries.insert_or_assign(key, PackedWeight{
        c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(w.getIntrusivePtr()),
        w.storage().getWeakStorageImpl(), version, std::move(geometry), Tensor()});
    return Tensor();
  }
  if (it->second.packed.defined()) return it->second.packed;
  lock.unlock();  // reorder outside the lock: other threads' convolutions need not wait for it
  // The reorder is chosen for this input size; another size still gets a correct result (oneDNN
  // reorders again on the fly if its choice differs), only slower. oneDNN picks a channels_last
  // output when the input or the weight is: the weight goes in the input's layout so that the
  // output follows the input, as the op's contract says.
  Tensor packed = call(*ops.reorder, {w.contiguous(format), vec(padding), vec(stride), vec(dilation), groups,
                                      vec(x.sizes())});
  lock.lock();
  it = entries.find(key);  // the map may have changed meanwhile
  if (it != entries.end() && matches(it->second, w, version, geometry)) it->second.packed = packed;
  return packed;
}

// Below about 8 million multiply-adds (a conv of ~0.5 ms on one AVX2 core), oneDNN's fused path
// costs about as much per call (~0.1 ms of primitive setup) as the passes and the reorder it saves,
// and in whole small models (CIFAR ResNets at batch 1) it was measured slower;
// FUSED_RESNET_ONEDNN_MIN_MACS overrides the bound (tests set 0 to cover every shape).
int64_t min_macs() {
  const char* v = std::getenv("FUSED_RESNET_ONEDNN_MIN_MACS");
  return v != nullptr && v[0] != '\0' ? std::strtoll(v, nullptr, 10) : int64_t{1} << 23;
}

int64_t conv_macs(const Tensor& x, const Tensor& w, IntList stride, IntList padding, IntList dilation) {
  int64_t macs = x.size(0) * w.numel();  // w.numel() = C_out * C_in/groups * kh * kw
  for (int d = 0; d < 2; ++d) {
    macs *= std::max<int64_t>(
        (x.size(d + 2) + 2 * padding[d] - dilation[d] * (w.size(d + 2) - 1) - 1) / stride[d] + 1, 0);
  }
  return macs;
}

bool is_float(const OptTensor& t) { return !t.has_value() || !t->defined() || t->scalar_type() == at::kFloat; }

bool is_nhwc(const Tensor& x) {  // the layout rule of fused_resnet/_layout.py (as fused_ops.cpp)
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

}  // namespace

std::optional<Tensor> onednn_conv_bias_act(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                           const OptTensor& residual, IntList stride, IntList padding,
                                           IntList dilation, int64_t groups, bool relu) {
  const OneDnnOps& ops = onednn_ops();
  // Under autograd the weight changes every step, so a reorder would not be reused; and an
  // inference-mode tensor has no version counter to tell an in-place change by.
  if (!ops.available() || !at::globalContext().userEnabledMkldnn() || c10::GradMode::is_enabled() ||
      weight.is_inference() || x.layout() != at::kStrided || weight.layout() != at::kStrided ||
      !weight.has_storage() || x.dim() != 4 || weight.dim() != 4 || x.numel() == 0 || x.scalar_type() != at::kFloat ||
      weight.scalar_type() != at::kFloat || !is_float(bias) || !is_float(residual) ||
      conv_macs(x, weight, stride, padding, dilation) < min_macs()) {
    return std::nullopt;
  }
  const bool nhwc = is_nhwc(x);
  // With a reordered weight oneDNN works in channels_last: an NCHW input (and residual) is converted
  // on the way in and the output back, passes over the activations that only pay off where the
  // weight, whose per-call reorder is saved, is not much smaller than the input (measured on
  // CIFAR-size and ImageNet-size ResNets, batch 1 to 32).
  if (!nhwc && weight.numel() * 4 < x.numel()) return std::nullopt;
  const auto format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Tensor input = x.contiguous(format);
  const Tensor packed = packed_weight(ops, weight, format, input, stride, padding, dilation, groups);
  if (!packed.defined()) return std::nullopt;
  c10::IValue b = (bias.has_value() && bias->defined()) ? c10::IValue(bias->contiguous()) : c10::IValue();
  Tensor out;
  if (residual.has_value() && residual->defined()) {
    c10::IValue unary = relu ? c10::IValue(std::string("relu")) : c10::IValue();
    out = call(*ops.binary, {input, residual->contiguous(format), packed, b, vec(padding), vec(stride), vec(dilation),
                             groups, std::string("add"), c10::IValue(), unary, c10::List<std::optional<c10::Scalar>>(),
                             c10::IValue()});
  } else {
    out = call(*ops.unary, {input, packed, b, vec(padding), vec(stride), vec(dilation), groups,
                            std::string(relu ? "relu" : "none"), c10::List<std::optional<c10::Scalar>>(),
                            c10::IValue()});
  }
  return out.contiguous(format);
}

int64_t packed_weight_count() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  int64_t n = 0;
  for (const auto& [key, entry] : cache()) n += entry.packed.defined() && !entry.source.expired();
  return n;
}

void clear_packed_weights() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache().clear();
}

}  // namespace fused_resnet_native::cpu
