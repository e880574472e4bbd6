// Torch-free interface between the host side (ops_cuda.cpp, built against torch) and the CUDA kernels
// (*.cu, built with plain nvcc). Launchers take raw device pointers and enqueue on `stream`; they never
// synchronize and never read device memory on the host.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace fastsam {
namespace cuda {

constexpr int kModeIdentity = 0, kModeAbs = 1, kModeRow = 2;  // fastsam/ops/reference.py MODE_*

// Elements per CUDA block in the element-wise ops; also the unit of the partial sums of the reductions.
constexpr int64_t kChunk = 65536;
constexpr int kMaxLists = 7;

// The position of each list of an op in TensorArgs::ptr (and in the kernels' metadata): the one definition of
// the order in which the host packs the lists and the kernels address them. kCount: the op's number of lists.
struct NormSqList {
  enum : int { kGrads, kParams, kEma, kCount };
};
struct DotNormSqList {
  enum : int { kA, kB, kCount };
};
struct RowNormList {
  enum : int { kParams, kOut, kCount };
};
struct PerturbList {
  enum : int { kParams, kGrads, kBackups, kEma, kCount };
};
struct ReflectList {
  enum : int { kParams, kBackups, kDirs, kGrads, kGradCopies, kCount };
};
struct RestoreList {
  enum : int { kParams, kBackups, kCount };
};
// The lists the fused updates start with; each update's own follow them.
struct UpdateList {
  enum : int { kParams, kGrads, kBackups, kGradsB, kGradsC, kCount };
};
struct SgdList : UpdateList {
  enum : int { kMomentumBuffers = UpdateList::kCount, kCount };
};
struct AdamList : UpdateList {
  enum : int { kExpAvgs = UpdateList::kCount, kExpAvgSqs, kCount };
};
static_assert(AdamList::kCount <= kMaxLists, "TensorArgs holds every list of an op");

// One tensor of an op, seen across the op's lists (their positions: the op's list enum above). A list the
// call does not use holds null pointers.
struct TensorArgs {
  void* ptr[kMaxLists];     // ptr[l]: the tensor's data in list l, all of the param dtype except where noted
  int64_t n;                // elements; rows for row_norm_
  int64_t inner;            // elements per row (slice along dim 0): MODE_ROW and row_norm_
  // fp32, read by the kernels: one scale per row under MODE_ROW (row_scales[j]), the step count of
  // restore_adam_ with device steps (steps[j]); null otherwise
  const float* aux;
};

inline int64_t chunks_of(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Blocks of the first stage of a reduction: each writes its partial sums to the fp32 scratch buffer, whose
// size is this count times the sums per block (1 for launch_norm_sq, 2 for launch_dot_norm_sq).
inline int64_t reduction_blocks(const TensorArgs* t, int n) {
  int64_t total = 0;
  for (int j = 0; j < n; ++j) total += chunks_of(t[j].n);
  return total;
}

// Loss scaling and skipped steps (reference.py's module docstring): fp32 one-element device tensors, null
// when not given. Read in the kernels, never on the host, so a step stays capturable in a CUDA graph.
struct AmpArgs {
  const float* inv_scale;  // every read of the op's grads list is g * inv_scale
  const float* found_inf;  // nonzero: the step is skipped, w stays (or is put back) where it began
};

// The EMA list of perturb_. The kind decides which memory the kernel touches, so it is a compile-time
// switch; sigma == 0 and lmbda == 0 within kFull are uniform selects, free in a bandwidth-bound loop.
enum class EmaKind : int {
  kNone = 0,  // no ema list: d = g
  kCopy = 1,  // sigma == 0 and lmbda == 0: m <- g, d = g; m is only written
  kFull = 2,  // m is read: d = g - sigma m unless sigma == 0, then m <- lmbda m + (1 - lmbda) g unless lmbda == 0
};
struct EmaArgs {
  EmaKind kind;
  bool sub;   // sigma != 0 in double, as the reference decides it
  bool copy;  // lmbda == 0 in double
  float sigma, lmbda, one_minus_lmbda;
};

// The grad the fused updates use: g, or coef[0] g + coef[1] g_b + coef[2] g_c with coef on the device.
constexpr unsigned kTermCoef = 1, kTermB = 2, kTermC = 4;
struct GradArgs {
  unsigned terms;     // 0 (g alone) or kTermCoef plus kTermB / kTermC for the grads_b / grads_c lists given
  const float* coef;  // fp32 [3], read by the kernels when terms != 0
};

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
  // Each tensor's step count is on the device (TensorArgs::aux): each block calls set_step with it, so the
  // host's neg_step_size and bias_correction2_sqrt are not used.
  bool device_steps;
  struct {
    double lr, beta1, beta2;
  } exact;  // set_step's inputs as the host has them (the float beta2 above is rounded)

  // The bias corrections at a step count (after increment), in double as reference.restore_adam_ computes
  // them; one definition for the host's float step and the kernels' device steps.
  __host__ __device__ void set_step(double step) {
    neg_step_size = float(-(exact.lr / (1 - pow(exact.beta1, step))));
    bias_correction2_sqrt = float(sqrt(1 - pow(exact.beta2, step)));
  }
};

// Lists: NormSqList; acc[0] += sum (T d)^2 with d = g - sigma ema when `sub`, else g (ema unused).
// `inv_scale`: device pointer or null, as AmpArgs. `partials`: reduction_blocks(t, n) floats of scratch.
void launch_norm_sq(DType dt, const TensorArgs* t, int n, int mode, float eta, bool sub, float sigma,
                    const float* inv_scale, float* partials, float* acc, cudaStream_t stream);
// Lists: DotNormSqList; acc[0] += sum a b, acc[1] += sum b^2. `partials`: 2 * reduction_blocks(t, n) floats.
void launch_dot_norm_sq(DType dt, const TensorArgs* t, int n, float* partials, float* acc, cudaStream_t stream);
// Lists: RowNormList, out of fp32; t[j].n = rows, t[j].inner = elements per row. out[r] = ||w[r]|| + eta.
void launch_row_norm(DType dt, const TensorArgs* t, int n, float eta, cudaStream_t stream);
// Lists: PerturbList. `norm_sq` is a device pointer, read only when !sign.
void launch_perturb(DType dt, const TensorArgs* t, int n, const float* norm_sq, float rho, float eps, int mode,
                    float eta, bool sign, const EmaArgs& ema, const AmpArgs& amp, cudaStream_t stream);
// Lists: ReflectList; grads and grad_copies are used when `copy`. `norm_sq`: device.
void launch_reflect(DType dt, const TensorArgs* t, int n, const float* norm_sq, float rho, float eps, bool copy,
                    const AmpArgs& amp, cudaStream_t stream);
// Lists: RestoreList.
void launch_restore(DType dt, const TensorArgs* t, int n, cudaStream_t stream);
// Lists: SgdList; lists that `g` and `a` leave out are unused. Without a restore, backups holds the params
// themselves. inv_scale scales grads alone.
void launch_restore_sgd(DType dt, const TensorArgs* t, int n, const GradArgs& g, const SgdArgs& a,
                        const AmpArgs& amp, cudaStream_t stream);
// Lists: AdamList; as launch_restore_sgd.
void launch_restore_adam(DType dt, const TensorArgs* t, int n, const GradArgs& g, const AdamArgs& a,
                         const AmpArgs& amp, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsam
