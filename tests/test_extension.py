"""The compiled extension: its ops are registered for torch.compile, and the package works without it."""
import os
import subprocess
import sys

import pytest
import torch

import fastsam
from fastsam import _extension
from fastsam.ops import _fake

needs_ext = pytest.mark.skipif(not _extension.has_extension() and "cpu" not in os.environ.get(
    "FASTSAM_REQUIRE_IMPLS", ""), reason="fastsam._C is not built")


def _sample_args(name):
    w, g, b, m, v = (torch.randn(2, 3, 4) for _ in range(5))
    acc, rows = torch.zeros(1), [torch.rand(2) + 0.5]
    return {
        "norm_sq_": (acc, [g], [w], rows, 2, 0.01, [m], 0.5),
        "row_norm_": (rows, [w], 0.01),
        "perturb_": ([w], [g], [b], rows, torch.ones(1), 0.05, 1e-12, 2, 0.01, False, [m], 1.0, 0.9),
        "reflect_": ([w], [b], [g], torch.ones(1), 0.05, 1e-12, [v], [m]),
        "dot_norm_sq_": (torch.zeros(2), [g], [v]),
        "restore_": ([w], [b]),
        "restore_sgd_": ([w], [g], [b], [m], 0.1, 1e-4, 0.9, 0.0, True, False, False, [v], [], torch.rand(3)),
        "restore_adam_": ([w], [g], [b], [m], [v.abs()], 1e-3, 0.9, 0.999, 1e-2, 1e-8, True, False, 3.0, [], [], None,
                          None, None, []),
        "cvar_select": (torch.randn(10), 0.3),
        "cvar_cross_entropy": (torch.randn(6, 4), torch.tensor([0, 3, -1, 2, 1, 1]), 0.5, -1, 0.1),
        "cvar_bce_with_logits": (torch.randn(5, 3), torch.tensor([[0.0, 1, -1]] * 5), torch.rand(3) + 0.5, 0.4,
                                 True, -1.0),
    }[name]


def _scaled_sample_args(name):
    """The ops that take a loss scale, with it, a found flag and (Adam) device step counts."""
    args = _sample_args(name)
    inv, found = torch.full((), 0.25), torch.zeros(1)
    if name == "norm_sq_":
        return args + (inv,)
    if name == "restore_adam_":
        return args[:-3] + (inv, found, [torch.tensor(3.0)])
    return args + (inv, found)


@needs_ext
@pytest.mark.parametrize("name", _fake.OPS)
def test_opcheck(name):
    """Schema, fake kernel and dispatch checks of torch.library for every op on the CPU."""
    assert _extension.has_extension(), _extension.extension_error()
    torch.library.opcheck(getattr(torch.ops.fastsam, name).default, _sample_args(name))


@needs_ext
@pytest.mark.parametrize("name", ["norm_sq_", "perturb_", "reflect_", "restore_sgd_", "restore_adam_"])
def test_opcheck_scaled(name):
    assert _extension.has_extension(), _extension.extension_error()
    torch.library.opcheck(getattr(torch.ops.fastsam, name).default, _scaled_sample_args(name))


def test_available_impls_lists_what_works():
    impls = fastsam.available_impls("cpu")
    assert impls[-1] == "torch"
    assert ("cpu" in impls) == _extension.has_extension()


def test_package_imports_without_the_extension():
    """With fastsam._C unimportable (as when it was never built), the package imports and SAM runs."""
    code = ("import sys; sys.modules['fastsam._C'] = None\n"  # makes `import fastsam._C` raise ImportError
            "import torch, fastsam; assert 'cpu' not in fastsam.available_impls(), fastsam.available_impls()\n"
            "m = torch.nn.Linear(3, 2); o = fastsam.SAM(m.parameters(), torch.optim.SGD, lr=0.1)\n"
            "m(torch.randn(4, 3)).sum().backward(); o.first_step(True); m(torch.randn(4, 3)).sum().backward()\n"
            "o.second_step(True); print('ok')")
    env = dict(os.environ, FASTSAM_IMPL="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
