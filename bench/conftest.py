"""Options of the pytest-benchmark suites: pytest bench/ --benchmark-only [--sam-device cuda] ...

--sam-device and --sam-dtype apply to every suite (test_step.py and test_cvar.py)."""
import pytest
import torch

from fastsam.bench.cvar_peers import CVAR_ROWS, cvar_rows
from fastsam.bench.methods import METHODS
from fastsam.bench.shapes import DTYPES, SHAPE_DTYPES, SHAPES


def pytest_addoption(parser):
    group = parser.getgroup("fastsam bench")
    group.addoption("--sam-device", choices=("cpu", "cuda"), default=None,
                    help="device of the benchmarked tensors (default: cuda if visible, else cpu)")
    group.addoption("--sam-dtype", choices=tuple(DTYPES), default=None,
                    help="dtype of every shape set (default: each set's own, as in python -m fastsam.bench)")
    group.addoption("--sam-shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    group.addoption("--sam-methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)}")
    group.addoption("--cvar-rows", default=",".join(map(str, CVAR_ROWS)),
                    help="comma list of the batch sizes n of the CVaR cases")


@pytest.fixture(scope="session")
def sam_device(pytestconfig):
    device = pytestconfig.getoption("sam_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--sam-device cuda: torch sees no CUDA device")
    return torch.device(device)


@pytest.fixture(scope="session")
def sam_dtype(pytestconfig):
    """dtype_of(shape set name or None) -> torch.dtype: --sam-dtype, else the set's own (fp32 without a set)."""
    forced = pytestconfig.getoption("sam_dtype")
    return lambda shapes=None: DTYPES[forced or SHAPE_DTYPES.get(shapes, "fp32")]


def _names(config, option, allowed):
    names = list(dict.fromkeys(s.strip() for s in config.getoption(option).split(",") if s.strip()))
    bad = [s for s in names if s not in allowed]
    if bad:
        raise pytest.UsageError(f"--{option.replace('_', '-')}: unknown {', '.join(bad)}; "
                                f"choose from {', '.join(allowed)}")
    return names


def _sizes(config):
    try:
        sizes = [int(s) for s in config.getoption("cvar_rows").split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise pytest.UsageError(f"--cvar-rows: expected a comma list of positive integers, "
                                f"got {config.getoption('cvar_rows')!r}")
    return list(dict.fromkeys(sizes))


def pytest_generate_tests(metafunc):
    # cases in a fixed order, shape set first, so one shape set's tensors are alive at a time
    config = metafunc.config
    device = config.getoption("sam_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = _names(config, "sam_shapes", SHAPES)
    methods = _names(config, "sam_methods", METHODS)
    if "step_case" in metafunc.fixturenames:
        cases = [(s, m, r) for s in shapes for m in methods for r in METHODS[m].rows(device)]
        metafunc.parametrize("step_case", cases, ids=["-".join(c) for c in cases])
    if "limit_case" in metafunc.fixturenames:
        cases = [(s, m) for s in shapes for m in methods if METHODS[m].words_per_param is not None]
        metafunc.parametrize("limit_case", cases, ids=["-".join(c) for c in cases])
    if "cvar_case" in metafunc.fixturenames:
        cases = [(n, r) for n in _sizes(config) for r in cvar_rows(device)]
        metafunc.parametrize("cvar_case", cases, ids=[f"n{n}-{r}" for n, r in cases])
