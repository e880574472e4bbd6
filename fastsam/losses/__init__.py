"""CVaR losses (Rockafellar-Uryasev), exact top-k form, on fused kernels.

``cvar`` takes any loss vector; ``cvar_cross_entropy`` and ``cvar_bce_with_logits`` fuse the per-sample
loss, the top-k selection and the gradient into one forward (backward is a scale).
"""
from fastsam.losses.functional import cvar, cvar_bce_with_logits, cvar_cross_entropy
from fastsam.losses.modules import CVaRBCEWithLogitsLoss, CVaRCrossEntropyLoss

__all__ = ["cvar", "cvar_cross_entropy", "cvar_bce_with_logits", "CVaRCrossEntropyLoss", "CVaRBCEWithLogitsLoss"]
