// Torch-free interface between the host side (ops_cuda.cpp, built against torch) and the CUDA kernels
// (*.cu, built with plain nvcc). Launchers take raw device pointers and enqueue on `stream`; they never
// synchronize and never read device memory on the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastsam {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kModeIdentity = 0, kModeAbs = 1, kModeRow = 2;  // fastsam/ops/reference.py MODE_*

// Elements per CUDA block in the element-wise ops; also the unit of the norm_sq_ partial sums.
constexpr int64_t kChunk = 65536;
constexpr int kMaxLists = 5;

// One tensor of an op, seen across the op's lists (the list order is given at each launcher).
struct TensorArgs {
  void* ptr[kMaxLists];     // ptr[l]: the tensor's data in list l, all of the param dtype except where noted
  int64_t n;                // elements; rows for row_norm_
  int64_t inner;            // elements per row (slice along dim 0): MODE_ROW and row_norm_
  const float* row_scale;   // MODE_ROW only: one fp32 scale per row
};

inline int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Size of the fp32 scratch buffer launch_norm_sq needs: one partial per chunk.
inline int64_t norm_sq_partials(const TensorArgs* t, int n) {
  int64_t total = 0;
  for (int j = 0; j < n; ++j) total += chunks_of(t[j].n);
  return total;
}

struct SgdArgs {
  float lr, weight_decay, momentum, one_minus_dampening;
  bool use_momentum;  // momentum != 0 in double: momentum_buffers are given and updated
  bool nesterov, maximize, init_momentum;
};

struct AdamArgs {
  float lerp_weight;     // 1 - beta1
  float beta2, one_minus_beta2, weight_decay;
  float decay_factor;    // 1 - lr * weight_decay (decoupled)
  float eps, neg_step_size, bias_correction2_sqrt;
  bool decoupled, maximize;
};

// Lists {grads, params}; acc[0] += sum (T g)^2. `partials`: norm_sq_partials(t, n) floats of scratch.
void launch_norm_sq(DType dt, const TensorArgs* t, int n, int mode, float eta, float* partials, float* acc,
                    cudaStream_t stream);
// Lists {params, out (fp32)}; t[j].n = rows, t[j].inner = elements per row. out[r] = ||w[r]|| + eta.
void launch_row_norm(DType dt, const TensorArgs* t, int n, float eta, cudaStream_t stream);
// Lists {params, grads, backups}. `norm_sq` is a device pointer, read only when !sign.
void launch_perturb(DType dt, const TensorArgs* t, int n, const float* norm_sq, float rho, float eps, int mode,
                    float eta, bool sign, cudaStream_t stream);
// Lists {params, backups}.
void launch_restore(DType dt, const TensorArgs* t, int n, cudaStream_t stream);
// Lists {params, grads, backups, momentum_buffers}; the last is unused when momentum == 0.
void launch_restore_sgd(DType dt, const TensorArgs* t, int n, const SgdArgs& a, cudaStream_t stream);
// Lists {params, grads, backups, exp_avgs, exp_avg_sqs}.
void launch_restore_adam(DType dt, const TensorArgs* t, int n, const AdamArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsam
