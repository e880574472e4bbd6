"""Entries of the fused CVaR ops: validate the impl, pick it, run it. The math is in cvar_reference.

These are the raw forward ops (no autograd); fastsam.losses wraps them in autograd Functions and checks
the user's inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from fastsam.ops._dispatch import backend, resolve_impl

Result = Tuple[Tensor, Tensor, Tensor]


def _backend(impl: str, x: Tensor):
    return backend(resolve_impl(impl, x.device), "cvar")


def cvar_select(losses: Tensor, alpha: float, *, impl: str = "auto") -> Result:
    """``(value, var, weights)`` of CVaR_alpha over ``losses`` ([n], contiguous); see cvar_reference."""
    return _backend(impl, losses).cvar_select(losses, alpha)


def cvar_cross_entropy(logits: Tensor, target: Tensor, alpha: float, ignore_index: int, label_smoothing: float,
                       *, impl: str = "auto") -> Result:
    """``(value, var, grad_logits)`` of CVaR_alpha over per-sample cross-entropies; logits [n, C] contiguous,
    target [n] int64; see cvar_reference."""
    return _backend(impl, logits).cvar_cross_entropy(logits, target, alpha, ignore_index, label_smoothing)


def cvar_bce_with_logits(logits: Tensor, target: Tensor, pos_weight: Optional[Tensor], alpha: float,
                         per_sample: bool, ignore_index: float, *, impl: str = "auto") -> Result:
    """``(value, var, grad_logits)`` of CVaR_alpha over BCE-with-logits losses; logits and target [n, L] of one
    dtype, contiguous; pos_weight None or fp32 [L]; see cvar_reference."""
    return _backend(impl, logits).cvar_bce_with_logits(logits, target, pos_weight, alpha, per_sample, ignore_index)
