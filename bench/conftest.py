"""Options of the pytest-benchmark suites: pytest bench/ --benchmark-only [--sam-device cuda] ..."""
import pytest
import torch

from fastsam.bench.peers import rows
from fastsam.bench.shapes import DTYPES, SHAPES


def pytest_addoption(parser):
    group = parser.getgroup("fastsam bench")
    group.addoption("--sam-device", choices=("cpu", "cuda"), default=None,
                    help="device of the benchmarked tensors (default: cuda if visible, else cpu)")
    group.addoption("--sam-dtype", choices=tuple(DTYPES), default="fp32")
    group.addoption("--sam-shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")


@pytest.fixture(scope="session")
def sam_device(pytestconfig):
    device = pytestconfig.getoption("sam_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--sam-device cuda: torch sees no CUDA device")
    return torch.device(device)


@pytest.fixture(scope="session")
def sam_dtype(pytestconfig):
    return DTYPES[pytestconfig.getoption("sam_dtype")]


def _shape_names(config):
    names = [s.strip() for s in config.getoption("sam_shapes").split(",") if s.strip()]
    bad = [s for s in names if s not in SHAPES]
    if bad:
        raise pytest.UsageError(f"--sam-shapes: unknown {', '.join(bad)}; choose from {', '.join(SHAPES)}")
    return names


def pytest_generate_tests(metafunc):
    # (shapes, row) pairs in a fixed order so one shape set's tensors are alive at a time
    config = metafunc.config
    device = config.getoption("sam_device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if "sam_case" in metafunc.fixturenames:
        cases = [(s, r) for s in _shape_names(config) for r in rows(device)]
        metafunc.parametrize("sam_case", cases, ids=[f"{s}-{r}" for s, r in cases])
    if "shape_name" in metafunc.fixturenames:
        metafunc.parametrize("shape_name", _shape_names(config))
