r"""CVaR losses as functions: the exact top-k form, computed by one fused op per call.

For ``n`` per-sample losses :math:`\ell_i` and a level :math:`\alpha \in (0, 1]`, with :math:`k = \alpha n`:

.. math::
    \mathrm{CVaR}_\alpha(\ell) = \min_\lambda \; \lambda + \frac{1}{\alpha n} \sum_i (\ell_i - \lambda)_+
    = \frac{1}{k}\Big(\sum_{j \le \lfloor k \rfloor} \ell_{(j)} + (k - \lfloor k \rfloor)\, \ell_{(\lceil k \rceil)}\Big)

(:math:`\ell_{(j)}` the j-th largest). The minimizing :math:`\lambda` (the VaR) is
:math:`\ell_{(\lceil k \rceil)}`; ``return_lambda=True`` returns it too, detached. :math:`\alpha = 1` is the
mean; :math:`k < 1` gives the largest loss. Losses tied at the threshold share its weight equally. The
forward pass writes the gradient of the loss with respect to the logits; backward scales it, so no
softmax, no per-sample loss vector and no index set is kept for backward, and nothing waits for the
host (the number of non-ignored targets stays on the device).

Defined results instead of errors (they cannot be checked on a GPU without a host sync):
a NaN logit, or on a GPU a class target outside ``[0, C)``, makes the loss, lambda and the gradient of
every non-ignored entry NaN (a ``GradScaler`` then skips the step); a batch whose targets are all
ignored gives a NaN loss (as ``F.cross_entropy``'s mean over nothing) and a zero gradient. On the CPU an
out-of-range class target raises ValueError, as in torch (inside torch.compile it gives NaN instead).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from fastsam import ops
from fastsam._checks import _check_number

LossOut = Union[Tensor, Tuple[Tensor, Tensor]]
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _FusedCVaR(torch.autograd.Function):
    """``op(x, *args) -> (value, var, d value / d x)``; backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, op: Callable, *args):
        value, var, grad = op(x, *args)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(var)
        ctx.n_inputs = 2 + len(args)
        return value.to(x.dtype), var

    @staticmethod
    def backward(ctx, grad_value: Tensor, _grad_var: Optional[Tensor]):
        (grad,) = ctx.saved_tensors
        # The usual loss.backward() passes exactly 1: on the CPU that is free to see, and the saved
        # gradient is then the answer (autograd copies it where it must keep it as a leaf's .grad).
        # Under torch.compile the read would break the graph, and the product fuses there anyway.
        if (grad_value.device.type == "cpu" and not torch.compiler.is_compiling()
                and grad_value.item() == 1.0):
            out = grad
        else:
            out = grad * grad_value.to(grad.dtype)
        return (out,) + (None,) * (ctx.n_inputs - 1)


def _apply(x: Tensor, op: Callable, *args, impl: str) -> Tuple[Tensor, Tensor]:
    return _FusedCVaR.apply(x, functools.partial(op, impl=impl), *args)


def _check_alpha(alpha) -> float:
    alpha = _check_number("alpha", alpha)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return alpha


def _check_float_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x


def _check_target(target, logits: Tensor, shape) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, logits on {logits.device}; they must be on one device")
    if tuple(target.shape) != tuple(shape):
        raise ValueError(f"target must have shape {tuple(shape)} to match logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    return target


def _out(value: Tensor, var: Tensor, return_lambda: bool) -> LossOut:
    return (value, var) if return_lambda else value


def cvar(losses: Tensor, alpha: float, *, return_lambda: bool = False, impl: str = "auto") -> LossOut:
    """CVaR_alpha of a vector of losses (the mean of the worst alpha fraction, exactly).

    Args:
        losses: any shape (flattened), float32/float64/float16/bfloat16; differentiable.
        alpha: level in (0, 1]; 1 is the mean.
        return_lambda: also return the VaR threshold lambda (0-dim, detached).
        impl: "auto", "cuda", "triton", "cpu" or "torch".

    Returns:
        0-dim tensor in the dtype of ``losses`` (and lambda, fp32; fp64 for fp64 losses).
    """
    alpha = _check_alpha(alpha)
    ops.check_impl(impl)
    flat = _check_float_tensor("losses", losses).reshape(-1).contiguous()
    value, var = _apply(flat, ops.cvar_select, alpha, impl=impl)
    return _out(value, var, return_lambda)


def _check_logits_2d(logits, what: str) -> Tensor:
    logits = _check_float_tensor("logits", logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be 2-D [n, {what}] with {what} >= 1, got shape {tuple(logits.shape)}")
    return logits


def cvar_cross_entropy(logits: Tensor, target: Tensor, alpha: float, ignore_index: int = -1,
                       label_smoothing: float = 0.0, impl: str = "auto", return_lambda: bool = False) -> LossOut:
    """CVaR_alpha of the per-sample cross-entropy, fused: loss, top-k and gradient in one forward.

    The per-sample loss is ``F.cross_entropy(logits, target, reduction="none", label_smoothing=...)``;
    samples whose target is ``ignore_index`` are excluded (``n`` counts the others).

    Args:
        logits: [n, C] float32/float64/float16/bfloat16 (C >= 1); differentiable.
        target: [n] integer class indices in [0, C), or ``ignore_index``.
        alpha: level in (0, 1] (the affect paper: 0.3; alpha = 1 gives the mean cross-entropy).
        ignore_index: target value to exclude (default -1, the Aff-Wild2 convention).
        label_smoothing: in [0, 1], as in ``F.cross_entropy``.
        impl: "auto", "cuda", "triton", "cpu" or "torch".
        return_lambda: also return the VaR threshold lambda (0-dim, detached).

    Returns:
        0-dim loss in the dtype of ``logits`` (and lambda).
    """
    alpha = _check_alpha(alpha)
    ops.check_impl(impl)
    logits = _check_logits_2d(logits, "C")
    target = _check_target(target, logits, logits.shape[:1])
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    smoothing = _check_number("label_smoothing", label_smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    target = target.to(torch.int64).contiguous()
    # The check reads the host, which torch.compile cannot trace: compiled, the CPU follows the GPU's NaN rule.
    if target.device.type == "cpu" and target.numel() and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[1]))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target holds class {value}, outside [0, {logits.shape[1]}) and not "
                             f"ignore_index={ignore_index}")
    value, var = _apply(logits.contiguous(), ops.cvar_cross_entropy, target, alpha, ignore_index, smoothing,
                        impl=impl)
    return _out(value, var, return_lambda)


def _check_reduction(reduction) -> bool:
    if reduction not in ("element", "sample"):
        raise ValueError(f"reduction must be 'element' or 'sample', got {reduction!r}")
    return reduction == "sample"


def cvar_bce_with_logits(logits: Tensor, target: Tensor, alpha: float, reduction: str = "element",
                         ignore_index: float = -1, pos_weight: Optional[Tensor] = None, impl: str = "auto",
                         return_lambda: bool = False) -> LossOut:
    """CVaR_alpha of binary cross-entropy with logits (multi-label, e.g. action units), fused.

    The element loss is ``F.binary_cross_entropy_with_logits(..., pos_weight=pos_weight, reduction="none")``;
    entries whose target equals ``ignore_index`` are excluded.

    Args:
        logits: [n, L] or [n] (one label) float32/float64/float16/bfloat16; differentiable.
        target: the shape of ``logits``; 0/1 (or soft labels in [0, 1]) or ``ignore_index``; cast to the
            dtype of ``logits``.
        alpha: level in (0, 1].
        reduction: "element": CVaR over every valid (sample, label) loss (the affect authors' choice for
            AUs; n = number of valid entries); "sample": average the valid labels of each sample first
            (n = samples with at least one valid label).
        ignore_index: target value to exclude (default -1).
        pos_weight: None, or the weight of positives per label: [L] (or a scalar), > 0 by convention.
        impl: "auto", "cuda", "triton", "cpu" or "torch".
        return_lambda: also return the VaR threshold lambda (0-dim, detached).

    Returns:
        0-dim loss in the dtype of ``logits`` (and lambda).
    """
    alpha = _check_alpha(alpha)
    ops.check_impl(impl)
    per_sample = _check_reduction(reduction)
    ignore = _check_number("ignore_index", ignore_index)
    x = _check_float_tensor("logits", logits)
    if x.dim() == 1:
        x = x.unsqueeze(1)
    x = _check_logits_2d(x, "L")
    target = _check_target(target, logits, logits.shape).reshape(x.shape).to(x.dtype).contiguous()
    pw = None
    if pos_weight is not None:
        if not isinstance(pos_weight, Tensor):
            raise TypeError(f"pos_weight must be a Tensor or None, got {type(pos_weight).__name__}")
        if pos_weight.device != x.device:
            raise ValueError(f"pos_weight is on {pos_weight.device}, logits on {x.device}")
        if pos_weight.numel() == 1:
            pos_weight = pos_weight.reshape(1).expand(x.shape[1])
        if tuple(pos_weight.shape) != (x.shape[1],):
            raise ValueError(f"pos_weight must have shape [{x.shape[1]}] (one weight per label), "
                             f"got {tuple(pos_weight.shape)}")
        pw = pos_weight.to(torch.float32).contiguous()
    value, var = _apply(x.contiguous(), ops.cvar_bce_with_logits, target, pw, alpha, per_sample, ignore,
                        impl=impl)
    return _out(value, var, return_lambda)

