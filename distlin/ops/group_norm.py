"""GroupNorm split in two: per-group moments that add up over any partition of the pixels, then the affine map.

Summing the moments of row bands (across ranks, or band by band on one device) gives exactly the moments of
the whole image, which is what makes a banded GroupNorm equal the plain one.
"""

from __future__ import annotations

import torch
from torch import nn

MOMENT_CHUNK_ELEMENTS = 1 << 26  # largest float32 copy group_moments makes of a half-precision input


def group_moments(x: torch.Tensor, groups: int, chunk_elements: int = MOMENT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Per (batch, group): ``[count, sum, sum of squares]`` in float64, computed stably from var_mean.

    Groups are visited a few at a time so the float32 copy of a half-precision input stays below
    ``chunk_elements`` whatever the resolution.
    """
    xg = x.reshape(x.shape[0], groups, -1)
    n = xg.shape[-1]
    step = max(1, chunk_elements // max(1, n * x.shape[0]))
    parts = [torch.var_mean(xg[:, g : g + step].float(), dim=-1, unbiased=False) for g in range(0, groups, step)]
    var, mean = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    mean, var = mean.double(), var.double()
    return torch.stack([torch.full_like(mean, n), mean * n, (var + mean * mean) * n], dim=-1)


def normalize_with(x: torch.Tensor, moments: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Apply GroupNorm with given (global) moments: one fused multiply-add in the input dtype."""
    b, c = x.shape[:2]
    g = norm.num_groups
    mean = moments[..., 1] / moments[..., 0]
    var = (moments[..., 2] / moments[..., 0] - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(var + norm.eps)
    scale = rstd.repeat_interleave(c // g, dim=1).float()
    shift = (-mean * rstd).repeat_interleave(c // g, dim=1).float()
    if norm.affine:
        shift = shift * norm.weight.float() + norm.bias.float()
        scale = scale * norm.weight.float()
    view = (b, c) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))
