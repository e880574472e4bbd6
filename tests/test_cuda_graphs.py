"""A whole SAM training step captured in a torch.cuda.CUDAGraph replays like the eager step.

The captured step (forward, backward, first_step, forward, backward, second_step) reads its batch from
static input tensors; each replay is compared with the same step run eagerly on a twin model.
"""
import pytest
import torch
import torch.nn as nn

import fastsam
from fastsam import _extension

from _sam_loops import sam_step_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA_IMPLS = [pytest.param(impl, marks=pytest.mark.skipif(
    torch.cuda.is_available() and not _extension.impl_works_on(impl, "cuda"), reason=f"{impl} is not available"))
    for impl in ("cuda", "triton")]

BASES = {
    # SGD: the fused restore+update kernel (lr, momentum are constants of the graph, as in torch).
    "sgd": lambda: (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    # capturable Adam: step counts live on the device. With a float lr the fused kernel reads them there;
    # a tensor lr takes torch's capturable step after the fused restore.
    "adam-capturable": lambda: (torch.optim.Adam, dict(lr=torch.tensor(1e-2, device="cuda"), capturable=True)),
    "adamw-capturable": lambda: (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, capturable=True)),
}


def _twin(base_name, impl):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
    base, kwargs = BASES[base_name]()
    opt = fastsam.SAM(model.parameters(), base, rho=0.05, impl=impl, **kwargs)
    return model, opt, sam_step_fn(model, opt)


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g).cuda(), torch.randint(0, 3, (8,), generator=g).cuda()) for _ in range(n)]


def _capture(step, x, y, warmup):
    """Runs the ``warmup`` batches eagerly on a side stream (lazy buffers and kernels get made there),
    then captures one step reading (x, y); returns the graph and its loss tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for wx, wy in warmup:
            step(wx, wy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(x, y)
    return graph, loss


@pytest.mark.parametrize("impl", CUDA_IMPLS)
@pytest.mark.parametrize("base_name", sorted(BASES))
def test_captured_sam_step_replays_like_eager(base_name, impl):
    batches = _batches(5)
    warmup, data = batches[:2], batches[2:]
    eager_model, eager_opt, eager_step = _twin(base_name, impl)
    model, opt, step = _twin(base_name, impl)
    for x, y in warmup:
        eager_step(x, y)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    graph, static_loss = _capture(step, static_x, static_y, warmup)
    for i, (x, y) in enumerate(data):
        if i == 1 and base_name == "adam-capturable":  # a scheduler's write to the device lr is replayed
            for o in (eager_opt, opt):
                o.param_groups[0]["lr"].fill_(3e-3)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        torch.testing.assert_close(static_loss, eager_step(x, y))
        for a, b in zip(eager_model.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_capture_of_a_fused_adam_that_is_not_capturable_raises(impl):
    """Its step count is a host value a replay would repeat: torch's own check refuses the capture."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).cuda()
    opt = fastsam.SAM(model.parameters(), torch.optim.Adam, lr=1e-2, impl=impl)
    x, y = _batches(1)[0]

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="capturable"):
        _capture(lambda *_: step(), x, y, [(x, y)])


@pytest.mark.parametrize("optimizer", ["sam", "fsam", "crsam", "adamw"])
def test_affect_training_with_a_cuda_graph_equals_eager(tmp_path, monkeypatch, optimizer):
    """``fastsam.affect train --cuda-graph``: 3 epochs of 7 steps (3 eager warm-up steps, a capture per epoch as
    the cosine schedule moves the lr, replays, the short last batch eager) end where eager training does."""
    import functools
    import types

    import numpy as np

    from fastsam.affect import train as train_module
    from fastsam.affect.model import AffectMLP

    # Dropout off: whether replayed dropout draws the eager masks is torch's business, not this test's.
    monkeypatch.setattr(train_module, "AffectMLP", functools.partial(AffectMLP, dropout=0.0))
    rng = np.random.default_rng(0)

    def bank(n):
        return types.SimpleNamespace(features=rng.normal(size=(n, 16)).astype(np.float16),
                                     labels=rng.integers(0, 8, n), images=[f"v/{i:05d}.jpg" for i in range(n)])
    train_bank, val_bank = bank(200), bank(64)
    config = train_module.make_config("expr", optimizer=optimizer, epochs=3, batch_size=32, device="cuda")
    eager = train_module.train(config, train_bank, val_bank, tmp_path / "eager", log=lambda _: None)
    lines = []
    graphed = train_module.train(config, train_bank, val_bank, tmp_path / "graph", log=lines.append,
                                 cuda_graph=True)
    assert [line.endswith(f"(CUDA graph, captured {k}x)") for k, line in enumerate(lines, 1)] == [True] * 3
    for e, g in zip(eager["epochs"], graphed["epochs"]):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
    want, _ = train_module.load_model(tmp_path / "eager", "cuda")
    got, _ = train_module.load_model(tmp_path / "graph", "cuda")
    torch.testing.assert_close(got.state_dict(), want.state_dict(), rtol=1e-4, atol=1e-5)
