// CPU kernels of the CVaR ops: cvar_select, cvar_cross_entropy, cvar_bce_with_logits (the math, the tie
// and NaN rules: fastsam/ops/cvar_reference.py).
//
// Each op makes three passes. (1) Over fixed chunks of rows, in parallel: the losses (one per row, or one
// per element for element-wise BCE), kept as order-preserving integer keys (select.h; 0 for an ignored
// entry), with the counts of valid entries and of NaN losses. (2) The radix select of the ceil(k)-th
// largest key (select.h). (3) Over the same chunks: the weights or gradients, and the sum of the losses
// above the threshold, one double per chunk, added in chunk order. The chunks depend on the shape alone,
// so no result depends on the number of threads.
//
// exp and log (simd_math.h) run on 8 fp32 (4 fp64) lanes at once, written with GCC vector extensions so
// that they are compiled for AVX2 inside run_chunks' AVX2 copy of each loop (multi_tensor.h) and for the
// baseline ISA otherwise. They are accurate to a couple of ulp, not bitwise torch's, so unlike sam_ops.cpp this file
// leaves fp-contract on: the AVX2 copy fuses the polynomials' multiply-adds, which halves their cost
// (results then differ from the baseline copy's by an ulp, never with the number of threads).
#if defined(__GNUC__) && !defined(__clang__)
// 32-byte vectors in code built for the baseline ISA: GCC notes an ABI difference, which cannot matter
// here, as every function taking or returning one is inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>
#include <utility>

#include "multi_tensor.h"
#include "select.h"
#include "simd_math.h"

namespace fastsam::cpu {
namespace {

// ----------------------------------------------------------------------------------------------
// Loads and stores of N lanes between storage (IO::S) and opmath (T).

struct F64 {
  using S = double;
  static double ld(S x) { return x; }
  static S st(double x) { return x; }
};

template <class IO, class T>
inline Vec<T> load(const typename IO::S* p) {
  Vec<T> v;
  if constexpr (std::is_same_v<typename IO::S, T>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    T a[Lanes<T>::N];
    for (int l = 0; l < Lanes<T>::N; ++l) a[l] = T(IO::ld(p[l]));
    std::memcpy(&v, a, sizeof v);
  }
  return v;
}

// The first cnt (< N) lanes from p, `pad` in the others: the tail of a row, read without overrunning it.
template <class IO, class T>
inline Vec<T> load_part(const typename IO::S* p, int64_t cnt, T pad) {
  T a[Lanes<T>::N];
  for (int l = 0; l < Lanes<T>::N; ++l) a[l] = l < cnt ? T(IO::ld(p[l])) : pad;
  Vec<T> v;
  std::memcpy(&v, a, sizeof v);
  return v;
}

template <class IO, class T>
inline void store(typename IO::S* p, Vec<T> v) {
  if constexpr (std::is_same_v<typename IO::S, T>) {
    std::memcpy(p, &v, sizeof v);
  } else {
    T a[Lanes<T>::N];
    std::memcpy(a, &v, sizeof v);
    for (int l = 0; l < Lanes<T>::N; ++l) p[l] = IO::st(a[l]);
  }
}

template <class IO, class T>
inline void store_part(typename IO::S* p, Vec<T> v, int64_t cnt) {
  T a[Lanes<T>::N];
  std::memcpy(a, &v, sizeof v);
  for (int l = 0; l < cnt; ++l) p[l] = IO::st(a[l]);
}

template <class T>
inline UVec<T> load_keys(const key_t<T>* p) {
  UVec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void store_keys(key_t<T>* p, UVec<T> v, int64_t cnt) {
  if (cnt == Lanes<T>::N) {
    std::memcpy(p, &v, sizeof v);
  } else {
    for (int l = 0; l < cnt; ++l) p[l] = v[l];
  }
}

// The lane blocks of a row of width >= N: the whole blocks, then, if N does not divide the width, one that
// ends at the row's end, overlapping the one before, so that every load and store is a whole vector.
// body(j, fresh): the block starts at j; fresh masks its lanes that no earlier block had (all but in the
// last one), for sums and counts. A store of the overlapping block rewrites the overlapped elements with
// the values they already have: every element's value depends on that element alone.
template <class T, class F>
inline void for_row_blocks(int64_t width, F&& body) {
  constexpr int N = Lanes<T>::N;
  using Int = typename Lanes<T>::Int;
  int64_t j = 0;
  for (; j + N <= width; j += N) body(j, IVec<T>{} - 1);
  if (j < width) body(width - N, lane_index<T>() >= Int(N - (width - j)));
}

// The first cnt <= N elements at p in lanes [0, cnt), `pad` in the others. One vector load where the N
// elements lie inside the buffer (before end): the lanes past cnt then read the next row, and are masked.
template <class IO, class T>
inline Vec<T> load_lanes(const typename IO::S* p, int64_t cnt, T pad, const typename IO::S* end) {
  using Int = typename Lanes<T>::Int;
  if (cnt == Lanes<T>::N) return load<IO, T>(p);
  if (end - p >= Lanes<T>::N) return lane_index<T>() < Int(cnt) ? load<IO, T>(p) : splat<T>(pad);
  return load_part<IO, T>(p, cnt, pad);
}

// ----------------------------------------------------------------------------------------------
// A third copy of the loops, for AVX-512: the same 8-lane code, which gets twice the vector registers
// (fewer spills in the exps and folds) and its mask and ternary-logic instructions. run_chunks' own
// dispatch (multi_tensor.h) then only forwards each chunk to it. FASTSAM_CPU_ISA=avx2 (or base) keeps
// the AVX2 (or baseline) copy, to test it on an AVX-512 machine.

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__AVX512F__)
#define FASTSAM_CVAR_AVX512 1
template <class F>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), noinline)) FASTSAM_FLATTEN void call_avx512(
    const F& f, const Chunk& c, int64_t i) {
  f(c, i, Isa<true>{});
}

inline bool use_avx512() {
  static const bool yes = [] {
    const char* env = std::getenv("FASTSAM_CPU_ISA");
    return !(env && (std::strcmp(env, "base") == 0 || std::strcmp(env, "avx2") == 0)) &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return yes;
}
#endif

// run_chunks (the same chunks to the same threads), through the AVX-512 copy where there is one.
template <class F>
void run_cvar_chunks(const std::vector<Chunk>& chunks, const F& f) {
#ifdef FASTSAM_CVAR_AVX512
  if (use_avx512()) return run_chunks(chunks, [&f](const Chunk& c, int64_t i, auto) { call_avx512(f, c, i); });
#endif
  run_chunks(chunks, f);
}

// ----------------------------------------------------------------------------------------------
// Checks, dispatch, chunks, and the threshold shared by the three ops.

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Storage type and opmath type of each supported dtype.
template <class F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(F32{}, float{});
    case at::kDouble: return f(F64{}, double{});
    case at::kBFloat16: return f(BF16{}, float{});
    case at::kHalf: return f(F16{}, float{});
    default: TORCH_CHECK(false, "unreachable: dtype ", dtype, " passed check_float");
  }
}

void check_float(const char* op, const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kDouble || d == at::kBFloat16 || d == at::kHalf, op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", d);
}

void check_dense(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (sizes ", t.sizes(), ", strides ",
                    t.strides(), "); call .contiguous() on it");
}

void check_alpha(const char* op, double alpha) {
  TORCH_CHECK_VALUE(alpha > 0 && alpha <= 1, op, ": alpha must be in (0, 1], got ", alpha);
}

// Whole rows of about kChunk elements per chunk (Chunk.begin/end count elements), fixed by the shape.
std::vector<Chunk> row_chunks(int64_t rows, int64_t width) {
  const int64_t per = std::max<int64_t>(1, kChunk / std::max<int64_t>(width, 1));
  std::vector<Chunk> out;
  out.reserve(size_t((rows + per - 1) / per));
  for (int64_t r = 0; r < rows; r += per) out.push_back({0, r * width, std::min(rows, r + per) * width});
  return out;
}

struct Counts {
  int64_t valid = 0, nan = 0;
};

Counts total(const std::vector<Counts>& per_chunk) {
  Counts t;
  for (const Counts& c : per_chunk) {
    t.valid += c.valid;
    t.nan += c.nan;
  }
  return t;
}

constexpr double kSnap = 1e-9;  // cvar_reference.SNAP

// The threshold t of CVaR_alpha and the weights of the losses above and at it.
template <class T>
struct Cut {
  bool defined = false;  // some valid loss and no NaN among them; else value and var are NaN
  key_t<T> key = 0;      // the key of t (nonzero)
  T t = kNaN<T>;
  double k = 0, w_gt = 0, w_eq = 0;
  int64_t c_gt = 0;
};

// keys: one per entry, 0 where the entry is not valid; counts: over the valid entries.
template <class T>
Cut<T> make_cut(const key_t<T>* keys, int64_t n, Counts counts, double alpha) {
  Cut<T> c;
  if (counts.valid == 0 || counts.nan > 0) return c;
  double k = alpha * double(counts.valid);
  const double r = std::nearbyint(k);
  if (r >= 1 && std::fabs(k - r) <= kSnap * k) k = r;
  const int64_t rank = std::clamp<int64_t>(int64_t(std::ceil(k)), 1, counts.valid);
  const Threshold<key_t<T>> th = select_largest(keys, n, rank);
  c.defined = true;
  c.key = th.key;
  c.t = from_key<T>(th.key);
  c.k = k;
  c.c_gt = th.above;
  c.w_gt = 1.0 / k;
  c.w_eq = (k - double(th.above)) / (k * double(th.equal));
  return c;
}

// The sum, in double, of the losses whose keys in [b, e) are above the threshold: N keys at a time, their
// losses widened to double into 4-lane sums (two of them for fp32), which are added in a fixed order.
template <class T>
double sum_above(const key_t<T>* keys, int64_t b, int64_t e, key_t<T> t) {
  constexpr int N = Lanes<T>::N;
  typedef double D __attribute__((vector_size(32)));
  D lo{}, hi{};
  int64_t i = b;
  for (; i + N <= e; i += N) {
    const UVec<T> kv = load_keys<T>(keys + i);
    const Vec<T> v = kv > t ? from_keys<T>(kv) : splat<T>(0);
    if constexpr (N == 8) {
      lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), D);
      hi += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), D);
    } else {
      lo += v;
    }
  }
  double tail = 0;
  for (; i < e; ++i) tail += keys[i] > t ? double(from_key<T>(keys[i])) : 0.0;
  const D s = lo + hi;
  return ((s[0] + s[1]) + (s[2] + s[3])) + tail;
}

// value and var: 0-dim tensors of the opmath dtype. sums: the chunk sums of sum_above.
template <class T>
std::pair<at::Tensor, at::Tensor> value_and_var(const at::Tensor& like, const Cut<T>& c,
                                                const std::vector<double>& sums) {
  const auto opts = like.options().dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat);
  at::Tensor value = at::empty({}, opts), var = at::empty({}, opts);
  double s_gt = 0;
  for (const double s : sums) s_gt += s;
  *value.data_ptr<T>() = c.defined ? T((s_gt + (c.k - double(c.c_gt)) * double(c.t)) / c.k) : kNaN<T>;
  *var.data_ptr<T>() = c.t;
  return {value, var};
}

// Selected rows (weight != 0) of [rb, re), rb-relative, in order: a branch-free compaction, as whether
// a row is selected is as unpredictable as its loss.
template <class K>
inline int pick_rows(const K* keys, int64_t rb, int64_t re, K t, int32_t* pick) {
  int np = 0;
  for (int64_t r = rb; r < re; ++r) {
    pick[np] = int32_t(r - rb);
    np += keys[r] >= t;
  }
  return np;
}

constexpr int64_t kRun = 256;  // rows zeroed at once before the selected ones are written

// Pass 3 of per-row weights over rows [r0, r1) of `width` elements: each run of kRun rows of g is zeroed
// (a full-line store that needs no read of the line), then body(rb, pick, np) writes its selected rows
// (key >= t; pick: rb-relative). The rows of x that the next run selects are prefetched first: they are
// scattered, so the hardware prefetcher does not see them coming, and pass 1 read them long ago.
template <class K, class S, class Body>
void for_selected_runs(const K* keys, K t, const S* x, S* g, int64_t width, int64_t r0, int64_t r1, Body&& body) {
  int32_t pick[2][kRun];
  int np[2] = {0, 0};
  const int64_t bytes = std::min<int64_t>(width * int64_t(sizeof(S)), 256);
  const auto scan = [&](int64_t rb, int slot) {
    np[slot] = pick_rows(keys, rb, std::min(r1, rb + kRun), t, pick[slot]);
    for (int q = 0; q < np[slot]; ++q) {
      const char* row = reinterpret_cast<const char*>(x + (rb + pick[slot][q]) * width);
      for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o);
      __builtin_prefetch(row + bytes - 1);
    }
  };
  if (r0 < r1) scan(r0, 0);
  for (int64_t rb = r0, k = 0; rb < r1; rb += kRun, ++k) {
    const int cur = int(k & 1);
    if (rb + kRun < r1) scan(rb + kRun, cur ^ 1);
    const int64_t re = std::min(r1, rb + kRun);
    std::memset(static_cast<void*>(g + rb * width), 0, size_t((re - rb) * width) * sizeof(S));
    body(rb, pick[cur], np[cur]);
  }
}

// ----------------------------------------------------------------------------------------------
// cvar_select

// losses: [n], float32/64, float16 or bfloat16, contiguous. Returns value and var (0-dim, opmath: fp32,
// fp64 for fp64) and the weights d value / d losses ([n], the dtype of losses).
Result cvar_select(const at::Tensor& losses, double alpha) {
  constexpr const char* kOp = "cvar_select";
  check_alpha(kOp, alpha);
  check_float(kOp, losses, "losses");
  TORCH_CHECK_VALUE(losses.dim() == 1, kOp, ": losses must be 1-D, got shape ", losses.sizes());
  check_dense(kOp, losses, "losses");
  const int64_t n = losses.numel();
  at::Tensor weights = at::empty({n}, losses.options());
  Result out;
  dispatch_float(losses.scalar_type(), [&](auto io, auto opmath) {
    using IO = decltype(io);
    using T = decltype(opmath);
    using S = typename IO::S;
    using K = key_t<T>;
    const S* l = static_cast<const S*>(losses.const_data_ptr());
    S* w = static_cast<S*>(weights.data_ptr());
    std::unique_ptr<K[]> keys(new K[n]);
    const auto chunks = row_chunks(n, 1);
    std::vector<Counts> counts(chunks.size());
    K* kp = keys.get();
    run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
      int64_t nan = 0;
      for (int64_t j = c.begin; j < c.end; ++j) {
        const T v = T(IO::ld(l[j]));
        kp[j] = to_key(v);
        nan += v != v;
      }
      counts[i] = {c.end - c.begin, nan};
    });
    const Cut<T> cut = make_cut<T>(keys.get(), n, total(counts), alpha);
    std::vector<double> sums(chunks.size());
    if (!cut.defined) {
      std::fill(w, w + n, IO::st(kNaN<T>));
    } else {
      run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
        // Locals, not captures: a store to w could otherwise alias them and force a reload per element.
        const S wg = IO::st(T(cut.w_gt)), we = IO::st(T(cut.w_eq)), zero = IO::st(T(0));
        const K t = cut.key;
        for (int64_t j = c.begin; j < c.end; ++j) w[j] = kp[j] > t ? wg : kp[j] == t ? we : zero;
        sums[i] = sum_above<T>(kp, c.begin, c.end, t);
      });
    }
    auto [value, var] = value_and_var<T>(losses, cut, sums);
    out = {value, var, weights};
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// cvar_cross_entropy

template <class T>
struct CeArgs {
  int64_t rows, classes, ignore_index;
  bool smooth;
  T keep, ls;      // 1 - s and s, the weights of the two terms of the smoothed loss
  T off, hit;      // gradient terms: s / C off every class, s - 1 more on the target
};

// max (shift), sum of exp(x - shift) and sum of x over one row of more than N logits.
template <class IO, class T>
inline void ce_row_stats(const typename IO::S* xr, int64_t classes, T& shift, T& sum_exp, T& sum_x) {
  using V = Vec<T>;
  V vm = splat<T>(-kInf<T>), vx = splat<T>(0);
  for_row_blocks<T>(classes, [&](int64_t j, IVec<T> fresh) {
    const V v = load<IO, T>(xr + j);
    vm = vmax<T>(vm, v);
    vx += fresh ? v : splat<T>(0);
  });
  const T m = hmax<T>(vm);
  const bool finite = std::isfinite(m);
  shift = finite ? m : T(0);  // as torch's logsumexp: an infinite max shifts by 0
  V vs = splat<T>(0);
  for_row_blocks<T>(classes, [&](int64_t j, IVec<T> fresh) {
    const V v = load<IO, T>(xr + j) - shift;
    vs += fresh ? (finite ? vexp<T, true>(v) : vexp<T, false>(v)) : splat<T>(0);
  });
  sum_exp = hsum<T>(vs);
  sum_x = hsum<T>(vx);
}

// Pass 1 over rows [r0, r1): the key of each row's loss (0 if ignored) and its log-sum-exp.
template <class IO, class T>
Counts ce_losses(const typename IO::S* x, const int64_t* target, int64_t r0, int64_t r1, const CeArgs<T> a,
                 key_t<T>* keys, T* lse) {
  constexpr int N = Lanes<T>::N;
  using V = Vec<T>;
  Counts counts;
  for (int64_t r = r0; r < r1; r += N) {
    const int nb = int(std::min<int64_t>(N, r1 - r));
    // Lanes of ignored rows (and past r1) get harmless values and key 0.
    alignas(32) T shift[N] = {}, sum_exp[N], sum_x[N] = {}, x_y[N] = {};
    alignas(32) typename Lanes<T>::Int ok[N] = {};
    for (int l = 0; l < N; ++l) sum_exp[l] = 1;
    for (int l = 0; l < nb; ++l) {
      const int64_t y = target[r + l];
      if (y == a.ignore_index) continue;
      const typename IO::S* xr = x + (r + l) * a.classes;
      ce_row_stats<IO, T>(xr, a.classes, shift[l], sum_exp[l], sum_x[l]);
      x_y[l] = y >= 0 && y < a.classes ? T(IO::ld(xr[y])) : kNaN<T>;  // a class outside [0, C): NaN loss
      ok[l] = -1;
    }
    V vshift, vsum, vsx, vxy;
    IVec<T> vok;
    std::memcpy(&vshift, shift, sizeof vshift);
    std::memcpy(&vsum, sum_exp, sizeof vsum);
    std::memcpy(&vsx, sum_x, sizeof vsx);
    std::memcpy(&vxy, x_y, sizeof vxy);
    std::memcpy(&vok, ok, sizeof vok);
    const V vlse = vshift + vlog<T>(vsum);
    V loss = vlse - vxy;
    if (a.smooth) loss = loss * a.keep + (vlse - vsx / T(a.classes)) * a.ls;
    store_keys<T>(keys + r, to_keys<T>(loss) & __builtin_bit_cast(UVec<T>, vok), nb);
    if (nb == N) std::memcpy(lse + r, &vlse, sizeof vlse);
    else for (int l = 0; l < nb; ++l) lse[r + l] = vlse[l];
    for (int l = 0; l < nb; ++l) {
      counts.valid += ok[l] != 0;
      counts.nan += ok[l] != 0 && loss[l] != loss[l];
    }
  }
  return counts;
}

// Lane masks of N targets ys: ok (not ignore_index) and bad (ok but outside [0, C)); idx: where to read
// the target's logit (0 for a class outside [0, C)).
template <class T>
inline void target_lanes(const int64_t* ys, int64_t ignore_index, int64_t classes, IVec<T>& ok, IVec<T>& bad,
                         int64_t* idx) {
  typedef int64_t Q __attribute__((vector_size(32)));
  typedef uint64_t UQ __attribute__((vector_size(32)));
  typedef int32_t H __attribute__((vector_size(16)));
  constexpr int kQ = Lanes<T>::N / 4;
  Q okq[kQ], badq[kQ];
  for (int h = 0; h < kQ; ++h) {
    Q q;
    std::memcpy(&q, ys + 4 * h, sizeof q);
    const Q in = __builtin_bit_cast(UQ, q) < uint64_t(classes);
    okq[h] = q != ignore_index;
    badq[h] = okq[h] & ~in;
    const Q ix = in ? q : Q{};
    std::memcpy(idx + 4 * h, &ix, sizeof ix);
  }
  if constexpr (kQ == 1) {
    ok = okq[0];
    bad = badq[0];
  } else {
    const H o0 = __builtin_convertvector(okq[0], H), o1 = __builtin_convertvector(okq[1], H);
    const H b0 = __builtin_convertvector(badq[0], H), b1 = __builtin_convertvector(badq[1], H);
    ok = __builtin_shufflevector(o0, o1, 0, 1, 2, 3, 4, 5, 6, 7);
    bad = __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 4, 5, 6, 7);
  }
}

// Pass 1 for rows of at most N classes, one lane block each, N rows at a time: the row reductions are
// folded across the rows (fold_lanes) and the N exps run side by side (vexp_n). kWide: exactly N classes
// (whole-vector loads). Groups of N rows are straight-line code; only the last, partial one is not.
template <class IO, class T, bool kSmooth, bool kWide>
Counts ce_losses_narrow(const typename IO::S* x, const int64_t* target, int64_t r0, int64_t r1, const CeArgs<T> a,
                        key_t<T>* keys, T* lse) {
  constexpr int N = Lanes<T>::N;
  using V = Vec<T>;
  using I = IVec<T>;
  using Int = typename Lanes<T>::Int;
  using UInt = typename Lanes<T>::UInt;
  constexpr UInt kExpBits = UInt(2 * Lanes<T>::kBias + 1) << Lanes<T>::kMant;
  const int64_t classes = kWide ? N : a.classes;
  const typename IO::S* end = x + a.rows * classes;
  const I in_row = lane_index<T>() < Int(classes);
  I valid{}, nan{};  // per-lane counts (-1 per row)
  const auto group = [&](int64_t r, int nb, auto whole_c) {
    constexpr bool kWhole = decltype(whole_c)::value;
    V v[N], e[N];
#pragma GCC unroll 8
    for (int b = 0; b < N; ++b) {
      const typename IO::S* xr = x + (r + b) * classes;
      if (!kWhole && b >= nb) v[b] = splat<T>(0);
      else if constexpr (kWide) v[b] = load<IO, T>(xr);
      else v[b] = load_lanes<IO, T>(xr, classes, -kInf<T>, end);
      e[b] = v[b];
    }
    const V m = fold_lanes<T>(e, [](V p, V q) { return vmax<T>(p, q); });
    // As torch's logsumexp, an infinite max shifts by 0 (and NaN rows stay NaN whatever the shift).
    const I finite = (__builtin_bit_cast(UVec<T>, m) & kExpBits) != kExpBits;
    const V shift = finite ? m : splat<T>(0);
#pragma GCC unroll 8
    for (int b = 0; b < N; ++b) e[b] = v[b] - shift[b];
    if (all_lanes<T>(finite)) vexp_n<T, true, N>(e);
    else vexp_n<T, false, N>(e);
    const V vlse = shift + vlog<T>(fold_lanes<T>(e, [](V p, V q) { return p + q; }));
    // The target's logit, loaded from memory (cheaper than picking a lane of each row's vector); a
    // class outside [0, C) is a NaN loss.
    alignas(32) int64_t ys[N], idx[N];
    if constexpr (kWhole) {
      std::memcpy(ys, target + r, sizeof ys);
    } else {
      for (int b = 0; b < N; ++b) ys[b] = b < nb ? target[r + b] : a.ignore_index;
    }
    I vok, vbad;
    target_lanes<T>(ys, a.ignore_index, classes, vok, vbad, idx);
    alignas(32) T x_y[N];
#pragma GCC unroll 8
    for (int b = 0; b < N; ++b) x_y[b] = kWhole || b < nb ? T(IO::ld(x[(r + b) * classes + idx[b]])) : T(0);
    V vxy;
    std::memcpy(&vxy, x_y, sizeof vxy);
    V loss = vlse - (vbad ? splat<T>(kNaN<T>) : vxy);
    if constexpr (kSmooth) {
#pragma GCC unroll 8
      for (int b = 0; b < N; ++b) e[b] = in_row ? v[b] : splat<T>(0);
      const V sum_x = fold_lanes<T>(e, [](V p, V q) { return p + q; });
      loss = loss * a.keep + (vlse - sum_x / T(classes)) * a.ls;
    }
    valid -= vok;
    nan -= vok & (loss != loss);
    const UVec<T> kv = to_keys<T>(loss) & __builtin_bit_cast(UVec<T>, vok);
    if constexpr (kWhole) {
      std::memcpy(keys + r, &kv, sizeof kv);
      std::memcpy(lse + r, &vlse, sizeof vlse);
    } else {
      for (int l = 0; l < nb; ++l) {
        keys[r + l] = kv[l];
        lse[r + l] = vlse[l];
      }
    }
  };
  int64_t r = r0;
  for (; r + N <= r1; r += N) group(r, N, std::true_type{});
  if (r < r1) group(r, int(r1 - r), std::false_type{});
  Counts counts;
  for (int l = 0; l < N; ++l) {
    counts.valid += valid[l];
    counts.nan += nan[l];
  }
  return counts;
}

// w (softmax(x) - s / C - (1 - s) onehot(y)) for one row of more than N classes.
template <class IO, class T>
inline void ce_row_grad(const typename IO::S* xr, typename IO::S* gr, int64_t y, T lse, T w, const CeArgs<T> a) {
  using V = Vec<T>;
  using Int = typename Lanes<T>::Int;
  const IVec<T> lane = lane_index<T>();
  for_row_blocks<T>(a.classes, [&](int64_t j, IVec<T>) {
    V d = vexp<T, true>(load<IO, T>(xr + j) - lse) - a.off;  // lse >= max(x): the argument is <= 0
    const Int yl = y >= j && y < j + Lanes<T>::N ? Int(y - j) : Int(-1);
    d = lane == yl ? d + a.hit : d;
    store<IO, T>(gr + j, d * w);
  });
}

// Pass 3 for the selected rows of at most N classes: N rows at a time, their exps side by side.
template <class IO, class T>
inline void ce_grads_narrow(const typename IO::S* x, typename IO::S* g, const int64_t* target, const T* lse,
                            const key_t<T>* keys, key_t<T> t, T wg, T we, int64_t rb, const int32_t* pick, int np,
                            const CeArgs<T> a) {
  constexpr int N = Lanes<T>::N;
  using V = Vec<T>;
  using Int = typename Lanes<T>::Int;
  const int64_t classes = a.classes;
  const typename IO::S* end = x + a.rows * classes;
  const IVec<T> lane = lane_index<T>();
  for (int q = 0; q < np; q += N) {
    const int cnt = std::min(N, np - q);
    V e[N];
    for (int b = 0; b < N; ++b) {
      if (b >= cnt) {
        e[b] = splat<T>(0);
        continue;
      }
      const int64_t r = rb + pick[q + b];
      e[b] = load_lanes<IO, T>(x + r * classes, classes, T(0), end) - lse[r];
    }
    vexp_n<T, true, N>(e);  // lse >= max(x): the arguments are <= 0
    for (int b = 0; b < cnt; ++b) {
      const int64_t r = rb + pick[q + b];
      V d = e[b] - a.off;
      d = lane == Int(target[r]) ? d + a.hit : d;  // a selected row's target is in [0, C)
      d = d * (keys[r] > t ? wg : we);
      if (classes == N) store<IO, T>(g + r * classes, d);
      else store_part<IO, T>(g + r * classes, d, classes);
    }
  }
}

// logits: [n, C], float32/64, float16 or bfloat16, contiguous; target: [n] int64. Returns value and var
// (0-dim, opmath) and grad_logits = d value / d logits ([n, C], the dtype of logits).
Result cvar_cross_entropy(const at::Tensor& logits, const at::Tensor& target, double alpha, int64_t ignore_index,
                          double label_smoothing) {
  constexpr const char* kOp = "cvar_cross_entropy";
  check_alpha(kOp, alpha);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, kOp, ": label_smoothing must be in [0, 1], got ",
                    label_smoothing);
  check_float(kOp, logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, kOp,
                    ": logits must be 2-D [n, C] with C >= 1, got shape ", logits.sizes());
  check_dense(kOp, logits, "logits");
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, kOp, ": target must be int64 class indices, got ",
                   target.scalar_type());
  const int64_t n = logits.size(0), classes = logits.size(1);
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == n, kOp, ": target must have shape [", n,
                    "] (one class per row of logits), got ", target.sizes());
  check_dense(kOp, target, "target");
  at::Tensor grad = at::empty({n, classes}, logits.options());
  Result out;
  dispatch_float(logits.scalar_type(), [&](auto io, auto opmath) {
    using IO = decltype(io);
    using T = decltype(opmath);
    using S = typename IO::S;
    using K = key_t<T>;
    const S* x = static_cast<const S*>(logits.const_data_ptr());
    const int64_t* y = target.const_data_ptr<int64_t>();
    S* g = static_cast<S*>(grad.data_ptr());
    const CeArgs<T> a{n,
                      classes,
                      ignore_index,
                      label_smoothing != 0,
                      T(1.0 - label_smoothing),
                      T(label_smoothing),
                      T(label_smoothing / double(classes)),
                      T(label_smoothing - 1.0)};
    std::unique_ptr<K[]> keys(new K[n]);
    std::unique_ptr<T[]> lse(new T[n]);
    const auto chunks = row_chunks(n, classes);
    std::vector<Counts> counts(chunks.size());
    const bool narrow = classes <= Lanes<T>::N;
    run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
      const int64_t r0 = c.begin / classes, r1 = c.end / classes;
      K* kp = keys.get();
      T* lp = lse.get();
      if (!narrow) counts[i] = ce_losses<IO, T>(x, y, r0, r1, a, kp, lp);
      else with_bool(a.smooth, [&](auto smooth_c) {
        with_bool(classes == Lanes<T>::N, [&](auto wide_c) {
          counts[i] = ce_losses_narrow<IO, T, decltype(smooth_c)::value, decltype(wide_c)::value>(x, y, r0, r1, a, kp, lp);
        });
      });
    });
    const Counts all = total(counts);
    const Cut<T> cut = make_cut<T>(keys.get(), n, all, alpha);
    std::vector<double> sums(chunks.size());
    if (!cut.defined) {  // NaN on the valid rows if one loss is NaN; 0 everywhere if none is valid
      const S fill = IO::st(all.nan > 0 ? kNaN<T> : T(0)), zero = IO::st(T(0));
      for (int64_t r = 0; r < n; ++r) std::fill(g + r * classes, g + (r + 1) * classes, y[r] != ignore_index ? fill : zero);
    } else {
      run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
        const T wg = T(cut.w_gt), we = T(cut.w_eq);  // locals: see cvar_select
        const K t = cut.key;
        const CeArgs<T> args = a;
        const int64_t r0 = c.begin / classes, r1 = c.end / classes;
        const K* kp = keys.get();
        const T* lp = lse.get();
        sums[i] = sum_above<T>(kp, r0, r1, t);
        for_selected_runs(kp, t, x, g, classes, r0, r1, [&](int64_t rb, const int32_t* pick, int np) {
          if (narrow) {
            ce_grads_narrow<IO, T>(x, g, y, lp, kp, t, wg, we, rb, pick, np, args);
          } else {
            for (int q = 0; q < np; ++q) {
              const int64_t r = rb + pick[q];
              ce_row_grad<IO, T>(x + r * classes, g + r * classes, y[r], lp[r], kp[r] > t ? wg : we, args);
            }
          }
        });
      });
    }
    auto [value, var] = value_and_var<T>(logits, cut, sums);
    out = {value, var, grad};
  });
  return out;
}

// ----------------------------------------------------------------------------------------------
// cvar_bce_with_logits

// One lane block of BCE terms: the logits, the targets y (0 where not valid), the positive weights
// lw = 1 + (p - 1) y and the mask of valid entries.
template <class T>
struct BceLanes {
  Vec<T> x, y, lw;
  IVec<T> ok;

  // t: the targets; in: the lanes that hold entries; p: the pos_weight of each lane, or nullptr.
  BceLanes(Vec<T> x_, Vec<T> t, IVec<T> in, T ignore, const Vec<T>* p) : x(x_) {
    ok = (t != ignore) & in;
    y = ok ? t : splat<T>(0);
    lw = p ? (*p - T(1)) * y + T(1) : splat<T>(1);
  }

  // e = exp(-|x|), computed once for both of the below.
  Vec<T> exp_neg_abs() const { return vexp<T, true>(-vabs<T>(x)); }

  // (1 - y) x + lw softplus(-x), with softplus(-x) = log1p(exp(-|x|)) + max(-x, 0).
  Vec<T> loss(Vec<T> e) const { return (T(1) - y) * x + lw * (vlog1p_unit<T>(e) + vmax<T>(-x, splat<T>(0))); }

  // (1 - y) - lw sigmoid(-x), sigmoid(-x) from e without overflow.
  Vec<T> dloss(Vec<T> e) const {
    const Vec<T> inv = T(1) / (e + T(1));
    return (T(1) - y) - lw * (x >= T(0) ? e * inv : inv);
  }
};

// logits, target: [n, L] of one float dtype, contiguous; pos_weight: None or float32 [L]. Returns value and
// var (0-dim, opmath) and grad_logits ([n, L], the dtype of logits).
Result cvar_bce_with_logits(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& pos_weight, double alpha, bool per_sample,
                            double ignore_index) {
  constexpr const char* kOp = "cvar_bce_with_logits";
  check_alpha(kOp, alpha);
  check_float(kOp, logits, "logits");
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, kOp,
                    ": logits must be 2-D [n, L] with L >= 1, got shape ", logits.sizes());
  check_dense(kOp, logits, "logits");
  TORCH_CHECK_TYPE(target.scalar_type() == logits.scalar_type(), kOp, ": target must have the dtype of logits (",
                   logits.scalar_type(), "), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == logits.sizes(), kOp, ": target must have the shape of logits (",
                    logits.sizes(), "), got ", target.sizes());
  check_dense(kOp, target, "target");
  const int64_t n = logits.size(0), labels = logits.size(1);
  const float* pw = nullptr;
  if (pos_weight.has_value() && pos_weight->defined()) {
    TORCH_CHECK_TYPE(pos_weight->scalar_type() == at::kFloat, kOp, ": pos_weight must be float32, got ",
                     pos_weight->scalar_type());
    TORCH_CHECK_VALUE(pos_weight->dim() == 1 && pos_weight->size(0) == labels, kOp,
                      ": pos_weight must have shape [", labels, "] (one weight per label), got ",
                      pos_weight->sizes());
    check_dense(kOp, *pos_weight, "pos_weight");
    pw = pos_weight->const_data_ptr<float>();
  }
  at::Tensor grad = at::empty({n, labels}, logits.options());
  Result out;
  dispatch_float(logits.scalar_type(), [&](auto io, auto opmath) {
    using IO = decltype(io);
    using T = decltype(opmath);
    using S = typename IO::S;
    using K = key_t<T>;
    using V = Vec<T>;
    using I = IVec<T>;
    using Int = typename Lanes<T>::Int;
    constexpr int N = Lanes<T>::N;
    const int64_t size = n * labels;
    const S* x = static_cast<const S*>(logits.const_data_ptr());
    const S* tg = static_cast<const S*>(target.const_data_ptr());
    S* g = static_cast<S*>(grad.data_ptr());
    using M = decltype(IO::ld(S{}));  // what IO converts from and to: float, or double for float64
    const T ignore = T(IO::ld(IO::st(M(ignore_index))));  // torch compares in the target's dtype
    // pos_weight repeated: the weights of N consecutive elements starting at label j are pw_ext[j, j + N).
    std::vector<T> pw_ext(pw ? size_t(labels + N) : 0);
    for (size_t k = 0; k < pw_ext.size(); ++k) pw_ext[k] = T(pw[int64_t(k) % labels]);
    const T* pwe = pw ? pw_ext.data() : nullptr;
    // Element-wise: one key per element, and the elements are walked flat, N at a time. Per sample: one
    // key per row, and the row's count of valid labels.
    const int64_t entries = per_sample ? n : size;
    std::unique_ptr<K[]> keys(new K[entries]);
    std::unique_ptr<int64_t[]> per_row(new int64_t[per_sample ? n : 0]);
    K* kp = keys.get();
    int64_t* rows_valid = per_row.get();
    const auto chunks = row_chunks(n, labels);
    std::vector<Counts> counts(chunks.size());
    // The block of the N elements from e (element-wise), with its lanes in [0, cnt).
    const auto flat_block = [x, tg, pwe, size, labels, ignore](int64_t e, int64_t cnt, int64_t label) {
      const V xv = load_lanes<IO, T>(x + e, cnt, T(0), x + size);
      const V tv = load_lanes<IO, T>(tg + e, cnt, T(0), tg + size);
      V p;
      if (pwe) std::memcpy(&p, pwe + label, sizeof p);
      return BceLanes<T>(xv, tv, lane_index<T>() < Int(cnt), ignore, pwe ? &p : nullptr);
    };
    // The block of a row starting at label j (rows of at least N labels), or the whole row (fewer).
    V pw_short = splat<T>(1);  // the weights of a row of fewer than N labels
    if (pwe) std::memcpy(&pw_short, pwe, sizeof pw_short);
    const auto row_block = [x, tg, pwe, size, labels, ignore, pw_short](int64_t r, int64_t j, I in) {
      const int64_t e = r * labels + j;
      if (labels >= N) {
        V p;
        if (pwe) std::memcpy(&p, pwe + j, sizeof p);
        return BceLanes<T>(load<IO, T>(x + e), load<IO, T>(tg + e), in, ignore, pwe ? &p : nullptr);
      }
      const V xv = load_lanes<IO, T>(x + e, labels, T(0), x + size);
      const V tv = load_lanes<IO, T>(tg + e, labels, T(0), tg + size);
      return BceLanes<T>(xv, tv, in, ignore, pwe ? &pw_short : nullptr);
    };
    const auto for_row = [labels](auto&& body) {  // body(j, in): the lane blocks of one row
      if (labels >= N) for_row_blocks<T>(labels, body);
      else body(int64_t(0), lane_index<T>() < Int(labels));
    };

    run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
      const int64_t step = N % labels;  // locals, not captures: see cvar_select
      const bool rows = per_sample;
      I valid{}, nan{};
      if (!rows) {
        int64_t label = c.begin % labels;
        for (int64_t e = c.begin; e < c.end; e += N) {
          const int64_t cnt = std::min<int64_t>(N, c.end - e);
          const BceLanes<T> b = flat_block(e, cnt, label);
          const V loss = b.loss(b.exp_neg_abs());
          valid -= b.ok;
          nan -= b.ok & (loss != loss);
          store_keys<T>(kp + e, to_keys<T>(loss) & __builtin_bit_cast(UVec<T>, b.ok), cnt);
          label += step;
          if (label >= labels) label -= labels;
        }
      } else {
        for (int64_t r = c.begin / labels, r1 = c.end / labels; r < r1; ++r) {
          V sum = splat<T>(0);
          I row_valid{};
          for_row([&](int64_t j, I in) {
            const BceLanes<T> b = row_block(r, j, in);
            sum += b.ok ? b.loss(b.exp_neg_abs()) : splat<T>(0);
            row_valid -= b.ok;
          });
          const int64_t m = lane_sum<T>(row_valid);
          const T row_loss = hsum<T>(sum) / T(std::max<int64_t>(m, 1));
          kp[r] = m > 0 ? to_key(row_loss) : K(0);
          rows_valid[r] = m;
          valid[0] += m > 0;
          nan[0] += m > 0 && row_loss != row_loss;
        }
      }
      counts[i] = {lane_sum<T>(valid), lane_sum<T>(nan)};
    });
    const Counts all = total(counts);
    const Cut<T> cut = make_cut<T>(kp, entries, all, alpha);
    std::vector<double> sums(chunks.size());
    if (!cut.defined) {  // NaN on the valid entries if one loss is NaN; 0 everywhere if none is valid
      const S fill = IO::st(all.nan > 0 ? kNaN<T> : T(0)), zero = IO::st(T(0));
      for (int64_t e = 0; e < size; ++e) g[e] = T(IO::ld(tg[e])) != ignore ? fill : zero;
    } else if (per_sample) {
      run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
        const double wg = cut.w_gt, we = cut.w_eq;  // locals: see cvar_select
        const K t = cut.key;
        const int64_t r0 = c.begin / labels, r1 = c.end / labels;
        sums[i] = sum_above<T>(kp, r0, r1, t);
        for_selected_runs(kp, t, x, g, labels, r0, r1, [&](int64_t rb, const int32_t* pick, int np) {
          for (int q = 0; q < np; ++q) {
            const int64_t r = rb + pick[q];
            // w_i / m_i: the row's weight spread over its valid labels
            const T scale = T((kp[r] > t ? wg : we) / double(rows_valid[r]));
            S* gr = g + r * labels;
            for_row([&](int64_t j, I in) {
              // Every lane of a block inside the row: the overlapping last block rewrites its overlap.
              const BceLanes<T> b = row_block(r, j, labels >= N ? I{} - 1 : in);
              const V d = b.ok ? scale * b.dloss(b.exp_neg_abs()) : splat<T>(0);
              if (labels >= N) store<IO, T>(gr + j, d);
              else store_part<IO, T>(gr, d, labels);
            });
          }
        });
      });
    } else {
      run_cvar_chunks(chunks, [&](const Chunk& c, int64_t i, auto) {
        const T wg = T(cut.w_gt), we = T(cut.w_eq);  // locals: see cvar_select
        const K t = cut.key;
        const int64_t step = N % labels;
        sums[i] = sum_above<T>(kp, c.begin, c.end, t);
        int64_t label = c.begin % labels;
        for (int64_t e = c.begin; e < c.end; e += N) {
          const int64_t cnt = std::min<int64_t>(N, c.end - e);
          UVec<T> kv{};
          if (cnt == N) kv = load_keys<T>(kp + e);
          else for (int l = 0; l < cnt; ++l) kv[l] = kp[e + l];
          V d = splat<T>(0);
          if (any_lane<T>(kv >= t)) {  // else zeros, without reading the logits
            const BceLanes<T> b = flat_block(e, cnt, label);
            const V w = kv > t ? splat<T>(wg) : kv == t ? splat<T>(we) : splat<T>(0);
            d = b.ok ? w * b.dloss(b.exp_neg_abs()) : splat<T>(0);
          }
          if (cnt == N) store<IO, T>(g + e, d);
          else store_part<IO, T>(g + e, d, cnt);
          label += step;
          if (label >= labels) label -= labels;
        }
      });
    }
    auto [value, var] = value_and_var<T>(logits, cut, sums);
    out = {value, var, grad};
  });
  return out;
}

}  // namespace
}  // namespace fastsam::cpu

TORCH_LIBRARY_IMPL(fastsam, CPU, m) {
  m.impl("cvar_select", &fastsam::cpu::cvar_select);
  m.impl("cvar_cross_entropy", &fastsam::cpu::cvar_cross_entropy);
  m.impl("cvar_bce_with_logits", &fastsam::cpu::cvar_bce_with_logits);
}
