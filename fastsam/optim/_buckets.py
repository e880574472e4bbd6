"""Groups the parameters of a step into buckets that one fused op call each can cover.

A bucket holds the parameters of one param group that share a device, a dtype, a normalization
operator and an implementation. Buckets are built once per set of parameters-with-grad and cached,
so a step only gathers the current ``.grad`` tensors (which autograd may replace between passes).
The per-parameter buffers a method keeps (backups, an EMA, grad copies) live in the optimizer's
state and are made once, the first time a parameter is seen.

A DTensor parameter (FSDP2) joins a bucket as its local shard, and its state buffers are DTensors laid out
like it (so that a distributed checkpoint saves them sharded), seen through their local shards too; the
bucket's ``scope`` says over which process group its partial sums are completed (see ``_sharding``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from fastsam.ops import MODE_ROW, resolve_impl
from fastsam.optim._sharding import Scope, local, scope_of


@dataclass
class Bucket:
    group: dict
    mode: int
    eta: float
    impl: str
    perturbed: bool  # False: a group with rho=0 or perturb=False, which has no backups
    scope: Scope  # the device of its tensors, and the process group of a sharded parameter's other shards
    params: List[Tensor] = field(default_factory=list)
    backups: List[Tensor] = field(default_factory=list)
    row_scales: List[Tensor] = field(default_factory=list)
    # The method's own per-parameter buffers, by state key (e.g. "ema", "grad0").
    buffers: Dict[str, List[Tensor]] = field(default_factory=dict)
    # Indices of parameters whose buffers were made by this plan (a method may treat their first step apart).
    fresh: List[int] = field(default_factory=list)
    # Adam/AdamW: [(step count, indices of the params at that count)], kept so a step reads no counters.
    adam_steps: "List[Tuple[float, List[int]]] | None" = None

    # The parameters themselves when ``params`` holds views of them (see ``kernel_view``): the keys of the
    # base optimizer's state.
    sources: "List[Tensor] | None" = None

    def grads(self) -> List[Tensor]:
        """The current ``.grad`` of each parameter (None where it has none), seen as the kernels see the
        parameter (``kernel_view``)."""
        if self.sources is None:
            return [p.grad for p in self.params]
        return [None if p.grad is None else kernel_view(p.grad) for p in self.sources]

    def keys(self) -> List[Tensor]:
        """The parameters as the base optimizer's state knows them."""
        return self.params if self.sources is None else self.sources


# The parameter dtypes of the compiled kernels (cpu, cuda, triton); the reference also takes fp64 and,
# through real views, complex parameters.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_real(t: Tensor) -> Tensor:
    """``t``, or its real view (shape ``(*t.shape, 2)``, same storage) when ``t`` is complex: the SAM math of
    a complex parameter is that of the real vector of its parts (the norm of C^n is the norm of R^2n), as
    torch's optimizers treat complex parameters."""
    return torch.view_as_real(t) if t.is_complex() else t


def kernel_view(t: Tensor) -> Tensor:
    """What the kernels step for parameter (or grad, or state buffer) ``t``: its local shard when it is a
    DTensor, as a real view when it is complex (same storage either way)."""
    return as_real(local(t))


def bucket_impl(impl: str, p: Tensor) -> str:
    """The implementation of parameter ``p``'s bucket: ``impl`` resolved for its device, or the reference
    ("torch") for a strided parameter (kernels read memory linearly) and, under "auto", for an fp64 or complex
    one. Raises TypeError naming the dtype when an explicit compiled ``impl`` cannot take it."""
    if p.dtype not in KERNEL_DTYPES:
        if impl not in ("auto", "torch"):
            raise TypeError(f"impl={impl!r} takes float32, float16 and bfloat16 parameters; a parameter of shape "
                            f"{tuple(p.shape)} is {p.dtype} (impl='auto' or 'torch' steps it with the reference ops)")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"a parameter of shape {tuple(p.shape)} is {p.dtype}: fastsam optimizers step "
                            "floating-point or complex parameters")
        return "torch"
    return resolve_impl(impl, p.device) if p.is_contiguous() else "torch"


def take(ts: List[Tensor], idx: "List[int] | None") -> List[Tensor]:
    """``ts[i] for i in idx``; all of ``ts`` when ``idx`` is None; an empty list stays empty."""
    return ts if idx is None or not ts else [ts[i] for i in idx]


def with_grad(grads: List["Tensor | None"]) -> "List[int] | None":
    """The positions of the tensors that have a grad, for :func:`take`: None when all of them have one."""
    return None if all(g is not None for g in grads) else [i for i, g in enumerate(grads) if g is not None]


# A state flag: the parameter's buffers were made zero-filled before its first step (a template to load a
# checkpoint into); its first step still treats it as new.
UNSTARTED = "unstarted"

# (param, param name or None, group) -> (mode, eta)
OperatorRule = Callable[[Tensor, "str | None", dict], Tuple[int, float]]


def grad_signature(param_groups: List[dict]) -> Tuple[bool, ...]:
    """Which parameters have a grad: the cache key of a plan."""
    return tuple(p.grad is not None for g in param_groups for p in g["params"])


def check_grad(p: Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError("fastsam optimizers do not support sparse gradients")
    if p.grad.shape != p.shape:
        raise RuntimeError(f"a gradient of shape {tuple(p.grad.shape)} belongs to a parameter of shape {tuple(p.shape)}")


def build(param_groups: List[dict], state: Dict[Tensor, dict], impl: str, rule: OperatorRule,
          perturbed: Callable[[dict], bool], buffers: Tuple[str, ...] = ()) -> List[Bucket]:
    """Buckets of the parameters that have a grad now. Allocates their backups (for perturbed groups),
    filter-norm buffers and the method's ``buffers`` (zero-filled) in ``state`` the first time a
    parameter is seen; later plans reuse them."""
    buckets: Dict[tuple, Bucket] = {}
    for gi, group in enumerate(param_groups):
        names = group.get("param_names")
        moved = perturbed(group)
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            check_grad(p)
            mode, eta = rule(p, names[i] if names else None, group)
            view = kernel_view(p)
            scope = scope_of(p, rows=mode == MODE_ROW)
            p_impl = bucket_impl(impl, local(p))
            key = (gi, scope, p.dtype, mode, p_impl)
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = Bucket(group, mode, eta, p_impl, moved, scope, buffers={k: [] for k in buffers},
                                          sources=[] if view is not p else None)
            st = state[p]
            b.params.append(view)
            if b.sources is not None:
                b.sources.append(p)
            # A parameter is new to the method when its buffers are made now, or were made zero-filled for a
            # checkpoint's template before its first step (see SAM.step).
            unstarted = st.pop(UNSTARTED, False)
            if unstarted or any(k not in st for k in buffers):
                b.fresh.append(len(b.params) - 1)
            # State keeps the parameter's dtype, shape and layout (a state dict loads into it); buckets see
            # kernel views.
            for k in buffers:
                if k not in st:
                    st[k] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                b.buffers[k].append(kernel_view(st[k]))
            if not moved:
                continue
            if "backup" not in st:
                st["backup"] = torch.empty_like(p, memory_format=torch.contiguous_format)
            b.backups.append(kernel_view(st["backup"]))
            if mode == MODE_ROW:
                if "row_scale" not in st:
                    st["row_scale"] = torch.empty(view.shape[0], device=view.device, dtype=torch.float32)
                b.row_scales.append(st["row_scale"])
    return list(buckets.values())
