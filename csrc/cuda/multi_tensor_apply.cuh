// Multi-tensor apply (after NVIDIA apex csrc/multi_tensor_apply.cuh), torch-free.
//
// One kernel launch covers many tensors: the kernel argument holds the addresses of up to kMaxTensors
// tensors per list and a map block -> (tensor slot, unit), where a unit is a chunk of kChunk elements for
// element-wise ops (or a group of rows for row_norm_). The host fills the struct and launches whenever its
// blocks or tensor slots run out, so a step costs O(#tensors / kMaxTensors + #chunks / kMaxBlocks) launches.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace fastsam {
namespace cuda {

constexpr int kBlock = 512;
// Kernel parameters are limited to 4 KiB (without relying on CUDA 12.1's larger limit); the rest of the
// budget is for the op's scalars, passed beside the metadata. Slots per launch: 59 tensors with 2 lists,
// 29 with the 7 of restore_adam_.
constexpr int kMetaBytes = 3968;

template <int L>
struct TensorListMeta {
  static constexpr int kMaxBlocks = 320;
  static constexpr int kMaxTensors = (kMetaBytes - kMaxBlocks * 5) / (8 * L + 24);
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 256, "block_tensor is a uint8_t");
  void* ptr[L][kMaxTensors];
  int64_t n[kMaxTensors];
  int64_t inner[kMaxTensors];
  const float* aux[kMaxTensors];
  int32_t block_unit[kMaxBlocks];   // 2^31 chunks of kChunk elements is far beyond any device's memory
  uint8_t block_tensor[kMaxBlocks];
};

// __grid_constant__: the body indexes the metadata with per-block values; without it, taking its address
// would copy 4 KiB into every thread's local memory.
template <int L, class Body>
__global__ void __launch_bounds__(kBlock) multi_tensor_kernel(const __grid_constant__ TensorListMeta<L> meta,
                                                              const Body body) {
  static_assert(sizeof(TensorListMeta<L>) + sizeof(Body) <= 4096, "kernel parameters exceed 4 KiB");
  body(meta);
}

// launch(meta, blocks, first_block): enqueue one kernel over blocks [0, blocks) of `meta`; first_block is
// the index of its block 0 among all blocks of the call (the partial sums of the reductions are indexed by it).
template <int L, class Units, class Launch>
void multi_tensor_apply(const TensorArgs* t, int n, Units units, Launch launch) {
  static_assert(L <= kMaxLists, "TensorArgs holds kMaxLists lists");
  using Meta = TensorListMeta<L>;
  Meta m{};
  int nt = 0, nb = 0;
  int64_t first_block = 0;
  for (int j = 0; j < n; ++j) {
    const int64_t u = units(t[j]);
    // A tensor whose units do not fit takes a slot again in the next launch.
    for (int64_t c = 0; c < u;) {
      for (int l = 0; l < L; ++l) m.ptr[l][nt] = t[j].ptr[l];
      m.n[nt] = t[j].n;
      m.inner[nt] = t[j].inner;
      m.aux[nt] = t[j].aux;
      for (; c < u && nb < Meta::kMaxBlocks; ++c, ++nb) {
        m.block_tensor[nb] = static_cast<uint8_t>(nt);
        m.block_unit[nb] = static_cast<int32_t>(c);
      }
      if (++nt == Meta::kMaxTensors || nb == Meta::kMaxBlocks) {
        launch(m, nb, first_block);
        first_block += nb;
        nt = nb = 0;
      }
    }
  }
  if (nb > 0) launch(m, nb, first_block);
}

// Accessed through `raw` so that the compiler keeps one 16-byte load/store even when it splits the
// elements into registers.
template <typename T, int V>
union Pack {
  uint4 raw;
  T v[V];
};

// The bit mask of the lists at `positions` (an op's list enum, kernels.h), for Op::kLoad / Op::kStore.
template <class... P>
constexpr unsigned list_mask(P... positions) {
  return (0u | ... | (1u << positions));
}

// Element-wise driver for the block's chunk. Op::kLoad / Op::kStore are bit masks (list_mask) of the lists read
// and written; op(x, i) gets the raw elements x[l] of global index i (within the tensor) and updates the
// stored ones in place, so copies stay bit-exact. 16-byte vector accesses when every pointer of the
// chunk is 16-byte aligned (chunks start at multiples of kChunk), else scalar ones.
template <typename T, int L, class Op>
__device__ __forceinline__ void for_each_element(const TensorListMeta<L>& m, int slot, Op& op) {
  constexpr int V = 16 / sizeof(T);
  static_assert(kChunk % V == 0, "vector path needs chunk starts aligned to V");
  const int64_t start = int64_t(m.block_unit[blockIdx.x]) * kChunk;
  const int64_t left = m.n[slot] - start;
  const int count = static_cast<int>(left < kChunk ? left : kChunk);
  T* p[L];
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < L; ++l) {
    const bool used = (Op::kLoad | Op::kStore) >> l & 1;  // an unused list may hold null pointers
    p[l] = used ? static_cast<T*>(m.ptr[l][slot]) + start : nullptr;
    if (used) aligned &= reinterpret_cast<uintptr_t>(p[l]) % 16 == 0;
  }
  const int nvec = aligned ? count / V : 0;
  for (int k = threadIdx.x; k < nvec; k += blockDim.x) {
    Pack<T, V> r[L];
#pragma unroll
    for (int l = 0; l < L; ++l)
      if (Op::kLoad >> l & 1) r[l].raw = reinterpret_cast<const uint4*>(p[l])[k];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      T x[L];
#pragma unroll
      for (int l = 0; l < L; ++l)
        if (Op::kLoad >> l & 1) x[l] = r[l].v[v];
      op(x, start + k * V + v);
#pragma unroll
      for (int l = 0; l < L; ++l)
        if (Op::kStore >> l & 1) r[l].v[v] = x[l];
    }
#pragma unroll
    for (int l = 0; l < L; ++l)
      if (Op::kStore >> l & 1) reinterpret_cast<uint4*>(p[l])[k] = r[l].raw;
  }
  for (int i = nvec * V + threadIdx.x; i < count; i += blockDim.x) {
    T x[L];
#pragma unroll
    for (int l = 0; l < L; ++l)
      if (Op::kLoad >> l & 1) x[l] = p[l][i];
    op(x, start + i);
#pragma unroll
    for (int l = 0; l < L; ++l)
      if (Op::kStore >> l & 1) p[l][i] = x[l];
  }
}

}  // namespace cuda
}  // namespace fastsam
