// CUDA kernels of the fused SAM ops. The math of each op is fastsam/ops/reference.py: fp32 arithmetic
// whatever the param dtype, one rounding per store, the reference's order of operations.
// IEEE __fdiv_rn / __fsqrt_rn where setup.py's --use_fast_math would otherwise approximate.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct Tag {
  using type = T;
};

template <class F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return f(Tag<__half>{});
  }
}

template <class F>
void dispatch_mode(int mode, F&& f) {
  switch (mode) {
    case kModeIdentity: return f(std::integral_constant<int, kModeIdentity>{});
    case kModeAbs: return f(std::integral_constant<int, kModeAbs>{});
    case kModeRow: return f(std::integral_constant<int, kModeRow>{});
  }
}

template <class F>
void dispatch_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  f(std::false_type{});
}

// Sum over aligned groups of g threads (g a power of two <= kBlock, the same in the whole block; every
// thread of the block must call it). The result is valid in each group's first thread. The order of the
// additions is fixed, so the result is deterministic.
__device__ __forceinline__ float group_sum(float v, int g) {
  __shared__ float warp_sums[kBlock / 32];
  for (int off = (g < 32 ? g : 32) / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (g > 32) {
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x % g == 0) {
      v = 0.f;
      for (int w = 0; w < g / 32; ++w) v += warp_sums[threadIdx.x / 32 + w];
    }
  }
  return v;
}

// The normalization operator T of (A)SAM at element i of the block's tensor.
template <int MODE>
struct TOp {
  float eta;
  const float* row_scale = nullptr;
  int64_t inner = 1;
  bool narrow = true;  // 32-bit division suffices for the row index

  template <int L>
  __device__ void bind(const TensorListMeta<L>& m, int slot) {
    row_scale = m.row_scale[slot];
    inner = m.inner[slot];
    narrow = m.n[slot] <= 0xffffffffLL;
  }
  __device__ float operator()(float w, int64_t i) const {
    if constexpr (MODE == kModeAbs) return fabsf(w) + eta;
    if constexpr (MODE == kModeRow)
      return __ldg(row_scale + (narrow ? int64_t(uint32_t(i) / uint32_t(inner)) : i / inner));
    return 1.f;
  }
};

struct OpBase {
  template <int L>
  __device__ void bind(const TensorListMeta<L>&, int) {}
  __device__ void finish() {}
};

// Body of every element-wise op: one block per chunk.
template <typename T, class Op>
struct Elementwise {
  Op op;
  template <int L>
  __device__ void operator()(const TensorListMeta<L>& m) const {
    const int slot = m.block_tensor[blockIdx.x];
    Op o = op;
    o.bind(m, slot);
    for_each_element<T>(m, slot, o);
    o.finish();
  }
};

// Lists {grads, params}. Stage 1 of norm_sq_: each block writes the partial of its chunk.
template <typename T, int MODE>
struct NormSqOp {
  static constexpr unsigned kLoad = MODE == kModeAbs ? 0b11 : 0b01, kStore = 0;
  TOp<MODE> t;
  float* partials;  // this launch's block 0 writes partials[0]
  float sum = 0.f;

  template <int L>
  __device__ void bind(const TensorListMeta<L>& m, int slot) {
    t.bind(m, slot);
    sum = 0.f;
  }
  __device__ void operator()(T (&x)[2], int64_t i) {
    float w = 0.f;
    if constexpr (MODE == kModeAbs) w = to_f(x[1]);
    const float v = t(w, i) * to_f(x[0]);
    sum += v * v;
  }
  __device__ void finish() {
    const float s = group_sum(sum, kBlock);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
  }
};

// Stage 2 of norm_sq_: one block adds the partials in a fixed order, so the result is deterministic.
__global__ void __launch_bounds__(kBlock) sum_partials_kernel(const float* partials, int64_t n, float* acc) {
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kBlock) s += partials[i];
  s = group_sum(s, kBlock);
  if (threadIdx.x == 0) acc[0] += s;
}

// Lists {params, grads, backups}.
template <typename T, int MODE, bool SIGN>
struct PerturbOp {
  static constexpr unsigned kLoad = 0b011, kStore = 0b101;
  TOp<MODE> t;
  const float* norm_sq;
  float rho, eps;
  float scale = 0.f;

  template <int L>
  __device__ void bind(const TensorListMeta<L>& m, int slot) {
    t.bind(m, slot);
    scale = SIGN ? rho : __fdiv_rn(rho, __fsqrt_rn(*norm_sq) + eps);
  }
  __device__ void operator()(T (&x)[3], int64_t i) const {
    x[2] = x[0];
    const float w = to_f(x[0]), g = to_f(x[1]), tw = t(w, i);
    const float e = SIGN ? scale * tw * float((g > 0.f) - (g < 0.f)) : scale * (tw * tw) * g;
    x[0] = from_f<T>(w + e);
  }
  __device__ void finish() {}
};

// Lists {params, backups}: a raw copy, bit-exact for every dtype (NaN payloads included).
template <typename T>
struct RestoreOp : OpBase {
  static constexpr unsigned kLoad = 0b10, kStore = 0b01;
  __device__ void operator()(T (&x)[2], int64_t) const { x[0] = x[1]; }
};

// Lists {params, grads, backups, momentum_buffers}.
template <typename T, bool MOMENTUM>
struct SgdOp : OpBase {
  static constexpr unsigned kLoad = MOMENTUM ? 0b1110 : 0b0110, kStore = MOMENTUM ? 0b1001 : 0b0001;
  SgdArgs a;
  __device__ void operator()(T (&x)[4], int64_t) const {
    const float w = to_f(x[2]);
    float d = to_f(x[1]);
    if (a.maximize) d = -d;
    if (a.weight_decay != 0.f) d += a.weight_decay * w;
    if constexpr (MOMENTUM) {
      // The update uses the fp32 buffer value, before its rounding to the buffer dtype.
      const float buf = a.init_momentum ? d : to_f(x[3]) * a.momentum + a.one_minus_dampening * d;
      x[3] = from_f<T>(buf);
      d = a.nesterov ? d + a.momentum * buf : buf;
    }
    x[0] = from_f<T>(w - a.lr * d);
  }
};

// Lists {params, grads, backups, exp_avgs, exp_avg_sqs}.
template <typename T>
struct AdamOp : OpBase {
  static constexpr unsigned kLoad = 0b11110, kStore = 0b11001;
  AdamArgs a;
  __device__ void operator()(T (&x)[5], int64_t) const {
    float w = to_f(x[2]), g = to_f(x[1]);
    if (a.maximize) g = -g;
    if (a.weight_decay != 0.f) {
      if (a.decoupled) w *= a.decay_factor;
      else g += a.weight_decay * w;
    }
    // torch.lerp's two-sided formula, exact at both ends.
    const float m0 = to_f(x[3]), diff = g - m0;
    const float m = fabsf(a.lerp_weight) < 0.5f ? m0 + a.lerp_weight * diff : g - diff * (1.f - a.lerp_weight);
    const float v = to_f(x[4]) * a.beta2 + a.one_minus_beta2 * g * g;
    x[3] = from_f<T>(m);
    x[4] = from_f<T>(v);
    const float denom = __fdiv_rn(__fsqrt_rn(v), a.bias_correction2_sqrt) + a.eps;
    x[0] = from_f<T>(w + __fdiv_rn(a.neg_step_size * m, denom));
  }
};

// Threads per row of row_norm_: a power of two giving each thread ~8 elements, at most the whole block.
__host__ __device__ inline int row_group(int64_t inner) {
  int g = 1;
  while (g < kBlock && int64_t(g) * 8 < inner) g <<= 1;
  return g;
}

// Lists {params, out}; a unit is kBlock / G consecutive rows of G threads each.
template <typename T>
struct RowNormBody {
  float eta;
  __device__ void operator()(const TensorListMeta<2>& m) const {
    const int slot = m.block_tensor[blockIdx.x];
    const int64_t inner = m.inner[slot];
    const int g = row_group(inner);
    const int64_t row = int64_t(m.block_unit[blockIdx.x]) * (kBlock / g) + threadIdx.x / g;
    const bool valid = row < m.n[slot];
    float s = 0.f;
    if (valid) {
      const T* w = static_cast<const T*>(m.ptr[0][slot]) + row * inner;
      for (int64_t k = threadIdx.x % g; k < inner; k += g) {
        const float x = to_f(w[k]);
        s += x * x;
      }
    }
    s = group_sum(s, g);  // every thread takes part: the shuffles need full warps
    if (valid && threadIdx.x % g == 0) static_cast<float*>(m.ptr[1][slot])[row] = __fsqrt_rn(s) + eta;
  }
};

template <int L, class Units, class MakeBody>
void launch_apply(const TensorArgs* t, int n, cudaStream_t stream, Units units, MakeBody make_body) {
  multi_tensor_apply<L>(t, n, units, [&](const TensorListMeta<L>& m, int blocks, int64_t first_block) {
    multi_tensor_kernel<<<blocks, kBlock, 0, stream>>>(m, make_body(first_block));
  });
}

// Element-wise ops: one unit per chunk.
template <int L, typename T, class Op>
void launch_elementwise(const TensorArgs* t, int n, cudaStream_t stream, const Op& op) {
  launch_apply<L>(t, n, stream, [](const TensorArgs& a) { return chunks_of(a.n); },
                  [&](int64_t) { return Elementwise<T, Op>{op}; });
}

}  // namespace

void launch_norm_sq(DType dt, const TensorArgs* t, int n, int mode, float eta, float* partials, float* acc,
                    cudaStream_t stream) {
  const int64_t num_partials = norm_sq_partials(t, n);
  if (num_partials == 0) return;
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_mode(mode, [&](auto md) {
      constexpr int M = decltype(md)::value;
      launch_apply<2>(t, n, stream, [](const TensorArgs& a) { return chunks_of(a.n); }, [&](int64_t first) {
        return Elementwise<T, NormSqOp<T, M>>{{TOp<M>{eta}, partials + first}};
      });
    });
  });
  sum_partials_kernel<<<1, kBlock, 0, stream>>>(partials, num_partials, acc);
}

void launch_row_norm(DType dt, const TensorArgs* t, int n, float eta, cudaStream_t stream) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_apply<2>(
        t, n, stream,
        [](const TensorArgs& a) {
          const int rows_per_block = kBlock / row_group(a.inner);
          return (a.n + rows_per_block - 1) / rows_per_block;
        },
        [&](int64_t) { return RowNormBody<T>{eta}; });
  });
}

void launch_perturb(DType dt, const TensorArgs* t, int n, const float* norm_sq, float rho, float eps, int mode,
                    float eta, bool sign, cudaStream_t stream) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_mode(mode, [&](auto md) {
      dispatch_bool(sign, [&](auto sg) {
        using Op = PerturbOp<T, decltype(md)::value, decltype(sg)::value>;
        launch_elementwise<3, T>(t, n, stream, Op{{eta}, norm_sq, rho, eps});
      });
    });
  });
}

void launch_restore(DType dt, const TensorArgs* t, int n, cudaStream_t stream) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_elementwise<2, T>(t, n, stream, RestoreOp<T>{});
  });
}

void launch_restore_sgd(DType dt, const TensorArgs* t, int n, const SgdArgs& a, cudaStream_t stream) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bool(a.use_momentum, [&](auto mom) {
      launch_elementwise<4, T>(t, n, stream, SgdOp<T, decltype(mom)::value>{{}, a});
    });
  });
}

void launch_restore_adam(DType dt, const TensorArgs* t, int n, const AdamArgs& a, cudaStream_t stream) {
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_elementwise<5, T>(t, n, stream, AdamOp<T>{{}, a});
  });
}

}  // namespace cuda
}  // namespace fastsam
