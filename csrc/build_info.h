// What `_C_ops` was built with, for its loaders (fused_resnet/_extension.py through the pybind module,
// or a C++ program, which should refuse a library built against another torch: its C++ ABI differs).
#pragma once

extern "C" {
// The torch version (X.Y.Z) the library was compiled against; "" if the build did not record it.
const char* fused_resnet_torch_version();
// 1 if the CUDA kernels are compiled in.
int fused_resnet_with_cuda();
// Why they are not ("" when they are).
const char* fused_resnet_cuda_skip_reason();
}
