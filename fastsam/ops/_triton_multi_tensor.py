"""Multi-tensor launch machinery of the Triton ops: device tables of raw pointers, cached.

A launch covers every tensor of its lists. Program ``pid`` reads row ``pid`` of a table kept on the device
(int64, ``W = 3 + L`` words a row, L the number of lists), which holds everything it needs:

* a block of one tensor: ``[first element, numel, inner, data_ptr in list 0, ..., data_ptr in list L-1]``
  (``inner`` = elements per dim-0 row; a pointer is 0 for a list the op does not read);
* a packed block of S small tensors (interpreter only, see PACK): ``[0, -S, elements in all, index of the
  first of S records, 0...]``; the records follow the block rows, one per tensor, laid out as a block row
  whose first word is the tensor's offset in the packed block.
* row tables (row_norm_): the same, in units of dim-0 rows instead of elements.

A list holds, per tensor of the first list, a tensor of its shape (ELEMENTS), one fp32 value per dim-0 row
(ROWS: row_scales) or a one-element tensor (ONE: Adam's per-tensor step counts), which the kernels load as
a scalar of their tensor's row.

Tables are cached by what their content is a function of (device, dtype, the numels of the first list, or
its shapes where rows matter, the data_ptrs of every list), so steps over the same tensors neither rebuild
nor upload anything. Grads are keyed too: with ``zero_grad(set_to_none=True)`` they are reallocated each
step, usually at the same addresses by the caching allocator (a hit); otherwise a new table is built (one
asynchronous H2D copy from pinned memory) and the LRU bound keeps the cache small. Per-tensor checks
(dtype, device, contiguity, shapes) run when a table is built, so a hit costs only the key.
"""
import contextlib
import math
from collections import OrderedDict
from functools import reduce
from itertools import accumulate
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastsam._extension import triton_interpret

INTERPRET = triton_interpret()
# On a GPU, 4096 elements on 8 warps is 16 per thread: 4 vectorized 16-byte accesses per stream, and
# enough blocks to fill every SM from a few million parameters on. The interpreter runs every program
# as Python over numpy arrays, at a cost per operation that dwarfs the cost per element: there, blocks
# are big and small tensors share a block (PACK), so that 200 small tensors are one program, not 200.
MAX_BLOCK = 65536 if INTERPRET else 4096
PACK = INTERPRET
# Row tables (row_norm_) hold tiles of MAX_BLOCK elements: (rows per program) x (columns per step),
# at most this many columns so that a program still covers several rows of wide filters.
MAX_COLS = MAX_BLOCK if INTERPRET else 512
NUM_WARPS = 8
CACHE_SIZE = 64
PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Same-width integers: restore_ copies bits, whatever they hold.
BITS = {torch.float32: tl.int32, torch.bfloat16: tl.int16, torch.float16: tl.int16}
# What a list holds per tensor of the first list (see the module docstring).
ELEMENTS, ROWS, ONE = "elements", "rows", "one"
# The words of a table row (see the module docstring): a block row's, then the same words of a packed block's head.
ROW_START = tl.constexpr(0)  # first element (or dim-0 row) of the block
ROW_NUMEL = tl.constexpr(1)  # the tensor's elements (rows); -S in a packed head
ROW_INNER = tl.constexpr(2)  # elements per dim-0 row
ROW_PTRS = tl.constexpr(3)  # data_ptr in list 0, ..., list L-1: row word ROW_PTRS + k is list k's
PACKED_ELEMENTS = ROW_INNER  # a packed head: the elements of its S tensors in all
PACKED_RECORDS = ROW_PTRS  # a packed head: the table row index of its first record


def device_fn(fn):
    """``triton.jit`` for the device helpers the kernels call. Under the interpreter a plain function: there,
    each call of a jit helper re-patches triton.language (about 1 ms), which would dominate small blocks."""
    return fn if INTERPRET else triton.jit(fn)


class Table:
    __slots__ = ("device", "meta", "host", "nb", "width", "block", "pack_log", "cols", "align", "scratch")


_cache: "OrderedDict[tuple, Table]" = OrderedDict()
# A CUDA graph that captured a table's upload copies it again from the same pinned host buffer at every
# replay: those buffers stay alive for the life of the process, even when their table leaves the cache.
_replayed_uploads: List[Tensor] = []


def table(specs, rows: bool = False) -> Table:
    """The (cached) table of ``specs``: ``(name, tensor list or None, dtype, per)`` tuples, ``per`` one of
    ELEMENTS, ROWS, ONE.

    The first list gives the shapes; a ROWS list holds one fp32 value per dim-0 row of them (row_scales,
    row_norm_'s out). ``rows=True`` cuts tensors into blocks of rows instead of elements.
    """
    first = specs[0][1]
    # Flat element-wise ops see numels only; dim 0 matters where a per-row list is read. (torch.Size objects
    # cost twice as much to get as numels: on a hit the key is the whole host cost.)
    by_row = rows or any(per == ROWS and lst is not None for _, lst, _, per in specs)
    key = (rows, first[0].device, first[0].dtype, tuple(t.shape for t in first) if by_row
           else tuple(map(Tensor.numel, first))) + tuple(
        None if lst is None else tuple(map(Tensor.data_ptr, lst)) for _, lst, _, _ in specs)
    tab = _cache.get(key)
    if tab is not None:
        _cache.move_to_end(key)
        return tab
    tab = _cache[key] = _build(specs, rows)
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return tab


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _build(specs, rows: bool) -> Table:
    first = specs[0][1]
    device = first[0].device
    numel = [t.numel() for t in first]
    nrows = [t.shape[0] if t.dim() else 1 for t in first]
    inner = [n // r if r else 1 for n, r in zip(numel, nrows)]
    ptrs, vector = [], []  # vector: the lists read a block at a time (not ONE), whose alignment matters
    for name, lst, dtype, per in specs:
        vector.append(per != ONE)
        if lst is None:
            ptrs.append([0] * len(first))
            continue
        for i, (t, f) in enumerate(zip(lst, first)):
            if t.dtype != dtype:
                raise TypeError(f"{name}[{i}] must be {dtype} like the other tensors, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
            want = {ROWS: nrows[i], ONE: 1}.get(per)
            if t.shape != f.shape if want is None else t.numel() != want:
                want = f"shape {tuple(f.shape)}" if want is None else f"{want} element{'s' * (want != 1)}"
                raise ValueError(f"{name}[{i}] must have {want}, got shape {tuple(t.shape)}")
        ptrs.append([t.data_ptr() for t in lst])
    tab = Table()
    tab.device, tab.width, tab.scratch, tab.cols = device, ROW_PTRS.value + len(ptrs), None, 1
    # Every pointer is a multiple of this many bytes (at most 16): the kernels hint it for vector access. A
    # ONE tensor is a scalar load, and may be a view into a bigger tensor: it would only lower the hint.
    tab.align = reduce(math.gcd, (p for col, v in zip(ptrs, vector) if v for p in col), 16)
    sizes = nrows if rows else numel
    if rows:
        tab.cols = _pow2(max(inner), 1, MAX_COLS)
    # No bigger than the job: small lists stay cheap in the interpreter.
    tab.block = _pow2(sum(sizes) if PACK else max(sizes), 1 if rows else 16, MAX_BLOCK // tab.cols)
    # Greedy packing, in list order, of the tensors smaller than a block; a group of one is a plain block.
    groups, group, room = [], [], 0
    for j, n in enumerate(sizes):
        if PACK and 0 < n < tab.block:
            if n > room:
                groups.append(group)
                group, room = [], tab.block
            group.append(j)
            room -= n
    groups = [g for g in groups + [group] if len(g) > 1]
    packed = {j for g in groups for j in g}
    single = [0 if j in packed else s for j, s in enumerate(sizes)]
    counts = torch.tensor([-(-s // tab.block) for s in single], dtype=torch.int64)
    nsingle = int(counts.sum())
    tab.nb = nsingle + len(groups)
    tid = torch.repeat_interleave(torch.arange(len(first)), counts)
    start = (torch.arange(nsingle) - (counts.cumsum(0) - counts)[tid]) * tab.block
    per_tensor = torch.tensor([sizes, inner] + ptrs, dtype=torch.int64).t()
    parts = [torch.cat([start[:, None], per_tensor[tid]], 1)]
    if groups:
        heads, recs = [], []
        for g in groups:
            offsets = list(accumulate((sizes[j] for j in g), initial=0))
            head = [0, -len(g), offsets[-1], tab.nb + len(recs)]  # ROW_START .. PACKED_RECORDS
            heads.append(head + [0] * (tab.width - len(head)))
            recs += [[o] + per_tensor[j].tolist() for o, j in zip(offsets, g)]
        parts += [torch.tensor(heads, dtype=torch.int64), torch.tensor(recs, dtype=torch.int64)]
    tab.pack_log = max((len(g) - 1).bit_length() for g in groups) if groups else 0
    meta = torch.cat(parts).flatten()
    tab.host = None
    if device.type != "cpu":
        tab.host = meta.pin_memory()  # kept with the table: the async copy reads it after this returns
        if torch.cuda.is_current_stream_capturing():
            _replayed_uploads.append(tab.host)
        meta = tab.host.to(device, non_blocking=True)
    tab.meta = meta
    return tab


def launch(kernel, tab: Table, *args, grid=None, **constexprs) -> None:
    """One launch of ``kernel(table, *args, BLOCK, ALIGN, W, PACK_LOG, **constexprs)`` over the blocks of
    ``tab`` (or over ``grid`` programs)."""
    if tab.nb == 0:
        return
    dev = tab.device
    guard = (torch.cuda.device(dev) if dev.type == "cuda" and dev.index != torch.cuda.current_device()
             else contextlib.nullcontext())
    with guard:
        kernel[grid or (tab.nb,)](tab.meta, *args, BLOCK=tab.block, ALIGN=tab.align, W=tab.width,
                                   PACK_LOG=tab.pack_log, num_warps=NUM_WARPS, enable_fp_fusion=True,
                                   **constexprs)


@device_fn
def block_of(table, W: tl.constexpr, BLOCK: tl.constexpr):
    """(table row, first element or row, numel) of this program's block; numel < 0 for a packed block."""
    row = table + tl.program_id(0) * W
    return row, tl.multiple_of(tl.load(row + ROW_START), BLOCK), tl.load(row + ROW_NUMEL)


@device_fn
def lanes(table, row, start, numel, W: tl.constexpr, BLOCK: tl.constexpr, PACK_LOG: tl.constexpr):
    """(table row, element offsets, mask) of a block that is not full: a tensor's last block, or (PACK_LOG > 0)
    a packed block, whose lanes find their tensor's row by a binary search of the records' offsets; with
    packing, the row is per lane."""
    i = tl.arange(0, BLOCK)
    rows = row
    offs = start + i
    mask = offs < numel
    if PACK_LOG > 0:
        rows = tl.broadcast_to(row, (BLOCK,))
        if numel < 0:
            recs = table + tl.load(row + PACKED_RECORDS) * W
            lo = tl.zeros((BLOCK,), tl.int32)
            hi = lo - numel.to(tl.int32)
            for _ in tl.static_range(PACK_LOG):
                mid = (lo + hi) // 2
                go = tl.load(recs + mid * W) <= i
                lo = tl.where(go, mid, lo)
                hi = tl.where(go, hi, mid)
            rows = recs + lo * W
            offs = i - tl.load(rows)  # a record's first word: its tensor's offset in the packed block
            mask = i < tl.load(row + PACKED_ELEMENTS)
    return rows, offs, mask


@device_fn
def ptr_of(row, k: tl.constexpr, DT: tl.constexpr, ALIGN: tl.constexpr):
    """Data pointer(s), typed ``DT``, in list ``k`` of the tensor(s) of ``row`` (a row or a row per lane).
    Every data pointer is a multiple of ALIGN bytes, checked on the host (the table's align; for a ONE list,
    which the table's align does not cover, the size of DT)."""
    return tl.multiple_of(tl.load(row + (ROW_PTRS + k)).to(tl.pointer_type(DT)), ALIGN)


@device_fn
def ld(p, offs, mask):
    """fp32 load; ``mask`` None in full blocks, which keeps the access vectorizable. Masked lanes read 0."""
    if mask is None:
        x = tl.load(p + offs)
    else:
        x = tl.load(p + offs, mask=mask, other=0)
    return x.to(tl.float32)
