"""fastsam: fused sharpness-aware minimization for PyTorch."""
from fastsam import utils
from fastsam._extension import available_impls
from fastsam.optim import ASAM, SAM

__all__ = ["SAM", "ASAM", "available_impls", "utils"]
__version__ = "0.1.0"
