"""Vision encoder: `python -m pytest tests/model/test_vision.py`."""
from __future__ import annotations

import pytest
import torch

from scimoe.model.vision import INTERN_S1_PRO_VISION, VisionConfig, VisionEncoder, image_token_count, native_size


@pytest.mark.parametrize("height,width,expected", [
    (32, 32, (32, 32)), (64, 96, (64, 96)), (480, 640, (480, 640)), (33, 1000, (32, 992)), (5, 5, (32, 32)),
    (4000, 3000, (1152, 864)),  # over the pixel budget: scaled down, aspect ratio kept
])
def test_native_size_keeps_aspect_and_rounds_to_32(height, width, expected):
    assert native_size(height, width) == expected
    h, w = expected
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 1024 * 1024


def test_any_image_size_gives_one_vector_per_32x32_pixels():
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(), lm_hidden=48)
    for h, w in [(32, 32), (64, 96), (96, 64), (224, 160)]:
        out = encoder(torch.randn(3, h, w))
        assert out.shape == (image_token_count(h, w), 48) == ((h // 32) * (w // 32), 48)
    with pytest.raises(ValueError, match="multiples of 32"):
        encoder(torch.randn(3, 40, 32))


def test_position_information_reaches_the_output():
    """2-D RoPE and the interpolated grid: the same content at another place gives another output."""
    torch.manual_seed(0)
    encoder = VisionEncoder(VisionConfig(), lm_hidden=16)
    tile = torch.randn(3, 32, 32)
    image = torch.cat([tile, tile], dim=2)  # two identical 32×32 tiles side by side → 2 tokens
    out = encoder(image)
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_the_intern_s1_pro_preset_has_the_published_sizes():
    assert (INTERN_S1_PRO_VISION.hidden, INTERN_S1_PRO_VISION.layers, INTERN_S1_PRO_VISION.heads) == (1024, 24, 16)
    with torch.device("meta"):
        encoder = VisionEncoder(INTERN_S1_PRO_VISION, lm_hidden=4096)
    shapes = {n: list(p.shape) for n, p in encoder.named_parameters()}  # the released tower's names and shapes
    assert shapes["pos_embed.weight"] == [2304, 1024] and shapes["patch_embed.proj.weight"] == [1024, 3, 2, 16, 16]
    assert shapes["blocks.0.attn.qkv.weight"] == [3072, 1024] and shapes["blocks.23.mlp.linear_fc2.weight"] == [1024, 4096]
    assert shapes["merger.norm.weight"] == [1024] and shapes["merger.linear_fc1.weight"] == [4096, 4096]
    assert shapes["merger.linear_fc2.weight"] == [4096, 4096]
    blocks = sum(p.numel() for p in encoder.blocks.parameters())
    assert blocks == 24 * (2 * 2 * 1024 + 3 * 1024 * 1024 + 3 * 1024 + 1024 * 1024 + 1024 + 2 * 1024 * 4096 + 4096 + 1024)


def _released_smart_resize():
    """transformers' own `smart_resize`, taken from its module's source: importing that module needs torchvision,
    which this CPU setup does not install (the registry's build is CUDA-only)."""
    import ast
    import importlib.util
    import math
    import os

    spec = importlib.util.find_spec("transformers.models.qwen2_vl")
    path = os.path.join(os.path.dirname(spec.origin), "image_processing_qwen2_vl.py")
    tree = ast.parse(open(path).read())
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    namespace = {"math": math}
    exec(compile(ast.Module(body=[function], type_ignores=[]), path, "exec"), namespace)
    return namespace["smart_resize"]


def test_native_size_is_the_released_processors_smart_resize():
    """The release resizes with transformers' Qwen2-VL `smart_resize` at factor 32; every size below agrees,
    thin sides of 16 px or less included (11×2100 → 32×3552, 111 tokens, not 32×2112)."""
    smart_resize = _released_smart_resize()
    budget = {"min_pixels": 65536, "max_pixels": 1024 * 1024}
    assert native_size(11, 2100, **budget) == smart_resize(11, 2100, 32, **budget) == (32, 3552)
    sides = [1, 5, 11, 16, 17, 31, 47, 48, 49, 100, 333, 1000, 2100, 4000]
    for budget in ({"min_pixels": 32 * 32, "max_pixels": 1024 * 1024}, {"min_pixels": 65536, "max_pixels": 2 ** 22}):
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    with pytest.raises(ValueError, match="aspect ratio over 200"):
                        native_size(h, w, **budget)
                    with pytest.raises(ValueError):
                        smart_resize(h, w, 32, **budget)
                else:
                    assert native_size(h, w, **budget) == smart_resize(h, w, 32, **budget), (h, w, budget)
