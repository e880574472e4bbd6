"""The attainable memory bandwidth that a step's "x limit" is measured against: STREAM-style kernels.

A step's bandwidth limit (:func:`limit_seconds`) is the least traffic of a fully fused step (words per
parameter, :mod:`fastsam.bench.methods`) over the machine's bandwidth. One kernel's figure is not that
bandwidth: a copy pays for write-allocate traffic that it is not credited with (the line written is read
first); on a CPU a read-only stream is bound by the misses a core keeps in flight (on the 2-core machine of
the README it reaches 20 GB/s where the step's read-mostly mix moves 28); caches serve a working set that
fits in them. So the bandwidth is the best of four kernels (``KERNELS``), each over a working set as large
as a SAM step's (:func:`stream_arrays`: w, g, the backup and the momentum, each of the set's size in bytes,
held as fp32) and run on the step's own threads (torch's intra-op pool, or the GPU):

* ``read``: the sum of each array: reads 4 words per parameter;
* ``copy``: ``b <- a`` and ``d <- c``: reads 2, writes 2;
* ``triad``: ``a <- b + s c``: reads 2, writes 1;
* ``mix``: the read-mostly mix of the step's last phase, done by fastsam's fused restore + SGD op (the
  impl ``auto`` picks): reads backup, g, momentum; writes w, momentum (5).

The benchmark times them in the same interleaved rounds as the rows of a method
(:func:`fastsam.bench.timing.time_paired`), so that a drift of the machine cannot put the limit and the rows
at different speeds. A row that still beats its limit (ratio under 1) reuses data across its phases in a
cache, which the word count of the limit does not credit.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

import fastsam.ops as ops

KERNELS = ("read", "copy", "triad", "mix")
WORDS = {"read": 4, "copy": 4, "triad": 3, "mix": 5}  # words moved per parameter by each kernel
SCALAR = 0.5
LR, MOMENTUM = 1e-3, 0.9  # the mix's SGD step; values that keep its arrays far from denormals and overflow


# The arrays' size is capped: past the last-level cache the bandwidth no longer depends on it, and on GPT-2
# medium 4 full-size arrays would add 2.8 GB beside the rows' state (the 24 GB development machine ran out).
MAX_BYTES = 1 << 29


def array_bytes(numel: int, element_size: int) -> int:
    """The bytes of each STREAM array for a shape set of ``numel`` parameters of ``element_size`` bytes: the
    set's size, at most ``MAX_BYTES``."""
    if numel < 1:
        raise ValueError(f"numel must be a positive element count, got {numel}")
    return min(numel * element_size, MAX_BYTES)


def stream_arrays(nbytes: int, device: torch.device) -> List[torch.Tensor]:
    """The 4 arrays the kernels run over (SAM's working set), of ``nbytes`` each (:func:`array_bytes`).

    They hold fp32 whatever the parameters' dtype: the bandwidth is that of the memory, and on a CPU the
    kernels' bf16 and fp16 arithmetic (a conversion per element, 2 cores) runs slower than memory, which
    would make the limit of a bf16 step lenient. Filled, not empty: reading untouched pages would read the
    shared zero page and flatter the figure."""
    return [torch.full((max(nbytes // 4, 1),), 1.0 + i, dtype=torch.float32, device=device) for i in range(4)]


def kernels(arrays: List[torch.Tensor]) -> Dict[str, Callable[[], object]]:
    """The STREAM kernels over ``arrays`` (from :func:`stream_arrays`), by name."""
    a, b, c, d = arrays

    def read():
        return [x.sum() for x in arrays]

    def copy():
        b.copy_(a)
        d.copy_(c)

    def triad():
        torch.add(b, c, alpha=SCALAR, out=a)

    def mix():
        ops.restore_sgd_(params=[a], grads=[b], backups=[c], momentum_buffers=[d], lr=LR, weight_decay=0.0,
                         momentum=MOMENTUM, dampening=0.0, nesterov=False, maximize=False, init_momentum=False)

    return dict(read=read, copy=copy, triad=triad, mix=mix)


def bandwidths(nbytes: int, seconds: Dict[str, float]) -> Dict[str, float]:
    """Bytes per second of each kernel that took ``seconds[name]`` over arrays of ``nbytes`` each."""
    return {name: WORDS[name] * nbytes / s for name, s in seconds.items()}


def limit_seconds(numel: int, dtype: torch.dtype, bandwidth: float, words: int) -> float:
    """The bandwidth limit of one step that moves ``words`` words of ``dtype`` per parameter over ``numel``
    parameters at ``bandwidth`` bytes/s."""
    return words * dtype.itemsize * numel / bandwidth
