// Which backend runs a call of a public op (docs/design.md, decision 3), decided in C++ so that
// the native path never enters Python: a process-wide default and a per-thread override, mirrored
// from fused_resnet.set_backend / use_backend. The native kernels are called directly; the
// reference and Triton backends are Python, reached through a function-pointer hook that the
// pybind module `fused_resnet._C` installs (csrc/python/module.cpp): this library (`_C_ops`) links
// neither libpython nor libtorch_python, so it loads without Python (decision 7).
#pragma once

#include <array>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

namespace fused_resnet_native::router {

// The order of fused_resnet._backend.BACKEND_NAMES; kPython and above: a backend registered from
// Python (fused_resnet._backend.register_backend), which Python resolves itself.
enum Backend : int { kAuto = 0, kReference = 1, kTriton = 2, kNative = 3, kPython = 4 };

// The name Python knows `backend` by ("" for kPython and above: the one in force there).
const char* name(int backend);
int from_name(const std::string& name);
// The backend asked for now on this thread (use_backend, else set_backend's default).
int requested();
void set_default(int backend);
int thread_override();  // -1: none
void set_thread_override(int backend);

// Runs `kernel` of the Python backends on the boxed arguments and returns its result boxed (None,
// a tensor, or a tuple of tensors). Installed by fused_resnet._C; it takes the GIL itself, and a
// Python exception leaves it as torch's carrier of one (python_error), which reaches the caller.
using PythonKernelHook = c10::IValue (*)(const char* kernel, const char* backend, std::vector<c10::IValue>& args);
// Called for every native kernel run while a fused_resnet.trace_dispatch is open (else unset).
using TraceHook = void (*)(const char* kernel, const char* backend);

void set_python_kernel_hook(PythonKernelHook hook);  // nullptr: none (a process without Python)
PythonKernelHook python_kernel_hook();
void set_trace_hook(TraceHook hook);
bool tracing();
void record(const char* kernel, const char* backend);

template <class T>
c10::IValue boxed(const T& t) {
  return c10::IValue(t);
}
inline c10::IValue boxed(c10::IntArrayRef a) { return c10::IValue(a.vec()); }
template <size_t N>
c10::IValue boxed(const std::array<bool, N>& a) {
  c10::List<bool> list;
  list.reserve(N);
  for (bool b : a) list.push_back(b);
  return c10::IValue(std::move(list));
}

// `kernel` on the Python side, on backend `backend` ("auto" lets Python choose among its own).
template <class Ret, class... Args>
Ret call_python(const char* kernel, const char* backend, const Args&... args) {
  const PythonKernelHook hook = python_kernel_hook();
  TORCH_CHECK(hook != nullptr, "fused_resnet: ", kernel, " has no native kernel for these arguments (float32, ",
              "bfloat16 and float16 activations only) or the backend asked for is a Python one (", backend,
              "), and no Python is here: the reference and Triton backends need `import fused_resnet`");
  std::vector<c10::IValue> stack;
  stack.reserve(sizeof...(Args));
  (stack.push_back(boxed(args)), ...);
  c10::IValue out = hook(kernel, backend, stack);
  if constexpr (!std::is_void_v<Ret>) return std::move(out).to<Ret>();
}

// Kernels run with autocast off: the functional layer already cast the operands, and a
// convolution inside a kernel must not be cast again.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace fused_resnet_native::router
