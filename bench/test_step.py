"""One step of SAM and its variants (Friendly SAM, CR-SAM, LastSAM's ASAM phase, orthogonal or not; grads
given) for every fastsam impl and the loop and foreach peers of each, per shape set.

A step is the method's step calls (CR-SAM: first_step + second_step + third_step). Grouped by shape set and
method; each group's "bw-limit" entry copies the method's words per parameter (fastsam.bench.methods), the
least a fused step must move.
"""
import gc

import pytest
import torch

from fastsam.bench.methods import METHODS
from fastsam.bench.shapes import SHAPES, make_params, numel
from fastsam.bench.timing import sync


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()  # ViT-B/16 cases hold 1.4-3 GB: release it before the next case allocates


def test_step(benchmark, step_case, sam_device, sam_dtype):
    shapes, method, row = step_case
    params = make_params(SHAPES[shapes], sam_device, sam_dtype)
    opt = METHODS[method].make(row, params)
    calls = METHODS[method].step_fn(opt)

    def step():
        calls()
        sync(sam_device)

    step()  # lazy state (backups, EMAs, grad copies, momentum buffers) is made outside the timing
    benchmark.group = f"{shapes} {method}"
    benchmark.extra_info.update(params=numel(SHAPES[shapes]), tensors=len(SHAPES[shapes]), method=method, impl=row)
    benchmark(step)


def test_bandwidth_limit(benchmark, limit_case, sam_device, sam_dtype):
    shapes, method = limit_case
    # one copy_ moves 2 words per element
    n = METHODS[method].words_per_param * numel(SHAPES[shapes]) // 2
    src = torch.ones(n, dtype=sam_dtype, device=sam_device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync(sam_device)

    copy()
    benchmark.group = f"{shapes} {method}"
    benchmark.extra_info.update(method=method, words_per_param=METHODS[method].words_per_param)
    benchmark(copy)
