"""fastsam: fused sharpness-aware minimization for PyTorch."""
from fastsam._extension import available_impls

__all__ = ["available_impls"]
__version__ = "0.1.0"
