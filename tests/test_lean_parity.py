"""Every class that re-implements a diffusers forward computes what the diffusers original computes, on random
inputs, with its mechanism switched on (thresholds lowered): the parity pyproject's diffusers bound rests on."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D

from distlin import LinFusion
from distlin.lean.bound_memory import bound_memory
from distlin.lean.resnet import LeanResnetBlock2D
from distlin.lean.transformer import ChunkedTransformer2D
from distlin.lean.upsample import IndexSafeUpsample2D
from distlin.models.tiny import build_unet
from distlin.surgery import original_type, twin


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("shortcut", [False, True])
@torch.no_grad()
def test_lean_resnet_equals_diffusers_resnet(shortcut: bool) -> None:
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=32, out_channels=64 if shortcut else 32, temb_channels=16, groups=8).eval()
    x, temb = torch.randn(2, 32, 9, 7), torch.randn(2, 16)
    lean = twin(block, LeanResnetBlock2D)
    _close(lean(x, temb), block(x, temb))
    assert original_type(lean) is ResnetBlock2D


@torch.no_grad()
def test_index_safe_upsample_equals_diffusers_upsample_above_the_limit() -> None:
    torch.manual_seed(0)
    up = Upsample2D(16, use_conv=True).eval()
    x = torch.randn(2, 16, 11, 5)
    safe = IndexSafeUpsample2D.from_upsample(up, index_limit=4 * x.numel() // 7)  # the banded path: 7+ row bands
    _close(safe(x), up(x))
    assert original_type(safe) is Upsample2D


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@torch.no_grad()
def test_chunked_transformer_equals_diffusers_transformer(name: str) -> None:
    unet = build_unet(name)
    torch.manual_seed(1)
    LinFusion.construct_for(unet=unet, load_pretrained=False, init="random")
    transformer = next(m for m in unet.modules() if type(m) is Transformer2DModel)
    channels = transformer.config.in_channels
    x = torch.randn(2, channels, 10, 6)
    context = torch.randn(2, 77, transformer.config.cross_attention_dim)
    chunked = ChunkedTransformer2D.from_transformer(transformer, chunk=7)  # 60 tokens: 9 chunks, a short last one
    _close(chunked(x, encoder_hidden_states=context).sample, transformer(x, encoder_hidden_states=context).sample)
    assert original_type(chunked) is Transformer2DModel


@torch.no_grad()
def test_bound_memory_keeps_the_unet_function() -> None:
    """All rewrites at once, every threshold crossed: the UNet computes what it computed before."""
    unet = build_unet("tiny-sd15")
    torch.manual_seed(1)
    LinFusion.construct_for(unet=unet, load_pretrained=False, init="random")
    sample, context = torch.randn(2, 4, 16, 24), torch.randn(2, 77, unet.config.cross_attention_dim)
    plain = unet(sample, 10, context).sample
    bound_memory(unet, chunk=40, index_limit=2000)
    _close(unet(sample, 10, context).sample, plain)
