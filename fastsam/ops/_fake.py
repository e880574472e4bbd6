"""Fake (meta) kernels of the extension ops, so torch.compile can trace through them.

Every op mutates its arguments in place and returns nothing, so the fakes only describe that.
"""
import torch

OPS = ("norm_sq_", "row_norm_", "perturb_", "reflect_", "dot_norm_sq_", "restore_", "restore_sgd_", "restore_adam_")


def _nothing(*args, **kwargs):
    return None


def register() -> None:
    for name in OPS:
        torch.library.register_fake(f"fastsam::{name}")(_nothing)
