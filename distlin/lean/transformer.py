"""A UNet transformer (``Transformer2DModel``) run in token chunks end to end: the memory of ~3 hidden states
per token instead of ~6, exactly.

With LinFusion the only non-token-local operations of an SD transformer are its GroupNorm (global moments)
and the self-attention (a global state that is a sum over tokens). Everything else — ``proj_in``, the
LayerNorms, cross-attention to the prompt, the feed-forward, ``proj_out`` and the residuals — acts token by
token. So the hidden state ``h`` lives in one buffer; each attention first sums the partial states of
all chunks (reduced across ranks by the engine's processor), then every chunk is updated in place:
``h += attn1(norm1(h))``, ``h += attn2(norm2(h))``, ``h += ff(norm3(h))``. The GroupNorm's moments come
from the whole band (all-reduced by the engine's :class:`~distlin.parallel.groupnorm.PatchGroupNorm`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from distlin.linfusion.attention import LinFusionAttention, LinFusionAttnProcessor
from distlin.ops.group_norm import group_moments, normalize_with
from distlin.surgery import twin


def _chunkable_block(block: nn.Module) -> bool:
    """A plain SD/SDXL block: LayerNorms, LinFusion self-attention, cross-attention, feed-forward."""
    return (
        type(block) is BasicTransformerBlock
        and block.norm_type == "layer_norm"
        and not block.only_cross_attention
        and block.pos_embed is None
        and isinstance(block.attn1, LinFusionAttention)
        and isinstance(block.attn1.processor, LinFusionAttnProcessor)
    )


class ChunkedTransformer2D(Transformer2DModel):
    """``Transformer2DModel`` (same parameters) that runs ``chunk`` tokens at a time above ``chunk`` tokens.

    Anything it does not model (masks, attention kwargs, discrete or patched inputs, other block kinds)
    runs the original forward.
    """

    twin_of: ClassVar[type] = Transformer2DModel
    chunk: int

    @classmethod
    def from_transformer(cls, transformer: Transformer2DModel, chunk: int) -> ChunkedTransformer2D:
        chunked = twin(transformer, cls)
        chunked.chunk = chunk
        return chunked

    def _chunkable(self, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        extras = ("attention_mask", "encoder_attention_mask", "cross_attention_kwargs", "class_labels")
        return (
            self.is_input_continuous
            and hidden_states.ndim == 4
            and hidden_states.shape[2] * hidden_states.shape[3] > self.chunk
            and all(kwargs.get(key) is None for key in extras)
            and all(_chunkable_block(block) for block in self.transformer_blocks)
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or not self._chunkable(hidden_states, kwargs):
            return super().forward(hidden_states, *args, **kwargs)
        out = self._forward_chunked(hidden_states, kwargs.get("encoder_hidden_states"))
        return Transformer2DModelOutput(sample=out) if kwargs.get("return_dict", True) else (out,)

    def _row_chunks(self, height: int, width: int) -> list[tuple[int, int]]:
        rows = max(1, self.chunk // width)
        return [(r, min(r + rows, height)) for r in range(0, height, rows)]

    def _forward_chunked(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        batch, _, height, width = x.shape
        norm = self.norm
        # the engine's band twin knows the whole image's moments (it all-reduces them); a plain norm, this band's
        moments = norm.moments(x) if hasattr(norm, "moments") else group_moments(x, norm.num_groups)
        rows = self._row_chunks(height, width)
        h: torch.Tensor | None = None
        for a, b in rows:  # h = proj_in(norm(x)) as tokens, (B, H*W, C_inner)
            part = normalize_with(x[:, :, a:b], moments, norm)
            if not self.use_linear_projection:
                part = self.proj_in(part)
            part = part.permute(0, 2, 3, 1).reshape(batch, (b - a) * width, part.shape[1])
            if self.use_linear_projection:
                part = self.proj_in(part)
            if h is None:
                h = part.new_empty(batch, height * width, part.shape[-1])
            h[:, a * width : b * width] = part
        tokens = [(a * width, b * width) for a, b in rows]
        for block in self.transformer_blocks:
            self._block(block, h, tokens, context)
        out = torch.empty_like(x)
        for a, b in rows:  # out = proj_out(h) + x, back to (B, C, H, W)
            part = h[:, a * width : b * width]
            if self.use_linear_projection:
                part = self.proj_out(part)
            part = part.reshape(batch, b - a, width, part.shape[-1]).permute(0, 3, 1, 2)
            if not self.use_linear_projection:
                part = self.proj_out(part)
            out[:, :, a:b] = part + x[:, :, a:b]
        return out

    @staticmethod
    def _block(
        block: BasicTransformerBlock, h: torch.Tensor, tokens: list[tuple[int, int]], context: torch.Tensor | None
    ) -> None:
        """One transformer block, in place on ``h``: the self-attention state of all chunks first."""
        attn = block.attn1
        processor: LinFusionAttnProcessor = attn.processor
        state = None
        for a, b in tokens:
            part = processor.partial(attn, block.norm1(h[:, a:b]))
            state = part if state is None else state + part
        state = processor.reduce(state)
        for a, b in tokens:
            chunk = h[:, a:b]
            chunk += processor.apply(attn, block.norm1(chunk), state)
            if block.attn2 is not None:
                chunk += block.attn2(block.norm2(chunk), encoder_hidden_states=context)
            chunk += block.ff(block.norm3(chunk))
