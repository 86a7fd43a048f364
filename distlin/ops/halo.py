"""Which neighbouring rows a convolution over a row band reads: the halo arithmetic of every banded conv."""

from __future__ import annotations


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
