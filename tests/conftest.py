"""Shared fixtures: a small SD-like UNet and an independent, naive LinFusion attention reference."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F

NaiveLinFusion = Callable[[torch.Tensor, Mapping[str, torch.Tensor], int, int | None], torch.Tensor]


def build_sd_like_unet(seed: int = 0):
    """A 2-level SD-1.5-shaped UNet2DConditionModel (cross-attention at both levels and in the mid block).

    Levels have different widths and head counts (32 ch / 2 heads, 64 ch / 4 heads) so layer mismatches show.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),  # SD-1.5 convention: this is the number of heads per level
        norm_num_groups=8,
    )
    return unet.eval()


@pytest.fixture
def sd_unet():
    """A fresh small SD-like UNet built with a fixed seed (function scope: tests may mount layers on it)."""
    return build_sd_like_unet()


def _naive_linfusion(
    x: torch.Tensor, weights: Mapping[str, torch.Tensor], heads: int, projection_mid_dim: int | None
) -> torch.Tensor:
    """LinFusion attention written out from the paper's formula, in float64, with an explicit N x N matrix.

    ``weights`` uses the released checkpoint's per-layer key names (``to_q.weight``, ``to_q_.0.weight``, ...).
    ``x`` is ``(B, N, C)``. ``projection_mid_dim == -1`` means P is the identity (q_in = k_in = 2x).
    """
    w = {name: t.detach().to(torch.float64) for name, t in weights.items()}
    x = x.detach().to(torch.float64)
    b, n, c = x.shape
    d = c // heads

    def projection(prefix: str) -> torch.Tensor:
        if projection_mid_dim == -1:
            return x
        hid = F.linear(x, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"])
        hid = F.layer_norm(hid, (hid.shape[-1],), w[f"{prefix}.1.weight"], w[f"{prefix}.1.bias"], eps=1e-5)
        hid = F.leaky_relu(hid, 0.01)
        return F.linear(hid, w[f"{prefix}.3.weight"], w[f"{prefix}.3.bias"])

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, n, heads, d).permute(0, 2, 1, 3)  # (B, h, N, d)

    q = split(F.linear(x + projection("to_q_"), w["to_q.weight"]))
    k = split(F.linear(x + projection("to_k_"), w["to_k.weight"]))
    v = split(F.linear(x, w["to_v.weight"]))
    phi_q, phi_k = F.elu(q) + 1.0, F.elu(k) + 1.0
    scores = phi_q @ phi_k.transpose(-1, -2)  # (B, h, N, N): phi(q_i) . phi(k_j), no 1/sqrt(d)
    numerator = (scores @ v) / n
    denominator = scores.sum(dim=-1, keepdim=True) / n + 1e-4
    out = (numerator / denominator).permute(0, 2, 1, 3).reshape(b, n, c)
    return F.linear(out, w["to_out.0.weight"], w["to_out.0.bias"])


@pytest.fixture
def naive_linfusion() -> NaiveLinFusion:
    """The naive reference ``f(x, weights, heads, projection_mid_dim) -> float64 output``."""
    return _naive_linfusion
