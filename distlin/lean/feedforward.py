"""Token-chunked feed-forward: the GEGLU's wide hidden activation for a bounded number of tokens at a time.

The GEGLU feed-forward holds ``4·mult·C`` values per token at once (projection, GELU, product), the
largest live activation of an SD UNet at high resolution; it is token-local, so running it ``chunk``
tokens at a time is exact. diffusers' ``BasicTransformerBlock.set_chunk_feed_forward`` does the same
but refuses token counts that are not a multiple of the chunk (band sizes rarely are), hence this twin.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from torch import nn

from distlin.surgery import Swaps, twin


class ChunkedFeedForward(FeedForward):
    """diffusers' ``FeedForward`` (same parameters and state-dict keys) run on ``chunk`` tokens (dim 1) at a
    time; any remainder is the last, shorter chunk."""

    twin_of: ClassVar[type] = FeedForward
    compiled_method: ClassVar[str] = "chunk_forward"  # what --compile compiles: one chunk, not the loop
    chunk: int

    @classmethod
    def from_feedforward(cls, ff: FeedForward, chunk: int) -> ChunkedFeedForward:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 token, got {chunk}")
        chunked = twin(ff, cls)
        chunked.chunk = chunk
        return chunked

    def chunk_forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The plain feed-forward of at most ``chunk`` tokens."""
        return super().forward(hidden_states, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if hidden_states.shape[1] <= self.chunk:
            return self.chunk_forward(hidden_states, *args, **kwargs)
        out = None  # written chunk by chunk: no list of chunk outputs plus a concatenated copy
        for start in range(0, hidden_states.shape[1], self.chunk):
            part = self.chunk_forward(hidden_states[:, start : start + self.chunk], *args, **kwargs)
            if out is None:
                out = part.new_empty(*part.shape[:1], hidden_states.shape[1], *part.shape[2:])
            out[:, start : start + part.shape[1]] = part
        return out


def enable_ff_chunking(model: nn.Module, chunk: int, swaps: Swaps | None = None) -> int:
    """The feed-forward of every transformer block of ``model`` chunked (recorded in ``swaps`` to undo it);
    returns how many blocks there are."""
    swaps = Swaps(model) if swaps is None else swaps
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)]
    for name, block in blocks:
        if isinstance(block.ff, FeedForward):
            swaps.module(f"{name}.ff" if name else "ff", ChunkedFeedForward.from_feedforward(block.ff, chunk))
    return len(blocks)
