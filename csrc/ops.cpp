// The one place where the native kernel ops are declared: schemas of `fused_resnet_native::*`.
// Each is the kernel of the public op of the same name in fused_resnet/_library.py, with the
// signature and semantics of the function of the same name in fused_resnet/reference.py, except
// that gradients not computed come back undefined (None in Python). Implementations: fused_ops.cpp (the
// device-generic composition around ATen's convolution), cpu/ and cuda/ (kernels); their fakes are
// the public ops' (fused_resnet/backends/native/_fakes.py).
//
// This file also makes the shared library importable as the Python module `fused_resnet._C`:
// importing it runs the registrations below.
#include <Python.h>
#include <torch/library.h>

#define FR_STRINGIFY_(x) #x
#define FR_STRINGIFY(x) FR_STRINGIFY_(x)

#define FR_CONV "int[2] stride, int[2] padding, int[2] dilation, int groups"

TORCH_LIBRARY(fused_resnet_native, m) {
  m.def("conv_stats(Tensor x, Tensor? in_scale, Tensor? in_shift, bool in_relu, Tensor weight, " FR_CONV
        ") -> (Tensor y, Tensor mean, Tensor var)");
  m.def("conv_stats_backward(Tensor grad_y, Tensor grad_mean, Tensor grad_var, Tensor x, Tensor? in_scale, "
        "Tensor? in_shift, bool in_relu, Tensor weight, Tensor y, Tensor mean, " FR_CONV
        ", bool[3] output_mask) -> (Tensor grad_x, Tensor grad_in_scale, Tensor grad_in_shift, "
        "Tensor grad_weight)");
  m.def("bn_add_relu(Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, Tensor? res_scale, "
        "Tensor? res_shift, bool relu) -> Tensor");
  m.def("bn_add_relu_backward(Tensor grad_out, Tensor y, Tensor? scale, Tensor? shift, Tensor? residual, "
        "Tensor? res_scale, Tensor? res_shift, bool relu, bool[4] output_mask) -> (Tensor grad_y, "
        "Tensor grad_scale, Tensor grad_shift, Tensor grad_residual, Tensor grad_res_scale, Tensor grad_res_shift)");
  m.def("conv_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, " FR_CONV ", bool relu) -> Tensor");
  m.def("conv_bias_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, bool relu, " FR_CONV
        ", bool[4] output_mask) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  m.def("update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!) num_batches_tracked, "
        "Tensor mean, Tensor var, SymInt count, float? momentum) -> ()");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused_resnet native kernels (torch.ops.fused_resnet_native)",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef FR_WITH_CUDA
  PyModule_AddObject(m, "WITH_CUDA", Py_NewRef(Py_True));
#else
  PyModule_AddObject(m, "WITH_CUDA", Py_NewRef(Py_False));
#endif
#ifdef FR_TORCH_VERSION
  // The torch this library was compiled against: its C++ ABI is only guaranteed for that version.
  PyModule_AddStringConstant(m, "TORCH_VERSION", FR_STRINGIFY(FR_TORCH_VERSION));
#endif
  return m;
}
