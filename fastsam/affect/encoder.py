"""The CLIP ViT image tower the affect pipeline encodes frames with, and loading of OpenAI checkpoints.

Parameter names follow OpenAI's CLIP layout without the ``visual.`` prefix, so the stripped keys of an
OpenAI checkpoint load strictly. Weights are read from a local file only; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import warnings
import zipfile
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_PREFIX = "visual."
_BLOCK_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_CHECKPOINT_HINT = ("Place OpenAI's ViT-L-14.pt (the TorchScript archive, or a state dict with visual.* keys) "
                    "at this path or pass --checkpoint PATH; fastsam never downloads weights")


class _QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width).normal_(std=0.02))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class _ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential()
        # add_module keeps OpenAI's names (mlp.c_fc, mlp.c_proj) inside a Sequential.
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    """The stack of residual blocks, kept as ``transformer.resblocks`` to match OpenAI's key names."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class CLIPVisionTower(nn.Module):
    """OpenAI CLIP's ViT image encoder; ``forward`` returns the projected CLS token (not L2-normalized).

    ``width``: token width; ``layers``: residual blocks; ``heads``: attention heads (must divide width);
    ``patch_size``: side of the square patches (must divide ``resolution``); ``resolution``: input side;
    ``output_dim``: feature size (768 for ViT-L/14).
    """

    def __init__(self, width: int, layers: int, heads: int, patch_size: int, resolution: int, output_dim: int):
        super().__init__()
        for name, value in (("width", width), ("layers", layers), ("heads", heads), ("patch_size", patch_size),
                            ("resolution", resolution), ("output_dim", output_dim)):
            _check_positive_int(name, value)
        if width % heads:
            raise ValueError(f"heads must divide width, got heads={heads}, width={width}")
        if resolution % patch_size:
            raise ValueError(f"patch_size must divide resolution, got patch_size={patch_size}, "
                             f"resolution={resolution}")
        self.width, self.layers, self.heads = width, layers, heads
        self.patch_size, self.resolution, self.output_dim = patch_size, resolution, output_dim
        grid = resolution // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width).normal_(std=0.02))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width).normal_(std=0.02))
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Parameter(torch.empty(width, output_dim).normal_(std=0.02))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [B, 3, resolution, resolution], already normalized -> float32 [B, output_dim]."""
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != self.resolution \
                or images.shape[3] != self.resolution:
            raise ValueError(f"images must have shape [B, 3, {self.resolution}, {self.resolution}], "
                             f"got {list(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]: one token per patch, row-major
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return (self.ln_post(x[:, 0]) @ self.proj).float()


def _visual_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image tower's entries with the ``visual.`` prefix removed (an already-stripped dict passes)."""
    visual = {k[len(_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    if not visual and "conv1.weight" in state_dict:
        visual = dict(state_dict)
    if not visual:
        raise ValueError("checkpoint has no image-tower weights: expected keys visual.conv1.weight, "
                         "visual.class_embedding, visual.positional_embedding, visual.ln_pre.*, "
                         "visual.transformer.resblocks.{i}.*, visual.ln_post.*, visual.proj "
                         f"(or the same without 'visual.'); found {sorted(state_dict)[:8]}")
    return visual


def _infer_config(visual: Mapping[str, torch.Tensor]) -> Tuple[int, int, int, int, int, int]:
    """(width, layers, heads, patch_size, resolution, output_dim) from stripped keys; heads = max(1, width // 64)."""
    for key in ("conv1.weight", "positional_embedding", "proj"):
        if key not in visual:
            raise ValueError(f"checkpoint lacks visual.{key}: not a CLIP ViT image tower")
    conv, pos, proj = visual["conv1.weight"], visual["positional_embedding"], visual["proj"]
    if conv.dim() != 4 or pos.dim() != 2 or proj.dim() != 2:
        raise ValueError(f"checkpoint has conv1.weight {list(conv.shape)}, positional_embedding "
                         f"{list(pos.shape)}, proj {list(proj.shape)}: not a CLIP ViT image tower")
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(max(pos.shape[0] - 1, 0))
    if pos.shape[0] < 2 or grid * grid != pos.shape[0] - 1:
        raise ValueError(f"positional_embedding has {pos.shape[0]} rows; expected grid*grid + 1 "
                         "(a square patch grid plus the class token)")
    blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.match, visual) if m}
    if not blocks or blocks != set(range(len(blocks))):
        raise ValueError(f"checkpoint's transformer.resblocks indices must be 0..L-1, got {sorted(blocks)}")
    return width, len(blocks), max(1, width // 64), patch, patch * grid, proj.shape[1]


def _tower_from_state_dict(visual: Mapping[str, torch.Tensor]) -> CLIPVisionTower:
    """A CLIPVisionTower (float32) holding the stripped ``visual`` weights; mismatches raise ValueError."""
    model = CLIPVisionTower(*_infer_config(visual))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(visual)), sorted(set(visual) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint is not a CLIP ViT image tower: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    try:
        model.load_state_dict({k: v.float() for k, v in visual.items()}, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint's image-tower weights have unexpected shapes: {e}") from None
    return model


def _is_torchscript_archive(path: str) -> bool:
    """TorchScript zips carry constants.pkl and code/; torch.save zips (also zips) carry neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _read_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    if _is_torchscript_archive(path):
        # OpenAI distributes TorchScript, so reading it needs torch.jit despite its deprecation.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"checkpoint {path!r} is neither a TorchScript archive nor a state dict: {e}") from None
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"checkpoint {path!r} must hold a state dict (str -> Tensor), got {type(loaded).__name__}")
    return loaded


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint not found: {path}. {_CHECKPOINT_HINT}")
    return path


def load_clip_visual(path, device="cpu") -> CLIPVisionTower:
    """The image tower of the CLIP checkpoint at ``path``, float32, in eval mode, gradients off, on ``device``.

    ``path`` holds OpenAI's TorchScript archive or a state dict saved with torch.save, with ``visual.*``
    keys (or already stripped of that prefix). The shape is inferred from the weights; heads are
    max(1, width // 64), OpenAI's rule (ViT-L/14: width 1024 -> 16 heads).
    """
    path = _check_path(path)
    model = _tower_from_state_dict(_visual_keys(_read_state_dict(path)))
    return model.to(torch.device(device)).eval().requires_grad_(False)


def checkpoint_sha256(path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks so multi-GB checkpoints stay out of memory."""
    path = _check_path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def random_clip_state_dict(width: int = 64, layers: int = 2, heads=None, patch_size: int = 8, resolution: int = 32,
                           output_dim: int = 768, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random float32 image tower with OpenAI's ``visual.*`` keys: weights and biases N(0, 0.02), LayerNorms 1/0.

    Heads leave no trace in the weights: ``load_clip_visual`` infers max(1, width // 64), so ``heads``
    (default that value) must equal it, or the checkpoint would load with a different head count.
    """
    _check_positive_int("width", width)
    inferred = max(1, width // 64)
    heads = inferred if heads is None else heads
    if heads != inferred:
        raise ValueError(f"heads must be max(1, width // 64) = {inferred} (what loading infers), got {heads}")
    model = CLIPVisionTower(width, layers, heads, patch_size, resolution, output_dim)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in model.state_dict().items():
        is_layer_norm = re.search(r"(^|\.)ln_\w+\.(weight|bias)$", name) is not None
        if is_layer_norm:
            value = torch.ones_like(tensor) if name.endswith("weight") else torch.zeros_like(tensor)
        else:
            value = torch.randn(tensor.shape, generator=gen) * 0.02
        out[_PREFIX + name] = value
    return out


class _ArchiveModel(nn.Module):
    """Top-level module of a written archive: holding the tower as ``visual`` gives the keys their prefix."""

    def __init__(self, visual: CLIPVisionTower):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def save_torchscript_archive(state_dict: Mapping[str, torch.Tensor], path) -> None:
    """Writes a TorchScript archive, like OpenAI's, whose state_dict() holds ``state_dict``'s ``visual.*`` weights.

    The weights keep the dtype of ``visual.conv1.weight``; keys outside ``visual.`` are not written.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of str -> Tensor, got {type(state_dict).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    visual = _visual_keys(state_dict)
    tower = _tower_from_state_dict(visual).to(visual["conv1.weight"].dtype)
    # Only torch.jit writes the TorchScript format that OpenAI's checkpoints use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_ArchiveModel(tower)).save(os.fspath(path))
