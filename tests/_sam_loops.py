"""Small models, data and straightforward per-parameter loops of the math of docs/design.md: the oracles of the
optimizer tests."""
import math

import torch
import torch.nn as nn

import fastsam
from fastsam.utils import frozen_bn_stats

from _impls import impl_params

CPU_IMPLS = [p for p in impl_params() if p.values[0] == "cpu"]
# The trajectory tests against the authors' loops run on every device: the cuda ids on a GPU (make gpu-check),
# with the model and its batches on that device.
ALL_IMPLS = impl_params()


def small_cnn(activation=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), activation(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), activation(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def batches(model, n=20):
    """n batches of inputs and labels for ``model``, on its device (drawn on the CPU: the same on every device)."""
    g = torch.Generator().manual_seed(1)
    shape = (8, 3, 6, 6) if isinstance(model[0], nn.Conv2d) else (8, 12)
    device = next(model.parameters()).device
    return [(torch.randn(shape, generator=g).to(device), torch.randint(0, 5, (8,), generator=g).to(device))
            for _ in range(n)]


def global_norm(tensors):
    """The 2-norm over all of ``tensors``: the norms per tensor, stacked (as the authors' loops compute it)."""
    return torch.norm(torch.stack([t.norm(2) for t in tensors]), 2)


def loss_at(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def operator_fn(kind, eta=0.0):
    """T(w, name) of the loop implementations: None means identity."""
    def t(w, name):
        if kind == "none" or (kind != "adaptive" and "weight" not in name):
            return None
        if kind == "filterwise" and w.dim() >= 3:
            return w.reshape(w.shape[0], -1).norm(dim=1).add(eta).view(-1, *([1] * (w.dim() - 1))).expand_as(w)
        return w.abs() + eta
    return t


def loop_sam(model, base, data, rho, p, t_fn, eps, orthogonal=False):
    """davda54/sam's algorithm written out per parameter (for ASAM: the official algorithm with a
    backup restore). ``orthogonal``: LastSAM's projection of the SAM grad off the first-pass grad."""
    named = [(n, w) for n, w in model.named_parameters()]
    for batch in data:
        loss_at(model, batch).backward()
        plain = {n: w.grad.clone() for n, w in named if w.grad is not None} if orthogonal else None
        ts = {n: t_fn(w.detach(), n) for n, w in named}
        tg = [(ts[n] if ts[n] is not None else 1.0) * w.grad for n, w in named if w.grad is not None]
        norm = torch.norm(torch.stack([x.norm(2) for x in tg]), 2)
        old = {}
        with torch.no_grad():
            for n, w in named:
                if w.grad is None:
                    continue
                old[n] = w.detach().clone()
                t = ts[n] if ts[n] is not None else 1.0
                e = rho * t * torch.sign(w.grad) if p == math.inf else rho / (norm + eps) * t * t * w.grad
                w.add_(e)
        second_pass_and_restore(model, base, batch, old)
        with torch.no_grad():
            if orthogonal:
                dot = sum((w.grad * plain[n]).sum() for n, w in named)
                norm_sq = sum((g * g).sum() for g in plain.values())
                for n, w in named:
                    w.grad -= dot / (norm_sq + 1e-12) * plain[n]
        base.step()
        base.zero_grad()


def second_pass_and_restore(model, base, batch, old):
    """The backward pass at w + e (BatchNorm stats frozen), then w back from the copies ``old`` (by name)."""
    base.zero_grad()
    with frozen_bn_stats(model):
        loss_at(model, batch).backward()
    with torch.no_grad():
        for n, w in model.named_parameters():
            if n in old:
                w.copy_(old[n])


def closure_for(model, batch, calls):
    """A closure for opt.step: forward and backward at the current point, BatchNorm stats frozen after the
    first call; appends to ``calls`` per call."""
    def closure():
        calls.append(1)
        if len(calls) > 1:
            with frozen_bn_stats(model):
                loss = loss_at(model, batch)
        else:
            loss = loss_at(model, batch)
        loss.backward()
        return loss
    return closure


def explicit_step(model, opt, batch):
    """One step of the documented explicit loop of any fastsam optimizer (README "Use it"): the backward at w,
    first_step, the later passes with BatchNorm statistics frozen, second_step (CR-SAM: second_step, pass 3,
    third_step with the three losses); LastSAM before its switch: one pass and step()."""
    if not opt.sharpness_active:
        loss_at(model, batch).backward()
        opt.step()
        opt.zero_grad()
        return
    loss0 = loss_at(model, batch)
    loss0.backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        loss_plus = loss_at(model, batch)
        loss_plus.backward()
        if isinstance(opt, fastsam.CRSAM):
            opt.second_step(zero_grad=True)
            loss_minus = loss_at(model, batch)
            loss_minus.backward()
            opt.third_step(zero_grad=True, losses=(loss0, loss_plus, loss_minus))
        else:
            opt.second_step(zero_grad=True)


def fast_sam(model, opt, data):
    for batch in data:
        loss_at(model, batch).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            loss_at(model, batch).backward()
        opt.second_step(zero_grad=True)


def assert_models_close(a, b, rtol=1e-5, atol=1e-6):
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3)),  # generic path: restore, then base.step()
}


def sam_step_fn(model, opt):
    """``step(x, y)``: one SAM step of ``model`` on a batch with cross-entropy (pass at w, ``first_step``, pass at
    w + e, ``second_step``), returning the detached loss at w + e; for compiled and CUDA-graph-captured steps."""
    def step(x, y):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)
        return loss.detach()
    return step
