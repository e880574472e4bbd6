"""Parameter shapes of the benchmark models, written out by hand (no torchvision needed).

Each set is a list of (name, shape) in the order of the model's ``named_parameters()``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

Shape = Tuple[int, ...]
ShapeList = List[Tuple[str, Shape]]


def _linear(name: str, fan_in: int, fan_out: int) -> ShapeList:
    return [(f"{name}.weight", (fan_out, fan_in)), (f"{name}.bias", (fan_out,))]


def _conv1d(name: str, fan_in: int, fan_out: int) -> ShapeList:
    """Hugging Face's Conv1D: a linear layer whose weight is stored (in, out)."""
    return [(f"{name}.weight", (fan_in, fan_out)), (f"{name}.bias", (fan_out,))]


def _norm(name: str, dim: int) -> ShapeList:
    return [(f"{name}.weight", (dim,)), (f"{name}.bias", (dim,))]


def affect_mlp(dim: int = 768, classes: int = 8, blocks: int = 3) -> ShapeList:
    """The affect MLP: ``blocks`` x (Linear(dim, dim), BatchNorm1d(dim)), then Linear(dim, classes)."""
    out: ShapeList = []
    for i in range(blocks):  # nn.Sequential indices: Linear, BatchNorm1d, ReLU, Dropout per block
        out += _linear(str(4 * i), dim, dim) + _norm(str(4 * i + 1), dim)
    return out + _linear(str(4 * blocks), dim, classes)


def resnet18(classes: int = 1000) -> ShapeList:
    """torchvision ``resnet18()``: bias-free convolutions, BatchNorm affine parameters, the fc head."""
    out: ShapeList = [("conv1.weight", (64, 3, 7, 7))] + _norm("bn1", 64)
    cin = 64
    for layer, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            pre, first_in = f"layer{layer}.{block}", cin if block == 0 else cout
            out += [(f"{pre}.conv1.weight", (cout, first_in, 3, 3))] + _norm(f"{pre}.bn1", cout)
            out += [(f"{pre}.conv2.weight", (cout, cout, 3, 3))] + _norm(f"{pre}.bn2", cout)
            if block == 0 and cin != cout:  # stride-2 blocks project the shortcut with a 1x1 conv
                out += [(f"{pre}.downsample.0.weight", (cout, cin, 1, 1))] + _norm(f"{pre}.downsample.1", cout)
        cin = cout
    return out + _linear("fc", 512, classes)


def vit_b16(classes: int = 1000, dim: int = 768, layers: int = 12, mlp_dim: int = 3072,
            image: int = 224, patch: int = 16) -> ShapeList:
    """torchvision ``vit_b_16()``: class token, patch conv, position embedding, encoder layers, head."""
    seq = (image // patch) ** 2 + 1
    out: ShapeList = [("class_token", (1, 1, dim)), ("conv_proj.weight", (dim, 3, patch, patch)),
                      ("conv_proj.bias", (dim,)), ("encoder.pos_embedding", (1, seq, dim))]
    for i in range(layers):
        pre = f"encoder.layers.encoder_layer_{i}"
        out += _norm(f"{pre}.ln_1", dim)
        out += [(f"{pre}.self_attention.in_proj_weight", (3 * dim, dim)),
                (f"{pre}.self_attention.in_proj_bias", (3 * dim,))]
        out += _linear(f"{pre}.self_attention.out_proj", dim, dim) + _norm(f"{pre}.ln_2", dim)
        out += _linear(f"{pre}.mlp.0", dim, mlp_dim) + _linear(f"{pre}.mlp.3", mlp_dim, dim)
    return out + _norm("encoder.ln", dim) + _linear("heads.head", dim, classes)


def gpt2(layers: int = 24, dim: int = 1024, vocab: int = 50257, context: int = 1024) -> ShapeList:
    """Hugging Face ``GPT2LMHeadModel`` (default: GPT-2 medium, 355M parameters): token and position
    embeddings, ``layers`` blocks of (ln_1, attention c_attn/c_proj, ln_2, MLP c_fc/c_proj), ln_f. The LM head
    is tied to the token embedding, so it adds no parameter."""
    out: ShapeList = [("transformer.wte.weight", (vocab, dim)), ("transformer.wpe.weight", (context, dim))]
    for i in range(layers):
        pre = f"transformer.h.{i}"
        out += _norm(f"{pre}.ln_1", dim) + _conv1d(f"{pre}.attn.c_attn", dim, 3 * dim)
        out += _conv1d(f"{pre}.attn.c_proj", dim, dim) + _norm(f"{pre}.ln_2", dim)
        out += _conv1d(f"{pre}.mlp.c_fc", dim, 4 * dim) + _conv1d(f"{pre}.mlp.c_proj", 4 * dim, dim)
    return out + _norm("transformer.ln_f", dim)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES: Dict[str, ShapeList] = {"mlp": affect_mlp(), "resnet18": resnet18(), "vit_b16": vit_b16(),
                                "gpt2_medium": gpt2()}
TITLES = {"mlp": "affect MLP", "resnet18": "ResNet-18", "vit_b16": "ViT-B/16", "gpt2_medium": "GPT-2 medium"}
# The dtype each set is benchmarked in unless --dtype says otherwise: what its users train in (LLMs in bf16).
SHAPE_DTYPES = {"mlp": "fp32", "resnet18": "fp32", "vit_b16": "fp32", "gpt2_medium": "bf16"}


def numel(shapes: ShapeList) -> int:
    """Total number of scalar parameters in a shape list."""
    return sum(math.prod(shape) for _, shape in shapes)


def make_params(shapes: ShapeList, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> List[torch.Tensor]:
    """Leaf tensors of the given shapes with random data and a random ``.grad`` each.

    Magnitudes are those of a trained network (weights ~0.02, grads ~1e-3) so nothing is denormal.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02).requires_grad_()
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(1e-3)
        params.append(p)
    return params
