// The public ops' CPU kernels (routed_ops.h) over the native ops: the device-generic ops of fused_ops.cpp with the CPU
// kernel table of the best instruction set this CPU has (AVX2 + FMA, else the baseline build).
#include "../routed_ops.h"

namespace fused_resnet_native::cpu {
namespace DEFAULT {
const Kernels& isa_kernels();
}
#if defined(__x86_64__) && defined(__GNUC__)
namespace AVX2 {
const Kernels& isa_kernels();
}
#endif

namespace {

const Kernels& select_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return AVX2::isa_kernels();
  }
#endif
  return DEFAULT::isa_kernels();
}

struct CpuDevice {
  using Guard = NoGuard;
  static const Kernels& kernels() {
    static const Kernels& k = select_kernels();
    return k;
  }
};

}  // namespace
}  // namespace fused_resnet_native::cpu

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  fused_resnet_native::register_routed<fused_resnet_native::cpu::CpuDevice>(m);
}
