// The activations of ../kernels.h (act_fwd, act_bwd) on at::vec vectors: included by bn_kernels.h inside
// its CPU_CAPABILITY namespace, so compiled once per instruction set as the kernels are.
// The activations of kernels.h on vectors (the same math; at::vec's maximum/minimum propagate NaN).
// The kernels take the code as a template argument (with_act), so that each loop holds one of them.
template <int A>
inline fVec act_fwd_v(const fVec& z) {
  if constexpr (A == kActRelu) return at::vec::maximum(z, fVec(0.f));
  else if constexpr (A == kActRelu6) return at::vec::minimum(at::vec::maximum(z, fVec(0.f)), fVec(6.f));
  else if constexpr (A == kActSilu) return z / (fVec(1.f) + z.neg().exp());
  else if constexpr (A == kActHardswish) {
    const fVec t = at::vec::minimum(at::vec::maximum(z + fVec(3.f), fVec(0.f)), fVec(6.f));
    return z * t / fVec(6.f);
  } else if constexpr (A == kActLeakyRelu || A == kActLeakyRelu01) {
    // ATen's vector form: blend(z * slope, z, z > 0); NaN fails z > 0 and stays NaN through the product.
    return fVec::blendv(z * fVec(leaky_slope(A)), z, z > fVec(0.f));
  } else return z;
}

template <int A>
inline fVec act_bwd_v(const fVec& g, const fVec& z) {
  const fVec zero(0.f);
  if constexpr (A == kActRelu) return fVec::blendv(zero, g, z > zero);
  else if constexpr (A == kActRelu6) return fVec::blendv(zero, g, (z > zero) & (z < fVec(6.f)));
  else if constexpr (A == kActSilu) {
    const fVec s = fVec(1.f) / (fVec(1.f) + z.neg().exp());
    return g * (s * (fVec(1.f) + z * (fVec(1.f) - s)));
  } else if constexpr (A == kActHardswish) {
    // kernels.h's branches as blends: 0 for z <= -3, g for z >= 3, g * (z / 3 + 1/2) between.
    const fVec mid = g * (z / fVec(3.f) + fVec(0.5f));
    return fVec::blendv(fVec::blendv(g, mid, z < fVec(3.f)), zero, z <= fVec(-3.f));
  } else if constexpr (A == kActLeakyRelu || A == kActLeakyRelu01) {
    return fVec::blendv(g * fVec(leaky_slope(A)), g, z > zero);
  } else return g;
}

template <class F>
void with_act(int act, const F& f) {
  switch (act) {
    case kActNone: return f(std::integral_constant<int, kActNone>{});
    case kActRelu: return f(std::integral_constant<int, kActRelu>{});
    case kActRelu6: return f(std::integral_constant<int, kActRelu6>{});
    case kActSilu: return f(std::integral_constant<int, kActSilu>{});
    case kActHardswish: return f(std::integral_constant<int, kActHardswish>{});
    case kActLeakyRelu: return f(std::integral_constant<int, kActLeakyRelu>{});
    case kActLeakyRelu01: return f(std::integral_constant<int, kActLeakyRelu01>{});
  }
  TORCH_CHECK(false, "fused_resnet_native: unknown activation code ", act);
}
