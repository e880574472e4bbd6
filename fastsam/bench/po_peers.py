"""The ``pytorch_optimizer`` peer: the SAM-family classes of the pytorch-optimizer package (import name
``pytorch_optimizer``, ``pip install "pytorch-optimizer>=4.1"`` or ``pip install -e ".[bench]"``), a widely used
PyPI collection, as a benchmark row next to the ``loop`` and ``foreach`` peers of :mod:`fastsam.bench.peers`.

Read from pytorch_optimizer 4.1.0 (``pytorch_optimizer/optimizer/sam.py``). Its SAM family is SAM, FriendlySAM,
GSAM, WSAM, BSAM and LookSAM. A method of :data:`fastsam.bench.methods.METHODS` gets this row where a class
does the same math with the same hyper-parameters (:data:`PO_CLASSES`), or the same method with its math differing
in a way that moves the same memory (:data:`DIFFERENT_MATH`: LookSAM):

* ``sam`` -> ``SAM``: ``e = rho T^2 g / (||T g|| + perturb_eps)`` with ``T = |w|`` if ``adaptive`` else 1, the
  eps (1e-12, pinned here to :attr:`fastsam.bench.peers.LoopSAM.eps`) added to the global norm as in davda54/sam,
  a backup ``p.clone()`` per step (popped by ``second_step``), the restore by ``p.copy_``, then the base step.
  ``use_gc`` (gradient centralization, an addition of the package) is pinned off.
* ``friendly_sam`` -> ``FriendlySAM``: at a parameter's first step ``m = g`` and ``d = g``; later
  ``d = g - sigma m`` and ``m <- lmbda m + (1 - lmbda) g`` (the EMA of the raw grad); then SAM's move along d,
  eps added to the norm: the math of :class:`fastsam.bench.family_peers.LoopFriendlySAM`, same defaults
  (rho 0.05, sigma 1, lmbda 0.9) and keyword names. One documented difference, not of the math of a step but of
  where d lives: like the Friendly SAM authors' code, the class writes d into ``p.grad`` in place
  (``grad.sub_(momentum, alpha=sigma)``), where our peers keep ``.grad`` untouched. With a fresh grad at every
  pass (a real training loop, and the tests) the trajectory is the same. The traffic is the same order too: the
  write of d goes into ``.grad`` instead of a temporary (the foreach path with sigma == 1 and lmbda >= 0.5 saves
  the copy of g: ``grads -= m; m += (1 - lmbda) grads``). In the benchmark, whose grads are fixed tensors reused
  by every pass, the values of ``.grad`` then evolve step after step (``g <- g - m``, ``m <- lerp(m, g, 0.1)``: a
  linear map with both eigenvalues of modulus 1, so they oscillate, neither growing nor decaying towards
  denormals), and the base optimizer steps with d rather than g: same ops, same memory moved.

* ``wsam`` -> ``WSAM``: SAM's perturbation (eps 1e-12 added to the norm, T = |w| for ``adaptive`` groups), g0
  cloned, then coupled ``a g1 + (1 - a) g0`` (its ``lerp_``) or decoupled: the base step with g0 and
  ``w -= lr a (g1 - g0)``, a = gamma / (1 - gamma). Its ``max_norm`` clips g1 only (before the mix), where the
  authors' code and fastsam clip g0 and g1: pinned to None (no clipping), where the math is the same. Its first
  argument is a model, used by that clipping only: None here.
* ``looksam`` -> ``LookSAM`` (:data:`DIFFERENT_MATH`): the same steps as the paper's Algorithm 1 (SAM on every
  k-th step keeping g_v, the steps between one pass with ``g + alpha (||g|| / ||g_v||) g_v``), but its cosine and
  norms are per tensor where the paper's are global, and it adds 1e-8 to ``||g_v||`` (fastsam: a g_v of norm 0
  adds nothing). Its step between is ``first_step()`` (which does nothing there) + ``second_step()``
  (:attr:`fastsam.bench.methods.Method.po_steps`), after one pass in an explicit loop; its ``step(closure)``
  runs the closure at w and at the point it is at on every step (200 passes per 100 steps: no pass saved). It
  keeps ``old_p`` and g as fresh clones per SAM step and writes the combined grad into ``p.grad`` in place (the
  benchmark puts its fixed grads back before each timed call). Its trajectory equals fastsam's where per-tensor
  and global norms agree: a single parameter tensor (tests/test_bench_po_peers.py).

Not mapped (no row): ``crsam`` (no CR-SAM class), ``lastsam`` and ``lastsam_orthogonal`` (no LastSAM class, and
``SAM(adaptive=True)`` is SAM's ``T = |w|``, not ASAM's ``T = |w| + eta`` with eps 1e-16), ``gsam`` (its GSAM
takes a model and an rho scheduler and drives its own closure: no first/second step to time; the package marks
it untested, ``pragma: no cover``). BSAM is a standalone Bayesian optimizer (noise, its own Adam-like moments, no
base optimizer).

``foreach``: the classes take ``foreach: bool | None = None``; None batches their own perturbation and restore
with ``torch._foreach_*`` on CUDA only, and leaves the base optimizer at torch's default (SGD: foreach on CUDA,
a per-tensor loop on CPU); an explicit ``True`` batches on CPU too, and reaches the base SGD (SAM adds it to the
base optimizer's kwargs, FriendlySAM through the param groups' ``foreach`` entry). :func:`make` passes
``foreach=True`` by default, as our ``foreach`` peer passes SGD(foreach=True): the package's best on either
device. Whatever ``foreach`` says, their batched path is for fp32/fp64 parameters only: bf16/fp16 parameters
take their per-tensor loop (the base SGD stays foreach). Their backups are fresh ``p.clone()`` per parameter and
step in both paths, and their batched perturbation makes a grad-sized temporary (``_foreach_mul(grads, 1.0)``).
The step calls are ``first_step()`` then ``second_step()`` (``zero_grad=False``), as in davda54/sam and in
:attr:`fastsam.bench.methods.Method.steps`; the base SGD gets ``lr`` and ``momentum`` through the class's
``**kwargs``.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Iterable, Optional

import torch

MODULE = "pytorch_optimizer"  # import name; the PyPI name is pytorch-optimizer
PIP_COMMAND = 'pip install "pytorch-optimizer>=4.1"'

# our method name -> the pytorch_optimizer class doing the same math (see the module docstring)
PO_CLASSES: Dict[str, str] = {
    "sam": "SAM",
    "friendly_sam": "FriendlySAM",
    "wsam": "WSAM",
    "looksam": "LookSAM",
}
# mapped methods whose class's math differs from ours (per tensor instead of global norms): a row for the cost,
# not a parity target
DIFFERENT_MATH = {"looksam"}
# classes whose first argument is the model (WSAM: for its clip_grad_norm_, unused without max_norm)
TAKES_MODEL = {"wsam"}

# our option name -> the class's keyword, per mapped method; an option not listed is refused (ValueError)
OPTION_NAMES: Dict[str, Dict[str, str]] = {
    "sam": {"rho": "rho", "adaptive": "adaptive"},
    "friendly_sam": {"rho": "rho", "sigma": "sigma", "lmbda": "lmbda", "adaptive": "adaptive"},
    "wsam": {"rho": "rho", "gamma": "gamma", "decouple": "decouple", "adaptive": "adaptive"},
    "looksam": {"rho": "rho", "k": "k", "alpha": "alpha", "adaptive": "adaptive"},
}

# keywords pinned to our peers' values, whatever the package's defaults become
PINNED: Dict[str, Dict[str, Any]] = {
    "sam": {"perturb_eps": 1e-12, "use_gc": False},
    "friendly_sam": {"perturb_eps": 1e-12},
    "wsam": {"eps": 1e-12, "max_norm": None},
    "looksam": {"perturb_eps": 1e-12, "use_gc": False},
}

def _module():
    """The imported package, or None when it cannot be imported."""
    try:
        return importlib.import_module(MODULE)
    except Exception:  # not installed, or broken against this torch
        return None


def available() -> bool:
    """Whether pytorch_optimizer can be imported."""
    return _module() is not None


def version() -> Optional[str]:
    """The installed pytorch_optimizer version, or None when it cannot be imported."""
    if not available():
        return None
    try:
        from importlib.metadata import version as dist_version
        return dist_version("pytorch_optimizer")
    except Exception:
        return getattr(_module(), "__version__", None)


def _check(method_name: str) -> str:
    if method_name not in PO_CLASSES:
        raise ValueError(f"pytorch_optimizer has no peer of the method {method_name!r} "
                         f"(peers exist for: {', '.join(PO_CLASSES)})")
    return PO_CLASSES[method_name]


def make(method_name: str, params: Iterable[torch.Tensor], base_optimizer: type = torch.optim.SGD,
         lr: float = 0.1, momentum: float = 0.9, *, foreach: Optional[bool] = True,
         **options) -> torch.optim.Optimizer:
    """The pytorch_optimizer optimizer doing ``method_name``'s step over ``base_optimizer(lr, momentum)``.

    ``options`` override the method's hyper-parameters (``METHODS[method_name].options``); an option given as
    None is left out (the method's default, else the class's). ``foreach`` goes to the class (True: batched
    perturbation/restore on every device and SGD(foreach=True); None: the package default; False: loops).
    Raises ValueError when the method has no peer or an option has no counterpart, ImportError (with the pip
    command) when the package is missing.
    """
    cls_name = _check(method_name)
    module = _module()
    if module is None:
        raise ImportError(f"the pytorch_optimizer peer needs the pytorch-optimizer package: {PIP_COMMAND} "
                          f'(or pip install -e ".[bench]")')
    from fastsam.bench.methods import METHODS  # here, not at the top: methods.py may import this module

    merged = {k: v for k, v in dict(METHODS[method_name].options, **options).items() if v is not None}
    names = OPTION_NAMES[method_name]
    unknown = sorted(set(merged) - set(names))
    if unknown:
        raise ValueError(f"pytorch_optimizer.{cls_name} has no counterpart of the {method_name!r} option(s) "
                         f"{', '.join(unknown)}")
    kw = {names[k]: v for k, v in merged.items()}
    kw.update(PINNED[method_name])
    if foreach is not None:
        kw["foreach"] = foreach
    cls = getattr(module, cls_name)
    lead = (None,) if method_name in TAKES_MODEL else ()
    return cls(*lead, params, base_optimizer, lr=lr, momentum=momentum, **kw)
