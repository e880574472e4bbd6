"""Which implementations the tests exercise, and the tolerances they are held to."""
import os

import pytest
import torch

from fastsam import _extension

DEVICE_IMPLS = [("cpu", "cpu"), ("cpu", "triton"), ("cuda", "cuda"), ("cuda", "triton"), ("cpu", "torch")]
# fp32: the project's standard. bf16/fp16: every result is rounded once to the param dtype, and an
# implementation may land one ulp away from the reference when their fp32 intermediates differ.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-3),
    torch.float16: dict(rtol=2**-10, atol=1e-4),
}


def impl_params():
    """pytest params (device, impl); unavailable ones are skipped with the reason, except those named
    in FASTSAM_REQUIRE_IMPLS (set by `make test`), which must be there."""
    required = set(filter(None, os.environ.get("FASTSAM_REQUIRE_IMPLS", "").split(",")))
    out = []
    for device, impl in DEVICE_IMPLS:
        marks = []
        if device == "cuda" and not torch.cuda.is_available():
            marks = [pytest.mark.skip(reason="no CUDA device")]
        elif not _extension.impl_works_on(impl, device) and impl not in required:
            marks = [pytest.mark.skip(reason=f"{impl} is not available on {device}")]
        out.append(pytest.param(device, impl, id=f"{device}-{impl}", marks=marks))
    return out


def assert_close(actual, expected, dtype=None):
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), **tol)
