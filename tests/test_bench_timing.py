"""The benchmark's timing pieces: paired rounds, STREAM bandwidths and the limit, GPU launch counting."""
import time
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from fastsam.bench import stream
from fastsam.bench.methods import StepCalls
from fastsam.bench.timing import count_launches, gpu_launches, time_calls, time_paired

CPU = torch.device("cpu")


def test_paired_rounds_interleave_the_rows_in_rotated_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = time_paired(fns, CPU, rounds=4, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, row by row
    assert calls[6:] == list("abc" "bca" "cab" "abc")  # each round starts one row later
    assert all(len(entry["times"]) == 4 and entry["first_s"] > 0 for entry in out.values())
    assert set(out) == set("abc") and set(out["a"]) == {"first_s", "times"}


def test_prepare_runs_before_every_call_outside_the_timer():
    """A StepCalls' prepare (the benchmark's grad reset) runs before each call, warm-up included, and its time
    is not counted."""
    calls = []
    fn = StepCalls([lambda: calls.append("call")], prepare=lambda: (calls.append("prepare"), time.sleep(0.05)))
    out = time_paired(dict(a=fn), CPU, rounds=3, warmup=2)
    assert calls == ["prepare", "call"] * 5
    assert max(out["a"]["times"]) < 0.04 and out["a"]["first_s"] < 0.04
    assert time_calls(fn, CPU, reps=2, warmup=1) and calls[10:] == ["prepare", "call"] * 3


def test_paired_rounds_fit_the_budget_of_the_slowest_row():
    def fast():
        pass

    def slow():
        time.sleep(0.02)
    out = time_paired(dict(fast=fast, slow=slow), CPU, warmup=1, budget_s=0.1, min_rounds=2, max_rounds=50)
    assert 2 <= len(out["fast"]["times"]) == len(out["slow"]["times"]) <= 6  # 0.1 s / 0.02 s, not / fast's
    out = time_paired(dict(fast=fast), CPU, warmup=1, budget_s=0.1, min_rounds=2, max_rounds=7)
    assert len(out["fast"]["times"]) == 7


def test_stream_kernels_do_what_their_word_counts_say():
    """Each kernel's result, over SAM's 4 arrays: the words it is credited with are the words it must move."""
    arrays = stream.stream_arrays(4000, CPU)  # 1000 fp32 elements each
    a, b, c, d = (x.clone() for x in arrays)
    fns = stream.kernels(arrays)
    assert [float(x) for x in fns["read"]()] == [1000.0 * k for k in (1, 2, 3, 4)]
    fns["copy"]()
    assert torch.equal(arrays[1], a) and torch.equal(arrays[3], c)
    b, d = a.clone(), c.clone()
    fns["triad"]()  # a <- b + s c
    assert torch.equal(arrays[0], b + stream.SCALAR * c)
    fns["mix"]()  # m <- mu m + g; w <- backup - lr m
    m = stream.MOMENTUM * d + b
    torch.testing.assert_close(arrays[3], m)
    torch.testing.assert_close(arrays[0], c - stream.LR * m)
    assert set(stream.WORDS) == set(stream.KERNELS) == set(fns)
    with pytest.raises(ValueError, match="numel"):
        stream.array_bytes(0, 4)


def test_bandwidths_and_limit(monkeypatch):
    bw = stream.bandwidths(2000, dict(read=1e-6, mix=2e-6))
    assert bw == dict(read=pytest.approx(4 * 2000 / 1e-6), mix=pytest.approx(5 * 2000 / 2e-6))
    # the arrays hold the set's bytes as fp32, whatever its dtype, up to the cap
    assert stream.array_bytes(1000, 2) == 2000 and stream.array_bytes(1 << 30, 4) == stream.MAX_BYTES
    assert [(a.numel(), a.dtype) for a in stream.stream_arrays(2000, CPU)] == [(500, torch.float32)] * 4
    # 10 words of 2 bytes for 1000 params at 4 GB/s: 5 microseconds
    assert stream.limit_seconds(1000, torch.bfloat16, 4e9, 10) == pytest.approx(5e-6)


def test_gpu_launches_count_the_gpu_events_only():
    events = [SimpleNamespace(device_type=DeviceType.CUDA), SimpleNamespace(device_type=DeviceType.CPU),
              SimpleNamespace(device_type=DeviceType.CUDA), SimpleNamespace()]
    assert gpu_launches(events) == 2
    assert count_launches(lambda: None, CPU) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_count_launches_on_the_gpu():
    x = torch.ones(1000, device="cuda")

    def three():
        x.add_(1)
        x.mul_(2)
        x.sub_(1)
    three()
    assert count_launches(three, torch.device("cuda")) == 3
