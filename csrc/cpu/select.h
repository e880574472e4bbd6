// Selection of the rank-th largest of a set of floats in O(n), for the CVaR kernels (cvar_ops.cpp).
// Floats are mapped to unsigned keys that order like the floats, so the selection is on integers: an
// MSB-first radix select narrows the key down one digit at a time, and counts of whole buckets give the
// number of keys above and at the threshold for free. Counts are integers, so the result does not depend
// on how the work is split over threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

namespace fastsam::cpu {

template <class T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
};
template <class T>
using key_t = typename KeyOf<T>::type;

// Unsigned key of x, ordered like the floats (NaN aside). -0 and +0 share the key of +0, as they compare
// equal. No number maps to 0 (only a negative NaN with every payload bit set), so 0 marks an entry that
// is not in the set.
template <class T>
inline key_t<T> to_key(T x) {
  using K = key_t<T>;
  constexpr int kTop = 8 * sizeof(K) - 1;
  const K u = __builtin_bit_cast(K, T(x + T(0)));
  return u ^ ((K(0) - (u >> kTop)) | (K(1) << kTop));  // negatives: all bits flipped; others: the sign bit
}

template <class T>
inline T from_key(key_t<T> k) {
  using K = key_t<T>;
  constexpr int kTop = 8 * sizeof(K) - 1;
  return __builtin_bit_cast(T, K(k ^ ((K(0) - ((k >> kTop) ^ 1)) | (K(1) << kTop))));
}

template <class K>
struct Threshold {
  K key;          // the rank-th largest key
  int64_t above;  // keys > key
  int64_t equal;  // keys == key
};

namespace select_detail {

constexpr int kDigit = 11;                    // bits per radix digit: a 2048-bucket histogram fits in L1
constexpr int64_t kSmall = 4096;              // below this, a copy and std::nth_element cost less
constexpr int64_t kBlock = int64_t(1) << 16;  // keys per task of the parallel passes
constexpr int64_t kHalves = int64_t(1) << 17;  // from here, two 16-bit digits (their histograms cost ~2^17 steps)

// Walks hist[0, size) from the top bucket down to the one holding the rank-th largest; rank becomes the
// rank inside that bucket and `above` grows by the keys in the buckets above it.
inline int64_t walk(const int64_t* hist, int64_t size, int64_t& rank, int64_t& above) {
  int64_t b = size - 1;
  while (b > 0 && hist[b] < rank) {
    rank -= hist[b];
    above += hist[b];
    --b;
  }
  return b;
}

template <class K>
Threshold<K> by_nth_element(const K* keys, int64_t n, int64_t rank) {
  std::vector<K> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (keys[i] != 0) v.push_back(keys[i]);
  std::nth_element(v.begin(), v.begin() + (rank - 1), v.end(), std::greater<K>());
  const K t = v[rank - 1];
  int64_t above = 0, equal = 0;
  for (const K k : v) {
    above += k > t;
    equal += k == t;
  }
  return {t, above, equal};
}

}  // namespace select_detail

// Two 16-bit digits, for many 32-bit keys: 2^16 buckets split a typical loss distribution finely enough
// that the threshold's bucket holds a small share of the keys, so the second digit is counted in a second
// pass over all keys with a rarely taken branch, and nothing is copied. (A bucket with a large share, as
// with many tied losses, is copied out first instead: there the branch would be a coin flip.) Counts are
// per-thread uint32 histograms, hence n < 2^32.
inline Threshold<uint32_t> select_by_halves(const uint32_t* keys, int64_t n, int64_t rank) {
  using namespace select_detail;
  constexpr int64_t kB = int64_t(1) << 16;
  const int threads = at::get_num_threads();
  // Uninitialized: each thread zeroes the histogram it uses.
  std::unique_ptr<uint32_t[]> hists(new uint32_t[size_t(threads) * kB]);
  std::vector<char> used(threads, 0);
  const auto histogram = [&](auto&& count) {
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, n, kBlock, [&](int64_t b, int64_t e) {
      const int tid = at::get_thread_num();
      uint32_t* h = hists.get() + size_t(tid) * kB;
      if (!used[tid]) std::memset(h, 0, kB * sizeof(uint32_t));
      used[tid] = 1;
      count(h, b, e);
    });
    uint32_t* total = nullptr;  // the first used histogram, with the others added in
    for (int t = 0; t < threads; ++t) {
      if (!used[t]) continue;
      uint32_t* h = hists.get() + size_t(t) * kB;
      if (!total) total = h;
      else for (int64_t b = 0; b < kB; ++b) total[b] += h[b];
    }
    return total;
  };
  const auto walk32 = [&](const uint32_t* h, int64_t& rank_, int64_t& above) {
    int64_t b = kB - 1;
    while (b > 0 && int64_t(h[b]) < rank_) {
      rank_ -= h[b];
      above += h[b];
      --b;
    }
    return uint32_t(b);
  };
  int64_t above = 0;
  const uint32_t* h1 = histogram([keys](uint32_t* h, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ++h[keys[i] >> 16];
  });
  const uint32_t top = walk32(h1, rank, above);
  const int64_t in_bucket = h1[top];
  const uint32_t* h2;
  if (in_bucket <= n / 8) {
    h2 = histogram([keys, top](uint32_t* h, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        if ((keys[i] >> 16) == top) ++h[keys[i] & 0xFFFF];
    });
  } else {
    std::unique_ptr<uint32_t[]> cand(new uint32_t[size_t(in_bucket)]);
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      cand[m] = keys[i];
      m += (keys[i] >> 16) == top;
      if (m == in_bucket) break;  // also keeps the unconditional store inside cand
    }
    uint32_t* h = hists.get();
    std::memset(h, 0, kB * sizeof(uint32_t));
    for (int64_t i = 0; i < m; ++i) ++h[cand[i] & 0xFFFF];
    h2 = h;
  }
  const uint32_t low = walk32(h2, rank, above);
  return {(top << 16) | low, above, int64_t(h2[low])};
}

// The rank-th largest of the nonzero keys among keys[0, n), rank in [1, number of nonzero keys].
// Zero keys are counted in the lowest bucket but never reached: every nonzero key is larger.
template <class K>
Threshold<K> select_largest(const K* keys, int64_t n, int64_t rank) {
  using namespace select_detail;
  if (n <= kSmall) return by_nth_element(keys, n, rank);
  if constexpr (sizeof(K) == 4)
    if (n >= kHalves && n < (int64_t(1) << 32)) return select_by_halves(keys, n, rank);
  constexpr int kBits = 8 * sizeof(K);
  constexpr int64_t kBuckets = int64_t(1) << kDigit;
  int shift = kBits - kDigit;

  // First digit: one histogram per thread over all keys.
  const int threads = at::get_num_threads();
  std::vector<int64_t> hists(size_t(threads) * kBuckets, 0);
  at::parallel_for(0, n, kBlock, [&](int64_t b, int64_t e) {
    int64_t* h = hists.data() + size_t(at::get_thread_num()) * kBuckets;
    for (int64_t i = b; i < e; ++i) ++h[keys[i] >> shift];
  });
  for (int t = 1; t < threads; ++t)
    for (int64_t b = 0; b < kBuckets; ++b) hists[b] += hists[size_t(t) * kBuckets + b];
  int64_t above = 0;
  K prefix = K(walk(hists.data(), kBuckets, rank, above));

  // The keys of that bucket, compacted block by block into the block's own slots (in parallel), then
  // moved together. `new` without initialization: only the pages written to are ever touched.
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::unique_ptr<K[]> cand(new K[n]);
  std::vector<int64_t> found(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t bb, int64_t be) {
    // Locals: a store to cand could alias a captured K and force a reload per key.
    const int sh = shift;
    const K top = prefix;
    for (int64_t blk = bb; blk < be; ++blk) {
      const int64_t b = blk * kBlock, e = std::min(n, b + kBlock);
      K* out = cand.get() + b;
      int64_t m = 0;
      for (int64_t i = b; i < e; ++i) {
        out[m] = keys[i];
        m += (keys[i] >> sh) == top;
      }
      found[blk] = m;
    }
  });
  int64_t m = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    std::memmove(cand.get() + m, cand.get() + blk * kBlock, size_t(found[blk]) * sizeof(K));
    m += found[blk];
  }

  // The other digits, serially over the shrinking candidate list.
  std::vector<int64_t> hist(kBuckets);
  while (true) {
    const int d = std::min(kDigit, shift);
    shift -= d;
    const K mask = (K(1) << d) - 1;
    std::fill(hist.begin(), hist.begin() + (int64_t(1) << d), 0);
    K* c = cand.get();
    for (int64_t i = 0; i < m; ++i) ++hist[(c[i] >> shift) & mask];
    const K digit = K(walk(hist.data(), int64_t(1) << d, rank, above));
    prefix = (prefix << d) | digit;
    if (shift == 0) return {prefix, above, hist[digit]};
    int64_t kept = 0;
    for (int64_t i = 0; i < m; ++i) {
      c[kept] = c[i];
      kept += ((c[i] >> shift) & mask) == digit;
    }
    m = kept;
  }
}

}  // namespace fastsam::cpu
