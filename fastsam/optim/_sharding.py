"""Sharded parameters (FSDP2's DTensors): the fused ops run on each rank's local shard, and every global
reduction (a squared norm, a dot product, a found flag) becomes one small all-reduce.

``torch.distributed.fsdp.fully_shard`` turns a module's parameters (and, after a backward pass, their
grads) into DTensors sharded on dim 0 over a device mesh. A SAM step is element-wise except for its global
reductions, so it runs unchanged on the local shards: the buckets hold ``to_local()`` views (same storage,
so an in-place kernel writes the DTensor's data), and a partial sum accumulated over local shards is
completed by an all-reduce over the process group of the mesh dimension the parameters are sharded on.

A sum is accumulated per :class:`Scope` (a device, and the process group whose ranks hold the other parts
of its parameters, None for ordinary tensors, which every rank holds whole): :func:`global_sums` all-reduces
each sharded scope's ``[n]`` fp32 accumulator once, on the device (an asynchronous collective on CUDA; no host
sync), then adds the scopes of all devices. A plain tensor trained beside sharded ones (a module left out of
``fully_shard``) is the same on every rank, so its share is added after the all-reduce, not counted once
per rank.
"""
from __future__ import annotations

from typing import Dict, Hashable, Iterable, NamedTuple, Optional

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch build without torch.distributed: no parameter can be a DTensor
    DTensor = Replicate = Shard = None


class Scope(NamedTuple):
    """Where a partial sum lives: its device, and the process group it is completed over (None: complete)."""
    device: torch.device
    group: Optional[object] = None


def is_dtensor(t: Optional[Tensor]) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The rank's local shard of a DTensor (a view of the same storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def version(t: Tensor) -> int:
    """The version counter that in-place writes bump: a DTensor's own stays at 0 when FSDP2 accumulates a
    grad into its local shard, so the local tensor's is read."""
    return local(t)._version


def scope_of(p: Tensor, rows: bool = False) -> Scope:
    """The scope of parameter ``p``'s partial sums. For a DTensor: the process group of the mesh dimension
    it is sharded on (its other placements must be Replicate). ``rows``: a per-row operator (filter-wise ASAM)
    needs whole rows on each rank, i.e. sharding on dim 0 (FSDP2's layout).

    Raises ValueError for a placement whose partial sums one all-reduce cannot complete (sharded on several
    mesh dimensions, or a Partial one) or, with ``rows``, one that cuts rows apart."""
    if not is_dtensor(p):
        return Scope(p.device)
    shard_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            if rows and placement.dim != 0:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is sharded on dim {placement.dim}: its "
                                 "filter-wise operator needs each filter (a slice along dim 0) on one rank; shard "
                                 "it on dim 0 (FSDP2's fully_shard does) or use normalization='elementwise'")
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has placement {placement}: fastsam optimizers "
                             "step DTensors that are sharded (Shard) or replicated (Replicate) on each mesh dimension")
    if len(shard_dims) > 1:
        raise ValueError(f"a parameter of shape {tuple(p.shape)} is sharded on {len(shard_dims)} mesh dimensions "
                         f"({p.placements}): fastsam optimizers support sharding on one mesh dimension (FSDP2, "
                         "or HSDP's replicate x shard mesh)")
    if not shard_dims:
        return Scope(local(p).device)
    return Scope(local(p).device, p.device_mesh.get_group(shard_dims[0]))


def mesh_dims(params: Iterable[Tensor]) -> set:
    """The numbers of device-mesh dimensions among ``params`` (0 for a plain tensor): {1} for FSDP2's 1-D mesh."""
    return {p.device_mesh.ndim if is_dtensor(p) else 0 for p in params}


def per_rank_zeros(p: Tensor) -> Tensor:
    """A zero-filled state for DTensor parameter ``p`` (on a 1-D mesh) that holds a full-size tensor of each
    rank's own: shape ``(world, *p.shape)``, sharded on dim 0, so rank r's local tensor ``[1, *p.shape]`` is
    its own and a distributed checkpoint saves and loads every rank's apart."""
    mesh = p.device_mesh
    world = mesh.size()
    mine = torch.zeros((1, *p.shape), device=local(p).device, dtype=p.dtype)
    return DTensor.from_local(mine, mesh, [Shard(0)], run_check=False, shape=(world, *p.shape),
                              stride=mine.stride())


def device_of(key: Hashable) -> torch.device:
    return key.device if isinstance(key, Scope) else key


def zeroed(accs: Dict[Hashable, Tensor], keys: Iterable[Hashable], n: int) -> Dict[Hashable, Tensor]:
    """Zeroes (making them the first time) the fp32 ``[n]`` accumulators of ``keys`` (devices or scopes);
    returns those."""
    out = {}
    for k in keys:
        if k not in accs:
            accs[k] = torch.zeros(n, device=device_of(k), dtype=torch.float32)
        out[k] = accs[k].zero_()
    return out


def global_sums(accs: Dict[Hashable, Tensor], added: Optional[set] = None) -> Dict[torch.device, Tensor]:
    """Completes the partial sums of ``accs`` (by scope or device): one all-reduce per sharded scope (of
    those in ``added``, the scopes that anything was added to, when given: the others hold 0 on every
    rank), then every accumulator gets the total of all. Returns one accumulator per device, holding the
    total."""
    for key, acc in accs.items():
        if isinstance(key, Scope) and key.group is not None and (added is None or key in added):
            torch.distributed.all_reduce(acc, group=key.group)
    if len(accs) > 1:
        first = next(iter(accs.values()))
        total = sum(a.to(first.device) for a in accs.values())
        for a in accs.values():
            a.copy_(total)
    by_device: Dict[torch.device, Tensor] = {}
    for key, acc in accs.items():
        by_device.setdefault(device_of(key), acc)
    return by_device


def mean_over_ranks(values: Tensor, groups: Iterable[object]) -> Tensor:
    """``values`` (a small tensor of this rank's losses) averaged over the ranks of every process group of
    ``groups`` in turn, on the device: the loss of the whole global batch, as the averaged grads see it."""
    for group in groups:
        torch.distributed.all_reduce(values, group=group)
        values = values / torch.distributed.get_world_size(group)
    return values


def data_parallel_groups(params: Iterable[Tensor]) -> list:
    """The process groups of every mesh dimension of the DTensors among ``params`` (whose ranks train on
    different batches, FSDP's shard dimension and HSDP's replicate one alike)."""
    meshes = {p.device_mesh for p in params if is_dtensor(p)}
    return [mesh.get_group(dim) for mesh in meshes for dim in range(mesh.ndim)]
