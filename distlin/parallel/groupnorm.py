"""GroupNorm over a row band with statistics of the whole image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distlin.ops.index_safe import INDEX_LIMIT
from distlin.parallel.context import ParallelContext
from distlin.surgery import twin

MOMENT_CHUNK_ELEMENTS = 1 << 26  # largest float32 copy group_moments makes of a half-precision input


def group_moments(x: torch.Tensor, groups: int, chunk_elements: int = MOMENT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Per (batch, group): ``[count, sum, sum of squares]`` in float64, computed stably from var_mean.

    Groups are visited a few at a time so the float32 copy of a half-precision input stays below
    ``chunk_elements`` whatever the resolution.
    """
    xg = x.reshape(x.shape[0], groups, -1)
    n = xg.shape[-1]
    step = max(1, chunk_elements // max(1, n * x.shape[0]))
    parts = [torch.var_mean(xg[:, g : g + step].float(), dim=-1, unbiased=False) for g in range(0, groups, step)]
    var, mean = torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
    mean, var = mean.double(), var.double()
    return torch.stack([torch.full_like(mean, n), mean * n, (var + mean * mean) * n], dim=-1)


def normalize_with(x: torch.Tensor, moments: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Apply GroupNorm with given (global) moments: one fused multiply-add in the input dtype."""
    b, c = x.shape[:2]
    g = norm.num_groups
    mean = moments[..., 1] / moments[..., 0]
    var = (moments[..., 2] / moments[..., 0] - mean * mean).clamp_min(0.0)
    rstd = torch.rsqrt(var + norm.eps)
    scale = rstd.repeat_interleave(c // g, dim=1).float()
    shift = (-mean * rstd).repeat_interleave(c // g, dim=1).float()
    if norm.affine:
        shift = shift * norm.weight.float() + norm.bias.float()
        scale = scale * norm.weight.float()
    view = (b, c) + (1,) * (x.ndim - 2)
    return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))


class PatchGroupNorm(nn.GroupNorm):
    """An ``nn.GroupNorm`` (same parameters) whose statistics cover every band.

    Exact: one all-reduce of per-group ``[count, sum, sum of squares]`` (float64). Displaced: last
    step's global moments with this rank's stale share replaced by its fresh one (DistriFusion's
    corrected asynchronous GroupNorm), the fresh moments travelling meanwhile. Naive: local moments.
    """

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

        stale_local, stale_total = ctx.exchange(self.moments_slot, local, launch)
        return stale_total if stale_local is local else stale_total - stale_local + local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._local_only() and x.numel() <= INDEX_LIMIT:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return normalize_with(x, self.moments(x), self)
