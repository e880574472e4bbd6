"""The benchmark's hand-written parameter shapes match the published models."""
import pytest
import torch
from torch import nn

from fastsam.bench.shapes import SHAPES, make_params, numel

# torchvision's documented sizes (models table: "Params") and len(list(model.parameters()))
PUBLISHED = {"resnet18": (11_689_512, 62), "vit_b16": (86_567_656, 152)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_torchvision(name):
    assert (numel(SHAPES[name]), len(SHAPES[name])) == PUBLISHED[name]


def _affect_mlp(dim=768, classes=8):
    layers = []
    for _ in range(3):
        layers += [nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(0.6)]
    return nn.Sequential(*layers, nn.Linear(dim, classes))


def test_mlp_is_the_affect_mlp():
    with torch.device("meta"):
        model = _affect_mlp()
    assert SHAPES["mlp"] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert (numel(SHAPES["mlp"]), len(SHAPES["mlp"])) == (3 * (768 * 768 + 768 + 2 * 768) + 768 * 8 + 8, 14)


@pytest.mark.parametrize("name,ctor", [("resnet18", "resnet18"), ("vit_b16", "vit_b_16")])
def test_shapes_match_torchvision_models(name, ctor):
    models = pytest.importorskip("torchvision.models")
    with torch.device("meta"):
        model = getattr(models, ctor)()
    assert SHAPES[name] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_make_params_gives_grads():
    params = make_params(SHAPES["mlp"][:3], dtype=torch.bfloat16)
    assert [tuple(p.shape) for p in params] == [s for _, s in SHAPES["mlp"][:3]]
    assert all(p.is_leaf and p.dtype == torch.bfloat16 and p.grad.shape == p.shape for p in params)
    assert not torch.equal(params[0], make_params(SHAPES["mlp"][:1], seed=1)[0].bfloat16())


def test_gpt2_medium_is_hugging_faces():
    """GPT-2 medium's 354,823,168 parameters (the LM head tied to the token embedding), in the order and shapes
    of transformers' GPT2LMHeadModel."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    assert SHAPES["gpt2_medium"] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert (numel(SHAPES["gpt2_medium"]), len(SHAPES["gpt2_medium"])) == (354_823_168, 292)
