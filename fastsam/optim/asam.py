"""ASAM: adaptive sharpness-aware minimization (Kwon et al., 2021) on the fused SAM kernels."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

import fastsam.ops as ops
from fastsam.optim.sam import SAM, _check_nonneg, _check_p

_NORMALIZATIONS = ("elementwise", "filterwise")


class ASAM(SAM):
    r"""Adaptive SAM: SAM with a scale-invariant neighbourhood defined by the operator :math:`T_w`.

    .. math::
        e = \rho\, \frac{T_w^2\, g}{\lVert T_w\, g \rVert_2 + 10^{-16}} \quad (p = 2), \qquad
        e = \rho\, T_w\, \mathrm{sign}(g) \quad (p = \infty)

    * ``normalization="elementwise"``: :math:`T_w = |w| + \eta`.
    * ``normalization="filterwise"``: for a convolution weight (``ndim >= 3``) every element of output
      filter :math:`f_i = w[i]` gets :math:`\lVert f_i \rVert_2 + \eta`; other normalized parameters
      use :math:`|w| + \eta` (the paper: weights not in any filter).
    * Bias normalization is off, as in the official code: with named parameters
      (``model.named_parameters()``), only parameters whose name contains ``"weight"`` are
      normalized and the others use :math:`T = 1`. Without names, a param group's ``normalize``
      flag (default True) decides for all of its parameters.

    ``second_step`` restores w from a backup, which is exact (the official code subtracts e again,
    which is exact only up to rounding).

    Args:
        params, base_optimizer, impl, nonfinite, **base_kwargs: as for :class:`fastsam.SAM`.
        rho: radius (default 0.5). eta: the operator's offset (default 0.01).
        normalization: "elementwise" or "filterwise". p: 2 or ``math.inf``.
    """

    _eps_norm = 1e-16
    _operator_options = ("eta", "normalization", "normalize")

    def __init__(self, params, base_optimizer, rho: float = 0.5, eta: float = 0.01,
                 normalization: str = "elementwise", p: float = 2, impl: str = "auto",
                 nonfinite: Optional[str] = None, **base_kwargs):
        defaults = dict(rho=_check_nonneg("rho", rho), eta=_check_nonneg("eta", eta),
                        normalization=_check_normalization(normalization), normalize=True, p=_check_p(p),
                        perturb=True)
        self._init_sam(params, base_optimizer, impl, defaults, base_kwargs, nonfinite)

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_asam_group(group)

    def _operator(self, p: Tensor, name: Optional[str], group: dict):
        normalized = ("weight" in name) if name is not None else bool(group["normalize"])
        if not normalized:
            return ops.MODE_IDENTITY, 0.0
        if group["normalization"] == "filterwise" and p.dim() >= 3:
            return ops.MODE_ROW, group["eta"]
        return ops.MODE_ABS, group["eta"]


def check_asam_group(group: dict) -> None:
    """ASAM's own group options (SAM's are checked by SAM)."""
    _check_nonneg("eta", group["eta"])
    _check_normalization(group["normalization"])


def _check_normalization(value) -> str:
    if value not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {value!r}")
    return value
