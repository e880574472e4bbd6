// Torch-free: the dtype of a launcher's tensors, one enum for the SAM launchers (kernels.h: the first three)
// and the CVaR launchers (cvar_kernels.h: all four).
#pragma once

namespace fastsam {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

}  // namespace cuda
}  // namespace fastsam
