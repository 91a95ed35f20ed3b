// The Python module `fused_resnet._C`: importing it registers, for the public ops
// `fused_resnet::*` whose schemas fused_resnet/_library.py declares, their CPU (and CUDA) kernels
// (routed_ops.h, registered in cpu/ and cuda/) and their autograd (autograd.cpp); this file adds
// the entry points of the backend choice (router.h) and what the build was made with.
#include <torch/extension.h>

#include "router.h"

#define FR_STRINGIFY_(x) #x
#define FR_STRINGIFY(x) FR_STRINGIFY_(x)

PYBIND11_MODULE(_C, m) {
  m.doc() = "fused_resnet native kernels, autograd and backend choice of the ops torch.ops.fused_resnet.*";
#ifdef FR_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
#ifdef FR_TORCH_VERSION
  // The torch this library was compiled against: its C++ ABI is only guaranteed for that version.
  m.attr("TORCH_VERSION") = FR_STRINGIFY(FR_TORCH_VERSION);
#endif
  fused_resnet_native::router::bind(m);
}
