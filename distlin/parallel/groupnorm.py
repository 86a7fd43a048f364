"""GroupNorm over a row band with statistics of the whole image."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distlin.ops.group_norm import group_moments, normalize_with
from distlin.parallel.context import ParallelContext
from distlin.surgery import twin


def corrected_moments(stale_band: torch.Tensor, stale_total: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """The whole image's moments now, estimated from last step's (DistriFusion's corrected asynchronous GroupNorm).

    Last step's global mean and mean square per group, each moved by this band's full change since last step,
    as if every band had changed like this one (replacing only this band's share counts its change ``1/N``
    and ends 13-21 dB further from one device, docs/RESULTS.md section 7). Where the estimate's variance
    comes out negative, this band's own variance is used.
    """

    def means(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return m[..., 1] / m[..., 0], m[..., 2] / m[..., 0]

    (mean, square), (band_mean, band_square), (old_band_mean, old_band_square) = map(
        means, (stale_total, band, stale_band)
    )
    mean = mean + band_mean - old_band_mean
    square = square + band_square - old_band_square
    square = torch.where(square < mean * mean, mean * mean + band_square - band_mean * band_mean, square)
    count = stale_total[..., 0]
    return torch.stack([count, mean * count, square * count], dim=-1)


class PatchGroupNorm(nn.GroupNorm):
    """An ``nn.GroupNorm`` (same parameters) whose statistics cover every band.

    Exact: one all-reduce of per-group ``[count, sum, sum of squares]`` (float64). Displaced with stale
    ``groupnorm``: last step's global moments corrected by this band's change (:func:`corrected_moments`),
    the fresh moments travelling meanwhile. Naive: local moments.
    """

    twin_of: ClassVar[type] = nn.GroupNorm
    ctx: ParallelContext

    @classmethod
    def from_norm(cls, norm: nn.GroupNorm, ctx: ParallelContext) -> PatchGroupNorm:
        patched = twin(norm, cls)
        patched.ctx = ctx
        patched.moments_slot = ctx.new_slot()
        return patched

    def _local_only(self) -> bool:
        ctx = self.ctx
        return ctx.patch.size == 1 or ctx.naive or ctx.layout is None

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group moments of the whole image (this band's in naive mode or alone), exchanged as the mode says;
        what a caller that normalises ``x`` piece by piece needs (:func:`normalize_with`)."""
        ctx = self.ctx
        local = group_moments(x, self.num_groups)  # chunked: also how a tensor too large for the kernel is normed
        if self._local_only():
            return local

        def launch(async_op: bool):
            total = local.clone()
            return ctx.patch.all_reduce(total, "groupnorm", async_op).then(lambda t: (local, t))

        stale_local, stale_total = ctx.exchange(self.moments_slot, "groupnorm", launch)
        return stale_total if stale_local is local else corrected_moments(stale_local, stale_total, local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._local_only() and x.numel() <= self.ctx.config.index_limit:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return normalize_with(x, self.moments(x), self)
