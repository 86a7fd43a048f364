"""A resnet block whose activations run in place: one normalised copy of its input alive instead of two."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class LeanResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` (same parameters) whose SiLUs run in place on the GroupNorm outputs, which
    are fresh tensors: the block then holds its input and one normalised copy instead of two. In an up
    block the input is the 3C-wide concatenation with the skip, so this is the peak of a 16K UNet once the
    transformers are chunked. Only without autograd, and only for the plain variant SD uses (no up/down
    sampling, additive time embedding, SiLU); anything else runs the original forward."""

    twin_of: ClassVar[type] = ResnetBlock2D

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
