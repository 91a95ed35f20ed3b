// CUDA kernels of the fused BN / residual / activation passes (the interface is ../kernels.h).
//
// Elementwise passes: one thread per 16-byte pack (4 fp32 or 8 bf16/fp16 values) when the
// channel run allows it (NHWC: C % pack == 0; NCHW: H*W % pack == 0; 16-byte aligned pointers),
// else one value per thread; arithmetic in fp32; grid-stride loops.
// Reductions (batch statistics, backward sums) are two-level and deterministic: level 1 has
// P blocks per channel tile each write fp32 partial sums to a workspace [P, NS, C] (warp
// shuffles, then shared memory), level 2 sums the P partials per channel in fp64, in order.
// Everything runs on the current stream, allocates nothing and never synchronises with the host,
// so the passes can be captured in CUDA graphs.
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kernels.h"

namespace fused_resnet_native::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // NHWC reductions: block = 32 channel packs x 8 rows
constexpr int kMaxPartials = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<float>(pk.v[k]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int k = 0; k < V; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

__device__ __forceinline__ float param(const float* p, int64_t c, float dflt) { return p ? p[c] : dflt; }

// Number of level-1 blocks per channel tile: enough work per thread to amortise the partials,
// capped so level 2 stays short. A function of the shape only: the op layer sizes the workspace
// with it.
int64_t num_partials(const Shape& s) {
  const int64_t per_block = s.nhwc ? kRowsPerBlock * 16 : kThreads * 16;
  const int64_t p = (s.per_channel() + per_block - 1) / per_block;
  return p < 1 ? 1 : (p > kMaxPartials ? kMaxPartials : p);
}

bool aligned(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// out = act((y - centre) * scale + shift + (res * res_scale + res_shift)): reads y (+res) once,
// writes out once; the unfused sequence moves the tensor once per operator.
template <typename T, int V, bool NHWC>
__global__ void bn_apply_fwd_kernel(ApplyArgs a) {
  const T* y = static_cast<const T*>(a.y);
  const T* res = static_cast<const T*>(a.res);
  T* out = static_cast<T*>(a.out);
  const int64_t packs = a.shape.numel() / V;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * V;
    const int64_t c0 = NHWC ? e % a.shape.c : (e / a.shape.hw) % a.shape.c;
    float z[V], r[V];
    load<T, V>(y + e, z);
    if (res) load<T, V>(res + e, r);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      float v = (z[k] - param(a.centre, c, 0.f)) * param(a.scale, c, 1.f) + param(a.shift, c, 0.f);
      if (res) v += r[k] * param(a.res_scale, c, 1.f) + param(a.res_shift, c, 0.f);
      z[k] = act_fwd(v, a.act);  // kernels.h: NaN propagates, as in torch
    }
    store<T, V>(out + e, z);
  }
}

// ---------------------------------------------------------------------------------------------
// Level 1 of a reduction: `op(e, c0, acc)` handles the V values at element offset e (channels
// c0.. in NHWC, channel c0 in NCHW) and adds NS sums per value into acc; the block's sums go to
// partial[blockIdx.y][j][c].
template <int NS, int V, bool NHWC, class Op>
__device__ __forceinline__ void reduce_level1(const Shape& s, float* partial, Op op) {
  float acc[NS][V];
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int k = 0; k < V; ++k) acc[j][k] = 0.f;
  if constexpr (NHWC) {
    __shared__ float smem[kRowsPerBlock][NS * V][32];
    const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * V;
    const int64_t rows = s.n * s.hw;
    if (c0 < s.c) {
      for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + threadIdx.y; r < rows;
           r += static_cast<int64_t>(gridDim.y) * kRowsPerBlock) {
        op(r * s.c + c0, c0, acc);
      }
    }
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int k = 0; k < V; ++k) smem[threadIdx.y][j * V + k][threadIdx.x] = acc[j][k];
    __syncthreads();
    if (threadIdx.y == 0 && c0 < s.c) {
      for (int j = 0; j < NS; ++j) {
        for (int k = 0; k < V; ++k) {
          float t = 0.f;
#pragma unroll
          for (int ty = 0; ty < kRowsPerBlock; ++ty) t += smem[ty][j * V + k][threadIdx.x];
          partial[(static_cast<int64_t>(blockIdx.y) * NS + j) * s.c + c0 + k] = t;
        }
      }
    }
  } else {
    __shared__ float smem[kThreads / 32][NS];
    const int64_t c = blockIdx.x;
    const int64_t packs = s.n * s.hw / V;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x; m < packs;
         m += static_cast<int64_t>(gridDim.y) * kThreads) {
      const int64_t e0 = m * V, n = e0 / s.hw;
      op((n * s.c + c) * s.hw + (e0 - n * s.hw), c, acc);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      float t = 0.f;
#pragma unroll
      for (int k = 0; k < V; ++k) t += acc[j][k];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) t += __shfl_down_sync(0xffffffffu, t, off);
      if (lane == 0) smem[warp][j] = t;
    }
    __syncthreads();
    if (threadIdx.x < NS) {
      float t = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) t += smem[w][threadIdx.x];
      partial[(static_cast<int64_t>(blockIdx.y) * NS + threadIdx.x) * s.c + c] = t;
    }
  }
}

template <typename T, int V, bool NHWC>
__global__ void bn_stats_partial_kernel(StatsArgs a) {
  const T* y = static_cast<const T*>(a.y);
  // Shifted sums around y[0, c, 0, 0] (no E[y^2] - E[y]^2 cancellation in fp32). A thread's
  // channels are fixed (as reduce_level1 assigns them): load their pivots once.
  const int64_t first = NHWC ? (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * V : blockIdx.x;
  float pivot[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t c = NHWC ? first + k : first;
    pivot[k] = c < a.shape.c ? static_cast<float>(y[NHWC ? c : c * a.shape.hw]) : 0.f;
  }
  reduce_level1<2, V, NHWC>(a.shape, a.workspace, [&](int64_t e, int64_t, float (&acc)[2][V]) {
    float v[V];
    load<T, V>(y + e, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = v[k] - pivot[k];
      acc[0][k] += d;
      acc[1][k] += d * d;
    }
  });
}

template <typename T>
__global__ void bn_stats_finalize_kernel(StatsArgs a, int64_t partials) {
  const T* y = static_cast<const T*>(a.y);
  const int64_t C = a.shape.c;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0, q = 0.0;
    for (int64_t p = 0; p < partials; ++p) {
      s += a.workspace[(p * 2) * C + c];
      q += a.workspace[(p * 2 + 1) * C + c];
    }
    const double m = static_cast<double>(a.shape.per_channel());
    const double d = s / m;
    const double var = q / m - d * d;
    a.mean[c] = static_cast<float>(static_cast<float>(y[a.shape.nhwc ? c : c * a.shape.hw]) + d);
    a.var[c] = static_cast<float>(var > 0.0 ? var : 0.0);
  }
}

// ---------------------------------------------------------------------------------------------
// dz = act_bwd(grad, z); grad_y = dz * scale; grad_res = dz * res_scale; partial sums of dz,
// dz * y and dz * res: one read of grad, y and res and one write per gradient, against a mask,
// a product per gradient and one reduction per sum when unfused.
template <typename T, int V, bool NHWC>
__global__ void bn_apply_bwd_partial_kernel(ApplyBackwardArgs a) {
  const T* g = static_cast<const T*>(a.grad);
  const T* y = static_cast<const T*>(a.y);
  const T* res = static_cast<const T*>(a.res);
  T* gy = static_cast<T*>(a.grad_y);
  T* gr = static_cast<T*>(a.grad_res);
  reduce_level1<3, V, NHWC>(a.shape, a.workspace, [&](int64_t e, int64_t c0, float (&acc)[3][V]) {
    float gv[V], yv[V], rv[V], out_y[V], out_r[V];
    load<T, V>(g + e, gv);
    load<T, V>(y + e, yv);
    if (res) {
      load<T, V>(res + e, rv);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) rv[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      const float sc = param(a.scale, c, 1.f), rsc = param(a.res_scale, c, 1.f);
      float dz = gv[k];
      if (a.act != kActNone) {
        float z = yv[k] * sc + param(a.shift, c, 0.f);
        if (res) z += rv[k] * rsc + param(a.res_shift, c, 0.f);
        dz = act_bwd(dz, z, a.act);
      }
      out_y[k] = dz * sc;
      out_r[k] = dz * rsc;
      acc[0][k] += dz;
      acc[1][k] += dz * yv[k];
      acc[2][k] += dz * rv[k];
    }
    if (gy) store<T, V>(gy + e, out_y);
    if (gr) store<T, V>(gr + e, out_r);
  });
}

__global__ void bn_bwd_finalize_kernel(ApplyBackwardArgs a, int64_t partials) {
  const int64_t C = a.shape.c;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double t[3] = {0.0, 0.0, 0.0};
    for (int64_t p = 0; p < partials; ++p)
      for (int j = 0; j < 3; ++j) t[j] += a.workspace[(p * 3 + j) * C + c];
    if (a.sum_dz) a.sum_dz[c] = static_cast<float>(t[0]);
    if (a.sum_dz_y) a.sum_dz_y[c] = static_cast<float>(t[1]);
    if (a.sum_dz_res) a.sum_dz_res[c] = static_cast<float>(t[2]);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

template <class F>
void dispatch(DType t, const F& f) {
  switch (t) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(c10::BFloat16{});
    case DType::kFloat16: return f(c10::Half{});
  }
}

// The widest pack every pointer and the channel run allow: 16 bytes, else one value.
template <typename T>
bool packable(const Shape& s, std::initializer_list<const void*> ptrs) {
  constexpr int64_t V = 16 / sizeof(T);
  if ((s.nhwc ? s.c : s.hw) % V != 0) return false;
  for (const void* p : ptrs)
    if (!aligned(p)) return false;
  return true;
}

unsigned grid_1d(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65536 ? 65536 : b));
}

template <typename T, int V, bool NHWC, class Kernel, class Args>
void launch_reduction(Kernel kernel, const Args& a) {
  const Shape& s = a.shape;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned p = static_cast<unsigned>(num_partials(s));
  if constexpr (NHWC) {
    const unsigned tiles = static_cast<unsigned>((s.c / V + 31) / 32);
    kernel<<<dim3(tiles, p), dim3(32, kRowsPerBlock), 0, stream>>>(a);
  } else {
    kernel<<<dim3(static_cast<unsigned>(s.c), p), kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply(const ApplyArgs& a) {
  TORCH_CHECK(a.y_dtype == a.out_dtype && (!a.res || a.res_dtype == a.y_dtype),
              "fused_resnet_native (CUDA): mixed dtypes are not supported");
  dispatch(a.y_dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const bool vec = packable<T>(a.shape, {a.y, a.res, a.out});
    const unsigned grid = grid_1d(vec ? a.shape.numel() / V : a.shape.numel());
    if (vec && a.shape.nhwc) bn_apply_fwd_kernel<T, V, true><<<grid, kThreads, 0, stream>>>(a);
    else if (vec) bn_apply_fwd_kernel<T, V, false><<<grid, kThreads, 0, stream>>>(a);
    else if (a.shape.nhwc) bn_apply_fwd_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(a);
    else bn_apply_fwd_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void stats(const StatsArgs& a) {
  dispatch(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool vec = packable<T>(a.shape, {a.y});
    if (vec && a.shape.nhwc) launch_reduction<T, V, true>(bn_stats_partial_kernel<T, V, true>, a);
    else if (vec) launch_reduction<T, V, false>(bn_stats_partial_kernel<T, V, false>, a);
    else if (a.shape.nhwc) launch_reduction<T, 1, true>(bn_stats_partial_kernel<T, 1, true>, a);
    else launch_reduction<T, 1, false>(bn_stats_partial_kernel<T, 1, false>, a);
    bn_stats_finalize_kernel<T><<<grid_1d(a.shape.c), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a, num_partials(a.shape));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void apply_backward(const ApplyBackwardArgs& a) {
  TORCH_CHECK(a.grad_dtype == a.y_dtype && (!a.grad_y || a.grad_y_dtype == a.y_dtype),
              "fused_resnet_native (CUDA): mixed dtypes are not supported");
  dispatch(a.y_dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool vec = packable<T>(a.shape, {a.grad, a.y, a.res, a.grad_y, a.grad_res});
    if (vec && a.shape.nhwc) launch_reduction<T, V, true>(bn_apply_bwd_partial_kernel<T, V, true>, a);
    else if (vec) launch_reduction<T, V, false>(bn_apply_bwd_partial_kernel<T, V, false>, a);
    else if (a.shape.nhwc) launch_reduction<T, 1, true>(bn_apply_bwd_partial_kernel<T, 1, true>, a);
    else launch_reduction<T, 1, false>(bn_apply_bwd_partial_kernel<T, 1, false>, a);
  });
  if (a.sum_dz || a.sum_dz_y || a.sum_dz_res) {
    bn_bwd_finalize_kernel<<<grid_1d(a.shape.c), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        a, num_partials(a.shape));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

int64_t workspace_floats(const Shape& s) { return num_partials(s) * 3 * s.c; }

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&apply, &apply_backward, &stats, &workspace_floats, /*half_conv_in_fp32=*/false};
  return k;
}

}  // namespace fused_resnet_native::cuda
