// Which backend runs a call of a public op (docs/design.md, decision 3), decided in C++ so that
// the native path never enters Python: a process-wide default and a per-thread override, mirrored
// from fused_resnet.set_backend / use_backend. The native kernels are called directly; the
// reference and Triton backends are Python callables (fused_resnet/_library.py) called with the GIL.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

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

// The Python callable `kernel(name, backend, *args)` that runs the reference / Triton kernels.
py::object& python_kernels();
// Called as `hook(kernel, backend)` for every native kernel run while a trace_dispatch is open.
py::object& trace_hook();
bool tracing();
void record(const char* kernel, const char* backend);
// Adds the functions above that Python calls to the module `fused_resnet._C`.
void bind(py::module& m);

template <class T>
const T& py_arg(const T& t) {
  return t;
}
inline std::vector<int64_t> py_arg(c10::IntArrayRef a) { return a.vec(); }

// `kernel` on the Python side, on backend `backend` ("auto" lets Python choose among its own).
template <class Ret, class... Args>
Ret call_python(const char* kernel, const char* backend, const Args&... args) {
  py::gil_scoped_acquire gil;
  try {
    py::object out = python_kernels()(kernel, backend, py_arg(args)...);
    if constexpr (!std::is_void_v<Ret>) return out.cast<Ret>();
  } catch (py::error_already_set& e) {
    // Into torch's own carrier of a Python exception, fetched while the GIL is held, so that the
    // caller gets the Python exception itself (BackendUnavailableError, ValueError, ...).
    e.restore();
    python_error error;
    error.persist();
    throw error;
  }
}

// Kernels run with autocast off: the functional layer already cast the operands, and a
// convolution inside a kernel must not be cast again.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace fused_resnet_native::router
