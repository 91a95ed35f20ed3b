// The interface between the device-generic op layer (fused_ops.cpp) and the per-device kernels
// (cpu/bn_kernels.h, cuda/bn_kernels.cu): plain pointers, sizes and dtype tags, no torch headers,
// so that the kernel translation units stay cheap to compile (and compile twice on the CPU, once
// per instruction set).
//
// Every activation is a 4-D [N, C, H, W] tensor, dense in NCHW (contiguous) or NHWC
// (channels_last) order; every per-channel vector is fp32 [C]. A null pointer means "absent":
// scale 1, shift/centre 0, no residual, output not wanted.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FR_HOST_DEVICE __host__ __device__
#else
#define FR_HOST_DEVICE
#endif

namespace fused_resnet_native {

enum class DType : int8_t { kFloat32, kBFloat16, kFloat16 };

struct Shape {
  int64_t n = 0, c = 0, hw = 0;
  bool nhwc = false;
  FR_HOST_DEVICE int64_t numel() const { return n * c * hw; }
  FR_HOST_DEVICE int64_t per_channel() const { return n * hw; }  // elements reduced per channel
};

// out = relu?((y - centre) * scale + shift + (res * res_scale + res_shift)), evaluated in fp32.
// Residual and output may have dtypes other than y's (see fused_ops.cpp for the combinations);
// out may alias y (in-place epilogue).
struct ApplyArgs {
  Shape shape;
  const void* y = nullptr;
  DType y_dtype = DType::kFloat32;
  int64_t y_batch_stride = 0;  // see Kernels::strided_nchw_y; 0: y is dense
  const float* centre = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const void* res = nullptr;
  DType res_dtype = DType::kFloat32;
  const float* res_scale = nullptr;
  const float* res_shift = nullptr;
  void* out = nullptr;
  DType out_dtype = DType::kFloat32;
  bool relu = false;
};

// Backward of ApplyArgs without centre: dz = grad * [z > 0 if relu], z the recomputed
// pre-activation; grad_y = dz * scale (in grad_y_dtype), grad_res = dz * res_scale (in y_dtype),
// and the per-channel sums sum(dz), sum(dz * y), sum(dz * res), each written only if its pointer
// is set. One read of grad, y and res; one write of each gradient.
struct ApplyBackwardArgs {
  Shape shape;
  const void* grad = nullptr;
  DType grad_dtype = DType::kFloat32;
  const void* y = nullptr;  // the residual, grad_res share y's dtype
  DType y_dtype = DType::kFloat32;
  int64_t y_batch_stride = 0;  // see Kernels::strided_nchw_y; 0: y is dense
  const float* scale = nullptr;
  const float* shift = nullptr;
  const void* res = nullptr;
  const float* res_scale = nullptr;
  const float* res_shift = nullptr;
  bool relu = false;
  void* grad_y = nullptr;
  DType grad_y_dtype = DType::kFloat32;
  void* grad_res = nullptr;
  float* sum_dz = nullptr;
  float* sum_dz_y = nullptr;
  float* sum_dz_res = nullptr;
  float* workspace = nullptr;  // workspace_floats(shape) floats on the device (CUDA partial sums)
};

// Per-channel mean and biased variance of y (shifted sums around y[0, c, 0, 0], fp32 partials
// combined in a second level).
struct StatsArgs {
  Shape shape;
  const void* y = nullptr;
  DType dtype = DType::kFloat32;
  float* mean = nullptr;
  float* var = nullptr;
  float* workspace = nullptr;
};

// A device's kernels. `workspace_floats` sizes the scratch the op layer allocates (with the
// caching allocator, so no sync and CUDA-graph safe) for the reductions.
struct Kernels {
  void (*apply)(const ApplyArgs&);
  void (*apply_backward)(const ApplyBackwardArgs&);
  void (*stats)(const StatsArgs&);
  int64_t (*workspace_floats)(const Shape&);
  // CPU: half-precision convolutions run in fp32 (as the reference does), CUDA: in their dtype.
  bool half_conv_in_fp32;
  // Whether apply / apply_backward read an NCHW `y` whose samples lie `y_batch_stride` elements
  // apart (> C*H*W: a channel prefix of a wider dense tensor, a DenseNet block's feature buffer,
  // whose (n, c) planes stay dense). The op layer copies such inputs densely for kernels without it.
  bool strided_nchw_y = false;
};

}  // namespace fused_resnet_native
