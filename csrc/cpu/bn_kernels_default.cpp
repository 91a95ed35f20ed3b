// The CPU kernels for any x86-64/ARM CPU (baseline instruction set); see bn_kernels.h.
#define CPU_CAPABILITY DEFAULT
#include "bn_kernels.h"
