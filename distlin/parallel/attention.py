"""Self-attention over row bands: an all-reduced linear-attention state, or gathered K/V for softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from distlin.linfusion.attention import LinFusionAttnProcessor
from distlin.ops.attention_state import LinearAttentionState
from distlin.parallel.context import ParallelContext


class StateAllReduce:
    """Turns a band's linear-attention state into the image's: one all-reduce of B·h·d·(d+1) floats.

    When ``attention`` is stale in displaced mode, last step's global state with this band's share replaced
    by its fresh one (as DistriFusion reuses the other bands' K/V), while the fresh sums travel.
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.slot = ctx.new_slot()

    def __call__(self, state: LinearAttentionState) -> LinearAttentionState:
        ctx = self.ctx
        if ctx.patch.size == 1 or ctx.naive:
            return state
        kv_n = state.kv.numel()
        flat = torch.cat([state.kv.flatten(), state.k.flatten()])
        # The image's token count follows from the row layout: no need to send it, nor to read it back from
        # the device (a host sync per layer on a GPU).
        count = float(sum(band_token_counts(ctx, int(state.count))))

        def unpack(t: torch.Tensor) -> LinearAttentionState:
            return LinearAttentionState(t[:kv_n].view_as(state.kv), t[kv_n:].view_as(state.k), count)

        def launch(async_op: bool):
            total = flat.clone()
            return ctx.patch.all_reduce(total, "attention", async_op).then(lambda t: (state, unpack(t)))

        stale_local, stale_total = ctx.exchange(self.slot, "attention", launch)
        return stale_total if stale_local is state else stale_total - stale_local + state


def band_token_counts(ctx: ParallelContext, tokens: int) -> list[int]:
    """Tokens of every band at the level where this band holds ``tokens`` tokens."""
    layout, me = ctx.layout, ctx.patch.index
    width = layout.width
    while True:
        sizes = layout.sizes(width)
        if sizes[me] * width == tokens:
            return [s * width for s in sizes]
        if width == 1:
            raise ValueError(f"{tokens} tokens do not match any level of the row layout")
        width = -(-width // 2)


class PatchSoftmaxAttnProcessor:
    """Softmax self-attention over bands as DistriFusion does it: local queries, all ranks' K and V.

    When ``attention`` is stale in displaced mode, the other bands' K/V come from the previous step while the
    fresh ones travel.
    """

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.slot = ctx.new_slot()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("patch-parallel softmax attention handles UNet self-attention (attn1) only")
        ctx = self.ctx
        b, n, _ = hidden_states.shape
        h = attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)

        q = attn.to_q(hidden_states)
        kv = torch.stack([attn.to_k(hidden_states), attn.to_v(hidden_states)])
        if ctx.patch.size > 1 and not ctx.naive:
            counts = band_token_counts(ctx, n)

            def launch(async_op: bool):
                return ctx.patch.all_gather_rows(kv, counts, 2, "attention", async_op)

            bands = list(ctx.exchange(self.slot, "attention", launch))
            bands[ctx.patch.index] = kv
            kv = torch.cat(bands, dim=2)
        out = F.scaled_dot_product_attention(heads(q), heads(kv[0]), heads(kv[1]))
        out = out.transpose(1, 2).reshape(b, n, -1).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def parallel_processor(attn: Attention, ctx: ParallelContext, chunk_size: int | None) -> object:
    """The band-aware processor for one ``attn1`` module (LinFusion or original softmax)."""
    if isinstance(attn.processor, LinFusionAttnProcessor):
        return LinFusionAttnProcessor(chunk_size, StateAllReduce(ctx), attn.processor.kernel)
    return PatchSoftmaxAttnProcessor(ctx)
