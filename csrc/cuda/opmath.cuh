// The storage types of the kernels (fp32, bf16, fp16, fp64) and their conversions to and from "opmath", the
// type the kernels compute in: fp32, fp64 for fp64. Shared by fused_kernels.cu and cvar_kernels.cu; torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <type_traits>

#include "dtype.h"

namespace fastsam {
namespace cuda {

// fp64 computes in fp64, every other storage type in fp32.
template <typename T>
using Opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_op(float x) { return x; }
__device__ __forceinline__ float to_op(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_op(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_op(double x) { return x; }

// Opmath to storage, rounded to nearest even.
template <typename T>
__device__ __forceinline__ T from_op(Opmath<T> x);
template <>
__device__ __forceinline__ float from_op<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_op<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_op<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ double from_op<double>(double x) { return x; }

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) with T the storage type of `dt`; kFloat64 is dispatched only WITH_FLOAT64 (the CVaR ops): the SAM
// ops take no fp64, so their kernels are not instantiated for it.
template <bool WITH_FLOAT64, class F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kFloat64:
      if constexpr (WITH_FLOAT64) return f(Tag<double>{});
      break;
  }
  // The host checks admit no other dtype; were one to get here, launching nothing would be a silent no-op.
  throw std::invalid_argument("fastsam: a CUDA kernel was asked for a dtype it has no instance of");
}

}  // namespace cuda
}  // namespace fastsam
