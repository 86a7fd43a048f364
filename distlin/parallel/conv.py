"""Convolution over a row band: halo rows from the two neighbouring bands, zeros at the image border."""

from __future__ import annotations

import torch
from torch import nn

from distlin.ops.index_safe import conv2d_rows
from distlin.parallel.context import ParallelContext
from distlin.surgery import twin


def conv_out_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def halo_rows(
    bounds_in: tuple[int, ...], bounds_out: tuple[int, ...], kernel: int, stride: int, pad_top: int, dilation: int
) -> list[tuple[int, int]]:
    """Per band, how many input rows it needs above and below its own to produce its output rows.

    Output row ``o`` reads input rows ``o*stride - pad_top + i*dilation`` for ``i < kernel``. A negative
    count means the band has rows it does not need (they are cropped).
    """
    needs = []
    for r in range(len(bounds_in) - 1):
        first = bounds_out[r] * stride - pad_top
        last = (bounds_out[r + 1] - 1) * stride - pad_top + dilation * (kernel - 1)
        needs.append((bounds_in[r] - first, last + 1 - bounds_in[r + 1]))
    return needs


class PatchConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state-dict keys) that runs on a row band.

    Before the convolution it fetches the rows its kernel reaches into from the bands above and below
    (point-to-point, never an all-gather) and pads with zeros only at the true image border. Stride,
    dilation and padding set the halo widths; ``pad_top`` is the zero rows above the image (the rows
    below follow from the output height). On one rank, or in naive mode, it is the plain convolution.
    Every kernel call goes through :func:`~distlin.ops.index_safe.conv2d_rows`, so none sees a tensor of
    more than 2**31 - 1 elements, whatever the band size; pointwise (1x1) convs exchange nothing.
    """

    ctx: ParallelContext

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ctx: ParallelContext) -> PatchConv2d:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"patch-parallel conv needs numeric zero padding, got {conv.padding!r}")
        patched = twin(conv, cls)
        patched.ctx = ctx
        patched.pad_top = conv.padding[0]
        patched.halo_slot = ctx.new_slot()
        patched.pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
        return patched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        comm = ctx.patch
        if comm.size == 1 or ctx.naive or ctx.layout is None or self.pointwise:
            return conv2d_rows(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        pw = self.padding[1]
        width_out = conv_out_size(x.shape[-1], self.kernel_size[1], self.stride[1], pw, pw, self.dilation[1])
        bounds_in = ctx.layout.boundaries_at_width(x.shape[-1])
        bounds_out = ctx.layout.boundaries_at_width(width_out)
        needs = halo_rows(bounds_in, bounds_out, k, s, self.pad_top, d)
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
            return comm.exchange_neighbours(send_prev, send_next, recv_prev, recv_next, "halo")

        from_prev, from_next = ctx.exchange(self.halo_slot, None, launch)
        parts = []
        if top > 0:
            parts.append(from_prev if me > 0 else x.new_zeros(*x.shape[:2], top, x.shape[3]))
        parts.append(x[:, :, max(-top, 0) : x.shape[2] - max(-bottom, 0)])
        if bottom > 0:
            parts.append(from_next if me < last else x.new_zeros(*x.shape[:2], bottom, x.shape[3]))
        rows = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        return conv2d_rows(rows, self.weight, self.bias, self.stride, (0, pw), self.dilation, self.groups)
