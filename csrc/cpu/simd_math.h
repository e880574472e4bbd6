// The vector math of the CPU CVaR kernels (cvar_ops.cpp), in GCC vector extensions: lanes of the opmath type
// (8 fp32 or 4 fp64: 32 bytes), horizontal reductions in a fixed tree order, e^x, log and log1p accurate to a
// couple of ulp (not bitwise torch's), and select.h's order-preserving keys on every lane. The code is
// compiled for the ISA of the loop that inlines it: cvar_ops.cpp instantiates each loop for the baseline
// ISA, AVX2 and AVX-512 (multi_tensor.h's run_chunks), so nothing here names an intrinsic.
// Everything is inline and internal to the including file (an unnamed namespace): include it from one
// source file, after silencing GCC's -Wpsabi note as cvar_ops.cpp does (32-byte vectors in baseline code).
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

namespace fastsam::cpu {
namespace {

template <class T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int N = 8;
  using Int = int32_t;
  using UInt = uint32_t;
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));  // lane masks (0 or -1), small integers
  typedef uint32_t U __attribute__((vector_size(32)));  // bit patterns, keys
  static constexpr int kMant = 23, kBias = 127;
  static constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds |x| < 2^22 to an integer
  // ln 2 = hi + lo with hi * n exact for the n of any exp argument that is not clamped.
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  // exp is 0 below kExpLo (it would be below half the smallest subnormal) and inf above kExpHi.
  static constexpr float kExpLo = -104.f, kExpHi = 89.f;
  static constexpr float kExpFlush = -88.f;  // rounds to n = -127: 2^n built from n is 0
  // Taylor degree of e^r, |r| <= ln2 / 2, and the number of terms of the atanh series of log and log1p:
  // each truncation error is below 2^-25 relative.
  static constexpr int kExpDegree = 6, kLogTerms = 5, kLog1pTerms = 7;
};

template <>
struct Lanes<double> {
  static constexpr int N = 4;
  using Int = int64_t;
  using UInt = uint64_t;
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  typedef uint64_t U __attribute__((vector_size(32)));
  static constexpr int kMant = 52, kBias = 1023;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  static constexpr double kExpLo = -746., kExpHi = 710.;
  static constexpr double kExpFlush = -709.;  // n = -1023
  static constexpr int kExpDegree = 12, kLogTerms = 11, kLog1pTerms = 16;  // below 2^-54 relative
};

template <class T>
using Vec = typename Lanes<T>::V;
template <class T>
using IVec = typename Lanes<T>::I;
template <class T>
using UVec = typename Lanes<T>::U;

template <class T>
constexpr T kInf = std::numeric_limits<T>::infinity();
template <class T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

template <class T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

template <class T>
inline IVec<T> lane_index() {
  IVec<T> v{};
  for (int l = 0; l < Lanes<T>::N; ++l) v[l] = l;
  return v;
}

template <class T>
inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}

template <int H, class V, size_t... L>
inline V xor_lanes(V v, std::index_sequence<L...>) {
  return __builtin_shufflevector(v, v, (int(L) ^ H)...);
}

// Horizontal max and sum, in a fixed tree order.
template <class T>
inline T hmax(Vec<T> v) {
  constexpr auto seq = std::make_index_sequence<Lanes<T>::N>{};
  if constexpr (Lanes<T>::N == 8) v = vmax<T>(v, xor_lanes<4>(v, seq));
  v = vmax<T>(v, xor_lanes<2>(v, seq));
  v = vmax<T>(v, xor_lanes<1>(v, seq));
  return v[0];
}

template <class T>
inline bool all_lanes(IVec<T> mask) {
  constexpr auto seq = std::make_index_sequence<Lanes<T>::N>{};
  if constexpr (Lanes<T>::N == 8) mask &= xor_lanes<4>(mask, seq);
  mask &= xor_lanes<2>(mask, seq);
  mask &= xor_lanes<1>(mask, seq);
  return mask[0] != 0;
}

template <class T>
inline bool any_lane(IVec<T> mask) {
  constexpr auto seq = std::make_index_sequence<Lanes<T>::N>{};
  if constexpr (Lanes<T>::N == 8) mask |= xor_lanes<4>(mask, seq);
  mask |= xor_lanes<2>(mask, seq);
  mask |= xor_lanes<1>(mask, seq);
  return mask[0] != 0;
}

template <class T>
inline int64_t lane_sum(IVec<T> v) {
  int64_t s = 0;
  for (int l = 0; l < Lanes<T>::N; ++l) s += v[l];
  return s;
}

template <class T>
inline T hsum(Vec<T> v) {
  constexpr auto seq = std::make_index_sequence<Lanes<T>::N>{};
  if constexpr (Lanes<T>::N == 8) v = v + xor_lanes<4>(v, seq);
  v = v + xor_lanes<2>(v, seq);
  v = v + xor_lanes<1>(v, seq);
  return v[0];
}

// N vectors reduced at once, one lane each: lane b of the result is op over the lanes of a[b] (a is
// overwritten). Each step pairs a[b] with a[b + H], so that N row reductions cost N - 1 ops and shuffles
// in all, against log2(N) per vector one at a time. The order of the op over the lanes is fixed.
template <class T, int H = Lanes<T>::N / 2, class Op>
inline Vec<T> fold_lanes(Vec<T>* a, Op op) {
  constexpr auto seq = std::make_index_sequence<Lanes<T>::N>{};
  const IVec<T> hi = (lane_index<T>() & H) != 0;
  for (int b = 0; b < H; ++b) a[b] = op(hi ? a[b + H] : a[b], xor_lanes<H>(hi ? a[b] : a[b + H], seq));
  if constexpr (H > 1) return fold_lanes<T, H / 2>(a, op);
  else return a[0];
}

// 1/d! for d = 0..kExpDegree, built at compile time: computed in the polynomial loop, the divisions
// were redone (and the constants re-splatted) on every call.
template <class T>
struct InvFactorials {
  static constexpr std::array<T, Lanes<T>::kExpDegree + 1> c = [] {
    std::array<T, Lanes<T>::kExpDegree + 1> a{};
    T f = 1;
    for (int d = 0; d <= Lanes<T>::kExpDegree; ++d) {
      if (d > 1) f *= T(d);
      a[d] = T(1) / f;
    }
    return a;
  }();
};

template <class T>
inline Vec<T> pow2(IVec<T> n) {  // 2^n for n in the normal exponent range; 0 for n = -bias
  return __builtin_bit_cast(Vec<T>, (n + Lanes<T>::kBias) << Lanes<T>::kMant);
}

// e^x: x = n ln2 + r with |r| <= ln2 / 2, a Taylor polynomial of e^r, and 2^n.
// General (kNonPos = false): any x; 2^n is applied in two halves, so that n may go below the normal
// range (gradual underflow) and up to 128 (fp32); NaN is passed through at the end.
// kNonPos: x <= 0 (or -inf): the common case here, every argument being a logit minus a bound above it,
// or -|x|. x is clamped at kExpFlush, where n reaches the bias below the normal range, so that the 2^n
// built from n is exactly 0 there (e^x below about 2^-126 is flushed to 0, which no loss or gradient here
// can tell from its tiny true value, and -inf gives 0); the clamp keeps NaN, and so does p * 2^n whatever
// n a NaN produced.
// Each call does G vectors in place, one step for several of them before the next: each polynomial is a
// chain of dependent multiply-adds, and independent chains side by side keep the pipelines full.
template <class T, bool kNonPos, int G>
inline void vexp_n(Vec<T>* x) {
  using L = Lanes<T>;
  using I = IVec<T>;
  constexpr int kSide = G < 4 ? G : 4;  // chains side by side: more would spill registers
  static_assert(G % kSide == 0);
  for (int g0 = 0; g0 < G; g0 += kSide) {
    Vec<T>* v = x + g0;
    Vec<T> r[kSide], p[kSide];
    I n[kSide];
    for (int g = 0; g < kSide; ++g) {
      const T lo = kNonPos ? L::kExpFlush : L::kExpLo;
      Vec<T> c = v[g] < lo ? splat<T>(lo) : v[g];
      if constexpr (!kNonPos) c = c > L::kExpHi ? splat<T>(L::kExpHi) : c;
      const Vec<T> t = c * T(1.4426950408889634) + L::kMagic;  // log2(e) x, rounded to an integer
      const Vec<T> nf = t - L::kMagic;
      n[g] = __builtin_bit_cast(I, t) - __builtin_bit_cast(typename L::Int, L::kMagic);
      r[g] = (c - nf * L::kLn2Hi) - nf * L::kLn2Lo;
      p[g] = splat<T>(InvFactorials<T>::c[L::kExpDegree]);
    }
#pragma GCC unroll 16
    for (int d = L::kExpDegree - 1; d >= 0; --d)
      for (int g = 0; g < kSide; ++g) p[g] = p[g] * r[g] + InvFactorials<T>::c[d];
    for (int g = 0; g < kSide; ++g) {
      if constexpr (kNonPos) {
        v[g] = p[g] * pow2<T>(n[g]);
      } else {
        const I half = n[g] >> 1;
        const Vec<T> y = p[g] * pow2<T>(half) * pow2<T>(n[g] - half);
        v[g] = v[g] == v[g] ? y : v[g];
      }
    }
  }
}

template <class T, bool kNonPos>
inline Vec<T> vexp(Vec<T> x) {
  vexp_n<T, kNonPos, 1>(&x);
  return x;
}

// sum_{k=0..K} z2^k / (2k + 1): 2 z times it is log((1 + z) / (1 - z)).
template <class T, int K>
inline Vec<T> atanh_series(Vec<T> z2) {
  Vec<T> q = splat<T>(T(1) / T(2 * K + 1));
#pragma GCC unroll 32
  for (int k = K - 1; k >= 0; --k) q = q * z2 + T(1) / T(2 * k + 1);  // unrolled: the quotients fold
  return q;
}

// log(s) for s a positive normal number, 0, inf or NaN (the sums of exps it is given are nothing else):
// s = 2^e m with m in [sqrt(1/2), sqrt(2)), and log m = 2 atanh((m - 1) / (m + 1)).
template <class T>
inline Vec<T> vlog(Vec<T> s) {
  using L = Lanes<T>;
  using I = IVec<T>;
  using U = UVec<T>;
  using UInt = typename L::UInt;
  const U u = __builtin_bit_cast(U, s);
  I e = __builtin_bit_cast(I, u >> L::kMant) - L::kBias;
  Vec<T> m = __builtin_bit_cast(Vec<T>, (u & ((UInt(1) << L::kMant) - 1)) | (UInt(L::kBias) << L::kMant));
  const I big = m > T(1.4142135623730951);
  m = big ? m * T(0.5) : m;
  e = e - big;
  const Vec<T> f = m - T(1), z = f / (f + T(2));
  const Vec<T> ef = __builtin_convertvector(e, Vec<T>);
  Vec<T> y = ef * L::kLn2Hi + (ef * L::kLn2Lo + (z + z) * atanh_series<T, L::kLogTerms>(z * z));
  y = s == T(0) ? splat<T>(-kInf<T>) : y;
  y = s == kInf<T> ? splat<T>(kInf<T>) : y;
  return s == s ? y : s;
}

// log1p(e) for e in [0, 1] (or NaN): 2 atanh(e / (2 + e)), with e / (2 + e) in [0, 1/3].
template <class T>
inline Vec<T> vlog1p_unit(Vec<T> e) {
  const Vec<T> z = e / (e + T(2));
  return (z + z) * atanh_series<T, Lanes<T>::kLog1pTerms>(z * z);
}

template <class T>
inline Vec<T> vabs(Vec<T> x) {
  using U = UVec<T>;
  using UInt = typename Lanes<T>::UInt;
  return __builtin_bit_cast(Vec<T>, __builtin_bit_cast(U, x) & ~(UInt(1) << (8 * sizeof(UInt) - 1)));
}

// Keys of select.h on every lane.
template <class T>
inline UVec<T> to_keys(Vec<T> x) {
  using U = UVec<T>;
  using UInt = typename Lanes<T>::UInt;
  constexpr int kTop = 8 * sizeof(UInt) - 1;
  const U u = __builtin_bit_cast(U, x + T(0));
  return u ^ ((U{} - (u >> kTop)) | (UInt(1) << kTop));
}

template <class T>
inline Vec<T> from_keys(UVec<T> k) {
  using U = UVec<T>;
  using UInt = typename Lanes<T>::UInt;
  constexpr int kTop = 8 * sizeof(UInt) - 1;
  return __builtin_bit_cast(Vec<T>, k ^ ((U{} - ((k >> kTop) ^ 1)) | (UInt(1) << kTop)));
}

}  // namespace
}  // namespace fastsam::cpu
