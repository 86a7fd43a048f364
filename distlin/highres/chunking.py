"""Memory-bounded UNet execution: token-chunked feed-forward, row-chunked convolution and upsampling.

The GEGLU feed-forward holds ``4·mult·C`` values per token at once (projection, GELU, product), the
largest live activation of an SD UNet at high resolution; it is token-local, so running it ``chunk``
tokens at a time is exact. diffusers' ``BasicTransformerBlock.set_chunk_feed_forward`` does the same
but refuses token counts that are not a multiple of the chunk (band sizes rarely are), hence this wrapper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from distlin.highres.transformer import ChunkedTransformer2D
from distlin.ops.index_safe import INDEX_LIMIT, conv2d_rows, upsample_nearest2x
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


def disable_ff_chunking(unet: nn.Module) -> None:
    """Put the plain feed-forward modules back."""
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock) and isinstance(block.ff, ChunkedFeedForward):
            block.ff = block.ff.ff


class RowChunkedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters) computed ``rows`` output rows at a time
    (:func:`distlin.ops.index_safe.conv2d_rows`) above ``threshold`` input elements per sample: the conv's
    workspace then covers one band."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rows: int, threshold: int) -> RowChunkedConv2d:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("row-chunked convolution needs numeric zero padding")
        chunked = twin(conv, cls)
        chunked.rows, chunked.threshold = rows, threshold
        return chunked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() <= self.threshold:
            return super().forward(x)
        return conv2d_rows(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, self.rows)


def enable_conv_chunking(model: nn.Module, rows: int, threshold: int) -> int:
    """Swap every plain spatial ``nn.Conv2d`` of ``model`` for a :class:`RowChunkedConv2d`; returns the count."""
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d and m.kernel_size[0] > 1]
    for name, conv in convs:
        set_submodule(model, name, RowChunkedConv2d.from_conv(conv, rows, threshold))
    return len(convs)


class IndexSafeUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` (same parameters) whose nearest x2 interpolation runs in row bands when its
    output would exceed 2**31 - 1 elements (:func:`distlin.ops.index_safe.upsample_nearest2x`); the conv
    that follows is the model's own (the engine's :class:`~distlin.parallel.conv.PatchConv2d` bounds it)."""

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        plain = self.norm is not None or self.use_conv_transpose or not self.interpolate or output_size is not None
        if plain or 4 * hidden_states.numel() <= INDEX_LIMIT:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        hidden_states = upsample_nearest2x(hidden_states)
        if not self.use_conv:
            return hidden_states
        return self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)


class LeanResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` (same parameters) whose SiLUs run in place on the GroupNorm outputs, which
    are fresh tensors: the block then holds its input and one normalised copy instead of two. In an up
    block the input is the 3C-wide concatenation with the skip, so this is the peak of a 16K UNet once the
    transformers are chunked. Only without autograd, and only for the plain variant SD uses (no up/down
    sampling, additive time embedding, SiLU); anything else runs the original forward."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        plain = (
            self.upsample is None
            and self.downsample is None
            and self.time_embedding_norm == "default"
            and type(self.nonlinearity) is nn.SiLU
            and (self.time_emb_proj is not None or temb is None)
            and not torch.is_grad_enabled()
        )
        if args or kwargs or not plain:
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = self.conv1(F.silu(self.norm1(input_tensor), inplace=True))
        if temb is not None:
            hidden += self.time_emb_proj(temb if self.skip_time_act else F.silu(temb))[:, :, None, None]
        hidden = self.conv2(self.dropout(F.silu(self.norm2(hidden), inplace=True)))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (shortcut + hidden) / self.output_scale_factor


def bound_memory(model: nn.Module, chunk: int) -> None:
    """What every high-resolution run applies to its UNet or VAE: LinFusion transformers run ``chunk`` tokens
    at a time end to end (:class:`~distlin.highres.transformer.ChunkedTransformer2D`), the feed-forward of
    any other transformer block too, resnets with in-place activations (:class:`LeanResnetBlock2D`) and
    index-safe upsampling. Exact."""
    enable_ff_chunking(model, chunk)
    for name, module in list(model.named_modules()):
        if type(module) is Upsample2D:
            set_submodule(model, name, twin(module, IndexSafeUpsample2D))
        elif type(module) is Transformer2DModel:
            set_submodule(model, name, ChunkedTransformer2D.from_transformer(module, chunk))
        elif type(module) is ResnetBlock2D:
            set_submodule(model, name, twin(module, LeanResnetBlock2D))
