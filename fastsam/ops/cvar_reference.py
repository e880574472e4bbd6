"""Pure-torch reference of the fused CVaR ops: the ground truth of the tests and the last fallback.

CVaR at level ``alpha`` of ``n`` losses (Rockafellar-Uryasev; the affect paper's eq. 1) is
``min over lambda of lambda + 1/(alpha n) sum_i (l_i - lambda)_+``. Its exact value is a top-k mean
with a fractional boundary weight. Contract shared by every implementation (reference, cpu, cuda, triton):

* Only *valid* losses count: ``n`` is their number (ignored targets are excluded on the device, so
  ``n`` is never read on the host). ``k = alpha * n`` in float64, snapped to the nearest integer
  ``r >= 1`` when ``|k - r| <= 1e-9 k`` (so ``0.3 * 10`` is 3, not 3.0000000000000004).
* ``var`` (the VaR, lambda*) is ``t``, the ``ceil(k)``-th largest valid loss. With ``c_gt`` the number
  of valid losses ``> t`` and ``c_eq`` the number ``== t``:
  weight ``1/k`` for every loss ``> t``, ``(k - c_gt) / (k c_eq)`` for every loss ``== t``, 0 else;
  ``value = (sum_{l > t} l + (k - c_gt) t) / k``, the sum accumulated in float64.
  Without ties this is the top-k form (``floor(k)`` largest at ``1/k``, the next at
  ``(k - floor(k)) / k``); losses tied at ``t`` share the boundary weight equally, which is a valid
  subgradient, independent of the order of the samples, so every implementation gives the same one.
* A NaN among the valid losses (a NaN logit, or a target class outside ``[0, C)``) makes ``value``,
  ``var`` and the gradient of every valid entry NaN. No valid loss at all: ``value`` and ``var`` are NaN
  (as torch's mean over nothing) and the gradient is 0. Ignored entries always get a gradient of exactly 0.
* Losses are computed in "opmath" (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64); ``value`` and ``var``
  are 0-dim tensors of that dtype; gradients are written in the dtype of the input.
* The fused losses return ``grad_logits = d value / d logits`` computed in the forward, so that the
  backward is one scale by the incoming grad.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# |k - round(k)| <= SNAP * k snaps k to the integer: alpha * n in float64 is off by a few ulps at most.
SNAP = 1e-9


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses are computed and reduced in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _select(losses: Tensor, valid: Tensor, alpha: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(value, var, weights) of CVaR_alpha over ``losses[valid]``; ``weights`` is 0 where not valid."""
    n = valid.sum()
    k = alpha * n.double()
    r = k.round()
    k = torch.where((r >= 1) & ((k - r).abs() <= SNAP * k), r, k)
    rank = torch.ceil(k).long().clamp(min=1)
    # NaN sorts as the largest value, -inf stands for "not valid" and sorts last.
    keyed = torch.where(valid, losses, torch.full_like(losses, float("-inf")))
    ordered = keyed.sort(descending=True).values
    t = ordered.gather(0, (rank - 1).clamp(max=max(losses.numel() - 1, 0)).view(1)).squeeze(0) \
        if losses.numel() else losses.new_zeros(())
    gt = valid & (losses > t)
    eq = valid & (losses == t)
    c_gt = gt.sum().double()
    c_eq = eq.sum().double()
    s_gt = torch.where(gt, losses.double(), 0.0).sum()
    value = (s_gt + (k - c_gt) * t.double()) / k
    w = torch.where(gt, 1.0 / k, torch.where(eq, (k - c_gt) / (k * c_eq), 0.0))
    undefined = (valid & losses.isnan()).any() | (n == 0)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=losses.device)
    value = torch.where(undefined, nan, value)
    t = torch.where(undefined, nan.to(t.dtype), t)
    w = torch.where(undefined & valid, nan, w)
    return value.to(losses.dtype), t, w


def cvar_select(losses: Tensor, alpha: float) -> Tuple[Tensor, Tensor, Tensor]:
    """CVaR of a loss vector: ``(value, var, weights)``.

    losses: [n], any float dtype, all valid. value, var: 0-dim, opmath dtype. weights: [n], the dtype of
    ``losses``: ``d value / d losses``.
    """
    l32 = losses.to(opmath(losses.dtype))
    value, var, w = _select(l32, torch.ones_like(l32, dtype=torch.bool), alpha)
    return value, var, w.to(losses.dtype)


def cvar_cross_entropy(logits: Tensor, target: Tensor, alpha: float, ignore_index: int,
                       label_smoothing: float) -> Tuple[Tensor, Tensor, Tensor]:
    """CVaR of the per-sample cross-entropy: ``(value, var, grad_logits)``.

    logits: [n, C] float, C >= 1; target: [n] int64 class indices, ``ignore_index`` excluded. The per-sample loss
    is torch's: ``(1 - s) (lse - x_y) + s (lse - mean_c x_c)`` with ``s = label_smoothing``.
    grad_logits: [n, C], the dtype of ``logits``: ``w_i (softmax(x_i) - (1 - s) onehot(y_i) - s / C)``.
    """
    x = logits.to(opmath(logits.dtype))
    n, c = x.shape
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= c))
    tgt = torch.where(valid & ~bad, target, 0).view(n, 1)
    lse = torch.logsumexp(x, dim=1)
    loss = lse - x.gather(1, tgt).squeeze(1)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - x.mean(dim=1))
    loss = torch.where(bad, float("nan"), loss)
    value, var, w = _select(loss, valid, alpha)
    grad = torch.exp(x - lse.unsqueeze(1)) - label_smoothing / c
    grad.scatter_add_(1, tgt, grad.new_full((n, 1), label_smoothing - 1.0))
    grad = torch.where(valid.unsqueeze(1), w.unsqueeze(1) * grad, 0.0)
    return value, var, grad.to(logits.dtype)


def cvar_bce_with_logits(logits: Tensor, target: Tensor, pos_weight: Optional[Tensor], alpha: float,
                         per_sample: bool, ignore_index: float) -> Tuple[Tensor, Tensor, Tensor]:
    """CVaR of binary cross-entropy with logits: ``(value, var, grad_logits)``.

    logits, target: [n, L] of one float dtype; entries with ``target == ignore_index`` are excluded.
    pos_weight: None or fp32 [L]. The element loss is torch's:
    ``(1 - y) x + (1 + (p - 1) y) softplus(-x)``. ``per_sample=False``: CVaR over all valid (sample, label)
    losses; ``per_sample=True``: over the per-sample means of the valid labels (samples with none are
    excluded). grad_logits: [n, L], the dtype of ``logits``.
    """
    x = logits.to(opmath(logits.dtype))
    y = target.to(x.dtype)
    valid = target != ignore_index
    y = torch.where(valid, y, 0.0)
    softplus_neg = torch.log1p(torch.exp(-x.abs())) + torch.clamp(-x, min=0)
    lw = 1.0 if pos_weight is None else 1.0 + (pos_weight.to(x.dtype) - 1.0) * y
    loss = (1.0 - y) * x + lw * softplus_neg
    dloss = (1.0 - y) - lw * torch.sigmoid(-x)
    if per_sample:
        m = valid.sum(dim=1)
        m1 = m.clamp(min=1).to(x.dtype)
        row_loss = torch.where(valid, loss, 0.0).sum(dim=1) / m1
        value, var, w = _select(row_loss, m > 0, alpha)
        grad = (w / m1).unsqueeze(1) * dloss
    else:
        value, var, w = _select(loss.flatten(), valid.flatten(), alpha)
        grad = w.view_as(x) * dloss
    grad = torch.where(valid, grad, 0.0)
    return value, var, grad.to(logits.dtype)
