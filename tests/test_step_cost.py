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


@pytest.mark.skipif(not _extension.impl_works_on("cpu", "cpu"), reason="fastsam._C is not built")
@pytest.mark.parametrize("base,kwargs", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                         (torch.optim.AdamW, dict(lr=1e-3))])
def test_step_op_count_is_independent_of_parameter_count(base, kwargs):
    counts = []
    for n in (3, 200):
        params = params_with_grads(n)
        opt = fastsam.SAM(params, base, impl="cpu", **kwargs)
        opt.first_step()
        opt.second_step()  # the first step makes the lazy state
        ptrs = [p.data_ptr() for p in params] + [opt.state[p]["backup"].data_ptr() for p in params]
        with CountOps() as mode:
            opt.first_step()
            opt.second_step()
        counts.append(mode.calls)
        assert [p.data_ptr() for p in params] + [opt.state[p]["backup"].data_ptr() for p in params] == ptrs
    fused = {k: v for k, v in counts[1].items() if k.startswith("fastsam.")}
    assert fused == {"fastsam.norm_sq_": 1, "fastsam.perturb_": 1,
                     f"fastsam.restore_{'sgd' if base is torch.optim.SGD else 'adam'}_": 1}
    # the remaining torch ops (zeroing the norm, Adam's step counters) do not scale with the parameters
    assert counts[0] == counts[1], (counts[0], counts[1])
    assert not any(k.startswith(("aten.empty", "aten.clone", "aten.zeros")) for k in counts[1]), counts[1]
