"""The CLIP image tower and its preprocessing against plain-tensor references written here."""
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastsam.affect.encoder import (CLIPVisionTower, checkpoint_sha256, load_clip_visual, random_clip_state_dict,
                                    save_torchscript_archive)
from fastsam.affect.preprocess import MEAN, STD, load_image, preprocess


def _layer_norm(x, weight, bias):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * weight + bias


def reference_features(sd, images, heads):
    """OpenAI's ViT image tower from the raw ``visual.*`` tensors: unfold + matmul patches, per-head softmax."""
    v = {k[len("visual."):]: t for k, t in sd.items()}
    weight = v["conv1.weight"]
    width, patch = weight.shape[0], weight.shape[-1]
    batch = images.shape[0]
    patches = F.unfold(images, kernel_size=patch, stride=patch)  # [B, 3*p*p, tokens]
    x = (weight.reshape(width, -1) @ patches).transpose(1, 2)
    x = torch.cat([v["class_embedding"].expand(batch, 1, width), x], dim=1) + v["positional_embedding"]
    x = _layer_norm(x, v["ln_pre.weight"], v["ln_pre.bias"])
    layers = len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})
    d = width // heads
    for i in range(layers):
        b = lambda name: v[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = _layer_norm(x, b("ln_1.weight"), b("ln_1.bias"))
        q, k, val = (h @ b("attn.in_proj_weight").T + b("attn.in_proj_bias")).chunk(3, dim=-1)
        outs = []
        for j in range(heads):
            s = slice(j * d, (j + 1) * d)
            scores = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), dim=-1)
            outs.append(scores @ val[..., s])
        x = x + torch.cat(outs, dim=-1) @ b("attn.out_proj.weight").T + b("attn.out_proj.bias")
        h = _layer_norm(x, b("ln_2.weight"), b("ln_2.bias"))
        h = h @ b("mlp.c_fc.weight").T + b("mlp.c_fc.bias")
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ b("mlp.c_proj.weight").T + b("mlp.c_proj.bias")
    return _layer_norm(x[:, 0], v["ln_post.weight"], v["ln_post.bias"]) @ v["proj"]


def sharpened(sd, seed=1):
    """Peaky attention and distinct LayerNorms, so a wrong head split or swapped norm shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in sd.items():
        if k.endswith("attn.in_proj_weight"):
            t = t * 10
        elif ".ln_" in k or k.startswith("visual.ln_"):
            t = t + 0.2 * torch.randn(t.shape, generator=gen)
        out[k] = t
    return out


@pytest.mark.parametrize("width,heads", [(64, 1), (128, 2)])
def test_forward_matches_reference(tmp_path, width, heads):
    sd = sharpened(random_clip_state_dict(width=width, layers=2, patch_size=8, resolution=32, output_dim=48))
    torch.save(sd, tmp_path / "clip.pt")
    model = load_clip_visual(tmp_path / "clip.pt")
    assert model.heads == heads and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = model(images)
    assert out.dtype == torch.float32 and out.shape == (3, 48)
    torch.testing.assert_close(out, reference_features(sd, images, heads), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [dict(width=64, layers=2, patch_size=8, resolution=32, output_dim=768),
                                    dict(width=128, layers=3, patch_size=4, resolution=20, output_dim=32)])
def test_shape_inference(tmp_path, config):
    torch.save(random_clip_state_dict(**config), tmp_path / "clip.pt")
    model = load_clip_visual(tmp_path / "clip.pt")
    got = {name: getattr(model, name) for name in config}
    assert got == config
    assert model.heads == max(1, config["width"] // 64)


def test_stripped_state_dict_is_accepted(tmp_path):
    sd = random_clip_state_dict()
    torch.save({k[len("visual."):]: t for k, t in sd.items()}, tmp_path / "stripped.pt")
    torch.save({**sd, "transformer.resblocks.0.ln_1.weight": torch.ones(512)}, tmp_path / "full.pt")
    images = torch.randn(2, 3, 32, 32)
    stripped, full = load_clip_visual(tmp_path / "stripped.pt"), load_clip_visual(tmp_path / "full.pt")
    assert torch.equal(stripped(images), full(images))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torchscript_archive_matches_state_dict(tmp_path, dtype):
    sd = {k: t.to(dtype) for k, t in random_clip_state_dict(width=64, layers=1).items()}
    torch.save(sd, tmp_path / "plain.pt")
    save_torchscript_archive(sd, tmp_path / "archive.pt")
    archived = torch.jit.load(str(tmp_path / "archive.pt")).state_dict()
    assert set(archived) == set(sd) and all(torch.equal(archived[k], sd[k]) for k in sd)
    images = torch.randn(2, 3, 32, 32)
    a, b = load_clip_visual(tmp_path / "archive.pt"), load_clip_visual(tmp_path / "plain.pt")
    assert a.conv1.weight.dtype == torch.float32
    assert torch.equal(a(images), b(images))


def test_checkpoint_sha256(tmp_path):
    torch.save(random_clip_state_dict(layers=1), tmp_path / "clip.pt")
    assert checkpoint_sha256(tmp_path / "clip.pt") == hashlib.sha256((tmp_path / "clip.pt").read_bytes()).hexdigest()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_clip_visual(tmp_path / "ViT-L-14.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        checkpoint_sha256(tmp_path / "ViT-L-14.pt")


def test_bad_checkpoints(tmp_path):
    torch.save({"token_embedding.weight": torch.zeros(4, 4)}, tmp_path / "text.pt")
    with pytest.raises(ValueError, match="visual.conv1.weight"):
        load_clip_visual(tmp_path / "text.pt")
    sd = random_clip_state_dict()
    sd["visual.positional_embedding"] = torch.zeros(18, 64)
    torch.save(sd, tmp_path / "grid.pt")
    with pytest.raises(ValueError, match="positional_embedding"):
        load_clip_visual(tmp_path / "grid.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_clip_visual(tmp_path / "junk.pt")
    with pytest.raises(TypeError, match="path"):
        load_clip_visual(3)
    with pytest.raises(ValueError, match="heads"):
        random_clip_state_dict(width=128, heads=4)


def test_forward_rejects_bad_images():
    model = CLIPVisionTower(64, 1, 1, 8, 32, 16)
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(TypeError, match="images"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def _normalized(rgb_image):
    x = torch.from_numpy(np.asarray(rgb_image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("size", [(64, 40), (30, 50), (32, 32)])
def test_preprocess_shape_and_solid_color(size):
    color = (200, 100, 50)
    out = preprocess(Image.new("RGB", size, color), 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    expected = (torch.tensor(color, dtype=torch.float32) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.equal(out, expected.view(3, 1, 1).expand(3, 24, 24))


def test_preprocess_converts_modes():
    assert preprocess(Image.new("L", (40, 20), 128), 16).shape == (3, 16, 16)
    assert preprocess(Image.new("RGBA", (20, 40), (1, 2, 3, 4)), 16).shape == (3, 16, 16)
    with pytest.raises(TypeError, match="image"):
        preprocess(np.zeros((4, 4, 3)), 16)
    with pytest.raises(ValueError, match="resolution"):
        preprocess(Image.new("RGB", (4, 4)), 0)


def _two_color(size, vertical_split):
    w, h = size
    a = np.zeros((h, w, 3), dtype=np.uint8)
    if vertical_split:
        a[:, : w // 2] = (255, 0, 0)
        a[:, w // 2:] = (0, 0, 255)
    else:
        a[: h // 2] = (0, 255, 0)
        a[h // 2:] = (255, 255, 0)
    return Image.fromarray(a)


# (image size, resized size, crop box): torchvision's int(long * R / short) and int(round((long - R) / 2.0)),
# the latter rounding half to even (57 - 32 = 25 -> offset 12).
@pytest.mark.parametrize("size,resized,box,vertical", [
    ((70, 40), (56, 32), (12, 0, 44, 32), True),
    ((41, 90), (32, 70), (0, 19, 32, 51), False),
    ((57, 32), (57, 32), (12, 0, 44, 32), True),
])
def test_preprocess_center_crop(size, resized, box, vertical):
    image = _two_color(size, vertical)
    expected = _normalized(image.resize(resized, Image.BICUBIC).crop(box))
    out = preprocess(image, 32)
    assert torch.equal(out, expected)
    # The split sits mid-image, so the crop holds as much of one color as of the other.
    halves = (out[:, :, :16], out[:, :, 16:]) if vertical else (out[:, :16], out[:, 16:])
    first, second = (h.mean((1, 2)) for h in halves)
    first_pure = (_normalized(Image.new("RGB", (1, 1), image.getpixel((0, 0))))).view(3)
    assert torch.allclose(first, first_pure, atol=0.2) and not torch.allclose(second, first_pure, atol=0.5)


def test_load_image(tmp_path):
    image = _two_color((48, 36), True)
    image.save(tmp_path / "frame.png")
    assert torch.equal(load_image(tmp_path / "frame.png", 24), preprocess(image, 24))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", 24)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", 24)
