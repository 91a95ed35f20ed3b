// The backend choice of the public ops (router.h): its state and the hooks into Python.
#include "router.h"

#include <atomic>

namespace fused_resnet_native::router {
namespace {

constexpr const char* kNames[] = {"auto", "reference", "triton", "native"};
std::atomic<int> default_backend{kAuto};
thread_local int override_backend = -1;
std::atomic<PythonKernelHook> kernel_hook{nullptr};
std::atomic<TraceHook> trace_hook{nullptr};

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

void set_python_kernel_hook(PythonKernelHook hook) { kernel_hook.store(hook); }
PythonKernelHook python_kernel_hook() { return kernel_hook.load(std::memory_order_acquire); }
void set_trace_hook(TraceHook hook) { trace_hook.store(hook); }
bool tracing() { return trace_hook.load(std::memory_order_relaxed) != nullptr; }

void record(const char* kernel, const char* backend) {
  if (const TraceHook hook = trace_hook.load(std::memory_order_acquire)) hook(kernel, backend);
}

}  // namespace fused_resnet_native::router
