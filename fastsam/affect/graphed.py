"""``train --cuda-graph``: the whole training step (both forward/backward passes, the CVaR loss, the fused SAM +
Adam step and the gather of the batch's rows) captured once in a CUDA graph and replayed for every batch.

The graph reads the batch's row indices from a static device tensor, so a step costs one device-to-device copy
of 32 indices and one replay: no Python, no kernel launches of its own. What the capture bakes in, and how
it stays right:

- The batch size: the epoch's last, shorter batch runs eagerly.
- Every float the kernels were launched with, among them the learning rate that the cosine schedule changes
  each epoch: the step is captured again whenever a group's lr (or any other hyperparameter) differs from
  the one it was captured with.
- The host-side choices of the optimizer's step: a step must launch the same kernels each time. It does for
  plain SAM, ASAM, Friendly SAM and CR-SAM once their state exists (the first steps run eagerly, on a side
  stream, before the capture, as torch's CUDA-graph guide asks), and for Adam and AdamW built with
  ``capturable=True`` (step counts on the device). LastSAM switches between its phases on the host, so a
  captured step would keep one phase for ever: it is refused.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

WARMUP_STEPS = 3  # eager steps before the first capture: the optimizer's state and cuBLAS's workspaces get made

StepFn = Callable[[torch.Tensor], torch.Tensor]


def check_cuda_graph(optimizer: str, device: torch.device, interval: int = 1) -> None:
    """Raises ValueError where ``--cuda-graph`` cannot capture the step: an optimizer that picks its kernels on
    the host step by step (LastSAM, any method with interval > 1), or a device other than CUDA."""
    if optimizer in ("lastsam", "looksam"):
        raise ValueError(f"cuda_graph: optimizer {optimizer!r} switches between one- and two-pass steps on the host, "
                         "which a captured step cannot follow; train it without --cuda-graph")
    if interval != 1:
        raise ValueError(f"cuda_graph: interval={interval} alternates one- and two-pass steps on the host, which a "
                         "captured step cannot follow; train it without --cuda-graph or with interval 1")
    if device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device (--device cuda), got device {str(device)!r}")


def _settings(optimizer: torch.optim.Optimizer) -> Tuple[tuple, ...]:
    """The host values a captured step was launched with: every group's scalar hyperparameters (lr first of all)."""
    return tuple(tuple((k, v) for k, v in sorted(g.items())
                       if k != "params" and isinstance(v, (bool, int, float, str, type(None))))
                 for g in optimizer.param_groups)


class GraphedStep:
    """``step(idx)`` (``idx``: int64 ``[B]`` row indices on the GPU; returns the 0-dim loss) run through a CUDA
    graph: the first ``warmup`` calls run eagerly on a side stream, the next one captures ``step`` reading a
    static index tensor, and every later call copies its indices there and replays the graph. A batch of
    another size runs eagerly; a change of the optimizer's hyperparameters (the scheduler's lr) captures again.

    The returned loss of a replay is the graph's output tensor: read it (or add it up) before the next call.
    """

    def __init__(self, step: StepFn, optimizer: torch.optim.Optimizer, batch_size: int,
                 warmup: int = WARMUP_STEPS) -> None:
        self.step, self.optimizer, self.batch_size, self.warmup = step, optimizer, batch_size, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.captures = 0
        self._settings: Optional[tuple] = None
        self._idx: Optional[torch.Tensor] = None
        self._loss: Optional[torch.Tensor] = None

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if len(idx) != self.batch_size:
            return self.step(idx)
        if self.warmup:
            self.warmup -= 1
            return self._on_side_stream(idx)
        if self.graph is None or _settings(self.optimizer) != self._settings:
            self._capture(idx)
        self._idx.copy_(idx)
        self.graph.replay()
        return self._loss

    def _on_side_stream(self, idx: torch.Tensor) -> torch.Tensor:
        side, current = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            loss = self.step(idx)
        current.wait_stream(side)
        return loss

    def _capture(self, idx: torch.Tensor) -> None:
        """Records ``step`` reading a static index buffer like ``idx`` (nothing runs: the caller fills the buffer
        and replays the graph for this batch).
        A host read inside ``step`` fails the capture loudly instead of baking a value in."""
        self.graph = self._loss = None  # the old graph's memory pool goes before the new one is made
        self._idx = torch.empty_like(idx)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._loss = self.step(self._idx)
        self.graph, self._settings = graph, _settings(self.optimizer)
        self.captures += 1
