// Shared machinery of the CPU kernels: input checks, dtype/flag dispatch, fp32 <-> storage
// conversions and the chunked multi-tensor loop that runs one op over whole tensor lists.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace fastsam::cpu {

enum Mode : int { kIdentity = 0, kAbs = 1, kRow = 2 };

// ----------------------------------------------------------------------------------------------
// Conversions between fp32 and the storage types. They are written with integer ops and mask
// selects (no branches, no library calls) so that GCC vectorizes them inside the element loops;
// c10's own Half conversions do not vectorize. Both round to nearest even like c10 does.

inline float f32(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t u32(float f) { return __builtin_bit_cast(uint32_t, f); }
// A ternary on values computed with fp ops is turned into a branch that -ftrapping-math then
// forbids to if-convert; a mask select keeps the loop vectorizable.
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

struct F32 {
  using S = float;
  static float ld(S x) { return x; }
  static S st(float x) { return x; }
};

struct BF16 {
  using S = uint16_t;
  static float ld(S x) { return f32(uint32_t(x) << 16); }
  static S st(float x) {
    // NaN is made the canonical quiet NaN first, which the rounding keeps; one select on 32 bits
    // before the narrowing is cheaper than one after it.
    const uint32_t u = select(x != x, 0x7FC00000u, u32(x));
    return S((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

// IEEE half, after Maratyszcza's FP16 library (the algorithm c10 uses without F16C).
struct F16 {
  using S = uint16_t;
  static float ld(S h) {
    const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
    const uint32_t normal = u32(f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f);
    const uint32_t subnormal = u32(f32((two_w >> 17) | (126u << 23)) - 0.5f);
    return f32(sign | select(two_w < (1u << 27), subnormal, normal));
  }
  static S st(float f) {
    const float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = u32(f), shl1_w = w + w, sign = w & 0x80000000u;
    const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
    const uint32_t bits = u32(f32((bias >> 1) + 0x07800000u) + base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return S((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
  }
};

// ----------------------------------------------------------------------------------------------
// Dispatch of runtime values to compile-time ones, so every inner loop is branch-free.

template <class F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(F32{});
    case at::kBFloat16: return f(BF16{});
    case at::kHalf: return f(F16{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, "; expected float32, bfloat16 or float16");
  }
}

template <class F>
void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// Calls f(std::integral_constant<int, v>) for v in [0, N).
template <int N, class F>
void with_int(int64_t v, F&& f) {
  if constexpr (N > 0) {
    if (v == N - 1) return f(std::integral_constant<int, N - 1>{});
    with_int<N - 1>(v, std::forward<F>(f));
  }
}

template <class S>
std::vector<S*> data_ptrs(at::TensorList ts) {
  std::vector<S*> out(ts.size());
  for (const auto j : c10::irange(ts.size())) out[j] = static_cast<S*>(ts[j].data_ptr());
  return out;
}

// ----------------------------------------------------------------------------------------------
// Input checks (checks.h) by the CPU's rules: CPU tensors, dense layouts like the lead's, scalars
// read on the host, where they lie (no device sync).

class Check : public Checks {
 public:
  Check(const char* op, at::TensorList lead, const char* name) : Checks(op, lead, name, kCpuRules) {}

  // An optional fp32 scalar (inv_scale, found_inf): its value, or nullopt when it is not given.
  std::optional<float> f32_scalar(const std::optional<at::Tensor>& t, const char* name) const {
    const float* p = optional_scalar(t, name);
    return p ? std::optional<float>(*p) : std::nullopt;
  }

  // An optional list of fp32 scalars (Adam's step counts): their values, none when it is not given.
  std::vector<float> f32_scalars(at::TensorList ts, const char* name) const {
    std::vector<float> out;
    if (optional_scalars(ts, name))
      for (const at::Tensor& t : ts) out.push_back(*t.data_ptr<float>());
    return out;
  }
};

// ----------------------------------------------------------------------------------------------
// The multi-tensor loop. All tensors of a call are cut into chunks of at most kChunk elements
// (a small tensor is one chunk), and the chunks are spread over the threads by element count, so
// a call over many small tensors is as parallel as one over a single big tensor.

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kChunkCost = 1024;        // fixed cost of a chunk, in elements, for load balancing
constexpr int64_t kSerialBelow = int64_t(1) << 15;  // total elements below which threads cost more

struct Chunk {
  int64_t t;            // tensor index in the lists
  int64_t begin, end;   // element range in that tensor's flat storage
};

// unit[j] (optional): chunk boundaries of tensor j fall on multiples of unit[j] when a unit fits in a
// chunk; a longer unit is split into equal pieces that never straddle two units.
inline std::vector<Chunk> make_chunks(at::TensorList ts, const std::vector<int64_t>* unit = nullptr) {
  std::vector<Chunk> out;
  for (const auto j : c10::irange(ts.size())) {
    const int64_t n = ts[j].numel(), u = unit ? std::max<int64_t>((*unit)[j], 1) : 1;
    if (n == 0) continue;
    const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
    const int64_t seg = u <= kChunk ? n : u;  // boundaries a chunk never crosses
    const int64_t step = u <= kChunk ? kChunk / u * u : ceil_div(u, ceil_div(u, kChunk));
    for (int64_t s = 0; s < n; s += seg)
      for (int64_t b = s; b < s + seg; b += step) out.push_back({int64_t(j), b, std::min(b + step, s + seg)});
  }
  return out;
}

// Tag of the ISA a chunk body is compiled for. fma() fuses where the ISA can (as ATen's vec::fmadd
// does there) and is a*b+c otherwise, where a libm fmaf call would stop vectorization.
template <bool kHasFma>
struct Isa {
  static float fma(float a, float b, float c) {
    if constexpr (kHasFma) return std::fma(a, b, c);
    else return a * b + c;
  }
};
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
using BaseIsa = Isa<true>;
#else
using BaseIsa = Isa<false>;
#endif

// The inner loops are compiled twice: for the build's baseline ISA, and on x86-64 once more for
// AVX2+FMA (picked at run time), which doubles the vector width and gives the fused multiply-adds
// that ATen's own kernels use, so results match torch's to the bit. `flatten` inlines the whole
// chunk body into each wrapper so it is compiled for the wrapper's ISA.
#if defined(__GNUC__)
#define FASTSAM_FLATTEN __attribute__((flatten))
#else
#define FASTSAM_FLATTEN
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__AVX2__)
#define FASTSAM_CPU_AVX2 1
template <class F>
__attribute__((target("avx2,fma"))) FASTSAM_FLATTEN void call_avx2(const F& f, const Chunk& c, int64_t i) {
  f(c, i, Isa<true>{});
}
#endif
template <class F>
FASTSAM_FLATTEN void call_base(const F& f, const Chunk& c, int64_t i) { f(c, i, BaseIsa{}); }

// FASTSAM_CPU_ISA=base forces the baseline loops (to test them on an AVX2 machine).
inline bool use_avx2() {
#ifdef FASTSAM_CPU_AVX2
  static const bool yes = [] {
    const char* env = std::getenv("FASTSAM_CPU_ISA");
    return !(env && std::strcmp(env, "base") == 0) && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}

// Runs f(chunk, chunk_index, isa_tag) for every chunk. Each thread gets one contiguous run of
// chunks of about equal total size; which chunk goes to which thread never changes a result.
// With torch's OpenMP backend at::parallel_for is header code: it only starts threads when this
// file is compiled with -fopenmp, and runs everything on the calling thread otherwise.
template <class F>
void run_chunks(const std::vector<Chunk>& chunks, const F& f) {
  const int64_t n = static_cast<int64_t>(chunks.size());
  const auto run = [&](int64_t b, int64_t e) {
#ifdef FASTSAM_CPU_AVX2
    if (use_avx2()) {
      for (int64_t i = b; i < e; ++i) call_avx2(f, chunks[i], i);
      return;
    }
#endif
    for (int64_t i = b; i < e; ++i) call_base(f, chunks[i], i);
  };
  int64_t total = 0;
  for (const Chunk& c : chunks) total += c.end - c.begin + kChunkCost;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || total < kSerialBelow || at::in_parallel_region()) return run(0, n);
  std::vector<int64_t> first(threads + 1, n);
  first[0] = 0;
  int64_t k = 1, done = 0;
  for (int64_t i = 0; i < n && k < threads; ++i) {
    while (k < threads && done * threads >= total * k) first[k++] = i;
    done += chunks[i].end - chunks[i].begin + kChunkCost;
  }
  at::parallel_for(0, threads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) run(first[t], first[t + 1]);
  });
}

// dst[j] <- src[j] bit for bit, for lists checked alike.
inline void copy_tensors(at::TensorList dst, at::TensorList src) {
  if (dst.empty()) return;
  const int64_t size = dst[0].element_size();
  const auto d = data_ptrs<char>(dst);
  const auto s = data_ptrs<const char>(src);
  run_chunks(make_chunks(dst), [&](const Chunk& c, int64_t, auto) {
    std::memcpy(d[c.t] + c.begin * size, s[c.t] + c.begin * size, (c.end - c.begin) * size);
  });
}

// ----------------------------------------------------------------------------------------------
// Loss scaling and skipped steps (see reference.py). The kernels read found_inf on the host and run a
// copy-only path for a skipped step, so that what it keeps is kept bit for bit.

inline bool skipped(std::optional<float> found_inf) { return found_inf && *found_inf != 0; }

// A read of an op's grads: g, or g * inv_scale in fp32 when kScaled (the multiply before any other use).
// A compile-time flag, so that loops over unscaled grads do not pay for a multiply by one.
template <class IO, bool kScaled>
struct GradIn {
  const typename IO::S* p;
  float inv;  // by value: a pointer to it could alias the stores of the loop
  float operator()(int64_t i) const {
    if constexpr (kScaled) return IO::ld(p[i]) * inv;
    else return IO::ld(p[i]);
  }
  // The grad to store where an op keeps it: the raw value when unscaled, which copies NaN payloads too.
  typename IO::S stored(int64_t i) const {
    if constexpr (kScaled) return IO::st((*this)(i));
    else return p[i];
  }
};

// The sums of the terms f(k), for each f of fs, for k in [b, e), in one pass: 32 fp32 lanes per sum
// add up blocks of 256 terms (8 per lane), and the blocks are summed in double. Many independent
// lanes keep the adds pipelined (one vector accumulator makes the loop latency-bound), and
// converting to double once per block, not per term, keeps the loop cheap enough to run at memory
// speed. One functor per sum, not one returning an array: GCC does not vectorize a loop that holds
// an aggregate, and it merges the loads that the functors share.
template <class... F>
inline std::array<double, sizeof...(F)> sum_ranges(int64_t b, int64_t e, const F&... fs) {
  constexpr size_t N = sizeof...(F);
  constexpr int kLanes = 32, kBlock = 8 * kLanes;
  double total[N][kLanes] = {};
  int64_t k = b;
  for (; k + kBlock <= e; k += kBlock) {
    float lane[N][kLanes] = {};
    for (int r = 0; r < kBlock; r += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        size_t s = 0;
        ((lane[s++][l] += fs(k + r + l)), ...);
      }
    }
    for (size_t s = 0; s < N; ++s) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) total[s][l] += double(lane[s][l]);
    }
  }
  std::array<double, N> out{};
  for (; k < e; ++k) {
    size_t s = 0;
    ((out[s++] += double(fs(k))), ...);
  }
  for (size_t s = 0; s < N; ++s)
    for (const double x : total[s]) out[s] += x;
  return out;
}

template <class F>
inline double sum_range(int64_t b, int64_t e, const F& f) { return sum_ranges(b, e, f)[0]; }

// ----------------------------------------------------------------------------------------------
// The normalization operator T of (A)SAM, element-wise in fp32 (see reference.py). Inside a chunk,
// runs of elements that share a row scale are handed to `body(begin, end, c)`; the element value
// of T is then t_op<M>(w, c) with c = eta (abs) or the row scale (row).

struct TArgs {
  std::vector<const float*> scale;  // row scales of each tensor (row mode)
  std::vector<int64_t> inner;       // elements per row of each tensor (row mode)
  float eta;

  TArgs(at::TensorList params, at::TensorList row_scales, int64_t mode, double eta_) : eta(float(eta_)) {
    if (mode != kRow) return;
    scale = data_ptrs<const float>(row_scales);
    for (const at::Tensor& p : params)
      inner.push_back(std::max<int64_t>(p.numel() / std::max<int64_t>(rows_of(p), 1), 1));
  }
};

template <int M>
inline float t_op(float w, float c) {
  if constexpr (M == kIdentity) return 1.f;
  else if constexpr (M == kAbs) return std::fabs(w) + c;
  else return c;
}

template <int M, class F>
inline void for_t_runs(const Chunk& c, const TArgs& ta, F&& body) {
  if constexpr (M != kRow) {
    body(c.begin, c.end, ta.eta);
  } else {
    const int64_t inner = ta.inner[c.t];
    const float* scale = ta.scale[c.t];
    for (int64_t b = c.begin; b < c.end;) {
      const int64_t r = b / inner, e = std::min(c.end, (r + 1) * inner);
      body(b, e, scale[r]);
      b = e;
    }
  }
}

}  // namespace fastsam::cpu
