"""Token-chunked feed-forward: the GEGLU's wide hidden activation for a bounded number of tokens at a time.

The GEGLU feed-forward holds ``4·mult·C`` values per token at once (projection, GELU, product), the
largest live activation of an SD UNet at high resolution; it is token-local, so running it ``chunk``
tokens at a time is exact. diffusers' ``BasicTransformerBlock.set_chunk_feed_forward`` does the same
but refuses token counts that are not a multiple of the chunk (band sizes rarely are), hence this wrapper.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn


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
        out = None  # written chunk by chunk: no list of chunk outputs plus a concatenated copy
        for start in range(0, hidden_states.shape[1], self.chunk):
            part = self.ff(hidden_states[:, start : start + self.chunk], *args, **kwargs)
            if out is None:
                out = part.new_empty(*part.shape[:1], hidden_states.shape[1], *part.shape[2:])
            out[:, start : start + part.shape[1]] = part
        return out


def enable_ff_chunking(unet: nn.Module, chunk: int) -> int:
    """Wrap the feed-forward of every transformer block of ``unet``; returns how many were wrapped."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for block in blocks:
        inner = block.ff.ff if isinstance(block.ff, ChunkedFeedForward) else block.ff
        block.ff = ChunkedFeedForward(inner, chunk)
    return len(blocks)
