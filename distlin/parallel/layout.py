"""Row bands: which latent rows each rank owns, at every resolution level of the network."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from distlin.errors import UsageError


class TooManyRanks(UsageError):
    """More ranks than an image's height splits into: ``ranks`` bands need at least ``min_height`` px."""

    def __init__(self, message: str, ranks: int, min_height: int):
        super().__init__(message)
        self.ranks, self.min_height = ranks, min_height


def max_ranks(height: int, unit: int) -> int:
    """The largest number of bands a latent of ``height`` rows splits into with ``unit``-row granularity."""
    return max(height // unit, 1)


@dataclass(frozen=True)
class RowLayout:
    """Contiguous bands of latent rows, one per rank, with boundaries on multiples of ``unit`` rows.

    ``unit`` is ``2**L`` for a network with ``L`` downsamplings, so every level splits exactly. Bands
    differ by at most one unit; the last band also takes the rows that do not fill a whole unit.
    ``width`` is the latent width, used to recognise a tensor's level from its width. ``factor``: image pixels
    per latent row, for messages in pixels.
    """

    height: int
    width: int
    unit: int
    ranks: int
    factor: int = 8

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise UsageError(f"number of ranks must be >= 1, got {self.ranks}")
        units = self.height // self.unit
        if self.ranks > 1 and self.ranks > units:
            most, least = max_ranks(self.height, self.unit), self.ranks * self.unit * self.factor
            raise TooManyRanks(
                f"{self.ranks} ranks cannot split a latent of {self.height} rows ({self.height * self.factor} px) "
                f"into bands of {self.unit}-row units: at most {most} {'rank works' if most == 1 else 'ranks work'} "
                f"for this height; use fewer ranks or a height of at least {least} px",
                self.ranks,
                least,
            )

    @cached_property
    def boundaries(self) -> tuple[int, ...]:
        """``ranks + 1`` row indices at latent resolution; band r is ``[b[r], b[r+1])``."""
        units = self.height // self.unit
        base, extra = divmod(units, self.ranks)
        cuts = [self.unit * (r * base + min(r, extra)) for r in range(self.ranks)]
        return (*cuts, self.height)

    def boundaries_at_width(self, width: int) -> tuple[int, ...]:
        """Band boundaries for a feature map ``width`` columns wide (a deeper or shallower level).

        Deeper levels halve with ceil (stride-2 convs with padding 1); shallower ones (VAE decoder,
        image space) double.
        """
        if width >= self.width:
            factor, rest = divmod(width, self.width)
            if rest or factor & (factor - 1):
                raise ValueError(f"width {width} is not a power-of-two multiple of the latent width {self.width}")
            return tuple(b * factor for b in self.boundaries)
        w, scale = self.width, 1
        while w > width:
            w, scale = -(-w // 2), scale * 2
        if w != width:
            raise ValueError(f"width {width} is not a level of latent width {self.width}")
        return tuple(-(-b // scale) for b in self.boundaries)

    def band(self, rank: int, width: int | None = None) -> tuple[int, int]:
        b = self.boundaries if width is None else self.boundaries_at_width(width)
        return b[rank], b[rank + 1]

    def sizes(self, width: int | None = None) -> list[int]:
        b = self.boundaries if width is None else self.boundaries_at_width(width)
        return [b[r + 1] - b[r] for r in range(self.ranks)]
