"""The CVaR losses fastsam's fused ``cvar_cross_entropy`` is compared with, and the rows of the CVaR table.

CVaR_alpha of the per-sample cross-entropies ``l`` of ``n`` rows (Rockafellar-Uryasev) is
``min over lambda of lambda + 1/alpha mean((l - lambda)_+)``, exactly the mean of the ``k = alpha n`` largest
losses with the ``ceil(k)``-th at the fractional weight ``(k - floor(k)) / k`` (fastsam.ops.cvar_reference).

``composite``: stock torch ops for that exact form: per-sample ``F.cross_entropy``, ``torch.topk`` of the
``floor(k) + 1`` largest, a weighted sum (``1/k`` each, ``(k - floor(k))/k`` for the last); the best a careful
user writes without a custom kernel.
``authors``: the affect paper authors' approach: the Rockafellar-Uryasev objective minimised over lambda by
Brent's bounded method (``scipy.optimize.fminbound``, what their code calls, when scipy is installed;
otherwise :mod:`fastsam.bench.brent`, written to the same rules: :func:`minimiser` says which) on
``[min(l) - 1000, max(l)]``, every objective evaluation a ``.item()`` (one host sync each), then the objective
at the found lambda (a Python float) as the loss. The evaluations run on ``l.detach()`` without autograd,
which is the cheapest way to write them: evaluations on the graph would only add work.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastsam.bench.brent import Minimum, fminbound
from fastsam.bench.peers import fastsam_impls
from fastsam.losses import cvar_cross_entropy

CVAR_PEERS = ("composite", "authors")
CLASSES = 8  # the affect task's classes
ALPHA = 0.3
CVAR_ROWS = (32, 4096, 262144)  # a batch, a large batch, a full-dataset pass
BRACKET = 1000.0  # the authors' lower end of the lambda search: min(l) - 1000
XTOL, MAXFUN = 1e-5, 500  # scipy.optimize.fminbound's defaults, as the authors called it


def composite_cvar_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """CVaR_alpha of the per-sample cross-entropies by ``torch.topk`` and a weighted sum (``k`` from ``n`` on the
    host: no sync)."""
    losses = F.cross_entropy(logits, target, reduction="none")
    n = losses.numel()
    k = alpha * n
    whole = math.floor(k)
    top = torch.topk(losses, min(whole + 1, n), sorted=True).values
    weights = torch.full((top.numel(),), 1.0 / k, dtype=losses.dtype, device=losses.device)
    if whole < n:
        weights[whole] = (k - whole) / k
    return (top * weights).sum()


@functools.lru_cache(maxsize=None)  # looked up once: the authors' row calls it in every timed step
def minimiser() -> Tuple[Callable[..., Minimum], str]:
    """The authors' bounded minimiser ``(f, lower, upper, xtol, maxfun) -> Minimum`` and its name for the
    report: ``scipy.optimize.fminbound`` when scipy is installed (an extra), else fastsam's own Brent."""
    try:
        import scipy
        from scipy.optimize import fminbound as scipy_fminbound
    except ImportError:
        return fminbound, "fastsam.bench.brent.fminbound (scipy is not installed)"

    def run(f: Callable[[float], float], lower: float, upper: float, xtol: float, maxfun: int) -> Minimum:
        x, fun, flag, nfev = scipy_fminbound(f, lower, upper, xtol=xtol, maxfun=maxfun, full_output=True, disp=0)
        return Minimum(float(x), float(fun), int(nfev), converged=flag == 0)  # flag 1: maxfun reached
    return run, f"scipy.optimize.fminbound (scipy {scipy.__version__})"


def authors_lambda(losses: torch.Tensor, alpha: float) -> Minimum:
    """The authors' lambda search: Brent's bounded method (:func:`minimiser`) over the Rockafellar-Uryasev
    objective, one ``.item()`` per evaluation, on the bracket ``[min(l) - 1000, max(l)]`` read on the host
    through numpy."""
    detached = losses.detach()
    host = detached.cpu().float().numpy()  # numpy has no bf16

    def objective(lam: float) -> float:
        with torch.no_grad():
            return (lam + torch.relu(detached - lam).mean() / alpha).item()

    search, _ = minimiser()
    return search(objective, float(host.min()) - BRACKET, float(host.max()), xtol=XTOL, maxfun=MAXFUN)


def authors_cvar_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float,
                               search: Optional[List[Minimum]] = None) -> torch.Tensor:
    """CVaR_alpha of the per-sample cross-entropies as the authors compute it: lambda from
    :func:`authors_lambda`, then ``lambda + 1/alpha mean(relu(l - lambda))``; ``search`` (a list) receives
    the search's result."""
    losses = F.cross_entropy(logits, target, reduction="none")
    found = authors_lambda(losses, alpha)
    if search is not None:
        search.append(found)
    return found.x + torch.relu(losses - found.x).mean() / alpha


def fastsam_cvar_cross_entropy(impl: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """fastsam's fused loss on ``impl``."""
    def loss(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
        return cvar_cross_entropy(logits, target, alpha, impl=impl)
    return loss


def cvar_loss_fn(row: str) -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """The loss of a row of the CVaR table: a peer ("composite", "authors") or a fastsam impl."""
    peers: Dict[str, Callable] = {"composite": composite_cvar_cross_entropy, "authors": authors_cvar_cross_entropy}
    return peers[row] if row in peers else fastsam_cvar_cross_entropy(row)


def cvar_rows(device: str | torch.device, impls: Optional[Sequence[str]] = None) -> List[str]:
    """Rows of the CVaR table: the peers, then ``impls`` (default: :func:`fastsam.bench.peers.fastsam_impls`)."""
    return [*CVAR_PEERS, *(fastsam_impls(device) if impls is None else impls)]


def make_logits(n: int, classes: int = CLASSES, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, target)``: a leaf ``[n, classes]`` of random logits (std 2: losses from ~0 to ~10, as a
    classifier early in training) requiring grad, and random int64 class indices."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen, device=device).mul_(2.0).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (n,), generator=gen, device=device)
    return logits, target


def evaluate(row: str, logits: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA) -> Tuple[float, Optional[int]]:
    """The loss of a row (a float) and, for the authors' row, the objective evaluations of its search (else None)."""
    searches: List[Minimum] = []
    if row == "authors":
        loss = authors_cvar_cross_entropy(logits, target, alpha, searches)
    else:
        loss = cvar_loss_fn(row)(logits, target, alpha)
    return loss.detach().item(), (searches[0].nfev if searches else None)


def step_fn(row: str, logits: torch.Tensor, target: torch.Tensor, alpha: float = ALPHA) -> Callable[[], None]:
    """One timed call of a row: the loss and its backward into ``logits.grad`` (cleared first, as a training
    step's zero_grad(set_to_none=True))."""
    loss_fn = cvar_loss_fn(row)

    def step() -> None:
        logits.grad = None
        loss_fn(logits, target, alpha).backward()
    return step
