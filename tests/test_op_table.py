"""The op table: every op's schema is the one its entry, its Python implementations and torch agree on."""
import importlib.util
import inspect
import subprocess
import sys

import pytest
import torch

import fastsam.ops as O
from fastsam.ops import _entries, cvar_reference, op_table, reference

PYTHON_BACKENDS = [reference, cvar_reference]
if importlib.util.find_spec("triton") is not None:
    from fastsam.ops import triton_cvar, triton_kernels

    PYTHON_BACKENDS += [triton_kernels, triton_cvar]


@pytest.mark.parametrize("op", op_table.OPS, ids=lambda op: op.name)
def test_entry_takes_the_schema_arguments(op):
    names = op_table.argument_names(op)
    grouped = _entries.MEMBER_GROUP
    groups = [k for k in _entries.GROUPS if any(grouped.get(n) == k for n in names)]
    params = inspect.signature(getattr(O, op.name)).parameters
    assert list(params) == [n for n in names if n not in grouped] + groups + ["impl"]
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in groups + ["impl"])
    assert getattr(O, op.name).__doc__ == op.doc


@pytest.mark.parametrize("backend", PYTHON_BACKENDS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_python_implementations_take_the_schema_arguments_in_order(backend):
    """The entries hand every argument on by position, in schema order. A module implements every op of a family."""
    names = [op.name for op in op_table.OPS if hasattr(backend, op.name)]
    families = {op_table.BY_NAME[n].family for n in names}
    assert len(families) == 1 and names == [op.name for op in op_table.OPS if op.family in families]
    for name in names:
        params = list(inspect.signature(getattr(backend, name)).parameters)
        assert params == op_table.argument_names(op_table.BY_NAME[name]), name


def test_schemas_and_fakes_exist_without_the_extension():
    code = ("import sys; sys.modules['fastsam._C'] = None\n"
            "import torch, fastsam.ops as O\n"
            "from torch._subclasses.fake_tensor import FakeTensorMode\n"
            "assert 'cvar_select' in str(torch.ops.fastsam.cvar_select.default._schema)\n"
            "assert not torch._C._dispatch_has_kernel_for_dispatch_key('fastsam::perturb_', 'CPU')\n"
            "with FakeTensorMode():\n"
            "    value, var, w = torch.ops.fastsam.cvar_select(torch.empty(7, dtype=torch.float64), 0.5)\n"
            "print(value.shape, value.dtype, w.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([]) torch.float64 torch.Size([7])"


def _sgd_call(**groups):
    w = [torch.zeros(3)]
    O.restore_sgd_(w, [torch.ones(3)], [], [], 0.1, 0.0, 0.0, 0.0, False, False, False, impl="torch", **groups)
    return w[0]


def test_groups_are_checked():
    inv = torch.full((), 0.5)
    with pytest.raises(TypeError, match="amp must be a fastsam.ops.AmpArgs or None, got tuple"):
        _sgd_call(amp=(inv, None))
    with pytest.raises(TypeError, match="grad must be a fastsam.ops.GradArgs"):
        _sgd_call(grad=torch.ones(3))
    with pytest.raises(ValueError, match="norm_sq_ takes no amp.found_inf"):
        O.norm_sq_(torch.zeros(1), [torch.ones(2)], [torch.ones(2)], [], 0, 0.0, amp=O.AmpArgs(inv, torch.zeros(1)),
                   impl="torch")
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'inv_scale'"):
        _sgd_call(inv_scale=inv)


def test_groups_reach_the_implementation():
    """amp unscales, grad combines: the entry puts the members in their schema places."""
    torch.testing.assert_close(_sgd_call(), torch.full((3,), -0.1))
    torch.testing.assert_close(_sgd_call(amp=O.AmpArgs(torch.full((), 0.5))), torch.full((3,), -0.05))
    grad = O.GradArgs(torch.tensor([2.0, 3.0, 0.0]), [torch.full((3,), 10.0)])
    torch.testing.assert_close(_sgd_call(grad=grad), torch.full((3,), -0.1 * 32))
    torch.testing.assert_close(_sgd_call(amp=O.AmpArgs(None, torch.ones(1))), torch.zeros(3))  # skipped


def test_an_empty_lead_list_is_a_no_op_and_a_short_one_is_named():
    O.perturb_([], [], [], [], torch.ones(1), 0.1, 1e-12, 0, 0.0, False, impl="torch")
    with pytest.raises(ValueError, match="backups must hold 1 tensors"):
        O.perturb_([torch.ones(2)], [torch.ones(2)], [], [], torch.ones(1), 0.1, 1e-12, 0, 0.0, False, impl="torch")
