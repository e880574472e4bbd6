"""The fused ops: one Python entry each, taking tensor lists of one device and dtype.

Each op is declared once, in :mod:`fastsam.ops.op_table` (schema, defaults, fake, opcheck samples); its entry
here is built from that row (see _entries.py): the schema's arguments, by name or position, with the loss-scale
arguments grouped as ``amp=AmpArgs(inv_scale, found_inf)``, the grad combination as
``grad=GradArgs(coef, grads_b, grads_c)``, and ``impl`` ("auto", "cuda", "triton", "cpu" or "torch", see
:func:`fastsam.ops._dispatch.resolve_impl`). The math of every op is specified in :mod:`fastsam.ops.reference`
(the CVaR ops: :mod:`fastsam.ops.cvar_reference`); the other implementations agree with it to rounding.
"""
from __future__ import annotations

from fastsam.ops import op_table
from fastsam.ops._dispatch import check_impl, resolve_impl
from fastsam.ops._entries import make_entry
from fastsam.ops.groups import AmpArgs, GradArgs
from fastsam.ops.reference import MODE_ABS, MODE_IDENTITY, MODE_ROW

op_table.define()

norm_sq_ = make_entry(op_table.BY_NAME["norm_sq_"])
row_norm_ = make_entry(op_table.BY_NAME["row_norm_"])
perturb_ = make_entry(op_table.BY_NAME["perturb_"])
reflect_ = make_entry(op_table.BY_NAME["reflect_"])
dot_norm_sq_ = make_entry(op_table.BY_NAME["dot_norm_sq_"])
restore_ = make_entry(op_table.BY_NAME["restore_"])
restore_sgd_ = make_entry(op_table.BY_NAME["restore_sgd_"])
restore_adam_ = make_entry(op_table.BY_NAME["restore_adam_"])
cvar_select = make_entry(op_table.BY_NAME["cvar_select"])
cvar_cross_entropy = make_entry(op_table.BY_NAME["cvar_cross_entropy"])
cvar_bce_with_logits = make_entry(op_table.BY_NAME["cvar_bce_with_logits"])

__all__ = ["MODE_IDENTITY", "MODE_ABS", "MODE_ROW", "AmpArgs", "GradArgs", "check_impl", "resolve_impl",
           *op_table.NAMES]
