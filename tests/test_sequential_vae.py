"""Sequential band decode equals the plain VAE decode, where diffusers' tiled decode does not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers.models.attention_processor import SpatialNorm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distlin.highres.sequential_vae import UnsupportedDecoderError, decode_sequential
from distlin.models.tiny import build_pipeline

LATENT_H, LATENT_W = 24, 16
TOL = 1e-4


class LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any op but ``cat`` materialises: a proxy for peak compute memory on CPU.

    Store and compute are both the CPU here; the big ``cat``s of the sequential decode are store-side (a
    band with its halo rows, the final image), and the plain decode has no big ``cat``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if func is torch.ops.aten.cat.default else tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _latents(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, LATENT_H, LATENT_W, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vae() -> nn.Module:
    return build_pipeline("tiny-sd15").vae.eval()


@pytest.fixture(scope="module")
def plain(vae) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(_latents()).sample


@pytest.fixture(scope="module")
def error(vae, plain) -> float:
    return (decode_sequential(vae, _latents(), band_rows=3) - plain).abs().max().item()


@pytest.mark.parametrize("band_rows", [1, 3, 5, 24])
def test_equals_plain_decode(vae, plain, band_rows) -> None:
    # query_chunk 7 splits the 16-token rows, so query chunks straddle rows and bands
    out = decode_sequential(vae, _latents(), band_rows, query_chunk=7)
    assert out.shape == plain.shape and out.dtype == plain.dtype
    assert (out - plain).abs().max().item() < TOL


def test_batch_of_two(vae) -> None:
    z = _latents(2)
    with torch.no_grad():
        plain = vae.decode(z).sample
    assert (decode_sequential(vae, z, band_rows=5) - plain).abs().max().item() < TOL


def test_float16_store_is_close(vae, plain) -> None:
    out = decode_sequential(vae, _latents(), band_rows=5, store_dtype=torch.float16)
    assert out.dtype == torch.float32
    assert (out - plain).abs().max().item() < 0.02 * plain.abs().max().item()


def test_float16_vae_is_close() -> None:
    vae = build_pipeline("tiny-sd15", torch_dtype=torch.float16).vae.eval()
    z = _latents().half()
    try:
        with torch.no_grad():
            plain = vae.decode(z).sample
    except (RuntimeError, NotImplementedError) as exc:  # an op without a CPU half kernel
        pytest.skip(f"float16 VAE decode not supported on this CPU build: {exc}")
    out = decode_sequential(vae, z, band_rows=5)
    assert out.dtype == torch.float16
    assert (out.float() - plain.float()).abs().max().item() < 0.02 * plain.float().abs().max().item()


def _spatial_norm(vae: nn.Module) -> None:
    vae.decoder.conv_norm_out = SpatialNorm(32, 4)


def _wide_shortcut(vae: nn.Module) -> None:
    vae.decoder.up_blocks[3].resnets[0].conv_shortcut = nn.Conv2d(16, 8, 3, padding=1)


def _transposed_upsampler(vae: nn.Module) -> None:
    vae.decoder.up_blocks[0].upsamplers[0].use_conv_transpose = True


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (_spatial_norm, "conv_norm_out"),
        (_wide_shortcut, r"up_blocks\[3\].resnets\[0\].conv_shortcut"),
        (_transposed_upsampler, r"up_blocks\[0\].upsamplers\[0\]"),
    ],
)
def test_unsupported_decoder_raises(mutate: Callable[[nn.Module], None], where: str) -> None:
    vae = build_pipeline("tiny-sd15").vae.eval()
    mutate(vae)
    with pytest.raises(UnsupportedDecoderError, match=where):
        decode_sequential(vae, _latents(), band_rows=3)


def test_bad_band_rows_raises(vae) -> None:
    with pytest.raises(ValueError, match="band_rows=0"):
        decode_sequential(vae, _latents(), band_rows=0)


def test_diffusers_tiling_is_far_worse(vae, plain, error) -> None:
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 32, 4, 0.25
    try:
        with torch.no_grad():
            tiled = vae.decode(_latents()).sample
    finally:
        vae.disable_tiling()
    tiled_error = (tiled - plain).abs().max().item()
    print(f"\nmax abs error vs plain decode: sequential {error:.2e}, diffusers tiled {tiled_error:.2e}")
    assert tiled_error > 100 * max(error, 1e-6)


def test_largest_tensor_is_a_band(vae) -> None:
    z = torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LargestTensor() as plain:
        vae.decode(z)
    with LargestTensor() as banded:
        decode_sequential(vae, z, band_rows=4)
    print(f"\nlargest tensor, 256x128 px: plain {plain.largest} B, sequential (4-row bands) {banded.largest} B")
    assert banded.largest * 6 < plain.largest  # 8 bands, each with 2 halo rows
