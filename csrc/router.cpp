// The backend choice of the public ops (router.h): state, and the Python side's entry points.
#include "router.h"

#include <atomic>

namespace fused_resnet_native::router {
namespace {

constexpr const char* kNames[] = {"auto", "reference", "triton", "native"};
std::atomic<int> default_backend{kAuto};
thread_local int override_backend = -1;
std::atomic<bool> tracing_on{false};

// Held for the life of the process and never destroyed: a static py::object destructor could run
// after the interpreter is gone.
py::object* kernels_callable = new py::object();
py::object* trace_callable = new py::object();

}  // namespace

const char* name(int backend) { return backend >= 0 && backend < kPython ? kNames[backend] : ""; }

int from_name(const std::string& name) {
  for (int i = 0; i < kPython; ++i) {
    if (name == kNames[i]) return i;
  }
  return kPython;
}

int requested() { return override_backend >= 0 ? override_backend : default_backend.load(std::memory_order_relaxed); }
void set_default(int backend) { default_backend.store(backend); }
int thread_override() { return override_backend; }
void set_thread_override(int backend) { override_backend = backend; }

py::object& python_kernels() { return *kernels_callable; }
py::object& trace_hook() { return *trace_callable; }
bool tracing() { return tracing_on.load(std::memory_order_relaxed); }

void record(const char* kernel, const char* backend) {
  py::gil_scoped_acquire gil;
  if (!trace_hook().is_none()) trace_hook()(kernel, backend);
}

void bind(py::module& m) {
  m.def("_set_default_backend", &set_default);
  m.def("_thread_backend", &thread_override);
  m.def("_set_thread_backend", &set_thread_override);
  m.def("_set_python_kernels", [](py::object fn) { *kernels_callable = std::move(fn); });
  m.def("_set_trace_hook", [](py::object fn) {
    *trace_callable = std::move(fn);
    tracing_on.store(!trace_callable->is_none());
  });
}

}  // namespace fused_resnet_native::router
