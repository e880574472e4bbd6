"""nn.Module forms of the CVaR losses, in the style of torch.nn's losses."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastsam import ops
from fastsam.losses import functional as F


class CVaRCrossEntropyLoss(nn.Module):
    """CVaR_alpha of the per-sample cross-entropy; see :func:`fastsam.losses.cvar_cross_entropy`.

    Example::

        criterion = CVaRCrossEntropyLoss(alpha=0.3)
        loss = criterion(model(x), y)          # logits [n, C], y [n] (-1 = ignored)
        loss.backward()
    """

    def __init__(self, alpha: float, ignore_index: int = -1, label_smoothing: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.alpha = F._check_alpha(alpha)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.impl = ops.check_impl(impl)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cvar_cross_entropy(logits, target, self.alpha, self.ignore_index, self.label_smoothing, self.impl)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"


class CVaRBCEWithLogitsLoss(nn.Module):
    """CVaR_alpha of binary cross-entropy with logits; see :func:`fastsam.losses.cvar_bce_with_logits`.

    ``pos_weight`` is a buffer, so it follows the module's ``.to(device)`` and is saved in its state dict.
    """

    pos_weight: Optional[Tensor]

    def __init__(self, alpha: float, reduction: str = "element", ignore_index: float = -1,
                 pos_weight: Optional[Tensor] = None, impl: str = "auto"):
        super().__init__()
        self.alpha = F._check_alpha(alpha)
        F._check_reduction(reduction)
        self.reduction = reduction
        self.ignore_index = ignore_index
        if pos_weight is not None and not isinstance(pos_weight, Tensor):
            raise TypeError(f"pos_weight must be a Tensor or None, got {type(pos_weight).__name__}")
        self.register_buffer("pos_weight", pos_weight)
        self.impl = ops.check_impl(impl)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cvar_bce_with_logits(logits, target, self.alpha, self.reduction, self.ignore_index,
                                      self.pos_weight, self.impl)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"
