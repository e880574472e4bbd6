"""The compiled extension: its ops are registered for torch.compile, and the package works without it."""
import os
import subprocess
import sys

import pytest
import torch

import fastsam
from fastsam import _extension
from fastsam.ops import op_table

needs_ext = pytest.mark.skipif(not _extension.has_extension() and "cpu" not in os.environ.get(
    "FASTSAM_REQUIRE_IMPLS", ""), reason="fastsam._C is not built")


SAMPLES = [pytest.param(op.name, i, id=f"{op.name}-{i}") for op in op_table.OPS for i in range(len(op.samples()))]


@needs_ext
@pytest.mark.parametrize("name,sample", SAMPLES)
def test_opcheck(name, sample):
    """Schema, fake kernel and dispatch checks of torch.library for every sample of every op, on the CPU."""
    assert _extension.has_extension(), _extension.extension_error()
    args = op_table.BY_NAME[name].samples()[sample]
    torch.library.opcheck(getattr(torch.ops.fastsam, name).default, args)


def test_every_op_has_opcheck_samples_and_the_loss_scaled_ones_too():
    for op in op_table.OPS:
        samples = op.samples()
        assert samples, op.name
        if "inv_scale" in op_table.argument_names(op):  # a sample with the loss-scale tensors given
            names = op_table.argument_names(op)
            assert any(len(s) > names.index("inv_scale") and s[names.index("inv_scale")] is not None
                       for s in samples), op.name


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
