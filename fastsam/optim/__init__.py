"""The sharpness-aware optimizers."""
from fastsam.optim.asam import ASAM
from fastsam.optim.sam import SAM

__all__ = ["SAM", "ASAM"]
