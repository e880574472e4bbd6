// CUDA kernels of the CVaR ops. The math is fastsam/ops/cvar_reference.py: losses in opmath (fp32, fp64 for
// fp64 inputs), k = alpha n in float64 snapped to an integer within 1e-9 k, t the ceil(k)-th largest valid
// loss, weight 1/k above t and (k - c_gt) / (k c_eq) at t, the sum above t in float64.
//
// A call runs, in stream order and without the host reading anything back:
//   1. a loss kernel over rows (CE, BCE per sample: G = 1..32 threads per row) or elements (BCE per element):
//      writes one order-preserving key per loss slot (0: not a valid loss) and, for CE, the row's logsumexp
//      (for BCE per sample, its count of valid labels). cvar_select has no loss kernel: it reads its input.
//   2. the selection of t, c_gt, c_eq, the weights (and, when cheap, value and var):
//      - small (slots <= cvar_small_max): ONE block of kSelectThreads holding every key in shared memory:
//        counts the valid losses and NaNs, radix-selects t (8-bit digits, shared histogram), reduces the
//        sum above t and writes value, var (and the weights of cvar_select);
//      - large: a radix select over the keys in global memory: per 8-bit digit (4 for fp32 opmath, 8 for
//        fp64) a histogram kernel (warp-aggregated shared-memory bins, then one 64-bit global atomic per
//        non-empty bin and block) and a one-warp kernel that picks the digit; pass 0's histogram and the NaN
//        flag come from the loss kernel (cvar_select: from a first histogram kernel over its input). The
//        pass-0 choice counts n (the histogram's total) and computes k and the rank.
//   3. the gradient kernel: weights from (key, t); rows / elements of weight 0 are written as zeros without
//      reading the logits. On the large path it also writes one float64 partial sum of the losses above t
//      per block, and a one-block kernel adds them in a fixed order into value (and writes var).
// Launches per call: small: cvar_select 1, CE / BCE 3; large (fp32 opmath): a memset of the state and 10
// kernels (loss, choose, 3 x (histogram, choose), gradient, finalize; cvar_select: 4 x (histogram, choose),
// weights, finalize); fp64 opmath: 8 more (4 more digits).
// Every reduction is deterministic for a given shape: integer atomics only, float64 sums in a fixed order
// (per-thread strides, a fixed shuffle tree, partials indexed by block of a grid sized from the shape).
// Rounding as the reference: IEEE __fdiv_rn where setup.py's --use_fast_math would otherwise approximate,
// log1p(s - 1) for log(s), gradients as the float64 weight times the opmath term, stored through fp32.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cvar_kernels.h"
#include "opmath.cuh"

namespace fastsam {
namespace cuda {
namespace {

constexpr int kThreads = 256;         // loss, histogram and gradient kernels
constexpr int kSelectThreads = 1024;  // the one-block selection
constexpr int kBins = 256;            // 8-bit digits
constexpr int kMaxBlocks = 4096;      // grid cap of the grid-stride kernels (also the count of partial sums)
constexpr int kSmallBytes = 32768;    // shared memory of the keys of the one-block selection
constexpr double kSnap = 1e-9;        // cvar_reference.SNAP
constexpr unsigned kFull = 0xffffffffu;
static_assert(kThreads == kBins, "the loss and histogram kernels zero and flush one bin per thread");

// ---------------------------------------------------------------------------------------------- types

// Keys: the bits of an opmath loss mapped so that unsigned order is the float order.
template <typename Op>
using KeyOf = typename std::conditional<std::is_same<Op, double>::value, unsigned long long, unsigned>::type;
template <typename Key>
using OpOfKey = typename std::conditional<sizeof(Key) == 8, double, float>::type;

// A float64 weight or gradient stored as T the way the reference's .to(dtype) stores it: torch converts
// float64 to float16 / bfloat16 through float32.
template <typename T>
__device__ __forceinline__ T from_double(double x) {
  return from_op<T>(__double2float_rn(x));
}
template <>
__device__ __forceinline__ double from_double<double>(double x) { return x; }

__device__ __forceinline__ float op_exp(float x) { return expf(x); }
__device__ __forceinline__ double op_exp(double x) { return exp(x); }
__device__ __forceinline__ float op_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double op_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float op_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double op_div(double a, double b) { return a / b; }
// NaN tests on the bits: immune to any fast-math assumption.
__device__ __forceinline__ bool op_isnan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
__device__ __forceinline__ bool op_isnan(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
}
template <typename Op>
__device__ __forceinline__ Op op_inf();
template <>
__device__ __forceinline__ float op_inf<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double op_inf<double>() { return __longlong_as_double(0x7ff0000000000000ll); }
template <typename Op>
__device__ __forceinline__ Op op_nan();
template <>
__device__ __forceinline__ float op_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double op_nan<double>() { return __longlong_as_double(0x7ff8000000000000ll); }

// ----------------------------------------------------------------------------------------------- keys

// Order-preserving keys: negative floats get their bits inverted, non-negative ones the sign bit set. -0.0
// is canonicalized to +0.0 (equal losses, equal keys) and every NaN to the positive quiet NaN, the largest
// key (the reference sorts NaN first). Key 0 would be a negative NaN, which never occurs: it marks a slot
// that holds no valid loss (an ignored target); every valid key is >= key(-inf) > 0.
__device__ __forceinline__ unsigned to_key(float v) {
  unsigned b = __float_as_uint(v);
  if ((b & 0x7fffffffu) > 0x7f800000u) b = 0x7fc00000u;
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ unsigned long long to_key(double v) {
  constexpr unsigned long long kSign = 0x8000000000000000ull;
  unsigned long long b = static_cast<unsigned long long>(__double_as_longlong(v));
  if ((b & ~kSign) > 0x7ff0000000000000ull) b = 0x7ff8000000000000ull;
  if (b == kSign) b = 0ull;
  return (b & kSign) ? ~b : (b | kSign);
}
__device__ __forceinline__ float from_key(unsigned k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ double from_key(unsigned long long k) {
  constexpr unsigned long long kSign = 0x8000000000000000ull;
  return __longlong_as_double(static_cast<long long>((k & kSign) ? (k & ~kSign) : ~k));
}
template <typename Key>
__device__ __forceinline__ Key nan_key() {
  return sizeof(Key) == 8 ? Key(0xfff8000000000000ull) : Key(0xffc00000u);
}
template <typename Key>
constexpr int kPasses = int(sizeof(Key));  // 8-bit digits, most significant first
template <typename Key>
constexpr int kTopShift = 8 * (int(sizeof(Key)) - 1);

// -------------------------------------------------------------------------------------- device state

// At the start of the workspace. The large path zeroes it with a memset per call (hist and nan_flag are
// accumulated; undefined starts false); the small path writes every field the gradient kernels read.
struct State {
  unsigned long long hist[8][kBins];  // per digit pass: candidates per digit value
  unsigned nan_flag;                  // a valid loss is NaN
  unsigned undefined;                 // NaN among the valid losses, or none valid
  unsigned long long n, rank, rank_left, c_gt, c_eq;
  unsigned long long prefix;  // the digits of t's key chosen so far; t's key after the last pass
  double k, w_gt, w_eq;
};

struct KRank {
  double k;
  unsigned long long rank;
};

// k = alpha n snapped as in the reference, rank = ceil(k) within [1, n]; n >= 1.
__device__ __forceinline__ KRank k_and_rank(double alpha, unsigned long long n) {
  double k = alpha * double(n);
  const double r = rint(k);  // torch.round: half to even
  if (r >= 1.0 && fabs(k - r) <= kSnap * k) k = r;
  const double c = ceil(k);
  unsigned long long rank = c < 1.0 ? 1ull : static_cast<unsigned long long>(c);
  if (rank > n) rank = n;
  return {k, rank};
}

template <typename Key>
__device__ __forceinline__ double weight_of(Key key, Key t, double w_gt, double w_eq, bool undefined) {
  if (key == 0) return 0.0;
  if (undefined) return op_nan<double>();
  return key > t ? w_gt : (key == t ? w_eq : 0.0);
}

// value = (sum_{l > t} l + (k - c_gt) t) / k, var = t; NaN both when undefined.
template <typename Key>
__device__ __forceinline__ void write_value(bool undefined, Key t_key, double s_gt, double k, unsigned long long c_gt,
                                            OpOfKey<Key>* value, OpOfKey<Key>* var) {
  using Op = OpOfKey<Key>;
  if (undefined) {
    *value = op_nan<Op>();
    *var = op_nan<Op>();
    return;
  }
  const Op t = from_key(t_key);
  // Rounded multiply and add (no contraction into an fma), as the reference computes it.
  *value = static_cast<Op>(__dadd_rn(s_gt, __dmul_rn(k - double(c_gt), double(t))) / k);
  *var = t;
}

// What the gradient kernels need of the selection, read once per thread.
template <typename Key>
struct Threshold {
  Key t;
  double w_gt, w_eq;
  bool undefined;
  __device__ explicit Threshold(const State* st)
      : t(static_cast<Key>(st->prefix)), w_gt(st->w_gt), w_eq(st->w_eq), undefined(st->undefined != 0u) {}
  __device__ double weight(Key key) const { return weight_of(key, t, w_gt, w_eq, undefined); }
  // Whether the slot's loss enters the sum above t (a valid key > t: t is at least the smallest valid key).
  __device__ bool above(Key key) const { return !undefined && key > t; }
};

// ------------------------------------------------------------------------------------ warp / block helpers

// Adds 1 to bins[digit] for every lane with digit >= 0 (lanes with equal digits aggregated into one shared
// atomic). The whole warp calls it together.
__device__ __forceinline__ void hist_add(unsigned* bins, int digit) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(kFull, digit);
  if (digit >= 0 && int(threadIdx.x & 31u) == __ffs(peers) - 1) atomicAdd(bins + digit, unsigned(__popc(peers)));
#else
  if (digit >= 0) atomicAdd(bins + digit, 1u);
#endif
}

// Sum over the block, the same bits in every thread and in every run: a fixed shuffle tree per warp, then the
// warps in order. Every thread calls it; `scratch` holds kWarps values.
template <int kWarps, typename V>
__device__ __forceinline__ V block_sum(V v, V* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  __syncthreads();  // a previous call's readers are done with scratch
  if ((threadIdx.x & 31u) == 0u) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  V total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Sum over aligned groups of G lanes (a fixed tree; every lane of the warp calls it).
template <int G, typename V>
__device__ __forceinline__ V group_sum(V v) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// One full warp: the digit holding the r-th largest (1-based) candidate counted in hist[0..256) (indexed by
// digit), 1 <= r <= the candidates' total. Every lane gets the digit, r's rank within the digit's bin and
// the bin's count.
template <typename Count>
__device__ __forceinline__ void choose_digit(const Count* hist, unsigned long long r, int& digit,
                                             unsigned long long& r_in, unsigned long long& count) {
  const int lane = int(threadIdx.x & 31u);
  unsigned long long c[8], sum = 0;  // lane l: digits 255 - 8l down to 248 - 8l
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    c[b] = hist[255 - 8 * lane - b];
    sum += c[b];
  }
  unsigned long long incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned long long up = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += up;
  }
  const unsigned long long excl = incl - sum;  // candidates in the digits above this lane's
  const unsigned hit = __ballot_sync(kFull, excl < r && r <= incl);
  const int src = hit ? __ffs(hit) - 1 : 0;  // exactly one lane when 1 <= r <= total
  int d = 0;
  unsigned long long below = excl, cnt = 0;
  if (lane == src) {
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      d = 255 - 8 * lane - b;
      cnt = c[b];
      if (below + c[b] >= r) break;
      below += c[b];
    }
  }
  digit = __shfl_sync(kFull, d, src);
  r_in = r - __shfl_sync(kFull, below, src);
  count = __shfl_sync(kFull, cnt, src);
}

// Per-block shared histogram of digit pass 0, fused into the loss kernels of the large path.
template <typename Key, bool kOn>
struct FirstPass {
  unsigned* bins;
  bool nan_seen = false;
  __device__ explicit FirstPass(unsigned* shared_bins) : bins(shared_bins) {
    if (kOn) {
      bins[threadIdx.x] = 0u;
      __syncthreads();
    }
  }
  // Every thread of the warp, once per loop iteration (key 0: nothing to count).
  __device__ void add(Key key) {
    if (kOn) {
      nan_seen |= key == nan_key<Key>();
      hist_add(bins, key != 0 ? int(key >> kTopShift<Key>) : -1);
    }
  }
  // Every thread of the block, once.
  __device__ void flush(State* st) {
    if (kOn) {
      if (nan_seen) st->nan_flag = 1u;
      __syncthreads();
      const unsigned c = bins[threadIdx.x];
      if (c != 0u) atomicAdd(&st->hist[0][threadIdx.x], static_cast<unsigned long long>(c));
    }
  }
};

// Grid-stride loops of the row kernels (block-uniform trip count: G threads per row, kThreads / G rows per
// block and step) and of the element kernels (warp-uniform trip count: lane i of a warp takes base + i).
#define FASTSAM_FOR_ROWS(first, n, G)                                                       \
  for (int64_t first = int64_t(blockIdx.x) * (kThreads / (G)); first < (n);                \
       first += int64_t(gridDim.x) * (kThreads / (G)))
#define FASTSAM_FOR_WARP_BASES(base, n)                                                             \
  for (int64_t base = int64_t(blockIdx.x) * kThreads + int64_t(threadIdx.x & ~31u); base < (n); \
       base += int64_t(gridDim.x) * kThreads)

// -------------------------------------------------------------------------------- loss kernels (step 1)

template <typename T>
struct CeArgs {
  const T* logits;
  const int64_t* target;
  int64_t n, c, ignore_index;
  Opmath<T> smoothing, one_minus_smoothing;  // fp32(s), fp32(1 - s) as torch rounds the Python floats
  Opmath<T> c_op;                            // C in opmath, for the mean of the logits
  Opmath<T> s_over_c, s_minus_1;             // gradient terms: s / C and s - 1 (in double, then rounded)
  KeyOf<Opmath<T>>* keys;                    // [n]
  Opmath<T>* lse;                            // [n]
};

// Per row: logsumexp as torch computes it (max, then exp(x - max) summed; an infinite max stands for
// itself), the loss (1 - s)(lse - x_y) + s (lse - mean x), NaN for a target outside [0, C).
template <typename T, int G, bool kHist>
__global__ void __launch_bounds__(kThreads) ce_loss_kernel(const CeArgs<T> a, State* st) {
  using Op = Opmath<T>;
  using Key = KeyOf<Op>;
  __shared__ unsigned bins[kBins];
  FirstPass<Key, kHist> hist(bins);
  const int sub = int(threadIdx.x) % G;
  const Op inf = op_inf<Op>();
  FASTSAM_FOR_ROWS(first, a.n, G) {
    const int64_t row = first + int64_t(threadIdx.x) / G;
    const bool active = row < a.n;
    // Online (max, sum of exp(x - max)) per thread; NaN logits are only flagged (they make the loss NaN).
    // With an infinite max the sum is not used, so its NaNs there do not matter.
    Op m = -inf, s = 0, sx = 0;
    int bad = 0;
    if (active) {
      const T* x = a.logits + row * a.c;
      for (int64_t j = sub; j < a.c; j += G) {
        const Op v = to_op(x[j]);
        bad |= int(op_isnan(v));
        sx += v;
        if (v > m) {
          s = s * op_exp(m - v) + Op(1);
          m = v;
        } else if (v > -inf) {
          s += op_exp(v - m);
        }
      }
    }
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) {
      const Op m2 = __shfl_xor_sync(kFull, m, off), s2 = __shfl_xor_sync(kFull, s, off);
      sx += __shfl_xor_sync(kFull, sx, off);
      bad |= __shfl_xor_sync(kFull, bad, off);
      const Op mm = m2 > m ? m2 : m;
      s = (m > -inf ? s * op_exp(m - mm) : Op(0)) + (m2 > -inf ? s2 * op_exp(m2 - mm) : Op(0));
      m = mm;
    }
    Key key = 0;
    if (active && sub == 0) {
      // s >= 1 (the max contributes exp(0)), so s - 1 is exact and log1p keeps small losses accurate.
      const Op lse = bad ? op_nan<Op>() : (m == inf || m == -inf) ? m : m + op_log1p(s - Op(1));
      a.lse[row] = lse;
      const int64_t y = a.target[row];
      if (y != a.ignore_index) {
        Op loss = op_nan<Op>();
        if (y >= 0 && y < a.c) {
          loss = lse - to_op(a.logits[row * a.c + y]);
          if (a.smoothing != Op(0))
            loss = a.one_minus_smoothing * loss + a.smoothing * (lse - op_div(sx, a.c_op));
        }
        key = to_key(loss);
      }
      a.keys[row] = key;
    }
    hist.add(key);
  }
  hist.flush(st);
}

template <typename T>
struct BceArgs {
  const T* logits;
  const T* target;
  const float* pos_weight;  // null or [l]
  int64_t n, l;
  Opmath<T> ignore;          // ignore_index rounded to T
  KeyOf<Opmath<T>>* keys;    // [n * l] per element, [n] per sample
  Opmath<T>* count;          // per sample: valid labels of the row
};

// torch's BCE with logits: (1 - y) x + lw softplus(-x), softplus(-x) = log1p(exp(-|x|)) + max(-x, 0),
// lw = 1 + (p - 1) y; d/dx = (1 - y) - lw sigmoid(-x).
template <typename Op>
__device__ __forceinline__ Op label_weight(const float* pos_weight, int64_t j, Op y) {
  return pos_weight ? Op(1) + (Op(pos_weight[j]) - Op(1)) * y : Op(1);
}
// lw of flat element i (label i mod l): the division only with a pos_weight, 32-bit where it suffices.
template <typename Op>
__device__ __forceinline__ Op label_weight_flat(const float* pos_weight, int64_t i, int64_t l, bool narrow, Op y) {
  if (!pos_weight) return Op(1);
  return label_weight(pos_weight, narrow ? int64_t(uint32_t(i) % uint32_t(l)) : i % l, y);
}
template <typename Op>
__device__ __forceinline__ Op bce_loss(Op x, Op y, Op lw) {
  const Op softplus_neg = op_log1p(op_exp(-fabs(x))) + (x < Op(0) ? -x : Op(0));
  return (Op(1) - y) * x + lw * softplus_neg;
}
template <typename Op>
__device__ __forceinline__ Op bce_dloss(Op x, Op y, Op lw) {
  return (Op(1) - y) - lw * op_div(Op(1), Op(1) + op_exp(x));
}

template <typename T, bool kHist>
__global__ void __launch_bounds__(kThreads) bce_element_loss_kernel(const BceArgs<T> a, State* st) {
  using Op = Opmath<T>;
  using Key = KeyOf<Op>;
  __shared__ unsigned bins[kBins];
  FirstPass<Key, kHist> hist(bins);
  const int64_t total = a.n * a.l;
  const bool narrow = total <= 0xffffffffLL;
  FASTSAM_FOR_WARP_BASES(base, total) {
    const int64_t i = base + int64_t(threadIdx.x & 31u);
    Key key = 0;
    if (i < total) {
      const Op y = to_op(a.target[i]);
      if (y != a.ignore)
        key = to_key(bce_loss(to_op(a.logits[i]), y, label_weight_flat(a.pos_weight, i, a.l, narrow, y)));
      a.keys[i] = key;
    }
    hist.add(key);
  }
  hist.flush(st);
}

// Per row: the mean of the valid labels' losses (no valid label: no loss).
template <typename T, int G, bool kHist>
__global__ void __launch_bounds__(kThreads) bce_sample_loss_kernel(const BceArgs<T> a, State* st) {
  using Op = Opmath<T>;
  using Key = KeyOf<Op>;
  __shared__ unsigned bins[kBins];
  FirstPass<Key, kHist> hist(bins);
  const int sub = int(threadIdx.x) % G;
  FASTSAM_FOR_ROWS(first, a.n, G) {
    const int64_t row = first + int64_t(threadIdx.x) / G;
    const bool active = row < a.n;
    int cnt = 0;
    Op sum = 0;
    if (active) {
      const T* x = a.logits + row * a.l;
      const T* yr = a.target + row * a.l;
      for (int64_t j = sub; j < a.l; j += G) {
        const Op y = to_op(yr[j]);
        if (y != a.ignore) {
          ++cnt;
          sum += bce_loss(to_op(x[j]), y, label_weight(a.pos_weight, j, y));
        }
      }
    }
    cnt = group_sum<G>(cnt);
    sum = group_sum<G>(sum);
    Key key = 0;
    if (active && sub == 0) {
      if (cnt > 0) key = to_key(op_div(sum, Op(cnt)));
      a.count[row] = Op(cnt);
      a.keys[row] = key;
    }
    hist.add(key);
  }
  hist.flush(st);
}

// ---------------------------------------------------------------------------------- selection (step 2)

template <typename Key>
struct KeySource {
  const Key* keys;
  __device__ Key operator()(int64_t i) const { return keys[i]; }
};
template <typename T>
struct LossSource {
  const T* losses;
  __device__ KeyOf<Opmath<T>> operator()(int64_t i) const { return to_key(to_op(losses[i])); }
};
struct NoSink {
  __device__ void operator()(int64_t, double) const {}
};
template <typename T>
struct WeightSink {
  T* weights;
  __device__ void operator()(int64_t i, double w) const { weights[i] = from_double<T>(w); }
};

// The small path: one block, every key in shared memory. Writes value, var, the State fields the gradient
// kernels read, and (cvar_select) the weights through `sink`.
template <typename Key, class Src, class Sink>
__global__ void __launch_bounds__(kSelectThreads)
    select_small_kernel(const Src src, const int n, const double alpha, State* st, OpOfKey<Key>* value,
                        OpOfKey<Key>* var, const Sink sink) {
  constexpr int kMax = kSmallBytes / int(sizeof(Key));
  __shared__ Key keys[kMax];
  __shared__ unsigned bins[kBins];
  __shared__ unsigned s_valid;
  __shared__ int s_digit;
  __shared__ unsigned long long s_r, s_count;
  __shared__ double scratch[kSelectThreads / 32];
  const int tid = int(threadIdx.x);
  if (tid == 0) s_valid = 0u;
  __syncthreads();
  unsigned valid = 0;
  int nan_seen = 0;
  for (int i = tid; i < n; i += kSelectThreads) {
    const Key key = src(i);
    keys[i] = key;
    valid += key != 0 ? 1u : 0u;
    nan_seen |= int(key == nan_key<Key>());
  }
  if (valid != 0u) atomicAdd(&s_valid, valid);
  const bool any_nan = __syncthreads_or(nan_seen) != 0;
  const unsigned n_valid = s_valid;
  if (any_nan || n_valid == 0u) {
    if (tid == 0) {
      write_value<Key>(true, Key(0), 0.0, 0.0, 0ull, value, var);
      st->undefined = 1u;
      st->prefix = 0ull;
      st->w_gt = st->w_eq = 0.0;
    }
    for (int i = tid; i < n; i += kSelectThreads) sink(i, keys[i] != 0 ? op_nan<double>() : 0.0);
    return;
  }
  const KRank kr = k_and_rank(alpha, n_valid);
  Key prefix = 0;
  unsigned long long r = kr.rank, count = 0;
  for (int pass = 0; pass < kPasses<Key>; ++pass) {
    const int shift = 8 * (kPasses<Key> - 1 - pass);
    const Key high = pass == 0 ? Key(0) : Key(~Key(0) << (shift + 8));
    if (tid < kBins) bins[tid] = 0u;
    __syncthreads();
    for (int base = 0; base < n; base += kSelectThreads) {  // block-uniform trip count
      const int i = base + tid;
      const Key key = i < n ? keys[i] : Key(0);
      hist_add(bins, key != 0 && (key & high) == prefix ? int((key >> shift) & 0xffu) : -1);
    }
    __syncthreads();
    if (tid < 32) {
      int d;
      unsigned long long r_in, c;
      choose_digit(bins, r, d, r_in, c);
      if (tid == 0) {
        s_digit = d;
        s_r = r_in;
        s_count = c;
      }
    }
    __syncthreads();
    prefix |= Key(s_digit) << shift;
    r = s_r;
    count = s_count;
  }
  const unsigned long long c_gt = kr.rank - r;  // the candidates ranked above t's bin, over all passes
  double part = 0.0;
  for (int i = tid; i < n; i += kSelectThreads) {
    const Key key = keys[i];
    if (key > prefix) part += double(from_key(key));
  }
  const double s_gt = block_sum<kSelectThreads / 32>(part, scratch);
  const double k = kr.k, w_gt = 1.0 / k, w_eq = (k - double(c_gt)) / (k * double(count));
  if (tid == 0) {
    write_value<Key>(false, prefix, s_gt, k, c_gt, value, var);
    st->undefined = 0u;
    st->prefix = prefix;
    st->w_gt = w_gt;
    st->w_eq = w_eq;
  }
  for (int i = tid; i < n; i += kSelectThreads) sink(i, weight_of(keys[i], prefix, w_gt, w_eq, false));
}

// Large path: the histogram of digit `pass` over the candidates (valid keys whose higher digits are the
// chosen prefix). kFirst (pass 0 read from the input of cvar_select): every valid key, and the NaN flag.
template <typename Key, class Src, bool kFirst>
__global__ void __launch_bounds__(kThreads) hist_kernel(const Src src, const int64_t total, State* st, const int pass) {
  if (!kFirst && st->undefined != 0u) return;  // block-uniform
  __shared__ unsigned bins[kBins];
  bins[threadIdx.x] = 0u;
  const int shift = 8 * (kPasses<Key> - 1 - pass);
  const Key high = pass == 0 ? Key(0) : Key(~Key(0) << (shift + 8));
  const Key prefix = pass == 0 ? Key(0) : static_cast<Key>(st->prefix);
  __syncthreads();
  bool nan_seen = false;
  FASTSAM_FOR_WARP_BASES(base, total) {
    const int64_t i = base + int64_t(threadIdx.x & 31u);
    const Key key = i < total ? src(i) : Key(0);
    if (kFirst) nan_seen |= key == nan_key<Key>();
    hist_add(bins, key != 0 && (key & high) == prefix ? int((key >> shift) & 0xffu) : -1);
  }
  if (kFirst && nan_seen) st->nan_flag = 1u;
  __syncthreads();
  const unsigned c = bins[threadIdx.x];
  if (c != 0u) atomicAdd(&st->hist[pass][threadIdx.x], static_cast<unsigned long long>(c));
}

// Large path, one warp: picks digit `pass` of t. Pass 0 also counts the valid losses (the histogram's total),
// decides `undefined` and computes k and the rank; the last pass the counts and weights.
template <typename Key>
__global__ void __launch_bounds__(32) choose_kernel(State* st, const int pass, const double alpha) {
  const int lane = int(threadIdx.x);
  double k;
  unsigned long long rank, r;
  if (pass == 0) {
    unsigned long long n = 0;
    for (int b = lane; b < kBins; b += 32) n += st->hist[0][b];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) n += __shfl_xor_sync(kFull, n, off);
    if (n == 0ull || st->nan_flag != 0u) {
      if (lane == 0) st->undefined = 1u;
      return;
    }
    const KRank kr = k_and_rank(alpha, n);
    k = kr.k;
    rank = r = kr.rank;
    if (lane == 0) {
      st->n = n;
      st->k = k;
      st->rank = rank;
    }
  } else {
    if (st->undefined != 0u) return;
    k = st->k;
    rank = st->rank;
    r = st->rank_left;
  }
  int digit;
  unsigned long long r_in, count;
  choose_digit(st->hist[pass], r, digit, r_in, count);
  if (lane == 0) {
    const int shift = 8 * (kPasses<Key> - 1 - pass);
    const Key prefix = (pass == 0 ? Key(0) : static_cast<Key>(st->prefix)) | (Key(digit) << shift);
    st->prefix = prefix;
    st->rank_left = r_in;
    if (pass == kPasses<Key> - 1) {
      const unsigned long long c_gt = rank - r_in;
      st->c_gt = c_gt;
      st->c_eq = count;
      st->w_gt = 1.0 / k;
      st->w_eq = (k - double(c_gt)) / (k * double(count));
    }
  }
}

// Large path, one block: value from the gradient kernel's partial sums (added in a fixed order), and var.
template <typename Key>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const State* st, const double* partials, const int blocks, OpOfKey<Key>* value,
                    OpOfKey<Key>* var) {
  __shared__ double scratch[kThreads / 32];
  double s = 0.0;
  for (int b = int(threadIdx.x); b < blocks; b += kThreads) s += partials[b];
  s = block_sum<kThreads / 32>(s, scratch);
  if (threadIdx.x == 0)
    write_value<Key>(st->undefined != 0u, static_cast<Key>(st->prefix), s, st->k, st->c_gt, value, var);
}

// ---------------------------------------------------------------------------------- gradients (step 3)

// kPartials (large path): block b writes the float64 sum of its losses above t to partials[b].
template <bool kPartials>
__device__ __forceinline__ void write_partial(double part, double* partials) {
  if (kPartials) {
    __shared__ double scratch[kThreads / 32];
    const double s = block_sum<kThreads / 32>(part, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
  }
}

// d value / d logits = w (softmax(x) - (1 - s) onehot(y) - s / C).
template <typename T, int G, bool kPartials>
__global__ void __launch_bounds__(kThreads)
    ce_grad_kernel(const CeArgs<T> a, const State* st, T* grad, double* partials) {
  using Op = Opmath<T>;
  using Key = KeyOf<Op>;
  const Threshold<Key> th(st);
  const int sub = int(threadIdx.x) % G;
  double part = 0.0;
  FASTSAM_FOR_ROWS(first, a.n, G) {
    const int64_t row = first + int64_t(threadIdx.x) / G;
    if (row < a.n) {
      const Key key = a.keys[row];
      if (kPartials && sub == 0 && th.above(key)) part += double(from_key(key));
      const double w = th.weight(key);
      T* g = grad + row * a.c;
      if (w == 0.0) {
        for (int64_t j = sub; j < a.c; j += G) g[j] = from_op<T>(Op(0));
      } else {
        const Op lse = a.lse[row];
        const int64_t y = a.target[row];
        const T* x = a.logits + row * a.c;
        for (int64_t j = sub; j < a.c; j += G) {
          Op d = op_exp(to_op(x[j]) - lse) - a.s_over_c;
          if (j == y) d += a.s_minus_1;
          g[j] = from_double<T>(w * double(d));  // the reference's float64 w times the opmath term
        }
      }
    }
  }
  write_partial<kPartials>(part, partials);
}

template <typename T, int G, bool kPartials>
__global__ void __launch_bounds__(kThreads)
    bce_sample_grad_kernel(const BceArgs<T> a, const State* st, T* grad, double* partials) {
  using Op = Opmath<T>;
  using Key = KeyOf<Op>;
  const Threshold<Key> th(st);
  const int sub = int(threadIdx.x) % G;
  double part = 0.0;
  FASTSAM_FOR_ROWS(first, a.n, G) {
    const int64_t row = first + int64_t(threadIdx.x) / G;
    if (row < a.n) {
      const Key key = a.keys[row];
      if (kPartials && sub == 0 && th.above(key)) part += double(from_key(key));
      const double w = th.weight(key);
      T* g = grad + row * a.l;
      if (w == 0.0) {
        for (int64_t j = sub; j < a.l; j += G) g[j] = from_op<T>(Op(0));
      } else {
        const double coef = w / double(a.count[row]);  // the reference's w / m, in float64
        const T* x = a.logits + row * a.l;
        const T* yr = a.target + row * a.l;
        for (int64_t j = sub; j < a.l; j += G) {
          const Op y = to_op(yr[j]);
          double d = 0.0;
          if (y != a.ignore) d = coef * double(bce_dloss(to_op(x[j]), y, label_weight(a.pos_weight, j, y)));
          g[j] = from_double<T>(d);
        }
      }
    }
  }
  write_partial<kPartials>(part, partials);
}

template <typename T, bool kPartials>
__global__ void __launch_bounds__(kThreads)
    bce_element_grad_kernel(const BceArgs<T> a, const State* st, T* grad, double* partials) {
  using Op = Opmath<T>;
  using Key = KeyOf<Op>;
  const Threshold<Key> th(st);
  const int64_t total = a.n * a.l;
  const bool narrow = total <= 0xffffffffLL;
  double part = 0.0;
  FASTSAM_FOR_WARP_BASES(base, total) {
    const int64_t i = base + int64_t(threadIdx.x & 31u);
    if (i < total) {
      const Key key = a.keys[i];
      if (kPartials && th.above(key)) part += double(from_key(key));
      const double w = th.weight(key);
      double d = 0.0;
      if (w != 0.0) {
        const Op y = to_op(a.target[i]);
        d = w * double(bce_dloss(to_op(a.logits[i]), y, label_weight_flat(a.pos_weight, i, a.l, narrow, y)));
      }
      grad[i] = from_double<T>(d);
    }
  }
  write_partial<kPartials>(part, partials);
}

// cvar_select, large path: the weights of the input losses (every one valid).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_weights_kernel(const T* losses, const int64_t n, const State* st, T* weights, double* partials) {
  using Key = KeyOf<Opmath<T>>;
  const Threshold<Key> th(st);
  double part = 0.0;
  FASTSAM_FOR_WARP_BASES(base, n) {
    const int64_t i = base + int64_t(threadIdx.x & 31u);
    if (i < n) {
      const Key key = to_key(to_op(losses[i]));
      if (th.above(key)) part += double(from_key(key));
      weights[i] = from_double<T>(th.weight(key));
    }
  }
  write_partial<true>(part, partials);
}

#undef FASTSAM_FOR_ROWS
#undef FASTSAM_FOR_WARP_BASES

// ------------------------------------------------------------------------------------------------- host

// Threads per row: a power of two giving each about 8 elements, at most a warp.
int group_of(int64_t cols) {
  int g = 1;
  while (g < 32 && int64_t(g) * 8 < cols) g <<= 1;
  return g;
}

template <class F>
void dispatch_group(int g, F&& f) {
  switch (g) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

int capped_blocks(int64_t units, int64_t per_block) {
  const int64_t b = (units + per_block - 1) / per_block;
  return int(b < kMaxBlocks ? (b > 0 ? b : 1) : kMaxBlocks);
}
int row_blocks(int64_t rows, int g) { return capped_blocks(rows, kThreads / g); }
int flat_blocks(int64_t total) { return capped_blocks(total, kThreads); }

size_t align_up(size_t bytes) { return (bytes + 255) & ~size_t(255); }

// Workspace: State, then keys, per-row values (lse / label counts), partial sums (large path only).
struct Layout {
  size_t keys, aux, partials, total;
  bool small;
  int grad_blocks;
};

Layout layout_of(CvarOp op, DType dt, int64_t rows, int64_t cols) {
  const size_t word = dt == DType::kFloat64 ? 8 : 4;  // opmath and key bytes
  const int64_t slots = op == CvarOp::kBceElement ? rows * cols : rows;
  Layout l{};
  l.small = slots <= cvar_small_max(dt);
  l.grad_blocks = op == CvarOp::kCrossEntropy || op == CvarOp::kBceSample ? row_blocks(rows, group_of(cols))
                                                                           : flat_blocks(slots);
  size_t at = align_up(sizeof(State));
  l.keys = at;
  if (op != CvarOp::kSelect) at += align_up(size_t(slots) * word);
  l.aux = at;
  if (op == CvarOp::kCrossEntropy || op == CvarOp::kBceSample) at += align_up(size_t(rows) * word);
  l.partials = at;
  if (!l.small) at += align_up(size_t(l.grad_blocks) * sizeof(double));
  l.total = at;
  return l;
}

// Large path, digit passes first_pass.. of the radix select (pass 0 comes from the loss kernel when
// first_pass == 1).
template <typename Key, class Src>
void radix_select(const Src& src, int64_t total, State* st, double alpha, int first_pass, cudaStream_t stream) {
  const int blocks = flat_blocks(total);
  for (int pass = 0; pass < kPasses<Key>; ++pass) {
    if (pass >= first_pass) {
      if (pass == 0) hist_kernel<Key, Src, true><<<blocks, kThreads, 0, stream>>>(src, total, st, pass);
      else hist_kernel<Key, Src, false><<<blocks, kThreads, 0, stream>>>(src, total, st, pass);
    }
    choose_kernel<Key><<<1, 32, 0, stream>>>(st, pass, alpha);
  }
}

template <typename Op>
Op* typed(void* p) {
  return static_cast<Op*>(p);
}

}  // namespace

int64_t cvar_small_max(DType dt) { return kSmallBytes / (dt == DType::kFloat64 ? 8 : 4); }

size_t cvar_workspace_bytes(CvarOp op, DType dt, int64_t rows, int64_t cols) {
  return layout_of(op, dt, rows, cols).total;
}

cudaError_t launch_cvar_select(DType dt, const void* losses, int64_t n, double alpha, const CvarOutputs& out,
                               void* workspace, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype<true>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Op = Opmath<T>;
    using Key = KeyOf<Op>;
    const Layout lay = layout_of(CvarOp::kSelect, dt, n, 1);
    char* ws = static_cast<char*>(workspace);
    State* st = reinterpret_cast<State*>(ws);
    const T* x = static_cast<const T*>(losses);
    T* weights = static_cast<T*>(out.out);
    if (lay.small) {
      select_small_kernel<Key><<<1, kSelectThreads, 0, stream>>>(LossSource<T>{x}, int(n), alpha, st,
                                                                 typed<Op>(out.value), typed<Op>(out.var),
                                                                 WeightSink<T>{weights});
      return;
    }
    err = cudaMemsetAsync(st, 0, sizeof(State), stream);
    if (err != cudaSuccess) return;
    double* partials = reinterpret_cast<double*>(ws + lay.partials);
    radix_select<Key>(LossSource<T>{x}, n, st, alpha, 0, stream);
    select_weights_kernel<T><<<lay.grad_blocks, kThreads, 0, stream>>>(x, n, st, weights, partials);
    finalize_kernel<Key><<<1, kThreads, 0, stream>>>(st, partials, lay.grad_blocks, typed<Op>(out.value),
                                                     typed<Op>(out.var));
  });
  return err;
}

cudaError_t launch_cvar_cross_entropy(DType dt, const void* logits, const int64_t* target, int64_t n, int64_t c,
                                      double alpha, int64_t ignore_index, double label_smoothing,
                                      const CvarOutputs& out, void* workspace, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype<true>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Op = Opmath<T>;
    using Key = KeyOf<Op>;
    const Layout lay = layout_of(CvarOp::kCrossEntropy, dt, n, c);
    char* ws = static_cast<char*>(workspace);
    State* st = reinterpret_cast<State*>(ws);
    CeArgs<T> a{};
    a.logits = static_cast<const T*>(logits);
    a.target = target;
    a.n = n;
    a.c = c;
    a.ignore_index = ignore_index;
    // As torch rounds the Python floats of the reference to the opmath dtype.
    a.smoothing = static_cast<Op>(label_smoothing);
    a.one_minus_smoothing = static_cast<Op>(1.0 - label_smoothing);
    a.c_op = static_cast<Op>(c);
    a.s_over_c = static_cast<Op>(label_smoothing / double(c));
    a.s_minus_1 = static_cast<Op>(label_smoothing - 1.0);
    a.keys = reinterpret_cast<Key*>(ws + lay.keys);
    a.lse = reinterpret_cast<Op*>(ws + lay.aux);
    T* grad = static_cast<T*>(out.out);
    dispatch_group(group_of(c), [&](auto gc) {
      constexpr int G = decltype(gc)::value;
      const int blocks = lay.grad_blocks;
      if (lay.small) {
        ce_loss_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, st);
        select_small_kernel<Key><<<1, kSelectThreads, 0, stream>>>(KeySource<Key>{a.keys}, int(n), alpha, st,
                                                                   typed<Op>(out.value), typed<Op>(out.var),
                                                                   NoSink{});
        ce_grad_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, st, grad, nullptr);
        return;
      }
      err = cudaMemsetAsync(st, 0, sizeof(State), stream);
      if (err != cudaSuccess) return;
      double* partials = reinterpret_cast<double*>(ws + lay.partials);
      ce_loss_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, st);
      radix_select<Key>(KeySource<Key>{a.keys}, n, st, alpha, 1, stream);
      ce_grad_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, st, grad, partials);
      finalize_kernel<Key><<<1, kThreads, 0, stream>>>(st, partials, blocks, typed<Op>(out.value),
                                                       typed<Op>(out.var));
    });
  });
  return err;
}

cudaError_t launch_cvar_bce_with_logits(DType dt, const void* logits, const void* target,
                                        const float* pos_weight, int64_t n, int64_t l, double alpha,
                                        bool per_sample, double ignore, const CvarOutputs& out, void* workspace,
                                        cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch_dtype<true>(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Op = Opmath<T>;
    using Key = KeyOf<Op>;
    const CvarOp op = per_sample ? CvarOp::kBceSample : CvarOp::kBceElement;
    const Layout lay = layout_of(op, dt, n, l);
    char* ws = static_cast<char*>(workspace);
    State* st = reinterpret_cast<State*>(ws);
    BceArgs<T> a{};
    a.logits = static_cast<const T*>(logits);
    a.target = static_cast<const T*>(target);
    a.pos_weight = pos_weight;
    a.n = n;
    a.l = l;
    a.ignore = static_cast<Op>(ignore);
    a.keys = reinterpret_cast<Key*>(ws + lay.keys);
    a.count = reinterpret_cast<Op*>(ws + lay.aux);
    T* grad = static_cast<T*>(out.out);
    double* partials = reinterpret_cast<double*>(ws + lay.partials);
    const int blocks = lay.grad_blocks;
    const int64_t slots = per_sample ? n : n * l;
    if (!lay.small) {
      err = cudaMemsetAsync(st, 0, sizeof(State), stream);
      if (err != cudaSuccess) return;
    }
    if (per_sample) {
      dispatch_group(group_of(l), [&](auto gc) {
        constexpr int G = decltype(gc)::value;
        if (lay.small) bce_sample_loss_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, st);
        else bce_sample_loss_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, st);
      });
    } else {
      if (lay.small) bce_element_loss_kernel<T, false><<<blocks, kThreads, 0, stream>>>(a, st);
      else bce_element_loss_kernel<T, true><<<blocks, kThreads, 0, stream>>>(a, st);
    }
    if (lay.small) {
      select_small_kernel<Key><<<1, kSelectThreads, 0, stream>>>(KeySource<Key>{a.keys}, int(slots), alpha, st,
                                                                 typed<Op>(out.value), typed<Op>(out.var),
                                                                 NoSink{});
    } else {
      radix_select<Key>(KeySource<Key>{a.keys}, slots, st, alpha, 1, stream);
    }
    if (per_sample) {
      dispatch_group(group_of(l), [&](auto gc) {
        constexpr int G = decltype(gc)::value;
        if (lay.small) bce_sample_grad_kernel<T, G, false><<<blocks, kThreads, 0, stream>>>(a, st, grad, nullptr);
        else bce_sample_grad_kernel<T, G, true><<<blocks, kThreads, 0, stream>>>(a, st, grad, partials);
      });
    } else {
      if (lay.small) bce_element_grad_kernel<T, false><<<blocks, kThreads, 0, stream>>>(a, st, grad, nullptr);
      else bce_element_grad_kernel<T, true><<<blocks, kThreads, 0, stream>>>(a, st, grad, partials);
    }
    if (!lay.small)
      finalize_kernel<Key><<<1, kThreads, 0, stream>>>(st, partials, blocks, typed<Op>(out.value),
                                                       typed<Op>(out.var));
  });
  return err;
}

}  // namespace cuda
}  // namespace fastsam
