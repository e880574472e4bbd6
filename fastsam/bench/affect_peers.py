"""The affect table: whole training steps of the affect MLP (two forward/backward passes, CVaR, SAM + Adam).

Every row runs the same step on the same model, batch and seed: the loss at w and its backward, SAM's
``first_step``, the loss at w + e (BatchNorm statistics frozen) and its backward, ``second_step``. Only the
optimizer and the CVaR loss differ:

``loop``: the per-parameter SAM of :class:`fastsam.bench.peers.LoopSAM` (davda54/sam's algorithm) and the
affect paper authors' CVaR (a host-synchronising Brent search of lambda per loss evaluation): the authors'
training loop. ``foreach``: :class:`fastsam.bench.peers.ForeachSAM` and the ``torch.topk`` composite CVaR:
the best of stock PyTorch. ``fastsam:<impl>``: fastsam.SAM and the fused CVaR loss on that impl.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

import fastsam
from fastsam.affect.model import AffectMLP
from fastsam.bench import cvar_peers
from fastsam.bench.peers import PEERS, ForeachSAM, LoopSAM, fastsam_impls
from fastsam.utils import frozen_bn_stats

BATCH, DIM, CLASSES = 32, 768, 8  # the paper's batch, CLIP ViT-L/14's feature width, the EXPR classes
ALPHA, RHO, LR = 0.3, 0.05, 1e-3  # the paper preset

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def affect_rows(device: str | torch.device, impls: Optional[Sequence[str]] = None) -> List[str]:
    """Rows of the affect table: the peers, then ``impls`` (default: the fastsam impls worth timing)."""
    return [*PEERS, *(fastsam_impls(device) if impls is None else impls)]


def make_row(row: str, device: str | torch.device = "cpu", seed: int = 0
             ) -> Tuple[AffectMLP, torch.optim.Optimizer, LossFn, torch.Tensor, torch.Tensor]:
    """``(model, optimizer, loss_fn, features, target)`` of a row: a fresh AffectMLP (train mode), its SAM
    around Adam (lr 1e-3, rho 0.05), the row's CVaR cross-entropy and a batch of random features [32, 768]
    with random classes, all from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AffectMLP(CLASSES, in_dim=DIM).to(device).train()
    features = torch.randn(BATCH, DIM, generator=gen).to(device)
    target = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(device)
    params = list(model.parameters())
    if row == "loop":
        opt = LoopSAM(params, torch.optim.Adam, rho=RHO, lr=LR, foreach=False)
        loss_fn: LossFn = cvar_peers.authors_cvar_cross_entropy
    elif row == "foreach":
        opt = ForeachSAM(params, torch.optim.Adam, rho=RHO, lr=LR)
        loss_fn = cvar_peers.composite_cvar_cross_entropy
    else:
        opt = fastsam.SAM(params, torch.optim.Adam, rho=RHO, lr=LR, impl=row)
        loss_fn = cvar_peers.fastsam_cvar_cross_entropy(row)
    return model, opt, loss_fn, features, target


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, features: torch.Tensor,
            target: torch.Tensor, alpha: float = ALPHA) -> Callable[[], None]:
    """One training step of a row: two forward/backward passes around SAM's two steps."""
    def step() -> None:
        loss_fn(model(features), target, alpha).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_fn(model(features), target, alpha).backward()
        opt.second_step(zero_grad=True)
    return step
