// nn.BatchNorm2d's running-statistics update (the op update_running_stats_, and inside conv_bn).
#include <ATen/ATen.h>

#include "fused_ops.h"

namespace fused_resnet_native {

void update_running_stats_(const Tensor& running_mean, const Tensor& running_var, const Tensor& num_batches_tracked,
                           const Tensor& mean, const Tensor& var, int64_t count, std::optional<double> momentum) {
  TORCH_CHECK(count > 1, "Expected more than 1 value per channel when training, got ", count);
  const auto f32_vector = [](const Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous();
  };
  if (f32_vector(running_mean) && f32_vector(running_var) && f32_vector(mean) && f32_vector(var) &&
      num_batches_tracked.device().is_cpu() && num_batches_tracked.scalar_type() == at::kLong &&
      num_batches_tracked.numel() == 1) {
    // On the CPU, one loop instead of the ~12 small ATen ops below (they cost ~50 us a BN on the
    // host); the same fp64 arithmetic in the same order, so the same results. Writes through raw
    // pointers are made visible to PyTorch by their version counters.
    int64_t* batches = num_batches_tracked.data_ptr<int64_t>();
    *batches += 1;
    const double factor = momentum.has_value() ? *momentum : 1.0 / static_cast<double>(*batches);
    const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
    float* rm = running_mean.data_ptr<float>();
    float* rv = running_var.data_ptr<float>();
    const float* m = mean.const_data_ptr<float>();
    const float* v = var.const_data_ptr<float>();
    for (int64_t c = 0; c < running_mean.numel(); ++c) {
      rm[c] = static_cast<float>(factor * static_cast<double>(m[c]) + (1 - factor) * static_cast<double>(rm[c]));
      rv[c] = static_cast<float>(factor * (static_cast<double>(v[c]) * unbias) +
                                 (1 - factor) * static_cast<double>(rv[c]));
    }
    for (const Tensor* t : {&running_mean, &running_var, &num_batches_tracked}) {
      t->unsafeGetTensorImpl()->bump_version();
    }
    return;
  }
  // As nn.BatchNorm2d, in fp64 and without a host sync: the cumulative-average factor stays on the device.
  num_batches_tracked.add_(1);
  const auto dbl = mean.options().dtype(at::kDouble);
  Tensor factor = momentum.has_value() ? at::scalar_tensor(*momentum, dbl)
                                       : num_batches_tracked.to(at::kDouble).reciprocal();
  Tensor unbiased = var.to(at::kDouble) * (static_cast<double>(count) / static_cast<double>(count - 1));
  running_mean.copy_(factor * mean.to(at::kDouble) + (1 - factor) * running_mean.to(at::kDouble));
  running_var.copy_(factor * unbiased + (1 - factor) * running_var.to(at::kDouble));
  // Called below the autograd keys (conv_bn's autograd redispatches there), these in-place ops do not
  // bump the version counters themselves; a second bump where they did is harmless.
  for (const Tensor* t : {&running_mean, &running_var, &num_batches_tracked}) {
    if (!t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace fused_resnet_native
