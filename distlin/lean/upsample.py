"""Nearest x2 upsampling that never hands a kernel more than the index limit (pytorch/pytorch#141831)."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers.models.upsampling import Upsample2D

from distlin.ops.index_safe import INDEX_LIMIT, upsample_nearest2x
from distlin.surgery import twin


class IndexSafeUpsample2D(Upsample2D):
    """diffusers' ``Upsample2D`` (same parameters) whose nearest x2 interpolation runs in row bands when its
    output would exceed ``index_limit`` elements (:func:`distlin.ops.index_safe.upsample_nearest2x`); the conv
    that follows is the model's own (the engine's :class:`~distlin.parallel.conv.PatchConv2d` bounds it)."""

    twin_of: ClassVar[type] = Upsample2D
    index_limit: int

    @classmethod
    def from_upsample(cls, upsample: Upsample2D, index_limit: int = INDEX_LIMIT) -> IndexSafeUpsample2D:
        safe = twin(upsample, cls)
        safe.index_limit = index_limit
        return safe

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        plain = self.norm is not None or self.use_conv_transpose or not self.interpolate or output_size is not None
        if plain or 4 * hidden_states.numel() <= self.index_limit:
            return super().forward(hidden_states, output_size, *args, **kwargs)
        hidden_states = upsample_nearest2x(hidden_states, self.index_limit)
        if not self.use_conv:
            return hidden_states
        return self.conv(hidden_states) if self.name == "conv" else self.Conv2d_0(hidden_states)
