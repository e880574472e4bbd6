// Torch-free interface between the host side of the CUDA CVaR ops (cvar_cuda.cpp, built against torch) and
// their kernels (cvar_kernels.cu, built with plain nvcc). The math is fastsam/ops/cvar_reference.py.
//
// Launchers take raw device pointers and enqueue on `stream`; they never synchronize and never read device
// memory on the host: the number of valid losses, k, the threshold and the tie counts stay on the device,
// so a call can be captured in a CUDA graph. Every launcher needs a scratch `workspace` of
// cvar_workspace_bytes(...) bytes (uninitialized device memory, 256-byte aligned) and at least one loss slot
// (the host answers calls without rows itself).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace fastsam {
namespace cuda {

// The input (losses or logits) is of any DType. Losses are computed and reduced in "opmath": fp32, fp64 for fp64.

enum class CvarOp : int { kSelect = 0, kCrossEntropy = 1, kBceElement = 2, kBceSample = 3 };

// Losses of one call ("slots": rows, or rows * labels for kBceElement) up to this count are selected by one
// block holding them all in shared memory; more take the multi-kernel radix select.
int64_t cvar_small_max(DType dt);

// Scratch bytes of a call of `op` on `rows` x `cols` inputs (cols = 1 for kSelect).
size_t cvar_workspace_bytes(CvarOp op, DType dt, int64_t rows, int64_t cols);

// Outputs common to the three ops: `value` and `var` are 0-dim tensors of the opmath dtype (fp32, or fp64
// for fp64 inputs); `out` is the weights / grad_logits tensor, of the input dtype and shape.
struct CvarOutputs {
  void* value;
  void* var;
  void* out;
};

// losses: [n] of dt, every loss valid.
cudaError_t launch_cvar_select(DType dt, const void* losses, int64_t n, double alpha, const CvarOutputs& out,
                               void* workspace, cudaStream_t stream);

// logits: [n, c] of dt; target: [n] int64, rows with target == ignore_index excluded.
cudaError_t launch_cvar_cross_entropy(DType dt, const void* logits, const int64_t* target, int64_t n, int64_t c,
                                      double alpha, int64_t ignore_index, double label_smoothing,
                                      const CvarOutputs& out, void* workspace, cudaStream_t stream);

// logits, target: [n, l] of dt; pos_weight: null or fp32 [l]. `ignore` is ignore_index already rounded to dt
// (as torch compares a tensor with a Python float: the float converted to the tensor's dtype).
cudaError_t launch_cvar_bce_with_logits(DType dt, const void* logits, const void* target,
                                        const float* pos_weight, int64_t n, int64_t l, double alpha,
                                        bool per_sample, double ignore, const CvarOutputs& out, void* workspace,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsam
