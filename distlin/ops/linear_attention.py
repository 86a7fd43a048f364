"""LinFusion's generalized linear attention as pure tensor functions.

The attention is split into two phases so that a parallel engine can combine the
state of several token sets exactly:

* :func:`partial_state` sums ``phi(k)^T v`` and ``phi(k)`` over the given tokens
  (in float32) and counts them. Sums from disjoint token sets add up.
* :func:`apply_state` normalises a (possibly global) state by its token count and
  applies it to local queries.

Both phases walk the tokens in chunks so the extra memory is bounded by the chunk
size, whatever the resolution. Shapes: ``q``, ``k``, ``v`` are ``(B, heads, N, d)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-4
DEFAULT_CHUNK = 65536


@dataclass
class LinearAttentionState:
    """Un-normalised attention state of a set of tokens.

    ``kv``: ``(B, h, d, d)`` sum of ``phi(k_j)^T v_j``; ``k``: ``(B, h, d)`` sum of ``phi(k_j)``;
    ``count``: number of tokens summed. All float32.
    """

    kv: torch.Tensor
    k: torch.Tensor
    count: float

    def __add__(self, other: LinearAttentionState) -> LinearAttentionState:
        return LinearAttentionState(self.kv + other.kv, self.k + other.k, self.count + other.count)

    def __sub__(self, other: LinearAttentionState) -> LinearAttentionState:
        return LinearAttentionState(self.kv - other.kv, self.k - other.k, self.count - other.count)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(u) = elu(u) + 1: positive, so the normaliser never changes sign.

    Written as ``u + 1`` / ``exp(u)`` so that small values keep full precision (``(exp(u) - 1) + 1`` does not).
    """
    return torch.where(x > 0, x + 1.0, torch.exp(torch.clamp(x, max=0.0)))


def token_chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``n`` tokens, ``chunk_size`` at a time (all at once if None/0)."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return [(s, min(s + step, n)) for s in range(0, n, max(step, 1))] or [(0, 0)]


def partial_state(k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK) -> LinearAttentionState:
    """Sum of ``phi(k)^T v`` and ``phi(k)`` over the tokens of ``k``/``v``, accumulated in float32."""
    b, h, n, d = k.shape
    kv = torch.zeros(b, h, d, v.shape[-1], dtype=torch.float32, device=k.device)
    ks = torch.zeros(b, h, d, dtype=torch.float32, device=k.device)
    for s, e in token_chunks(n, chunk_size):
        fk = feature_map(k[:, :, s:e].float())
        kv += fk.transpose(-1, -2) @ v[:, :, s:e].float()
        ks += fk.sum(dim=2)
    return LinearAttentionState(kv, ks, float(n))


def apply_state(q: torch.Tensor, state: LinearAttentionState, chunk_size: int | None = DEFAULT_CHUNK) -> torch.Tensor:
    """``o_i = phi(q_i) S / (phi(q_i) . kbar + eps)`` with ``S = kv/N`` and ``kbar = k/N``; returns q's dtype."""
    if state.count <= 0:
        raise ValueError("linear attention state holds no tokens")
    s_mat = state.kv / state.count
    k_mean = (state.k / state.count).unsqueeze(-1)
    out = torch.empty(*q.shape[:-1], s_mat.shape[-1], dtype=q.dtype, device=q.device)
    for s, e in token_chunks(q.shape[2], chunk_size):
        fq = feature_map(q[:, :, s:e].float())
        out[:, :, s:e] = ((fq @ s_mat) / (fq @ k_mean + EPS)).to(q.dtype)
    return out


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK
) -> torch.Tensor:
    """Single-device linear attention: both phases over the same tokens."""
    return apply_state(q, partial_state(k, v, chunk_size), chunk_size)
