"""A fused step's cost does not grow with the number of parameters: O(1) op calls, no new buffers."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastsam
from fastsam import _extension


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def params_with_grads(n):
    ps = [torch.nn.Parameter(torch.randn(7, 5)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


METHODS = {
    "sam": (lambda ps, base, kw: fastsam.SAM(ps, base, impl="cpu", **kw), (), ("norm_sq_", "perturb_")),
    "friendly_sam": (lambda ps, base, kw: fastsam.FriendlySAM(ps, base, impl="cpu", **kw), (),
                     ("norm_sq_", "perturb_")),
    "crsam": (lambda ps, base, kw: fastsam.CRSAM(ps, base, impl="cpu", **kw), ("third_step",),
              ("norm_sq_", "perturb_", "reflect_")),
    "lastsam_orthogonal": (lambda ps, base, kw: fastsam.LastSAM(ps, base, switch_at=0, orthogonal=True, impl="cpu",
                                                               **kw), (), ("norm_sq_", "perturb_", "dot_norm_sq_")),
}


def run_step(opt, extra):
    opt.first_step()
    opt.second_step()
    for name in extra:
        getattr(opt, name)()


@pytest.mark.skipif(not _extension.impl_works_on("cpu", "cpu"), reason="fastsam._C is not built")
@pytest.mark.parametrize("base,kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                         (torch.optim.AdamW, dict(lr=1e-3))], ids=["sgd", "adamw"])
@pytest.mark.parametrize("method", list(METHODS))
def test_step_op_count_is_independent_of_parameter_count(base, kwargs, method):
    make, extra, perturb_ops = METHODS[method]
    counts = []
    for n in (3, 200):
        params = params_with_grads(n)
        opt = make(params, base, kwargs)
        run_step(opt, extra)  # the first step makes the lazy state
        ptrs = [p.data_ptr() for p in params] + [opt.state[p]["backup"].data_ptr() for p in params]
        with CountOps() as mode:
            run_step(opt, extra)
        counts.append(mode.calls)
        assert [p.data_ptr() for p in params] + [opt.state[p]["backup"].data_ptr() for p in params] == ptrs
    fused = {k: v for k, v in counts[1].items() if k.startswith("fastsam.")}
    update = f"restore_{'sgd' if base is torch.optim.SGD else 'adam'}_"
    assert fused == {f"fastsam.{name}": 1 for name in perturb_ops + (update,)}
    # the remaining torch ops (zeroing the norm, Adam's step counters) do not scale with the parameters
    assert counts[0] == counts[1], (counts[0], counts[1])
    assert not any(k.startswith(("aten.empty", "aten.clone", "aten.zeros")) for k in counts[1]), counts[1]
