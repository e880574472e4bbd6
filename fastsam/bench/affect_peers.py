"""The affect table: training steps of the affect MLP (two forward/backward passes, CVaR, SAM + Adam) over a
synthetic feature bank, as ``python -m fastsam.affect train`` runs them.

Every row runs the same step on the same model, bank and seed: the loss at w and its backward, SAM's
``first_step``, the loss at w + e (BatchNorm statistics frozen) and its backward, ``second_step``. The batches
come from a bank of ``rows`` fp16 feature rows held in memory (on the GPU where there is one), gathered by the
shuffled order of :func:`fastsam.affect.train.batch_order`, with the loss summed on the device: the data path
of ``fastsam.affect train``, the same for every row. Only the optimizer and the CVaR loss differ:

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
from fastsam.affect.train import batch_order
from fastsam.bench import cvar_peers
from fastsam.bench.peers import PEERS, ForeachSAM, LoopSAM, fastsam_impls
from fastsam.utils import frozen_bn_stats

BATCH, DIM, CLASSES = 32, 768, 8  # the paper's batch, CLIP ViT-L/14's feature width, the EXPR classes
ALPHA, RHO, LR = 0.3, 0.05, 1e-3  # the paper preset
BANK_ROWS = 100_000  # the synthetic bank: 3,125 steps an epoch at batch 32 (Aff-Wild2's EXPR set: ~18,000)
STEPS_PER_CALL = 20  # training steps per timed call

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def affect_rows(device: str | torch.device, impls: Optional[Sequence[str]] = None) -> List[str]:
    """Rows of the affect table: the peers, then ``impls`` (default: the fastsam impls worth timing)."""
    return [*PEERS, *(fastsam_impls(device) if impls is None else impls)]


def make_row(row: str, device: str | torch.device = "cpu", seed: int = 0
             ) -> Tuple[AffectMLP, torch.optim.Optimizer, LossFn]:
    """``(model, optimizer, loss_fn)`` of a row: a fresh AffectMLP (train mode, initialised from ``seed``), its
    SAM around Adam (lr 1e-3, rho 0.05) and the row's CVaR cross-entropy ``loss_fn(logits, target, alpha)``."""
    torch.manual_seed(seed)
    model = AffectMLP(CLASSES, in_dim=DIM).to(device).train()
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
    return model, opt, loss_fn


def step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: LossFn, alpha: float = ALPHA) -> StepFn:
    """One training step of a row on a batch ``(x [B, D] float32, y [B] int64)``, returning the loss at w
    (0-dim, detached, not read): two forward/backward passes around SAM's two steps."""
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y, alpha)
        loss.backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_fn(model(x), y, alpha).backward()
        opt.second_step(zero_grad=True)
        return loss.detach()
    return step


def make_bank(rows: int = BANK_ROWS, device: str | torch.device = "cpu", seed: int = 0
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A synthetic EXPR bank as training holds it: features fp16 ``[rows, 768]`` (an extracted bank's dtype)
    and classes int64 ``[rows]``, on ``device``, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, DIM, generator=gen).to(torch.float16)
    return features.to(device), torch.randint(0, CLASSES, (rows,), generator=gen).to(device)


class BankSteps:
    """Each call runs the next ``steps`` training steps of ``step`` over the bank ``(features, labels)``: batches
    of ``batch`` rows in a shuffled order (:func:`fastsam.affect.train.batch_order`, a new one each epoch),
    gathered on the bank's device and converted to float32, the losses summed on the device (``total``).

    ``steps_per_epoch``: the batches of one epoch (a last batch of one row is dropped, as in training).
    """

    def __init__(self, step: StepFn, features: torch.Tensor, labels: torch.Tensor, batch: int = BATCH,
                 steps: int = STEPS_PER_CALL, seed: int = 0) -> None:
        self.step, self.features, self.labels, self.batch, self.steps = step, features, labels, batch, steps
        self.gen = torch.Generator().manual_seed(seed)
        self.total = torch.zeros((), dtype=torch.float64, device=features.device)
        self.steps_per_epoch = self._new_epoch()

    def _new_epoch(self) -> int:
        """Draws the next epoch's order; returns its number of batches."""
        self.order, spans = batch_order(len(self.features), self.batch, self.gen, self.features.device)
        self._spans = iter(spans)
        return len(spans)

    def _next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        span = next(self._spans, None)
        if span is None:  # the epoch is over
            self._new_epoch()
            span = next(self._spans)
        idx = self.order[span[0]:span[1]]
        return self.features.index_select(0, idx).float(), self.labels.index_select(0, idx)

    def __call__(self) -> None:
        for _ in range(self.steps):
            self.total += self.step(*self._next_batch()).double()
