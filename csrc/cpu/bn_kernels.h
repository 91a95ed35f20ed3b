// CPU kernels of the fused BN / residual / activation passes (the interface is ../kernels.h).
//
// This header is compiled once per instruction set (bn_kernels_default.cpp, bn_kernels_avx2.cpp)
// inside the namespace `CPU_CAPABILITY`, as ATen's own kernels are; register_cpu.cpp picks one
// at run time. Everything is fp32 arithmetic on at::vec vectors: half-precision data are widened
// on load and rounded once on store. Work is split with at::parallel_for:
//  * NHWC: over rows of C channels (a row is a pixel), per-channel parameters as vectors;
//  * NCHW: over planes of H*W pixels of one channel, per-channel parameters as scalars.
// Reductions are two-level: fp32 partial sums over at most kChunk values per channel and lane,
// then fp64 over the partials, in a fixed order.
#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "../kernels.h"

namespace fused_resnet_native::cpu {
inline namespace CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();
constexpr int64_t kStep = 2 * kW;      // elements per iteration: one vector of 16-bit data, two of fp32
constexpr int64_t kGrain = 32768;      // elements per parallel task (~128 KiB of fp32)
constexpr int64_t kChunkRows = 128;    // NHWC: rows summed in fp32 before the fp64 partial
constexpr int64_t kChunkPlane = 4096;  // NCHW: elements of a plane summed in fp32 lanes

template <typename T>
inline void load2(const T* p, fVec& a, fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + kW);
  } else {
    static_assert(at::vec::Vectorized<T>::size() == kStep, "16-bit vector must widen to two fp32 vectors");
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + kW);
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

#include "act_vec.h"  // inside CPU_CAPABILITY too: at::vec code is per instruction set

// Per-channel parameters as seen by a span: NHWC spans walk channels (vectors from arrays),
// NCHW spans stay in one channel (broadcast scalars).
struct ChannelArrays {
  std::vector<float> v[5];  // centre, scale, shift, res_scale, res_shift
  ChannelArrays(int64_t c, const float* cen, const float* sc, const float* sh, const float* rsc, const float* rsh) {
    const float* src[5] = {cen, sc, sh, rsc, rsh};
    const float dflt[5] = {0.f, 1.f, 0.f, 1.f, 0.f};
    for (int j = 0; j < 5; ++j) v[j] = src[j] ? std::vector<float>(src[j], src[j] + c) : std::vector<float>(c, dflt[j]);
  }
  // The arrays repeated k times: element i is channel i % c, for NHWC spans of k rows.
  ChannelArrays tiled(int64_t k) const {
    ChannelArrays t = *this;
    for (auto& arr : t.v) {
      std::vector<float> wide;
      wide.reserve(arr.size() * k);
      for (int64_t r = 0; r < k; ++r) wide.insert(wide.end(), arr.begin(), arr.end());
      arr = std::move(wide);
    }
    return t;
  }
};

// NHWC rows per span: a span has a fixed cost (pointers, loop set-up, ~10 cycles) that on a row of
// few channels is as much as the row's work (16 channels: two vectors; a ResNet-20's 16-channel
// epilogue ran 4x slower in NHWC than in NCHW); spans of several rows, over arrays tiled to match,
// keep it to one per ~256 elements. A power of two dividing kChunkRows.
inline int64_t rows_per_span(int64_t c) {
  int64_t k = 1;
  while (k < kChunkRows && 2 * k * c <= 256) k *= 2;
  return k;
}

struct RowParams {  // NHWC: element i of a row is channel i
  const float* p[5];
  RowParams(const ChannelArrays& a) {
    for (int j = 0; j < 5; ++j) p[j] = a.v[j].data();
  }
  fVec v(int j, int64_t i) const { return fVec::loadu(p[j] + i); }
  float s(int j, int64_t i) const { return p[j][i]; }
};

struct PlaneParams {  // NCHW: every element of a plane is the same channel
  float p[5];
  PlaneParams(const ChannelArrays& a, int64_t c) {
    for (int j = 0; j < 5; ++j) p[j] = a.v[j][c];
  }
  fVec v(int j, int64_t) const { return fVec(p[j]); }
  float s(int j, int64_t) const { return p[j]; }
};
enum { kCentre = 0, kScale = 1, kShift = 2, kResScale = 3, kResShift = 4 };

// Accumulators of per-channel sums. NHWC: arrays indexed by channel; NCHW: vector lanes.
template <int NS>
struct RowAcc {
  float* a[NS];
  void add(int j, int64_t i, const fVec& x) { (fVec::loadu(a[j] + i) + x).store(a[j] + i); }
  void add_s(int j, int64_t i, float x) { a[j][i] += x; }
};

template <int NS>
struct LaneAcc {
  fVec v[NS];
  float s[NS];
  LaneAcc() {
    for (int j = 0; j < NS; ++j) {
      v[j] = fVec(0.f);
      s[j] = 0.f;
    }
  }
  void add(int j, int64_t, const fVec& x) { v[j] = v[j] + x; }
  void add_s(int j, int64_t, float x) { s[j] += x; }
  double total(int j) const {
    float lanes[kW];
    v[j].store(lanes);
    double t = s[j];
    for (int64_t l = 0; l < kW; ++l) t += lanes[l];
    return t;
  }
};

// Runs `span(offset, length, params, acc)` over every row (NHWC) or plane (NCHW) and reduces
// NS per-channel sums into fp64 `out[j][c]`.
template <int NS, class Span>
void reduce_channels(const Shape& s, const ChannelArrays& arrays, std::vector<double>* out, const Span& span) {
  const int64_t C = s.c;
  for (int j = 0; j < NS; ++j) out[j].assign(C, 0.0);
  if (s.nhwc) {
    const int64_t k = rows_per_span(C), width = k * C;  // a span of k rows: accumulators per element
    const ChannelArrays wide = arrays.tiled(k);
    const RowParams rp(wide);
    const int64_t rows = s.n * s.hw;
    const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
    std::vector<double> part(chunks * NS * C);
    at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / (kChunkRows * C)), [&](int64_t b, int64_t e) {
      std::vector<float> acc(NS * width);
      RowAcc<NS> ra;
      for (int j = 0; j < NS; ++j) ra.a[j] = acc.data() + j * width;
      for (int64_t ch = b; ch < e; ++ch) {
        std::fill(acc.begin(), acc.end(), 0.f);
        const int64_t r1 = std::min(rows, (ch + 1) * kChunkRows);
        int64_t r = ch * kChunkRows;
        for (; r + k <= r1; r += k) span(r * C, width, rp, ra);
        for (; r < r1; ++r) span(r * C, C, rp, ra);  // the last chunk's rows past a multiple of k
        for (int j = 0; j < NS; ++j) {
          for (int64_t c = 0; c < C; ++c) {
            double sum = 0.0;
            for (int64_t t = 0; t < k; ++t) sum += acc[j * width + t * C + c];
            part[(ch * NS + j) * C + c] = sum;
          }
        }
      }
    });
    for (int64_t ch = 0; ch < chunks; ++ch)
      for (int j = 0; j < NS; ++j)
        for (int64_t c = 0; c < C; ++c) out[j][c] += part[(ch * NS + j) * C + c];
  } else {
    const int64_t planes = s.n * C;
    std::vector<double> part(planes * NS);
    at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(s.hw, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const PlaneParams pp(arrays, p % C);
        double tot[NS] = {};
        for (int64_t i = 0; i < s.hw; i += kChunkPlane) {
          LaneAcc<NS> la;
          span(p * s.hw + i, std::min(kChunkPlane, s.hw - i), pp, la);
          for (int j = 0; j < NS; ++j) tot[j] += la.total(j);
        }
        for (int j = 0; j < NS; ++j) part[p * NS + j] = tot[j];
      }
    });
    for (int64_t p = 0; p < planes; ++p)
      for (int j = 0; j < NS; ++j) out[j][p % C] += part[p * NS + j];
  }
}

// Runs `span(offset, length, params)` over every row (NHWC) or plane (NCHW), in parallel.
template <class Span>
void for_each_span(const Shape& s, const ChannelArrays& arrays, const Span& span) {
  if (s.nhwc) {
    const int64_t k = rows_per_span(s.c);
    const ChannelArrays wide = arrays.tiled(k);
    const RowParams rp(wide);
    at::parallel_for(0, s.n * s.hw, std::max<int64_t>(k, kGrain / s.c), [&](int64_t b, int64_t e) {
      int64_t r = b;
      for (; r + k <= e; r += k) span(r * s.c, k * s.c, rp);
      for (; r < e; ++r) span(r * s.c, s.c, rp);
    });
  } else {
    at::parallel_for(0, s.n * s.c, std::max<int64_t>(1, kGrain / std::max<int64_t>(s.hw, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) span(p * s.hw, s.hw, PlaneParams(arrays, p % s.c));
    });
  }
}

// Where the span starting at dense offset `off` (a plane or part of one, NCHW) starts in a y whose
// samples lie `batch_stride` apart (Kernels::strided_nchw_y; 0: dense, as every other tensor).
inline int64_t y_offset(const Shape& s, int64_t batch_stride, int64_t off) {
  if (batch_stride == 0) return off;
  const int64_t per_sample = s.c * s.hw;
  return off + (off / per_sample) * (batch_stride - per_sample);
}

// out = act((y - centre) * scale + shift + (res * res_scale + res_shift)), layout-agnostic
// (rows or planes). Moves 2 tensors (3 with a residual); unfused, BN + add + activation move 6
// (BN read/write, add read 2/write, activation read/write), and the downsample BN 2 more.
// Affine = false: no centre, scale, res_scale or res_shift (a conv's epilogue: act(y + bias + res)).
// Its loop loads only y, the shift and the residual: in NHWC, where the per-channel parameters are
// vectors reloaded on every row, the affine form's five loads a vector made a 16-channel epilogue
// four times slower than the NCHW one (broadcast scalars).
template <typename Y, typename R, typename O, int A, bool Affine>
void bn_apply_fwd_cpu_kernel(const ApplyArgs& a) {
  const ChannelArrays arr(a.shape.c, a.centre, a.scale, a.shift, a.res_scale, a.res_shift);
  const Y* y = static_cast<const Y*>(a.y);
  const R* res = static_cast<const R*>(a.res);
  O* out = static_cast<O*>(a.out);
  for_each_span(a.shape, arr, [&](int64_t off, int64_t len, const auto& p) {
    const Y* yp = y + y_offset(a.shape, a.y_batch_stride, off);
    const R* rp = res ? res + off : nullptr;
    O* op = out + off;
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      fVec y0, y1;
      load2(yp + i, y0, y1);
      fVec z0, z1;
      if constexpr (Affine) {
        z0 = (y0 - p.v(kCentre, i)) * p.v(kScale, i) + p.v(kShift, i);
        z1 = (y1 - p.v(kCentre, i + kW)) * p.v(kScale, i + kW) + p.v(kShift, i + kW);
      } else {
        z0 = y0 + p.v(kShift, i);
        z1 = y1 + p.v(kShift, i + kW);
      }
      if (rp) {
        fVec r0, r1;
        load2(rp + i, r0, r1);
        if constexpr (Affine) {
          z0 = z0 + (r0 * p.v(kResScale, i) + p.v(kResShift, i));
          z1 = z1 + (r1 * p.v(kResScale, i + kW) + p.v(kResShift, i + kW));
        } else {
          z0 = z0 + r0;
          z1 = z1 + r1;
        }
      }
      store2(op + i, act_fwd_v<A>(z0), act_fwd_v<A>(z1));
    }
    for (; i < len; ++i) {
      float z = Affine ? (static_cast<float>(yp[i]) - p.s(kCentre, i)) * p.s(kScale, i) + p.s(kShift, i)
                       : static_cast<float>(yp[i]) + p.s(kShift, i);
      if (rp) z += Affine ? static_cast<float>(rp[i]) * p.s(kResScale, i) + p.s(kResShift, i) : static_cast<float>(rp[i]);
      op[i] = static_cast<O>(act_fwd(z, A));
    }
  });
}

// Mean and biased variance per channel, from sums of d = y - y[0, c, 0, 0] and d * d: shifting
// by a sample of the channel keeps the fp32 sums free of the cancellation of E[y^2] - E[y]^2.
// One read of y (torch.var_mean reads it once too; BatchNorm's training forward reads it twice
// more to normalise and write, which here is deferred to the next op's prologue/epilogue).
template <typename Y>
void bn_stats_cpu_kernel(const StatsArgs& a) {
  const Shape& s = a.shape;
  const Y* y = static_cast<const Y*>(a.y);
  std::vector<float> pivot(s.c);
  for (int64_t c = 0; c < s.c; ++c) pivot[c] = static_cast<float>(y[s.nhwc ? c : c * s.hw]);
  const ChannelArrays arr(s.c, pivot.data(), nullptr, nullptr, nullptr, nullptr);
  std::vector<double> sums[2];
  reduce_channels<2>(s, arr, sums, [&](int64_t off, int64_t len, const auto& p, auto& acc) {
    const Y* yp = y + off;
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      fVec y0, y1;
      load2(yp + i, y0, y1);
      const fVec d0 = y0 - p.v(kCentre, i), d1 = y1 - p.v(kCentre, i + kW);
      acc.add(0, i, d0);
      acc.add(0, i + kW, d1);
      acc.add(1, i, d0 * d0);
      acc.add(1, i + kW, d1 * d1);
    }
    for (; i < len; ++i) {
      const float d = static_cast<float>(yp[i]) - p.s(kCentre, i);
      acc.add_s(0, i, d);
      acc.add_s(1, i, d * d);
    }
  });
  const double m = static_cast<double>(s.per_channel());
  for (int64_t c = 0; c < s.c; ++c) {
    const double d = sums[0][c] / m;
    a.mean[c] = static_cast<float>(pivot[c] + d);
    a.var[c] = static_cast<float>(std::max(sums[1][c] / m - d * d, 0.0));
  }
}

// dz = act_bwd(grad, z) (z the recomputed pre-activation); grad_y = dz * scale, grad_res =
// dz * res_scale, and sum(dz), sum(dz * y), sum(dz * res): reads grad, y (and res) once and
// writes each gradient once, 5 tensors with a residual; unfused, activation backward (3), the add's
// gradient fan-out and the BN backward(s) (about 5 each: two reductions, then the input gradient)
// move about 13.
template <typename G, typename Y, typename O, int A>
void bn_apply_bwd_cpu_kernel(const ApplyBackwardArgs& a) {
  const ChannelArrays arr(a.shape.c, nullptr, a.scale, a.shift, a.res_scale, a.res_shift);
  const G* g = static_cast<const G*>(a.grad);
  const Y* y = static_cast<const Y*>(a.y);
  const Y* res = static_cast<const Y*>(a.res);
  O* gy = static_cast<O*>(a.grad_y);
  Y* gr = static_cast<Y*>(a.grad_res);
  const bool want_dz = a.sum_dz, want_dzy = a.sum_dz_y, want_dzr = a.sum_dz_res && res;
  std::vector<double> sums[3];
  reduce_channels<3>(a.shape, arr, sums, [&](int64_t off, int64_t len, const auto& p, auto& acc) {
    const G* gp = g + off;
    const Y* yp = y + y_offset(a.shape, a.y_batch_stride, off);
    const Y* rp = res ? res + off : nullptr;
    O* gyp = gy ? gy + off : nullptr;
    Y* grp = gr ? gr + off : nullptr;
    int64_t i = 0;
    for (; i + kStep <= len; i += kStep) {
      fVec g0, g1, y0, y1, r0(0.f), r1(0.f);
      load2(gp + i, g0, g1);
      load2(yp + i, y0, y1);
      if (rp) load2(rp + i, r0, r1);
      fVec dz0 = g0, dz1 = g1;
      if constexpr (A != kActNone) {
        fVec z0 = y0 * p.v(kScale, i) + p.v(kShift, i);
        fVec z1 = y1 * p.v(kScale, i + kW) + p.v(kShift, i + kW);
        if (rp) {
          z0 = z0 + (r0 * p.v(kResScale, i) + p.v(kResShift, i));
          z1 = z1 + (r1 * p.v(kResScale, i + kW) + p.v(kResShift, i + kW));
        }
        dz0 = act_bwd_v<A>(g0, z0);
        dz1 = act_bwd_v<A>(g1, z1);
      }
      if (gyp) store2(gyp + i, dz0 * p.v(kScale, i), dz1 * p.v(kScale, i + kW));
      if (grp) store2(grp + i, dz0 * p.v(kResScale, i), dz1 * p.v(kResScale, i + kW));
      if (want_dz) {
        acc.add(0, i, dz0);
        acc.add(0, i + kW, dz1);
      }
      if (want_dzy) {
        acc.add(1, i, dz0 * y0);
        acc.add(1, i + kW, dz1 * y1);
      }
      if (want_dzr) {
        acc.add(2, i, dz0 * r0);
        acc.add(2, i + kW, dz1 * r1);
      }
    }
    for (; i < len; ++i) {
      const float yv = static_cast<float>(yp[i]), rv = rp ? static_cast<float>(rp[i]) : 0.f;
      float dz = static_cast<float>(gp[i]);
      if constexpr (A != kActNone) {
        float z = yv * p.s(kScale, i) + p.s(kShift, i);
        if (rp) z += rv * p.s(kResScale, i) + p.s(kResShift, i);
        dz = act_bwd(dz, z, A);
      }
      if (gyp) gyp[i] = static_cast<O>(dz * p.s(kScale, i));
      if (grp) grp[i] = static_cast<Y>(dz * p.s(kResScale, i));
      acc.add_s(0, i, dz);
      acc.add_s(1, i, dz * yv);
      acc.add_s(2, i, dz * rv);
    }
  });
  for (int64_t c = 0; c < a.shape.c; ++c) {
    if (want_dz) a.sum_dz[c] = static_cast<float>(sums[0][c]);
    if (want_dzy) a.sum_dz_y[c] = static_cast<float>(sums[1][c]);
    if (want_dzr) a.sum_dz_res[c] = static_cast<float>(sums[2][c]);
  }
}

// The dtype combinations the op layer uses, for T in {fp32, bf16, fp16}: (T, T, T), (T, T, fp32)
// (a 16-bit tensor into an fp32 convolution) and (fp32, T, T) (an fp32 convolution's output or
// gradient back to T).
template <class F>
void dispatch_one(DType t, const F& f) {
  switch (t) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(c10::BFloat16{});
    case DType::kFloat16: return f(c10::Half{});
  }
}

template <class F>
void dispatch3(DType a, DType b, DType c, const F& f) {
  dispatch_one(b, [&](auto tb) {
    using B = decltype(tb);
    if (a == b && c == b) return f(B{}, B{}, B{});
    if (a == b && c == DType::kFloat32) return f(B{}, B{}, float{});
    if (a == DType::kFloat32 && c == b) return f(float{}, B{}, B{});
    TORCH_CHECK(false, "fused_resnet_native: unsupported dtype combination");
  });
}

inline void apply(const ApplyArgs& a) {
  DType r = a.res ? a.res_dtype : (a.y_dtype == DType::kFloat32 ? a.out_dtype : a.y_dtype);
  dispatch3(a.y_dtype, r, a.out_dtype, [&](auto ty, auto tr, auto to) {
    with_act(a.act, [&](auto act) {
      if (a.centre || a.scale || a.res_scale || a.res_shift)
        bn_apply_fwd_cpu_kernel<decltype(ty), decltype(tr), decltype(to), decltype(act)::value, true>(a);
      else
        bn_apply_fwd_cpu_kernel<decltype(ty), decltype(tr), decltype(to), decltype(act)::value, false>(a);
    });
  });
}

inline void apply_backward(const ApplyBackwardArgs& a) {
  DType o = a.grad_y ? a.grad_y_dtype : a.y_dtype;
  dispatch3(a.grad_dtype, a.y_dtype, o, [&](auto tg, auto ty, auto to) {
    with_act(a.act, [&](auto act) {
      bn_apply_bwd_cpu_kernel<decltype(tg), decltype(ty), decltype(to), decltype(act)::value>(a);
    });
  });
}

inline void stats(const StatsArgs& a) {
  dispatch_one(a.dtype, [&](auto t) { bn_stats_cpu_kernel<decltype(t)>(a); });
}

inline int64_t no_workspace(const Shape&) { return 0; }

// This instruction set's kernel table (register_cpu.cpp chooses among them). Half-precision
// convolutions run in fp32 on the CPU, as in the reference: oneDNN's 16-bit convolutions need
// AVX512-BF16/FP16 to be fast, and fp32 rounds once instead of per op.
const Kernels& isa_kernels() {
  static const Kernels k{&apply, &apply_backward, &stats, &no_workspace, /*half_conv_in_fp32=*/true,
                                /*strided_nchw_y=*/true};
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace fused_resnet_native::cpu
