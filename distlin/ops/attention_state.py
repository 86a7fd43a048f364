"""The state of linear attention over a set of tokens: what the PyTorch ops and the Triton kernels both produce
and consume, and what the engine sums across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-4  # added to the normaliser of every query


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
