// The CPU kernels built for AVX2 + FMA (256-bit at::vec), chosen at run time by register_cpu.cpp
// when the CPU has them; see bn_kernels.h. The target pragma comes after the headers that are not
// instruction-set specific, so that only the at::vec code (in the AVX2 namespace) and these
// kernels are compiled for AVX2; nothing shared with the baseline build can pick up AVX2 code.
#if defined(__x86_64__) && defined(__GNUC__)
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#pragma GCC target("avx2,fma,f16c")
// The pragma does not define the macros that sleef.h and at::vec test; the -mavx2 build would.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "bn_kernels.h"
#endif
