"""The SD VAE over row bands: decode and encode images far larger than one device holds, exactly.

The latent is cut into row bands like the UNet's (``RowLayout`` with a 1-row unit at latent level; the
decoder doubles the width per level, so ``boundaries_at_width`` gives every level's bands). Every 3x3
convolution fetches exact halo rows from its neighbours (``PatchConv2d``), every GroupNorm uses the
statistics of the whole image (``PatchGroupNorm``), and the mid-block softmax attention is exact and
global: it runs at latent resolution, so each rank gathers every band's keys and values and attends its
own queries in chunks (K and V of the whole latent: 2·H/8·W/8·C elements, 4 GiB in fp16 for SD at
16384x8192, while windowed attention would change the image). The encoder's stride-2 ``Downsample2D``
pads one zero row below the *image*, not below every band; ``BandDownsample`` fetches the first row of
the next band instead. Bands are exchanged synchronously (the VAE runs once, staleness buys nothing).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.downsampling import Downsample2D
from torch import nn

from distlin.parallel.comm import CommStats
from distlin.parallel.config import PatchParallelConfig
from distlin.parallel.context import ParallelContext
from distlin.parallel.conv import PatchConv2d
from distlin.parallel.groupnorm import PatchGroupNorm
from distlin.parallel.layout import RowLayout
from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import LATENT_FACTOR
from distlin.sizes import format_size
from distlin.surgery import Swaps
from distlin.thresholds import INDEX_LIMIT


def banded(ctx: ParallelContext) -> bool:
    """Whether this call works on a band of rows (several patch ranks and a layout), not on the whole tensor."""
    return ctx.patch.size > 1 and ctx.layout is not None


def gather_rows(ctx: ParallelContext, band: torch.Tensor) -> torch.Tensor:
    """Every rank's band of a ``(B, C, rows, W)`` tensor, concatenated: the whole tensor on every rank."""
    if not banded(ctx):
        return band
    sizes = ctx.layout.sizes(band.shape[-1])
    return torch.cat(ctx.patch.all_gather_rows(band, sizes, 2, "gather").wait(), dim=2)


class BandDownsample(nn.Module):
    """``Downsample2D(padding=0)`` on a row band: the bottom zero row only below the image.

    The original pads (right 1, bottom 1) and applies a stride-2, 3x3, unpadded conv, so output row ``o``
    reads input rows ``2o..2o+2``. Bands start on even rows at every encoder level (latent boundaries
    times 2, 4 or 8), so a band needs exactly one row of the next band: its first.
    """

    twin_of: ClassVar[type] = Downsample2D  # the same function: the sequential VAE reads it as the original

    def __init__(self, down: Downsample2D, ctx: ParallelContext):
        super().__init__()
        if not (down.use_conv and down.padding == 0 and down.norm is None):
            raise ValueError("BandDownsample replaces only the VAE's Downsample2D(use_conv, padding=0, no norm)")
        self.conv = down.conv
        self.use_conv, self.padding, self.norm = down.use_conv, down.padding, down.norm
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if not banded(ctx):
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        comm = ctx.patch
        me, last = comm.index, comm.size - 1
        send_prev = x[:, :, :1] if me > 0 else None
        below = x.new_empty(*x.shape[:2], 1, x.shape[3]) if me < last else None
        _, below = comm.exchange_neighbours(send_prev, None, None, below, "halo").wait()
        rows = torch.cat([x, below if below is not None else torch.zeros_like(x[:, :, :1])], dim=2)
        return self.conv(F.pad(rows, (0, 1, 0, 0)))


class GlobalAttnProcessor:
    """The VAE mid-block attention (``AttnProcessor2_0`` semantics) with queries from this band and keys and
    values of every band; queries go ``query_chunk`` at a time so the CPU path never holds N x N scores."""

    def __init__(self, ctx: ParallelContext, query_chunk: int = 4096):
        self.ctx = ctx
        self.query_chunk = query_chunk

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("the VAE band attention handles plain self-attention only (no mask, no spatial norm)")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q = split(attn.to_q(x))
        kv = torch.cat([attn.to_k(x), attn.to_v(x)], dim=-1)
        if banded(self.ctx):
            sizes = [rows * w for rows in self.ctx.layout.sizes(w)]
            kv = torch.cat(self.ctx.patch.all_gather_rows(kv, sizes, 1, "attention").wait(), dim=1)
        k, v = (split(t) for t in kv.chunk(2, dim=-1))
        out = torch.cat([F.scaled_dot_product_attention(qc, k, v) for qc in q.split(self.query_chunk, dim=2)], dim=2)
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class ParallelVAE:
    """An ``AutoencoderKL`` whose ``decode``/``encode`` run over row bands on every rank of ``runtime``.

    The layers are swapped in place (same parameters); outside :meth:`decode`/:meth:`encode` they behave
    like the originals, so the plain ``vae.decode`` still works. Results are gathered on every rank (the
    cascade re-encodes the whole upscaled image on every rank); one rank runs the plain model.
    """

    def __init__(
        self,
        vae: nn.Module,
        runtime: Runtime | None = None,
        query_chunk: int = 4096,
        stats: CommStats | None = None,
        index_limit: int = INDEX_LIMIT,
    ):
        self.vae = vae
        config = PatchParallelConfig(mode="exact", cfg_parallel=False, index_limit=index_limit)
        self.ctx = ParallelContext(runtime or Runtime(), config, stats=stats)
        self._swaps = Swaps(vae)
        for name, module in list(vae.named_modules()):
            if type(module) is nn.Conv2d and not self._swaps.covers(name):
                self._swaps.module(name, PatchConv2d.from_conv(module, self.ctx))
            elif type(module) is nn.GroupNorm:
                self._swaps.module(name, PatchGroupNorm.from_norm(module, self.ctx))
            elif isinstance(module, Downsample2D):
                self._swaps.module(name, BandDownsample(module, self.ctx))
            elif isinstance(module, Attention):
                self._swaps.processor(name, GlobalAttnProcessor(self.ctx, query_chunk))

    def undo(self) -> None:
        """Restore the original modules and attention processors."""
        self._swaps.restore()

    def _set_layout(self, latent_height: int, latent_width: int) -> None:
        self.ctx.layout = RowLayout(latent_height, latent_width, 1, self.ctx.patch.size)

    def _band(self, t: torch.Tensor) -> torch.Tensor:
        start, stop = self.ctx.layout.band(self.ctx.patch.index, t.shape[-1])
        return t[..., start:stop, :]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latents).sample`` (unscaled latents in, image in [-1, 1] out), band-parallel."""
        vae = self.vae
        self._set_layout(latents.shape[-2], latents.shape[-1])
        try:
            z = self._band(latents)
            if vae.post_quant_conv is not None:
                z = vae.post_quant_conv(z)
            return gather_rows(self.ctx, vae.decoder(z))
        finally:
            self.ctx.layout = None

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        """``vae.encode(image).latent_dist``, band-parallel; the image's sides must be multiples of 8."""
        vae = self.vae
        height, width = image.shape[-2:]
        if height % LATENT_FACTOR or width % LATENT_FACTOR:
            size = format_size(width, height)
            raise ValueError(f"image of {size} px: both sides must be multiples of {LATENT_FACTOR}")
        self._set_layout(height // LATENT_FACTOR, width // LATENT_FACTOR)
        try:
            moments = vae.encoder(self._band(image))
            if vae.quant_conv is not None:
                moments = vae.quant_conv(moments)
            return DiagonalGaussianDistribution(gather_rows(self.ctx, moments))
        finally:
            self.ctx.layout = None


def parallelize_vae(
    vae: nn.Module,
    runtime: Runtime | None = None,
    query_chunk: int = 4096,
    stats: CommStats | None = None,
    index_limit: int = INDEX_LIMIT,
) -> ParallelVAE:
    """Band-parallel ``decode``/``encode`` for ``vae`` over the ranks of ``runtime`` (see :class:`ParallelVAE`).

    ``stats`` counts its exchanges (give the run's, so ``--report-comm`` shows them); convs and GroupNorms
    never hand a kernel more than ``index_limit`` elements.
    """
    return ParallelVAE(vae, runtime, query_chunk, stats, index_limit)
