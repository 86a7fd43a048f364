"""GroupNorm split in two: per-group moments that add up over any partition of the pixels, then the affine map.

Summing the moments of row bands (across ranks, or band by band on one device) gives exactly the moments of
the whole image, which is what makes a banded GroupNorm equal the plain one.
"""

from __future__ import annotations

import torch
from torch import nn

MOMENT_CHUNK_ELEMENTS = 1 << 26  # largest float32 copy group_moments makes of a half-precision input


def group_moments(x: torch.Tensor, groups: int, chunk_elements: int = MOMENT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Per (batch, group): ``[count, sum, sum of squares]`` in float64, from a centred two-pass in float32.

    Two passes (the mean, then the sum of the centred values' squares, with the centred sum as a correction) are
    float32-accurate and several times faster than ``var_mean`` on a CPU, whose Welford loop does not vectorise
    (2x320x64x128 band, one thread, 2-core EPYC, 2026-12-04: 22-33 ms against 3-4 ms). Groups are visited a few
    at a time so the float32 centred copy stays below ``chunk_elements`` whatever the resolution, and never
    exceeds the band the GroupNorm then writes.
    """
    xg = x.reshape(x.shape[0], groups, -1)
    n = xg.shape[-1]
    step = max(1, chunk_elements // max(1, n * x.shape[0]))
    means, variances = [], []
    for g in range(0, groups, step):
        part = xg[:, g : g + step]
        if part.dtype == torch.float32:
            mean = part.mean(dim=-1, keepdim=True)
            centred = part - mean
        else:  # the float32 copy is the centred one: no second buffer
            centred = part.float()
            mean = centred.mean(dim=-1, keepdim=True)
            centred.sub_(mean)
        residual = centred.sum(dim=-1, keepdim=True).double() / n
        square = centred.square_().sum(dim=-1, keepdim=True).double() / n
        means.append(mean.double() + residual)
        variances.append((square - residual * residual).clamp_min(0.0))
    mean, var = torch.cat(means, dim=1).squeeze(-1), torch.cat(variances, dim=1).squeeze(-1)
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
