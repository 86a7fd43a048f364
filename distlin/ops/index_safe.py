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

from distlin.thresholds import INDEX_LIMIT


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
    if rows is None and max(x.numel(), out_rows * out_row_elements) <= max_elements:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out = x.new_empty(batch, weight.shape[0], out_rows, out_width)  # parts written in place, never concatenated
    if rows is None and batch > 1:  # one sample at a time first: the cheapest split
        for i in range(batch):
            out[i : i + 1] = conv2d_rows(x[i : i + 1], weight, bias, stride, padding, dilation, groups)
        return out
    if rows is None:
        reach = d * (k - 1) + 1
        in_rows = max_elements // (x.shape[1] * width)
        rows = max(1, min(max_elements // out_row_elements, (in_rows - reach) // s + 1))
    for first in range(0, out_rows, rows):
        last = min(first + rows, out_rows) - 1
        lo, hi = first * s - p, last * s - p + d * (k - 1) + 1
        band = F.pad(x[:, :, max(lo, 0) : min(hi, height)], (0, 0, max(-lo, 0), max(hi - height, 0)))
        out[:, :, first : last + 1] = F.conv2d(band, weight, bias, stride, (0, pw), dilation, groups)
    return out


def upsample_nearest2x(x: torch.Tensor, max_elements: int = INDEX_LIMIT) -> torch.Tensor:
    """Nearest x2 upsampling of an NCHW tensor, in row bands whose output stays within ``max_elements``."""
    out_row_elements = 4 * x.shape[0] * x.shape[1] * x.shape[3]  # two output rows per input row
    rows = max(1, max_elements // out_row_elements)
    if rows >= x.shape[2]:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    out = x.new_empty(*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3])
    for first in range(0, x.shape[2], rows):
        band = x[:, :, first : first + rows]
        out[:, :, 2 * first : 2 * (first + band.shape[2])] = F.interpolate(band, scale_factor=2.0, mode="nearest")
    return out
