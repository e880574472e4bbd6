"""Fake (meta) kernels of the extension ops, so torch.compile can trace through them.

The SAM ops mutate their arguments in place and return nothing; the CVaR ops return new tensors, whose
fakes give their shapes and dtypes.
"""
import torch

IN_PLACE_OPS = ("norm_sq_", "row_norm_", "perturb_", "reflect_", "dot_norm_sq_", "restore_", "restore_sgd_",
                "restore_adam_")
CVAR_OPS = ("cvar_select", "cvar_cross_entropy", "cvar_bce_with_logits")
OPS = IN_PLACE_OPS + CVAR_OPS


def _nothing(*args, **kwargs):
    return None


def _scalars(x: torch.Tensor):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((), dtype=dtype), x.new_empty((), dtype=dtype)


def _cvar_select(losses, alpha):
    return (*_scalars(losses), torch.empty_like(losses))


def _cvar_fused(logits, *args):
    return (*_scalars(logits), torch.empty_like(logits))


def register() -> None:
    for name in IN_PLACE_OPS:
        torch.library.register_fake(f"fastsam::{name}")(_nothing)
    torch.library.register_fake("fastsam::cvar_select")(_cvar_select)
    for name in ("cvar_cross_entropy", "cvar_bce_with_logits"):
        torch.library.register_fake(f"fastsam::{name}")(_cvar_fused)
