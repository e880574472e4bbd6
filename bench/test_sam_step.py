"""One SAM step (first_step + second_step, grads given) of every fastsam impl and peer, per shape set.

Grouped by shape set; the "bw-limit" entry copies 10 words per parameter, the least a fused step must move.
"""
import gc

import pytest
import torch

from fastsam.bench.peers import make_optimizer
from fastsam.bench.shapes import SHAPES, make_params, numel
from fastsam.bench.timing import WORDS_PER_PARAM, sync


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()  # ViT-B/16 cases hold ~1.4 GB: release it before the next case allocates


def test_sam_step(benchmark, sam_case, sam_device, sam_dtype):
    shapes, row = sam_case
    params = make_params(SHAPES[shapes], sam_device, sam_dtype)
    opt = make_optimizer(row, params)

    def step():
        opt.first_step()
        opt.second_step()
        sync(sam_device)

    step()  # lazy state (backups, momentum buffers) is made outside the timing
    benchmark.group = shapes
    benchmark.extra_info.update(params=numel(SHAPES[shapes]), tensors=len(SHAPES[shapes]), impl=row)
    benchmark(step)


def test_bandwidth_limit(benchmark, shape_name, sam_device, sam_dtype):
    # one copy_ moves 2 words per element, so 5 elements per parameter is the step's least traffic
    n = WORDS_PER_PARAM // 2 * numel(SHAPES[shape_name])
    src = torch.ones(n, dtype=sam_dtype, device=sam_device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync(sam_device)

    copy()
    benchmark.group = shape_name
    benchmark(copy)
