"""torch.compile (inductor, CPU) through the fused ops, the CVaR loss and a whole SAM training step.

Each case compiles a fresh copy of a computation and compares it with the same computation run eagerly
on the same inputs; graph breaks are counted by dynamo's own counters.
"""
import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import fastsam
import fastsam.ops as ops
from fastsam import _extension
from fastsam.losses import functional as F

from _sam_loops import sam_step_fn

pytestmark = pytest.mark.skipif(not _extension.has_extension(), reason="fastsam._C is not built")

# The graph breaks a compiled SAM step may keep, none of them in fastsam's ops:
ALLOWED_BREAKS = (
    "Tensor.backward()",  # the user's backward passes: dynamo does not trace them
    # SAM.zero_grad calls Optimizer.zero_grad, which dynamo never traces. Tracing past it would not help:
    # dynamo drops attribute writes on optimizer objects (pytorch#171590), such as SAM's step state.
    "Optimizer.zero_grad",
)
# torch.optim's own breaks around a base optimizer's step (optimizer.py, _use_grad): only a compiled Adam
# step takes torch's update (its step count must stay a tensor); SGD's stays in the fused kernel.
TORCH_STEP_BREAK = "torch._dynamo.graph_break()"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _breaks():
    """{reason: count} of the graph breaks since the last reset (a reason: its message and explanation)."""
    return {" / ".join(reason.splitlines()[:2]): n for reason, n in counters["graph_break"].items()}


def _sam_norm_and_perturb(params, grads, backups, acc):
    acc.zero_()
    ops.norm_sq_(acc, grads, params, [], ops.MODE_IDENTITY, 0.0, impl="cpu")
    ops.perturb_(params, grads, backups, [], acc, 0.05, 1e-12, ops.MODE_IDENTITY, 0.0, False, impl="cpu")
    return acc


def test_fused_ops_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,)]
    grads = [torch.randn(s, generator=g) for s in shapes]
    eager = ([torch.randn(s, generator=g) for s in shapes], [torch.empty(s) for s in shapes], torch.zeros(1))
    compiled = ([p.clone() for p in eager[0]], [torch.empty(s) for s in shapes], torch.zeros(1))
    _sam_norm_and_perturb(eager[0], grads, *eager[1:])
    torch.compile(_sam_norm_and_perturb, backend="inductor", fullgraph=True)(compiled[0], grads, *compiled[1:])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not counters["graph_break"]


def _cvar_loss(model, x, target):
    return F.cvar_cross_entropy(model(x), target, alpha=0.5, label_smoothing=0.1, impl="cpu")


def test_cvar_loss_forward_backward_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(8, 6, generator=g), torch.tensor([0, 3, -1, 2, 1, 1, 3, 0])
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    eager_loss = _cvar_loss(model, x, target)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    loss = torch.compile(_cvar_loss, backend="inductor", fullgraph=True)(model, x, target)
    grads = torch.autograd.grad(loss, list(model.parameters()))  # through the compiled backward
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(eager_grads, grads):
        torch.testing.assert_close(b, a)
    assert not counters["graph_break"]


def _sam_training_step(base, kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = fastsam.SAM(model.parameters(), base, rho=0.05, impl="cpu", **kwargs)
    return model, sam_step_fn(model, opt)


@pytest.mark.parametrize("base, kwargs, allowed", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3), ALLOWED_BREAKS),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3), ALLOWED_BREAKS + (TORCH_STEP_BREAK,)),
], ids=["sgd", "adam"])
def test_sam_training_step_compiles_like_eager(base, kwargs, allowed):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    eager_model, eager_step = _sam_training_step(base, kwargs)
    model, step = _sam_training_step(base, kwargs)
    step = torch.compile(step, backend="inductor")
    for x, y in data:
        torch.testing.assert_close(step(x, y), eager_step(x, y))
        for a, b in zip(eager_model.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    breaks = _breaks()
    assert all(any(ok in reason for ok in allowed) for reason in breaks), breaks
