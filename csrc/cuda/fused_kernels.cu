// CUDA kernels of the fused SAM ops. The math of each op is fastsam/ops/reference.py: fp32 arithmetic
// whatever the param dtype, one rounding per store, the reference's order of operations.
// IEEE __fdiv_rn / __fsqrt_rn where setup.py's --use_fast_math would otherwise approximate.
#include <type_traits>

#include "kernels.h"
#include "multi_tensor_apply.cuh"
#include "opmath.cuh"

namespace fastsam {
namespace cuda {
namespace {

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

template <class F>
void dispatch_ema(EmaKind kind, F&& f) {
  switch (kind) {
    case EmaKind::kNone: return f(std::integral_constant<EmaKind, EmaKind::kNone>{});
    case EmaKind::kCopy: return f(std::integral_constant<EmaKind, EmaKind::kCopy>{});
    case EmaKind::kFull: return f(std::integral_constant<EmaKind, EmaKind::kFull>{});
  }
}

// The valid GradArgs::terms: g alone, or coef with any subset of grads_b, grads_c.
template <class F>
void dispatch_terms(unsigned terms, F&& f) {
  switch (terms) {
    case 0: return f(std::integral_constant<unsigned, 0>{});
    case kTermCoef: return f(std::integral_constant<unsigned, kTermCoef>{});
    case kTermCoef | kTermB: return f(std::integral_constant<unsigned, kTermCoef | kTermB>{});
    case kTermCoef | kTermC: return f(std::integral_constant<unsigned, kTermCoef | kTermC>{});
    case kTermCoef | kTermB | kTermC: return f(std::integral_constant<unsigned, kTermCoef | kTermB | kTermC>{});
  }
}

// Sums of K values over aligned groups of g threads (g a power of two <= kBlock, the same in the whole
// block; every thread of the block must call it, once per kernel: the shared buffer is not fenced for
// reuse). The results are valid in each group's first thread. The order of the additions is fixed, so the
// results are deterministic.
template <int K>
__device__ __forceinline__ void group_sum(float (&v)[K], int g) {
  __shared__ float warp_sums[K][kBlock / 32];
  for (int off = (g < 32 ? g : 32) / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if (g > 32) {
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) warp_sums[k][threadIdx.x / 32] = v[k];
    }
    __syncthreads();
    if (threadIdx.x % g == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        v[k] = 0.f;
        for (int w = 0; w < g / 32; ++w) v[k] += warp_sums[k][threadIdx.x / 32 + w];
      }
    }
  }
}

// AmpArgs as the kernels use them, read once per block by load() (in the op's bind). Without inv_scale,
// grad() is the plain read and stored() the raw element, through selects on a kernel argument, so the call
// keeps the math (and bit-exact copies) of a call without loss scaling at no cost in these bandwidth-bound
// loops; without found_inf, skip stays false.
struct Amp {
  AmpArgs args;
  float inv = 1.f;
  bool skip = false;

  __device__ void load() {
    if (args.inv_scale) inv = __ldg(args.inv_scale);
    if (args.found_inf) skip = __ldg(args.found_inf) != 0.f;  // NaN skips too, as in the reference
  }
  // An element of the op's grads list in fp32: one multiply by inv_scale before any other use.
  template <typename T>
  __device__ float grad(T g) const {
    return args.inv_scale ? to_op(g) * inv : to_op(g);
  }
  // The same where the op stores the grad.
  template <typename T>
  __device__ T stored(T g) const {
    return args.inv_scale ? from_op<T>(to_op(g) * inv) : g;
  }
};

// rho / (||d|| + eps) of the p = 2 SAM step, from the squared norm on the device.
__device__ __forceinline__ float sam_scale(const float* norm_sq, float rho, float eps) {
  return __fdiv_rn(rho, __fsqrt_rn(*norm_sq) + eps);
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
    row_scale = m.aux[slot];
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
  static constexpr bool kSkips = false;
  template <int L>
  __device__ void bind(const TensorListMeta<L>&, int) {}
  __device__ void finish() {}
};

// Base of the ops that take a found_inf (in their Amp `amp`): when it is set, the block runs the op's
// skipped(m, slot) instead, which keeps w where the step began.
struct SkippingOpBase : OpBase {
  static constexpr bool kSkips = true;
};

// Body of every element-wise op: one block per chunk. A skipped step is decided per block from the flag on
// the device (apex's noop flag), so the host never reads it.
template <typename T, class Op>
struct Elementwise {
  Op op;
  template <int L>
  __device__ void operator()(const TensorListMeta<L>& m) const {
    const int slot = m.block_tensor[blockIdx.x];
    Op o = op;
    o.bind(m, slot);
    if constexpr (Op::kSkips) {
      if (o.amp.skip) return o.skipped(m, slot);
    }
    for_each_element<T>(m, slot, o);
    o.finish();
  }
};

// Stage 1 of a reduction of K sums: each block writes the sums of its chunk to partials[K * block + k].
template <int K>
struct PartialSums : OpBase {
  static constexpr int kSums = K;
  float* partials;  // this launch's block 0 writes partials[0 .. K)
  float sum[K] = {};

  __device__ void finish() {
    group_sum(sum, kBlock);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) partials[K * blockIdx.x + k] = sum[k];
    }
  }
};

// Stage 2: one block adds the partials in a fixed order, so the result is deterministic.
template <int K>
__global__ void __launch_bounds__(kBlock) sum_partials_kernel(const float* partials, int64_t blocks, float* acc) {
  float s[K] = {};
  for (int64_t i = threadIdx.x; i < blocks; i += kBlock) {
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] += partials[K * i + k];
  }
  group_sum(s, kBlock);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] += s[k];
  }
}

// Stage 1 of norm_sq_. SUB: d = g - sigma m, else d = g and ema is not read.
template <typename T, int MODE, bool SUB>
struct NormSqOp : PartialSums<1> {
  using List = NormSqList;
  static constexpr unsigned kLoad = list_mask(List::kGrads) | (MODE == kModeAbs ? list_mask(List::kParams) : 0u) |
                                    (SUB ? list_mask(List::kEma) : 0u);
  static constexpr unsigned kStore = 0;
  TOp<MODE> t;
  float sigma;
  Amp amp;  // inv_scale only

  template <int L>
  __device__ void bind(const TensorListMeta<L>& m, int slot) {
    t.bind(m, slot);
    amp.load();
  }
  __device__ void operator()(T (&x)[List::kCount], int64_t i) {
    float w = 0.f, d = amp.grad(x[List::kGrads]);
    if constexpr (MODE == kModeAbs) w = to_op(x[List::kParams]);
    if constexpr (SUB) d -= sigma * to_op(x[List::kEma]);
    const float v = t(w, i) * d;
    sum[0] += v * v;
  }
};

// Stage 1 of dot_norm_sq_.
template <typename T>
struct DotNormSqOp : PartialSums<2> {
  using List = DotNormSqList;
  static constexpr unsigned kLoad = list_mask(List::kA, List::kB), kStore = 0;
  __device__ void operator()(T (&x)[List::kCount], int64_t) {
    const float a = to_op(x[List::kA]), b = to_op(x[List::kB]);
    sum[0] += a * b;
    sum[1] += b * b;
  }
};

// x[DST] <- x[SRC] (list positions): a raw copy, bit-exact for every dtype (NaN payloads included).
template <typename T, int DST, int SRC>
struct CopyOp : OpBase {
  static constexpr unsigned kLoad = list_mask(SRC), kStore = list_mask(DST);
  template <int L>
  __device__ void operator()(T (&x)[L], int64_t) const {
    x[DST] = x[SRC];
  }
};

template <typename T, int MODE, bool SIGN, EmaKind EMA>
struct PerturbOp : SkippingOpBase {
  using List = PerturbList;
  static constexpr unsigned kEma = list_mask(List::kEma);
  static constexpr unsigned kLoad = list_mask(List::kParams, List::kGrads) | (EMA == EmaKind::kFull ? kEma : 0u);
  static constexpr unsigned kStore = list_mask(List::kParams, List::kBackups) | (EMA != EmaKind::kNone ? kEma : 0u);
  TOp<MODE> t;
  const float* norm_sq;
  float rho, eps;
  EmaArgs ema;
  Amp amp;
  float scale = 0.f;

  template <int L>
  __device__ void bind(const TensorListMeta<L>& m, int slot) {
    t.bind(m, slot);
    amp.load();
    scale = SIGN ? rho : sam_scale(norm_sq, rho, eps);
  }
  // The backups are written all the same: the caller restores from them at the end of the step.
  template <int L>
  __device__ void skipped(const TensorListMeta<L>& m, int slot) const {
    CopyOp<T, List::kBackups, List::kParams> backup;
    for_each_element<T>(m, slot, backup);
  }
  __device__ void operator()(T (&x)[List::kCount], int64_t i) const {
    x[List::kBackups] = x[List::kParams];
    const float w = to_op(x[List::kParams]), g = amp.grad(x[List::kGrads]), tw = t(w, i);
    float d = g;
    // Without inv_scale, m <- g is a copy of the raw element: exact for every dtype, and sigma == 0 keeps
    // d = g even where m is not finite.
    if constexpr (EMA == EmaKind::kFull) {
      const float m = to_op(x[List::kEma]);
      if (ema.sub) d = g - ema.sigma * m;
      x[List::kEma] = ema.copy ? amp.stored(x[List::kGrads]) : from_op<T>(m * ema.lmbda + g * ema.one_minus_lmbda);
    } else if constexpr (EMA == EmaKind::kCopy) {
      x[List::kEma] = amp.stored(x[List::kGrads]);
    }
    const float e = SIGN ? scale * tw * float((d > 0.f) - (d < 0.f)) : scale * (tw * tw) * d;
    x[List::kParams] = from_op<T>(w + e);
  }
};

// COPY: grad_copies <- grads (unscaled with inv_scale, else raw, so bit-exact). SKIPPED: the op of a skipped
// step, w <- backup (dirs unread), the copies made all the same.
template <typename T, bool COPY, bool SKIPPED = false>
struct ReflectOp : std::conditional_t<SKIPPED, OpBase, SkippingOpBase> {
  using List = ReflectList;
  static constexpr unsigned kLoad = list_mask(List::kBackups) | (SKIPPED ? 0u : list_mask(List::kDirs)) |
                                    (COPY ? list_mask(List::kGrads) : 0u);
  static constexpr unsigned kStore = list_mask(List::kParams) | (COPY ? list_mask(List::kGradCopies) : 0u);
  Amp amp;
  const float* norm_sq;
  float rho, eps;
  float scale = 0.f;

  template <int L>
  __device__ void bind(const TensorListMeta<L>&, int) {
    amp.load();
    scale = sam_scale(norm_sq, rho, eps);
  }
  template <int L>
  __device__ void skipped(const TensorListMeta<L>& m, int slot) const {
    ReflectOp<T, COPY, true> op{{}, amp};
    for_each_element<T>(m, slot, op);
  }
  __device__ void operator()(T (&x)[List::kCount], int64_t) const {
    if constexpr (SKIPPED) x[List::kParams] = x[List::kBackups];
    else x[List::kParams] = from_op<T>(to_op(x[List::kBackups]) - scale * to_op(x[List::kDirs]));
    if constexpr (COPY) x[List::kGradCopies] = amp.stored(x[List::kGrads]);
  }
};

// The lists the fused updates start with (UpdateList), and their grad (reference._grad_combination) in the
// reference's order of operations. w is read from backups: without a restore, the host passes the params there.
template <typename T, unsigned TERMS>
struct UpdateBase : SkippingOpBase {
  using List = UpdateList;
  static constexpr unsigned kLoad = list_mask(List::kGrads, List::kBackups) |
                                    (TERMS & kTermB ? list_mask(List::kGradsB) : 0u) |
                                    (TERMS & kTermC ? list_mask(List::kGradsC) : 0u);
  static constexpr unsigned kStore = list_mask(List::kParams);
  const float* coef;
  Amp amp;  // inv_scale scales grads only: grads_b and grads_c were stored unscaled
  float c[3] = {};

  template <int L>
  __device__ void bind(const TensorListMeta<L>&, int) {
    amp.load();
    if constexpr (TERMS != 0) {
#pragma unroll
      for (int k = 0; k < 3; ++k) c[k] = __ldg(coef + k);
    }
  }
  // Only the restore, and nothing without one: then backups holds the params themselves.
  template <int L>
  __device__ void skipped(const TensorListMeta<L>& m, int slot) const {
    if (m.ptr[List::kBackups][slot] == m.ptr[List::kParams][slot]) return;
    CopyOp<T, List::kParams, List::kBackups> restore;
    for_each_element<T>(m, slot, restore);
  }
  template <int L>
  __device__ float grad(const T (&x)[L]) const {
    float g = amp.grad(x[List::kGrads]);
    if constexpr (TERMS != 0) {
      g *= c[0];
      if constexpr ((TERMS & kTermB) != 0) g += to_op(x[List::kGradsB]) * c[1];
      if constexpr ((TERMS & kTermC) != 0) g += to_op(x[List::kGradsC]) * c[2];
    }
    return g;
  }
};

template <typename T, unsigned TERMS, bool MOMENTUM>
struct SgdOp : UpdateBase<T, TERMS> {
  using Base = UpdateBase<T, TERMS>;
  using List = SgdList;
  static constexpr unsigned kBuf = MOMENTUM ? list_mask(List::kMomentumBuffers) : 0u;
  static constexpr unsigned kLoad = Base::kLoad | kBuf, kStore = Base::kStore | kBuf;
  SgdArgs a;
  __device__ void operator()(T (&x)[List::kCount], int64_t) const {
    const float w = to_op(x[List::kBackups]);
    float d = this->grad(x);
    if (a.maximize) d = -d;
    if (a.weight_decay != 0.f) d += a.weight_decay * w;
    if constexpr (MOMENTUM) {
      // The update uses the fp32 buffer value, before its rounding to the buffer dtype.
      const float buf =
          a.init_momentum ? d : to_op(x[List::kMomentumBuffers]) * a.momentum + a.one_minus_dampening * d;
      x[List::kMomentumBuffers] = from_op<T>(buf);
      d = a.nesterov ? d + a.momentum * buf : buf;
    }
    x[List::kParams] = from_op<T>(w - a.lr * d);
  }
};

template <typename T, unsigned TERMS>
struct AdamOp : UpdateBase<T, TERMS> {
  using Base = UpdateBase<T, TERMS>;
  using List = AdamList;
  static constexpr unsigned kMoments = list_mask(List::kExpAvgs, List::kExpAvgSqs);
  static constexpr unsigned kLoad = Base::kLoad | kMoments, kStore = Base::kStore | kMoments;
  AdamArgs a;

  template <int L>
  __device__ void bind(const TensorListMeta<L>& m, int slot) {
    Base::bind(m, slot);
    if (a.device_steps) a.set_step(__ldg(m.aux[slot]));
  }
  __device__ void operator()(T (&x)[List::kCount], int64_t) const {
    float w = to_op(x[List::kBackups]), g = this->grad(x);
    if (a.maximize) g = -g;
    if (a.weight_decay != 0.f) {
      if (a.decoupled) w *= a.decay_factor;
      else g += a.weight_decay * w;
    }
    // torch.lerp's two-sided formula, exact at both ends.
    const float m0 = to_op(x[List::kExpAvgs]), diff = g - m0;
    const float m = fabsf(a.lerp_weight) < 0.5f ? m0 + a.lerp_weight * diff : g - diff * (1.f - a.lerp_weight);
    const float v = to_op(x[List::kExpAvgSqs]) * a.beta2 + a.one_minus_beta2 * g * g;
    x[List::kExpAvgs] = from_op<T>(m);
    x[List::kExpAvgSqs] = from_op<T>(v);
    const float denom = __fdiv_rn(__fsqrt_rn(v), a.bias_correction2_sqrt) + a.eps;
    x[List::kParams] = from_op<T>(w + __fdiv_rn(a.neg_step_size * m, denom));
  }
};

// Threads per row of row_norm_: a power of two giving each thread ~8 elements, at most the whole block.
__host__ __device__ inline int row_group(int64_t inner) {
  int g = 1;
  while (g < kBlock && int64_t(g) * 8 < inner) g <<= 1;
  return g;
}

// A unit is kBlock / G consecutive rows of G threads each.
template <typename T>
struct RowNormBody {
  using List = RowNormList;
  float eta;
  __device__ void operator()(const TensorListMeta<List::kCount>& m) const {
    const int slot = m.block_tensor[blockIdx.x];
    const int64_t inner = m.inner[slot];
    const int g = row_group(inner);
    const int64_t row = int64_t(m.block_unit[blockIdx.x]) * (kBlock / g) + threadIdx.x / g;
    const bool valid = row < m.n[slot];
    float s[1] = {0.f};
    if (valid) {
      const T* w = static_cast<const T*>(m.ptr[List::kParams][slot]) + row * inner;
      for (int64_t k = threadIdx.x % g; k < inner; k += g) {
        const float x = to_op(w[k]);
        s[0] += x * x;
      }
    }
    group_sum(s, g);  // every thread takes part: the shuffles need full warps
    if (valid && threadIdx.x % g == 0) static_cast<float*>(m.ptr[List::kOut][slot])[row] = __fsqrt_rn(s[0]) + eta;
  }
};

template <int L, class Units, class MakeBody>
void launch_apply(const TensorArgs* t, int n, cudaStream_t stream, Units units, MakeBody make_body) {
  multi_tensor_apply<L>(t, n, units, [&](const TensorListMeta<L>& m, int blocks, int64_t first_block) {
    multi_tensor_kernel<<<blocks, kBlock, 0, stream>>>(m, make_body(first_block));
  });
}

int64_t chunk_units(const TensorArgs& a) { return chunks_of(a.n); }

// Element-wise ops: one unit per chunk.
template <int L, typename T, class Op>
void launch_elementwise(const TensorArgs* t, int n, cudaStream_t stream, const Op& op) {
  launch_apply<L>(t, n, stream, chunk_units, [&](int64_t) { return Elementwise<T, Op>{op}; });
}

// Two-stage reductions; make_op(p) is the stage-1 op of a launch whose block 0 writes its sums at p.
template <int L, typename T, class MakeOp>
void launch_reduction(const TensorArgs* t, int n, float* partials, float* acc, cudaStream_t stream,
                      MakeOp make_op) {
  using Op = decltype(make_op(partials));
  const int64_t blocks = reduction_blocks(t, n);
  if (blocks == 0) return;
  launch_apply<L>(t, n, stream, chunk_units,
                  [&](int64_t first) { return Elementwise<T, Op>{make_op(partials + Op::kSums * first)}; });
  sum_partials_kernel<Op::kSums><<<1, kBlock, 0, stream>>>(partials, blocks, acc);
}

}  // namespace

void launch_norm_sq(DType dt, const TensorArgs* t, int n, int mode, float eta, bool sub, float sigma,
                    const float* inv_scale, float* partials, float* acc, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_mode(mode, [&](auto md) {
      dispatch_bool(sub, [&](auto sb) {
        using Op = NormSqOp<T, decltype(md)::value, decltype(sb)::value>;
        launch_reduction<NormSqList::kCount, T>(t, n, partials, acc, stream,
                               [&](float* p) { return Op{{{}, p}, {eta}, sigma, {{inv_scale, nullptr}}}; });
      });
    });
  });
}

void launch_dot_norm_sq(DType dt, const TensorArgs* t, int n, float* partials, float* acc, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_reduction<DotNormSqList::kCount, T>(t, n, partials, acc, stream,
                                               [](float* p) { return DotNormSqOp<T>{{{}, p}}; });
  });
}

void launch_row_norm(DType dt, const TensorArgs* t, int n, float eta, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_apply<RowNormList::kCount>(
        t, n, stream,
        [](const TensorArgs& a) {
          const int rows_per_block = kBlock / row_group(a.inner);
          return (a.n + rows_per_block - 1) / rows_per_block;
        },
        [&](int64_t) { return RowNormBody<T>{eta}; });
  });
}

void launch_perturb(DType dt, const TensorArgs* t, int n, const float* norm_sq, float rho, float eps, int mode,
                    float eta, bool sign, const EmaArgs& ema, const AmpArgs& amp, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_mode(mode, [&](auto md) {
      dispatch_bool(sign, [&](auto sg) {
        dispatch_ema(ema.kind, [&](auto ek) {
          using Op = PerturbOp<T, decltype(md)::value, decltype(sg)::value, decltype(ek)::value>;
          launch_elementwise<PerturbList::kCount, T>(t, n, stream, Op{{}, {eta}, norm_sq, rho, eps, ema, {amp}});
        });
      });
    });
  });
}

void launch_reflect(DType dt, const TensorArgs* t, int n, const float* norm_sq, float rho, float eps, bool copy,
                    const AmpArgs& amp, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bool(copy, [&](auto cp) {
      launch_elementwise<ReflectList::kCount, T>(t, n, stream,
                                                 ReflectOp<T, decltype(cp)::value>{{}, {amp}, norm_sq, rho, eps});
    });
  });
}

void launch_restore(DType dt, const TensorArgs* t, int n, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_elementwise<RestoreList::kCount, T>(t, n, stream,
                                               CopyOp<T, RestoreList::kParams, RestoreList::kBackups>{});
  });
}

void launch_restore_sgd(DType dt, const TensorArgs* t, int n, const GradArgs& g, const SgdArgs& a,
                        const AmpArgs& amp, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_terms(g.terms, [&](auto terms) {
      dispatch_bool(a.use_momentum, [&](auto mom) {
        using Op = SgdOp<T, decltype(terms)::value, decltype(mom)::value>;
        launch_elementwise<SgdList::kCount, T>(t, n, stream, Op{{{}, g.coef, {amp}}, a});
      });
    });
  });
}

void launch_restore_adam(DType dt, const TensorArgs* t, int n, const GradArgs& g, const AdamArgs& a,
                         const AmpArgs& amp, cudaStream_t stream) {
  dispatch_dtype<false>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_terms(g.terms, [&](auto terms) {
      launch_elementwise<AdamList::kCount, T>(t, n, stream,
                                              AdamOp<T, decltype(terms)::value>{{{}, g.coef, {amp}}, a});
    });
  });
}

}  // namespace cuda
}  // namespace fastsam
