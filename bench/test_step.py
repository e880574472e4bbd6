"""One step of SAM and its variants (Friendly SAM, CR-SAM, LastSAM's ASAM phase, orthogonal or not; grads
given) for every fastsam impl and the loop and foreach peers of each, per shape set.

A step is the method's step calls (CR-SAM: first_step + second_step + third_step; LookSAM: a cycle of k steps,
a SAM step and the k - 1 between, in PEDANTIC_ROUNDS rounds with its grads put back before each, untimed: the
time shown is the cycle's). Grouped by shape set and
method; each group's "bw-limit" entry moves the method's words per parameter (fastsam.bench.methods), the
least a fused step must move, with the step's read-mostly mix (the STREAM "mix" kernel of
fastsam.bench.stream: fastsam's restore + SGD op, 5 words per element). Unlike python -m fastsam.bench, each
case runs alone (pytest-benchmark's model), not in paired rounds.
"""
import gc

import pytest
import torch

from fastsam.bench import stream
from fastsam.bench.methods import METHODS
from fastsam.bench.shapes import SHAPES, make_params, numel
from fastsam.bench.timing import sync


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()  # ViT-B/16 cases hold 1.4-3 GB: release it before the next case allocates


PEDANTIC_ROUNDS = 20  # rounds of a case whose grads are put back before each call (pytest-benchmark's pedantic mode)


def test_step(benchmark, step_case, sam_device, sam_dtype):
    shapes, method, row = step_case
    params = make_params(SHAPES[shapes], sam_device, sam_dtype(shapes))
    opt = METHODS[method].make(row, params)
    calls = METHODS[method].step_fn(opt, row, METHODS[method].grad_reset(params))

    def step():
        calls()
        sync(sam_device)

    def prepare():
        calls.prepare()
        sync(sam_device)

    if calls.prepare is not None:
        prepare()
    step()  # lazy state (backups, EMAs, grad copies, momentum buffers) is made outside the timing
    benchmark.group = f"{shapes} {method}"
    benchmark.extra_info.update(params=numel(SHAPES[shapes]), tensors=len(SHAPES[shapes]), method=method, impl=row,
                                steps_per_call=METHODS[method].cycle)
    if calls.prepare is None:
        benchmark(step)
    else:
        benchmark.pedantic(step, setup=prepare, rounds=PEDANTIC_ROUNDS, warmup_rounds=2)  # compiled: recompiles once


def test_bandwidth_limit(benchmark, limit_case, sam_device, sam_dtype):
    shapes, method = limit_case
    # the mix moves each of its arrays' bytes 5 times over (reads 3, writes 2): arrays of words/5 parameters' bytes
    # per timed call: LookSAM's is a cycle of its steps
    nbytes = int(METHODS[method].words_per_param * METHODS[method].cycle * numel(SHAPES[shapes])
                 * sam_dtype(shapes).itemsize)
    mix = stream.kernels(stream.stream_arrays(max(nbytes // stream.WORDS["mix"], 4), sam_device))["mix"]

    def run():
        mix()
        sync(sam_device)

    run()
    benchmark.group = f"{shapes} {method}"
    benchmark.extra_info.update(method=method, words_per_param=METHODS[method].words_per_param)
    benchmark(run)
