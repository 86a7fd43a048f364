"""Convolution over a row band: halo rows from the two neighbouring bands, zeros at the image border."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distlin.ops.halo import conv_out_size, halo_rows
from distlin.ops.index_safe import conv2d_rows
from distlin.parallel.context import ParallelContext
from distlin.surgery import bound_class, twin


class PatchConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state-dict keys) that runs on a row band.

    Before the convolution it fetches the rows its kernel reaches into from the bands above and below
    (point-to-point, never an all-gather) and pads with zeros only at the true image border. Stride,
    dilation and padding set the halo widths; ``pad_top`` is the zero rows above the image (the rows
    below follow from the output height). On one rank, or in naive mode, it is the plain convolution.
    Every kernel call goes through :func:`~distlin.ops.index_safe.conv2d_rows`, so none sees a tensor of
    more than 2**31 - 1 elements, whatever the band size; pointwise (1x1) convs exchange nothing. An input
    that holds every row of the image (``conv_in``'s: the latent, which every rank holds) is cut to this band
    and its halo rows directly, with no exchange.
    """

    twin_of: ClassVar[type] = nn.Conv2d
    ctx: ClassVar[ParallelContext]  # on the class bound to one engine (:func:`~distlin.surgery.bound_class`)

    def __init__(self, *args: Any, **kwargs: Any):
        """A conv built as ``type(conv)(...)`` beside a patched one joins its engine: PEFT builds a LoRA's down
        and up projections so, and the down projection has the adapted conv's kernel, so it needs halos too."""
        super().__init__(*args, **kwargs)
        self._join_engine()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ctx: ParallelContext) -> PatchConv2d:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"patch-parallel conv needs numeric zero padding, got {conv.padding!r}")
        patched = twin(conv, bound_class(cls, ctx=ctx))
        patched._join_engine()
        return patched

    def _join_engine(self) -> None:
        self.pad_top = self.padding[0]
        self.halo_slot = self.ctx.new_slot()
        self.ctx.add_conv(self)
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if ctx.patch.size == 1 or ctx.layout is None:
            return self._conv(x, self.padding)
        if x.shape[2] == ctx.layout.boundaries_at_width(x.shape[-1])[-1]:
            return self._conv(self._band_of_whole(x), (0, self.padding[1]))
        if ctx.naive or self.pointwise:
            return self._conv(x, self.padding)
        return self._conv(self._band_with_halos(x), (0, self.padding[1]))

    def _conv(self, x: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
        return conv2d_rows(
            x,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            max_elements=self.ctx.config.index_limit,
        )

    def _halo_needs(self, width: int) -> list[tuple[int, int]]:
        """Per band, the rows above and below it this conv reads (see :func:`~distlin.ops.halo.halo_rows`)."""
        pw = self.padding[1]
        width_out = conv_out_size(width, self.kernel_size[1], self.stride[1], pw, pw, self.dilation[1])
        layout = self.ctx.layout
        bounds_in, bounds_out = layout.boundaries_at_width(width), layout.boundaries_at_width(width_out)
        return halo_rows(bounds_in, bounds_out, self.kernel_size[0], self.stride[0], self.pad_top, self.dilation[0])

    def _band_of_whole(self, x: torch.Tensor) -> torch.Tensor:
        """This band's rows of an input that holds every row (what ``conv_in`` gets: the latent, which every
        rank holds) with the halo rows its kernel reads, zeros beyond the image: no exchange, in every mode."""
        me = self.ctx.patch.index
        start, stop = self.ctx.layout.band(me, x.shape[-1])
        top, bottom = self._halo_needs(x.shape[-1])[me]
        first, last, height = start - top, stop + bottom, x.shape[2]
        rows = x[:, :, max(first, 0) : min(last, height)]
        if first >= 0 and last <= height:
            return rows
        return F.pad(rows, (0, 0, max(-first, 0), max(last - height, 0)))

    def _band_with_halos(self, x: torch.Tensor) -> torch.Tensor:
        """This band ``x`` with the halo rows fetched from the neighbouring bands (zeros at the image border)."""
        ctx = self.ctx
        comm = ctx.patch
        bounds_in = ctx.layout.boundaries_at_width(x.shape[-1])
        needs = self._halo_needs(x.shape[-1])
        me, last = comm.index, comm.size - 1
        top, bottom = needs[me]
        sizes = [b - a for a, b in zip(bounds_in, bounds_in[1:], strict=False)]
        if (me > 0 and top > sizes[me - 1]) or (me < last and bottom > sizes[me + 1]):
            raise ValueError(
                f"a convolution needs {max(top, bottom)} halo rows but a neighbouring band has only "
                f"{min(sizes)}; use fewer ranks for this height"
            )

        def launch(async_op: bool):
            send_prev = x[:, :, : needs[me - 1][1]] if me > 0 and needs[me - 1][1] > 0 else None
            h = x.shape[2]
            send_next = x[:, :, h - needs[me + 1][0] :] if me < last and needs[me + 1][0] > 0 else None
            recv_prev = x.new_empty(*x.shape[:2], top, x.shape[3]) if me > 0 and top > 0 else None
            recv_next = x.new_empty(*x.shape[:2], bottom, x.shape[3]) if me < last and bottom > 0 else None
            return comm.exchange_neighbours(send_prev, send_next, recv_prev, recv_next, "halo", async_op)

        from_prev, from_next = ctx.exchange(self.halo_slot, "halo", launch)
        parts = []
        if top > 0:
            parts.append(from_prev if me > 0 else x.new_zeros(*x.shape[:2], top, x.shape[3]))
        parts.append(x[:, :, max(-top, 0) : x.shape[2] - max(-bottom, 0)])
        if bottom > 0:
            parts.append(from_next if me < last else x.new_zeros(*x.shape[:2], bottom, x.shape[3]))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
