"""Kernels that use 32-bit indexing, called so that no tensor they see exceeds 2**31 - 1 elements.

At 16K, SD-1.5 on one rank holds tensors of 2.7 G (a 640-channel level-0 map) and 4 G elements (an up
block's concatenated resnet input). Element-wise ops and reductions split such tensors themselves, but the
cuDNN convolution refuses them ("canUse32BitIndexMath") when the batch cannot be split further, and
nearest upsampling fails on large outputs (pytorch/pytorch#141831). Both ops are row-local, so they are
computed a band of output rows at a time here: the result is the same tensor, only the kernel calls shrink.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INDEX_LIMIT = 2**31 - 1


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def conv2d_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    rows: int | None = None,
    max_elements: int = INDEX_LIMIT,
) -> torch.Tensor:
    """``F.conv2d`` with numeric zero padding, run ``rows`` output rows at a time, or, by default, in as few
    row bands as keep every kernel call's input and output within ``max_elements`` (one call when they fit).

    Each band reads its input rows plus the kernel's reach; zero rows are added only at the image border,
    so the bands concatenate to exactly the whole convolution.
    """
    (s, sw), (p, pw), (d, dw) = _pair(stride), _pair(padding), _pair(dilation)
    k, kw = weight.shape[2:]
    batch, _, height, width = x.shape
    out_rows = (height + 2 * p - d * (k - 1) - 1) // s + 1
    out_width = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out_row_elements = batch * weight.shape[0] * out_width
    if rows is None:
        if max(x.numel(), out_rows * out_row_elements) <= max_elements:
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        if batch > 1:  # one sample at a time first: the cheapest split
            parts = [conv2d_rows(x[i : i + 1], weight, bias, stride, padding, dilation, groups) for i in range(batch)]
            return torch.cat(parts)
        in_row_elements = x.shape[1] * width
        reach = d * (k - 1) + 1
        rows = max(1, min(max_elements // out_row_elements, (max_elements // in_row_elements - reach) // s + 1))
    parts = []
    for first in range(0, out_rows, rows):
        last = min(first + rows, out_rows) - 1
        lo, hi = first * s - p, last * s - p + d * (k - 1) + 1
        band = F.pad(x[:, :, max(lo, 0) : min(hi, height)], (0, 0, max(-lo, 0), max(hi - height, 0)))
        parts.append(F.conv2d(band, weight, bias, stride, (0, pw), dilation, groups))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def upsample_nearest2x(x: torch.Tensor, max_elements: int = INDEX_LIMIT) -> torch.Tensor:
    """Nearest x2 upsampling of an NCHW tensor, in row bands whose output stays within ``max_elements``."""
    out_row_elements = 4 * x.shape[0] * x.shape[1] * x.shape[3]  # two output rows per input row
    rows = max(1, max_elements // out_row_elements)
    if rows >= x.shape[2]:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return torch.cat([F.interpolate(band, scale_factor=2.0, mode="nearest") for band in x.split(rows, 2)], dim=2)
