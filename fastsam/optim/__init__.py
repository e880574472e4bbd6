"""The sharpness-aware optimizers."""
from fastsam.optim.asam import ASAM
from fastsam.optim.cr_sam import CRSAM
from fastsam.optim.friendly_sam import FriendlySAM
from fastsam.optim.gsam import GSAM
from fastsam.optim.last_sam import LastSAM
from fastsam.optim.looksam import LookSAM
from fastsam.optim.sam import SAM
from fastsam.optim.wsam import WSAM

__all__ = ["SAM", "ASAM", "FriendlySAM", "CRSAM", "LastSAM", "GSAM", "WSAM", "LookSAM"]
