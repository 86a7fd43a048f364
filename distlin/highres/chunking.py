"""Memory-bounded UNet execution: token-chunked feed-forward and row-chunked convolution.

The GEGLU feed-forward holds ``4·mult·C`` values per token at once (projection, GELU, product), the
largest live activation of an SD UNet at high resolution; it is token-local, so running it ``chunk``
tokens at a time is exact. diffusers' ``BasicTransformerBlock.set_chunk_feed_forward`` does the same
but refuses token counts that are not a multiple of the chunk (band sizes rarely are), hence this wrapper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from distlin.surgery import set_submodule, twin


class ChunkedFeedForward(nn.Module):
    """Runs ``ff`` on ``chunk`` tokens (dim 1) at a time; any remainder is the last, shorter chunk."""

    def __init__(self, ff: nn.Module, chunk: int):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {chunk}")
        self.ff, self.chunk = ff, chunk

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if hidden_states.shape[1] <= self.chunk:
            return self.ff(hidden_states, *args, **kwargs)
        return torch.cat([self.ff(part, *args, **kwargs) for part in hidden_states.split(self.chunk, dim=1)], dim=1)


def enable_ff_chunking(unet: nn.Module, chunk: int) -> int:
    """Wrap the feed-forward of every transformer block of ``unet``; returns how many were wrapped."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        inner = block.ff.ff if isinstance(block.ff, ChunkedFeedForward) else block.ff
        block.ff = ChunkedFeedForward(inner, chunk)
    return len(blocks)


def disable_ff_chunking(unet: nn.Module) -> None:
    """Put the plain feed-forward modules back."""
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock) and isinstance(block.ff, ChunkedFeedForward):
            block.ff = block.ff.ff


def row_chunked_conv2d(conv: nn.Conv2d, x: torch.Tensor, rows: int) -> torch.Tensor:
    """``conv(x)`` computed ``rows`` output rows at a time: each chunk reads its input rows plus the
    kernel's reach, zero-padded only at the image border, so the result equals the whole convolution
    while the conv's workspace covers one chunk."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("row-chunked convolution needs numeric zero padding")
    (k, _), (s, _), (p, pw), (d, _) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    height = x.shape[2]
    out_rows = (height + 2 * p - d * (k - 1) - 1) // s + 1
    parts = []
    for first in range(0, out_rows, rows):
        last = min(first + rows, out_rows) - 1
        lo, hi = first * s - p, last * s - p + d * (k - 1) + 1
        band = x[:, :, max(lo, 0) : min(hi, height)]
        band = F.pad(band, (0, 0, max(-lo, 0), max(hi - height, 0)))
        parts.append(F.conv2d(band, conv.weight, conv.bias, conv.stride, (0, pw), conv.dilation, conv.groups))
    return torch.cat(parts, dim=2)


class RowChunkedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters) that switches to :func:`row_chunked_conv2d` above
    ``threshold`` input elements per sample."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rows: int, threshold: int) -> RowChunkedConv2d:
        chunked = twin(conv, cls)
        chunked.rows, chunked.threshold = rows, threshold
        return chunked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() <= self.threshold:
            return super().forward(x)
        return row_chunked_conv2d(self, x, self.rows)


def enable_conv_chunking(model: nn.Module, rows: int, threshold: int) -> int:
    """Swap every plain spatial ``nn.Conv2d`` of ``model`` for a :class:`RowChunkedConv2d`; returns the count."""
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size[0] > 1]
    for name, conv in convs:
        set_submodule(model, name, RowChunkedConv2d.from_conv(conv, rows, threshold))
    return len(convs)
