"""The affect head: an MLP from a frozen CLIP image feature to EXPR (8) or AU (12) logits."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class AffectMLP(nn.Module):
    """``blocks`` x (Linear -> BatchNorm1d -> ReLU -> Dropout), then a Linear to ``outputs`` logits.

    The authors' head (docs/design.md section 4): 3 blocks of width 768, dropout 0.6. Every Linear weight gets
    Kaiming-uniform init (fan_in, relu); biases and BatchNorm keep torch's defaults.

    Args:
        outputs: logits per row (8 for EXPR, 12 for AU).
        in_dim: feature width (768 for CLIP ViT-L/14).
        hidden: width of every block.
        blocks: number of hidden blocks (>= 1).
        dropout: drop probability in [0, 1).
    """

    def __init__(self, outputs: int, in_dim: int = 768, hidden: int = 768, blocks: int = 3, dropout: float = 0.6):
        super().__init__()
        self.outputs = _check_positive_int("outputs", outputs)
        self.in_dim = _check_positive_int("in_dim", in_dim)
        _check_positive_int("hidden", hidden)
        _check_positive_int("blocks", blocks)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        layers = []
        width = in_dim
        for _ in range(blocks):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, outputs)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """``x``: float ``[B, in_dim]`` -> logits ``[B, outputs]`` in the same dtype."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape [batch, {self.in_dim}], got {tuple(x.shape)}")
        return self.head(self.body(x))


__all__ = ["AffectMLP"]
