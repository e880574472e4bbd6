"""The trajectory the benchmark peers' tests compare: a few steps of a row's optimizer with fresh grads at every
pass (as a backward would give: new tensors, different at every pass, so kept grads, EMAs and copies matter)."""
import torch

from fastsam.bench.methods import METHODS
from fastsam.bench.shapes import make_params


def trajectory(method, opt, params, shapes, steps=3, row=None):
    """The parameters after every step call of ``steps`` timed calls of ``opt`` (row ``row`` of ``method`` over
    ``params``, made from ``shapes``; LookSAM: a call is a cycle of k steps), and SGD's momentum buffers (the sums
    of the grads the base optimizer stepped with) after every call."""
    points, momenta = [], []
    for step in range(steps):
        for k, call in enumerate(METHODS[method].calls(row)):
            for p, q in zip(params, make_params(shapes, seed=100 + 10 * step + k)):
                p.grad = q.grad
            getattr(opt, call)()
            points.append(torch.cat([p.detach().flatten() for p in params]))
        momenta.append(torch.cat([opt.base_optimizer.state[p]["momentum_buffer"].flatten() for p in params]))
    return points, momenta
