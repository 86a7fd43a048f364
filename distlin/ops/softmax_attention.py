"""Exact softmax attention against keys/values that arrive one block at a time (e.g. from host RAM).

When the keys and values of every token do not fit on the device, they can be kept elsewhere and loaded a
block at a time. Softmax over all keys is still exact with the online (streaming) softmax: per query, a
running maximum ``m``, a running sum ``l`` of ``exp(s - m)`` and an accumulator of ``exp(s - m) v``, all
float32, rescaled by ``exp(m_old - m_new)`` whenever a block raises the maximum. Queries are taken
``query_chunk`` at a time, so the explicit score tile is ``query_chunk x block tokens``.

The loop runs over blocks outside and query chunks inside: each block is loaded once per call, whatever
the number of query chunks. Shapes: ``q`` is ``(B, heads, Nq, d)``, each block's ``k``/``v`` is
``(B, heads, Nk_block, d)`` / ``(B, heads, Nk_block, dv)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

BlockLoader = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def softmax_attention(
    q: torch.Tensor,
    blocks: Sequence[BlockLoader],
    scale: float | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the keys/values of all ``blocks`` (concatenated), in ``q``'s dtype.

    Each loader returns one ``(k, v)`` block on ``q``'s device; it is called once, in order, and its block
    is dropped before the next one is loaded, so one block at a time is on the device. A single block takes
    the fused ``F.scaled_dot_product_attention`` path (no score tile). ``query_chunk`` None takes all queries
    at once; ``scale`` defaults to ``d ** -0.5`` as in SDPA. In half precision the scores are the matmul's
    half-precision output (about 1e-3 relative rounding, where fused SDPA keeps them in float32) and the
    probabilities are rounded to it before ``@ v`` (as in FlashAttention); max, sum and output accumulate in
    float32.
    """
    if not blocks:
        raise ValueError("softmax_attention needs at least one key/value block")
    n = q.shape[2]
    step = max(query_chunk or n, 1)
    chunks = [(s, min(s + step, n)) for s in range(0, n, step)]
    k, v = blocks[0]()
    if len(blocks) == 1:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for s, e in chunks:
            out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], k, v, scale=scale)
        return out
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    high = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    total = torch.zeros_like(high)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(len(blocks)):
        if i > 0:
            k, v = blocks[i]()
        for s, e in chunks:
            _accumulate(q[:, :, s:e] * scale, k, v, high[..., s:e], total[..., s:e], acc[:, :, s:e])
        del k, v  # before the next block is loaded: one block on the device at a time
    return acc.div_(total.unsqueeze(-1)).to(q.dtype)


def _accumulate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, high: torch.Tensor, total: torch.Tensor, acc: torch.Tensor
) -> None:
    """Fold one key/value block into the running max ``high``, sum ``total`` and ``acc`` (views, in place).

    ``q`` is already scaled. The first block finds ``high = -inf``: its decay ``exp(-inf) = 0`` zeroes the
    (zero) state instead of needing a special case.
    """
    scores = torch.matmul(q, k.mT).float()
    new_high = torch.maximum(high, scores.amax(-1))
    weights = scores.sub_(new_high.unsqueeze(-1)).exp_()
    decay = torch.exp(high - new_high)
    total.mul_(decay).add_(weights.sum(-1))
    acc.mul_(decay.unsqueeze(-1)).add_(torch.matmul(weights.to(v.dtype), v))
    high.copy_(new_high)
