"""The memory-bounding rewrites every high-resolution run applies to its UNet and VAE, in one function."""

from __future__ import annotations

from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from distlin.lean.feedforward import enable_ff_chunking
from distlin.lean.resnet import LeanResnetBlock2D
from distlin.lean.transformer import ChunkedTransformer2D
from distlin.lean.upsample import IndexSafeUpsample2D
from distlin.ops.index_safe import INDEX_LIMIT
from distlin.surgery import Swaps, twin


def bound_memory(model: nn.Module, chunk: int, index_limit: int = INDEX_LIMIT) -> Swaps:
    """What every high-resolution run applies to its UNet or VAE: LinFusion transformers run ``chunk`` tokens
    at a time end to end (:class:`~distlin.lean.transformer.ChunkedTransformer2D`), the feed-forward of
    any other transformer block too, resnets with in-place activations (:class:`LeanResnetBlock2D`) and
    upsampling whose kernel calls stay within ``index_limit`` elements. Exact; each rewrite switches itself on
    only above its threshold, so a small run computes exactly what the plain modules do. Every rewrite is a twin
    (the same parameters and state-dict keys); ``restore()`` on the returned swaps puts the originals back."""
    swaps = Swaps(model)
    enable_ff_chunking(model, chunk, swaps)
    for name, module in list(model.named_modules()):
        if type(module) is Upsample2D:
            swaps.module(name, IndexSafeUpsample2D.from_upsample(module, index_limit))
        elif type(module) is Transformer2DModel:
            swaps.module(name, ChunkedTransformer2D.from_transformer(module, chunk))
        elif type(module) is ResnetBlock2D:
            swaps.module(name, twin(module, LeanResnetBlock2D))
    return swaps
