"""Picks the implementation of a fused op for a list of tensors."""
from __future__ import annotations

import os
from types import ModuleType

import torch

from fastsam import _extension

_VALID = ("auto",) + _extension.IMPLS


def check_impl(impl: str) -> str:
    """Validates an ``impl`` argument (``auto``, ``cuda``, ``triton``, ``cpu`` or ``torch``)."""
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str, got {type(impl).__name__}")
    if impl not in _VALID:
        raise ValueError(f"impl must be one of {', '.join(_VALID)}; got {impl!r}")
    return impl


# torch.compile runs this eagerly while tracing and keeps the answer (it depends on the process, not
# on tensor values): tracing into it would import the extension (registering its kernels), which breaks
# the graph. So a compiled step keeps the implementation FASTSAM_IMPL named when it was compiled.
@torch.compiler.assume_constant_result
def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation ``impl`` means for tensors on ``device``.

    ``auto`` (overridden by the environment variable FASTSAM_IMPL): CUDA tensors -> cuda if the
    extension has CUDA kernels, else triton; CPU tensors -> cpu if the extension is built, else torch.
    An explicit impl that cannot run on ``device`` raises RuntimeError.
    """
    check_impl(impl)
    if impl == "auto":
        impl = os.environ.get("FASTSAM_IMPL", "auto") or "auto"
        if impl not in _VALID:
            raise ValueError(f"FASTSAM_IMPL must be one of {', '.join(_VALID)}; got {impl!r}")
    if impl == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(i for i in order if _extension.impl_works_on(i, device.type))
    if not _extension.impl_works_on(impl, device.type):
        why = ""
        if impl in ("cpu", "cuda") and not _extension.has_extension():
            why = f" (fastsam._C is not built: {_extension.extension_error()})"
        elif impl == "triton" and not _extension.has_triton():
            why = " (triton is not installed)"
        raise RuntimeError(
            f"impl={impl!r} is not available for {device.type} tensors{why}; "
            f"available: {_extension.available_impls(device)}"
        )
    return impl


def backend(impl: str, family: str = "sam") -> ModuleType | object:
    """The object whose attributes are the op functions of a concrete implementation.

    ``family`` is "sam" (the in-place optimizer ops) or "cvar" (the CVaR losses): the pure-Python
    implementations keep each family in its own module; the extension registers both.
    """
    if impl == "torch":
        from fastsam.ops import cvar_reference, reference

        return reference if family == "sam" else cvar_reference
    if impl == "triton":
        from fastsam.ops import triton_cvar, triton_kernels

        return triton_kernels if family == "sam" else triton_cvar
    return torch.ops.fastsam  # cpu and cuda: the extension, dispatched by the tensors' device
