// The public ops' CUDA kernels (routed_ops.h) over the native ops: the device-generic ops of fused_ops.cpp with the CUDA
// kernel table (bn_kernels.cu), run on the input's device and its current stream.
#include <c10/cuda/CUDAGuard.h>

#include "../routed_ops.h"

namespace fused_resnet_native::cuda {
const Kernels& kernels();

namespace {
struct CudaDevice {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };
  static const Kernels& kernels() { return cuda::kernels(); }
};
}  // namespace
}  // namespace fused_resnet_native::cuda

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  fused_resnet_native::register_routed<fused_resnet_native::cuda::CudaDevice>(m);
}
