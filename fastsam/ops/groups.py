"""The argument groups of the fused ops: arguments that travel together, passed as one named value.

They mirror the structs of the CUDA launchers (csrc/cuda/kernels.h ``AmpArgs`` and ``GradArgs``), and the
op entries of :mod:`fastsam.ops` take them as the keyword arguments ``amp`` and ``grad``.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

from torch import Tensor


class AmpArgs(NamedTuple):
    """Loss scaling and skipped steps (torch.amp.GradScaler), read on the device: no host sync.

    inv_scale: None, or a fp32 one-element tensor on the tensors' device: the op's ``grads`` hold loss-scaled
        grads and every read of them is ``g * inv_scale``.
    found_inf: None, or a fp32 one-element tensor: nonzero means the step is skipped, and the op keeps ``w``
        where the step began (see reference.py's module docstring).
    """

    inv_scale: Optional[Tensor] = None
    found_inf: Optional[Tensor] = None


class GradArgs(NamedTuple):
    """The grad a fused update steps with: ``coef[0] g + coef[1] g_b + coef[2] g_c``.

    coef: fp32 tensor of shape [3] on the tensors' device (so that the weights need no host sync).
    grads_b, grads_c: kept grads (one tensor per parameter, stored unscaled), or None to drop the term.
    """

    coef: Tensor
    grads_b: Optional[List[Tensor]] = None
    grads_c: Optional[List[Tensor]] = None
