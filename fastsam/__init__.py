"""fastsam: fused sharpness-aware minimization for PyTorch."""
from fastsam import losses, utils
from fastsam._extension import available_impls
from fastsam.optim import ASAM, CRSAM, GSAM, SAM, WSAM, FriendlySAM, LastSAM, LookSAM

__all__ = ["SAM", "ASAM", "FriendlySAM", "CRSAM", "LastSAM", "GSAM", "WSAM", "LookSAM", "available_impls", "losses", "utils"]
__version__ = "0.1.0"
