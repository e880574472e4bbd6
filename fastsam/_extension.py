"""Finds out which implementations of the fused ops work in this process. Nothing here fails at import."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

IMPLS = ("cuda", "triton", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def extension_error() -> str | None:
    """None if fastsam._C loaded (and registered its CPU kernels of the ops), else why it did not."""
    from fastsam.ops import op_table

    op_table.define()  # the schemas first: the extension registers kernels for them
    try:
        from fastsam import _C  # noqa: F401  (importing registers the kernels)
    except ImportError as exc:  # not built: the package still works on the other impls
        return str(exc)
    missing = [name for name in op_table.NAMES if not has_kernel(name, "CPU")]
    # A build of older sources (an editable install not rebuilt) that lacks ops. One whose kernel no longer fits its
    # schema here does not get this far: torch checks the signatures as the library loads, and that stops it.
    if missing:
        return f"fastsam._C is out of date: it lacks {', '.join(missing)}; rebuild it (make install)"
    return None


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel of op ``name`` for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastsam::{name}", dispatch_key)


def has_extension() -> bool:
    return extension_error() is None


@functools.lru_cache(maxsize=None)
def has_cuda_kernels() -> bool:
    """True if the extension was built with its CUDA kernels and a GPU is visible."""
    return (
        has_extension()
        and torch.cuda.is_available()
        and has_kernel("perturb_", "CUDA")
    )


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def impl_works_on(impl: str, device_type: str) -> bool:
    """Whether ``impl`` can run the ops on tensors of ``device_type`` ("cpu", "cuda", ...)."""
    if impl == "torch":
        return True
    if impl == "cpu":
        return device_type == "cpu" and has_extension()
    if impl == "cuda":
        return device_type == "cuda" and has_cuda_kernels()
    if impl == "triton":
        # Triton compiles for GPUs; on the CPU it only runs in its interpreter (used by the tests).
        return has_triton() and (device_type == "cuda" or (device_type == "cpu" and triton_interpret()))
    return False


def available_impls(device: str | torch.device | None = None) -> list[str]:
    """The implementations that work on ``device`` in this process, best first.

    Without a device: every implementation that works on some device here.
    """
    if device is None:
        types = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    else:
        types = [torch.device(device).type]
    return [impl for impl in IMPLS if any(impl_works_on(impl, t) for t in types)]
