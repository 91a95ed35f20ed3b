// The Python module `fused_resnet._C`: the Python side of `_C_ops` (../ops.cpp), which it links and so
// loads. It installs the router's hooks into Python (the Python backends' kernels, trace_dispatch's
// recorder: ../router.h), exposes the backend choice to fused_resnet._backend and says what the
// library was built with. All of Python the ops ever need is here; the library itself has none.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include "../build_info.h"
#include "../router.h"

namespace fused_resnet_native::python {
namespace {

namespace router = fused_resnet_native::router;

// Held for the life of the process and never destroyed: a static py::object destructor could run
// after the interpreter is gone.
py::object* kernels_callable = new py::object();
py::object* trace_callable = new py::object();

py::object to_python(const c10::IValue& v) {
  if (v.isNone()) return py::none();
  if (v.isTensor()) return py::cast(v.toTensor());
  if (v.isBool()) return py::bool_(v.toBool());
  if (v.isInt()) return py::int_(v.toInt());
  if (v.isDouble()) return py::float_(v.toDouble());
  if (v.isString()) return py::str(v.toStringRef());
  if (v.isIntList()) return py::cast(v.toIntVector());
  if (v.isBoolList()) {
    py::list out;
    for (bool b : v.toBoolList()) out.append(py::bool_(b));
    return out;
  }
  TORCH_INTERNAL_ASSERT(false, "fused_resnet: no Python value for an argument of kind ", v.tagKind());
}

c10::IValue from_python(const py::handle& obj) {
  if (obj.is_none()) return c10::IValue();
  if (py::isinstance<py::tuple>(obj)) {
    std::vector<c10::IValue> items;
    for (const py::handle item : obj) items.push_back(from_python(item));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  return c10::IValue(obj.cast<at::Tensor>());
}

// router::PythonKernelHook: fused_resnet._library.python_kernel(kernel, backend, *args), with the GIL.
c10::IValue run_python_kernel(const char* kernel, const char* backend, std::vector<c10::IValue>& args) {
  py::gil_scoped_acquire gil;
  try {
    py::tuple call(args.size() + 2);
    call[0] = py::str(kernel);
    call[1] = py::str(backend);
    for (size_t i = 0; i < args.size(); ++i) call[i + 2] = to_python(args[i]);
    return from_python((*kernels_callable)(*call));
  } catch (py::error_already_set& e) {
    // Into torch's own carrier of a Python exception, fetched while the GIL is held, so that the
    // caller gets the Python exception itself (BackendUnavailableError, ValueError, ...).
    e.restore();
    python_error error;
    error.persist();
    throw error;
  }
}

// router::TraceHook: trace_dispatch's recorder(kernel, backend), with the GIL.
void record(const char* kernel, const char* backend) {
  py::gil_scoped_acquire gil;
  if (!trace_callable->is_none()) (*trace_callable)(kernel, backend);
}

}  // namespace
}  // namespace fused_resnet_native::python

PYBIND11_MODULE(_C, m) {
  using namespace fused_resnet_native;
  m.doc() = "fused_resnet: the Python side of the library _C_ops (kernels, autograd, backend choice of "
            "torch.ops.fused_resnet.*)";
  m.attr("WITH_CUDA") = fused_resnet_with_cuda() != 0;
  if (!fused_resnet_with_cuda()) {
    // Read by `python -m fused_resnet info` and the native backend's availability on 'cuda'.
    m.attr("CUDA_SKIP_REASON") = fused_resnet_cuda_skip_reason();
  }
  // The torch _C_ops was compiled against: its C++ ABI is only guaranteed for that version.
  if (*fused_resnet_torch_version()) m.attr("TORCH_VERSION") = fused_resnet_torch_version();
  m.def("_set_default_backend", &router::set_default);
  m.def("_thread_backend", &router::thread_override);
  m.def("_set_thread_backend", &router::set_thread_override);
  m.def("_set_python_kernels", [](py::object fn) {
    *python::kernels_callable = std::move(fn);
    router::set_python_kernel_hook(python::kernels_callable->is_none() ? nullptr : &python::run_python_kernel);
  });
  m.def("_set_trace_hook", [](py::object fn) {
    *python::trace_callable = std::move(fn);
    router::set_trace_hook(python::trace_callable->is_none() ? nullptr : &python::record);
  });
}
