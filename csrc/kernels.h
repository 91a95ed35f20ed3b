// The interface between the device-generic op layer (fused_ops.cpp) and the per-device kernels
// (cpu/bn_kernels.h, cuda/bn_kernels.cu): plain pointers, sizes and dtype tags, no torch headers,
// so that the kernel translation units stay cheap to compile (and compile twice on the CPU, once
// per instruction set).
//
// Every activation is a 4-D [N, C, H, W] tensor, dense in NCHW (contiguous) or NHWC
// (channels_last) order; every per-channel vector is fp32 [C]. A null pointer means "absent":
// scale 1, shift/centre 0, no residual, output not wanted.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FR_HOST_DEVICE __host__ __device__
#else
#define FR_HOST_DEVICE
#endif

namespace fused_resnet_native {

enum class DType : int8_t { kFloat32, kBFloat16, kFloat16 };

// The activation codes of every op's `act` / `in_act` argument, and their math: the one C++
// definition (fused_resnet/_activation.py is the Python one, with the same codes). The CPU's
// vector forms (cpu/bn_kernels.h) follow these scalar ones.
// kActLeakyRelu: LeakyReLU(0.01), nn.LeakyReLU's default; kActLeakyRelu01: LeakyReLU(0.1) (YOLO-style):
// one code per slope, so that each code stays one fixed function.
enum Act : int {
  kActNone = 0, kActRelu = 1, kActRelu6 = 2, kActSilu = 3, kActHardswish = 4, kActLeakyRelu = 5, kActLeakyRelu01 = 6,
  kActCount = 7
};

// LeakyReLU's negative slope for its codes (as float: ATen applies float(slope) to fp32/bf16/fp16).
FR_HOST_DEVICE constexpr float leaky_slope(int act) { return act == kActLeakyRelu ? 0.01f : 0.1f; }

// The codes whose backward needs the pre-activation z: their output does not determine f'(z).
FR_HOST_DEVICE constexpr bool act_needs_z(int act) { return act == kActSilu || act == kActHardswish; }

// f(z); NaN propagates, as torch.relu / relu6 / silu / hardswish / leaky_relu.
FR_HOST_DEVICE inline float act_fwd(float z, int act) {
  switch (act) {
    case kActRelu: return z < 0.f ? 0.f : z;
    case kActRelu6: return z < 0.f ? 0.f : (z > 6.f ? 6.f : z);
    case kActSilu: return z / (1.f + expf(-z));
    case kActHardswish: {
      const float t = z + 3.f;
      return z * (t < 0.f ? 0.f : (t > 6.f ? 6.f : t)) / 6.f;
    }
    case kActLeakyRelu:
    case kActLeakyRelu01: return z > 0.f ? z : z * leaky_slope(act);  // ATen's leaky_relu
    default: return z;
  }
}

// g * f'(z), z the pre-activation. For ReLU, ReLU6 and LeakyReLU the output gives the same mask
// (out > 0, 0 < out < 6; LeakyReLU's positive slope keeps z's sign), so a backward may pass either;
// SiLU and Hardswish need z itself (act_needs_z). Hardswish's kinks take the outer slopes (0 at -3,
// 1 at 3), as ATen's hardswish_backward; LeakyReLU's takes the slope at 0, as ATen's
// leaky_relu_backward (z > 0 ? g : g * slope).
FR_HOST_DEVICE inline float act_bwd(float g, float z, int act) {
  switch (act) {
    case kActRelu: return z > 0.f ? g : 0.f;
    case kActRelu6: return (z > 0.f && z < 6.f) ? g : 0.f;
    case kActSilu: {
      const float s = 1.f / (1.f + expf(-z));
      return g * (s * (1.f + z * (1.f - s)));
    }
    case kActHardswish: return z <= -3.f ? 0.f : (z < 3.f ? g * (z / 3.f + 0.5f) : g);
    case kActLeakyRelu:
    case kActLeakyRelu01: return z > 0.f ? g : g * leaky_slope(act);
    default: return g;
  }
}

struct Shape {
  int64_t n = 0, c = 0, hw = 0;
  bool nhwc = false;
  FR_HOST_DEVICE int64_t numel() const { return n * c * hw; }
  FR_HOST_DEVICE int64_t per_channel() const { return n * hw; }  // elements reduced per channel
};

// out = act((y - centre) * scale + shift + (res * res_scale + res_shift)), evaluated in fp32.
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
  int act = kActNone;
};

// Backward of ApplyArgs without centre: dz = act_bwd(grad, z), z the recomputed pre-activation; grad_y = dz * scale (in grad_y_dtype), grad_res = dz * res_scale (in y_dtype),
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
  int act = kActNone;
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
