"""Every fused op declared once: its schema, its Python entry's defaults, its fake and its opcheck samples.

The table is the contract the implementations register against:

* :func:`define` gives torch the schemas (``torch.ops.fastsam.<name>``) and their fakes, whether or not the
  compiled extension is built; the extension (csrc/cpu, csrc/cuda) only registers kernels for them, and
  torch checks at load time that each kernel's C++ signature matches its schema here.
* :mod:`fastsam.ops` builds its entries (``fastsam.ops.perturb_`` ...) from the schemas (see _entries.py):
  the argument names and order are the schema's, so the pure-Python implementations (reference.py,
  triton_kernels.py, cvar_reference.py, triton_cvar.py) take them in that order too.
* The opcheck test runs ``torch.library.opcheck`` on every sample of every op.

Adding an op: a row here, then its implementations (CONTRIBUTING.md lists the files).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from fastsam.ops.cvar_reference import opmath

NAMESPACE = "fastsam"
IN_PLACE = "sam"  # in-place ops on tensor lists, returning nothing (backend family "sam")
FUNCTIONAL = "cvar"  # ops returning new tensors (backend family "cvar")


@dataclass(frozen=True)
class OpSpec:
    """One fused op.

    name: the op's name in torch.ops.fastsam and fastsam.ops.
    schema: its torch.library schema, without the name.
    family: IN_PLACE or FUNCTIONAL.
    lead: the argument whose device picks the implementation; for an IN_PLACE op a tensor list, and the
        call does nothing when it is empty.
    doc: the entry's docstring (the full contract is the reference implementation's docstring).
    samples: () -> argument tuples for torch.library.opcheck, in schema order.
    optional_lists: tensor lists a call may leave out (None in the entry, an empty list to the kernels).
    defaults: defaults of the entry's other trailing arguments.
    fake: the fake (meta) kernel; None for an IN_PLACE op, which returns nothing.
    """

    name: str
    schema: str
    family: str
    lead: str
    doc: str
    samples: Callable[[], List[tuple]]
    optional_lists: Tuple[str, ...] = ()
    defaults: Dict[str, object] = field(default_factory=dict)
    fake: Optional[Callable] = None


# ---------------------------------------------------------------------------------------------- fakes
def _opmath_scalars(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """value and var of a CVaR op: 0-dim, fp64 for fp64 inputs, fp32 otherwise."""
    dtype = opmath(x.dtype)
    return x.new_empty((), dtype=dtype), x.new_empty((), dtype=dtype)


def _cvar_select_fake(losses, alpha):
    return (*_opmath_scalars(losses), torch.empty_like(losses))


def _cvar_fused_fake(logits, *args):
    return (*_opmath_scalars(logits), torch.empty_like(logits))


# -------------------------------------------------------------------------------------------- samples
def _lists():
    """Five tensor lists of one [2, 3, 4] tensor each (w, g, backup, m, v), and fp32 row scales."""
    w, g, b, m, v = (torch.randn(2, 3, 4) for _ in range(5))
    return w, g, b, m, v, [torch.rand(2) + 0.5]


def _amp(*names: str) -> tuple:
    """Sample loss-scaling tensors: inv_scale 0-dim (as GradScaler's), found_inf one element."""
    return tuple({"inv_scale": torch.full((), 0.25), "found_inf": torch.zeros(1)}[n] for n in names)


def _norm_sq_samples():
    w, g, _, m, _, rows = _lists()
    plain = (torch.zeros(1), [g], [w], rows, 2, 0.01, [m], 0.5)
    return [plain, plain + _amp("inv_scale")]


def _row_norm_samples():
    w, _, _, _, _, rows = _lists()
    return [(rows, [w], 0.01)]


def _perturb_samples():
    w, g, b, m, _, rows = _lists()
    plain = ([w], [g], [b], rows, torch.ones(1), 0.05, 1e-12, 2, 0.01, False, [m], 1.0, 0.9)
    return [plain, plain + _amp("inv_scale", "found_inf")]


def _reflect_samples():
    w, g, b, m, v, _ = _lists()
    plain = ([w], [b], [g], torch.ones(1), 0.05, 1e-12, [v], [m])
    return [plain, plain + _amp("inv_scale", "found_inf")]


def _dot_norm_sq_samples():
    _, g, _, _, v, _ = _lists()
    return [(torch.zeros(2), [g], [v])]


def _restore_samples():
    w, _, b, _, _, _ = _lists()
    return [([w], [b])]


def _restore_sgd_samples():
    w, g, b, m, v, _ = _lists()
    plain = ([w], [g], [b], [m], 0.1, 1e-4, 0.9, 0.0, True, False, False, [v], [], torch.rand(3))
    return [plain, plain + _amp("inv_scale", "found_inf")]


def _restore_adam_samples():
    w, g, b, m, v, _ = _lists()
    head = ([w], [g], [b], [m], [v.abs()], 1e-3, 0.9, 0.999, 1e-2, 1e-8, True, False, 3.0, [], [], None)
    return [head + (None, None, []), head + _amp("inv_scale", "found_inf") + ([torch.tensor(3.0)],)]


def _cvar_select_samples():
    return [(torch.randn(10), 0.3)]


def _cvar_cross_entropy_samples():
    return [(torch.randn(6, 4), torch.tensor([0, 3, -1, 2, 1, 1]), 0.5, -1, 0.1)]


def _cvar_bce_samples():
    return [(torch.randn(5, 3), torch.tensor([[0.0, 1, -1]] * 5), torch.rand(3) + 0.5, 0.4, True, -1.0)]


# ---------------------------------------------------------------------------------------------- table
# The argument named "t_mode" in the schemas is "mode" in fastsam.ops: torch.library's mode redirection takes
# a keyword argument "mode" of its own.
PY_NAMES = {"t_mode": "mode"}

OPS: Tuple[OpSpec, ...] = (
    OpSpec(
        "norm_sq_",
        "(Tensor(a!) acc, Tensor[] grads, Tensor[] params, Tensor[] row_scales, int t_mode, float eta, "
        "Tensor[] ema, float sigma, Tensor? inv_scale=None) -> ()",
        IN_PLACE, "grads",
        """``acc += sum_j ||T_j d_j||^2`` (fp32 ``acc`` of shape [1]), ``d = g - sigma * ema`` (``g`` without
        ``ema``), with the grads unscaled by ``amp.inv_scale`` when given; see reference.norm_sq_.""",
        optional_lists=("ema",), defaults={"sigma": 0.0}, samples=_norm_sq_samples,
    ),
    OpSpec(
        "row_norm_", "(Tensor(a!)[] out, Tensor[] params, float eta) -> ()", IN_PLACE, "params",
        """``out[j][r] = ||params[j][r]||_2 + eta`` per output filter; see reference.row_norm_.""",
        samples=_row_norm_samples,
    ),
    OpSpec(
        "perturb_",
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor[] row_scales, Tensor norm_sq, "
        "float rho, float eps, int t_mode, float eta, bool sign, Tensor(c!)[] ema, float sigma, float lmbda, "
        "Tensor? inv_scale=None, Tensor? found_inf=None) -> ()",
        IN_PLACE, "params",
        """Back up w and move it to ``w + e`` along ``d = g - sigma * ema``; update the EMA
        ``ema <- lmbda * ema + (1 - lmbda) * g`` (with ``lmbda=0``: a copy of g). ``amp.inv_scale`` unscales
        the grads; a nonzero ``amp.found_inf`` leaves w and the EMA as they are; see reference.perturb_.""",
        optional_lists=("ema",), defaults={"sigma": 0.0, "lmbda": 0.0}, samples=_perturb_samples,
    ),
    OpSpec(
        "reflect_",
        "(Tensor(a!)[] params, Tensor[] backups, Tensor[] dirs, Tensor norm_sq, float rho, float eps, "
        "Tensor[] grads, Tensor(b!)[] grad_copies, Tensor? inv_scale=None, Tensor? found_inf=None) -> ()",
        IN_PLACE, "params",
        """``w <- backup - rho / (sqrt(norm_sq) + eps) * dir`` (CR-SAM's ``w - e``; ``w <- backup`` when
        ``amp.found_inf`` is nonzero), and copy ``grads`` (unscaled by ``amp.inv_scale``) into ``grad_copies``
        in the same pass; see reference.reflect_.""",
        optional_lists=("grads", "grad_copies"), samples=_reflect_samples,
    ),
    OpSpec(
        "dot_norm_sq_", "(Tensor(a!) acc, Tensor[] a, Tensor[] b) -> ()", IN_PLACE, "a",
        """``acc[0] += sum <a_j, b_j>``, ``acc[1] += sum ||b_j||^2`` (fp32 ``acc`` of shape [2]).""",
        samples=_dot_norm_sq_samples,
    ),
    OpSpec(
        "restore_", "(Tensor(a!)[] params, Tensor[] backups) -> ()", IN_PLACE, "params",
        """``params[j] <- backups[j]`` exactly.""",
        samples=_restore_samples,
    ),
    OpSpec(
        "restore_sgd_",
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor(b!)[] momentum_buffers, float lr, "
        "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, bool init_momentum, "
        "Tensor[] grads_b, Tensor[] grads_c, Tensor? coef, Tensor? inv_scale=None, Tensor? found_inf=None) -> ()",
        IN_PLACE, "params",
        """Restore w (unless ``backups`` is empty), then one torch.optim.SGD step with the grad ``g`` or, with
        ``grad``, ``coef[0] g + coef[1] g_b + coef[2] g_c`` (``g`` unscaled by ``amp.inv_scale``), unless
        ``amp.found_inf`` is nonzero; see reference.restore_sgd_.""",
        samples=_restore_sgd_samples,
    ),
    OpSpec(
        "restore_adam_",
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "float lr, float beta1, float beta2, float weight_decay, float eps, bool decoupled, bool maximize, "
        "float step, Tensor[] grads_b, Tensor[] grads_c, Tensor? coef, Tensor? inv_scale, Tensor? found_inf, "
        "Tensor[] steps) -> ()",
        IN_PLACE, "params",
        """Restore w (unless ``backups`` is empty), then one torch.optim.Adam / AdamW step with the grad ``g``
        or, with ``grad``, ``coef[0] g + coef[1] g_b + coef[2] g_c`` (``g`` unscaled by ``amp.inv_scale``),
        unless ``amp.found_inf`` is nonzero; the step counts are ``steps`` (device tensors) when given, else
        ``step``; see reference.restore_adam_.""",
        optional_lists=("steps",), samples=_restore_adam_samples,
    ),
    # CVaR: value and var are 0-dim in opmath (fp32, fp64 for fp64).
    OpSpec(
        "cvar_select", "(Tensor losses, float alpha) -> (Tensor value, Tensor var, Tensor weights)",
        FUNCTIONAL, "losses",
        """``(value, var, weights)`` of CVaR_alpha over ``losses`` ([n], contiguous); see cvar_reference.""",
        fake=_cvar_select_fake, samples=_cvar_select_samples,
    ),
    OpSpec(
        "cvar_cross_entropy",
        "(Tensor logits, Tensor target, float alpha, int ignore_index, float label_smoothing) "
        "-> (Tensor value, Tensor var, Tensor grad_logits)",
        FUNCTIONAL, "logits",
        """``(value, var, grad_logits)`` of CVaR_alpha over per-sample cross-entropies; logits [n, C]
        contiguous, target [n] int64; see cvar_reference.""",
        fake=_cvar_fused_fake, samples=_cvar_cross_entropy_samples,
    ),
    OpSpec(
        "cvar_bce_with_logits",
        "(Tensor logits, Tensor target, Tensor? pos_weight, float alpha, bool per_sample, float ignore_index) "
        "-> (Tensor value, Tensor var, Tensor grad_logits)",
        FUNCTIONAL, "logits",
        """``(value, var, grad_logits)`` of CVaR_alpha over BCE-with-logits losses; logits and target [n, L]
        of one dtype, contiguous; pos_weight None or fp32 [L]; see cvar_reference.""",
        fake=_cvar_fused_fake, samples=_cvar_bce_samples,
    ),
)

BY_NAME: Dict[str, OpSpec] = {op.name: op for op in OPS}
NAMES: Tuple[str, ...] = tuple(BY_NAME)


def _arguments(spec: OpSpec):
    return torch._C.parse_schema(f"{NAMESPACE}::{spec.name}{spec.schema}").arguments


def argument_names(spec: OpSpec) -> List[str]:
    """The schema's argument names in order, as fastsam.ops names them."""
    return [PY_NAMES.get(a.name, a.name) for a in _arguments(spec)]


def list_arguments(spec: OpSpec) -> Set[str]:
    """The names (as fastsam.ops names them) of the schema's tensor-list arguments."""
    return {PY_NAMES.get(a.name, a.name) for a in _arguments(spec) if isinstance(a.type, torch.ListType)}


_defined = False


def define() -> None:
    """Gives torch every op's schema and fake (once per process); the kernels come from the backends."""
    global _defined
    if _defined:
        return
    for op in OPS:
        qualname = f"{NAMESPACE}::{op.name}"
        torch.library.define(qualname, op.schema)
        torch.library.register_fake(qualname)(op.fake or _returns_nothing)
    _defined = True


def _returns_nothing(*args, **kwargs):
    return None
