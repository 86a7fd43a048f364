"""Softmax attention over key/value blocks equals SDPA over all keys, whatever the block and query split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distlin.ops.softmax_attention import BlockLoader, softmax_attention

N_QUERIES, N_KEYS = 37, 50


def _qkv(dtype: torch.dtype = torch.float32, spread: float = 3.0) -> tuple[torch.Tensor, ...]:
    """(B=2, heads=3) with value width 5 != head size 8; ``spread`` makes the scores large (|s| ~ 10s)."""
    g = torch.Generator().manual_seed(0)
    q = spread * torch.randn(2, 3, N_QUERIES, 8, generator=g)
    k = spread * torch.randn(2, 3, N_KEYS, 8, generator=g)
    v = torch.randn(2, 3, N_KEYS, 5, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _loaders(k: torch.Tensor, v: torch.Tensor, sizes: list[int], calls: list[int]) -> list[BlockLoader]:
    """One loader per block of ``sizes`` keys; ``calls`` counts the loads."""

    def loader(kb: torch.Tensor, vb: torch.Tensor) -> BlockLoader:
        def load() -> tuple[torch.Tensor, torch.Tensor]:
            calls.append(1)
            return kb, vb

        return load

    return [loader(kb, vb) for kb, vb in zip(k.split(sizes, 2), v.split(sizes, 2), strict=True)]


@pytest.mark.parametrize("sizes", [[50], [25, 25], [7, 20, 23], [1, 48, 1], [3] * 16 + [2]], ids=str)
@pytest.mark.parametrize("query_chunk", [None, 10, 37, 64], ids=lambda c: f"qc={c}")
def test_equals_sdpa_fp32(sizes: list[int], query_chunk: int | None) -> None:
    q, k, v = _qkv()
    calls: list[int] = []
    out = softmax_attention(q, _loaders(k, v, sizes, calls), scale=0.3, query_chunk=query_chunk)
    assert len(calls) == len(sizes)  # each block loaded once, whatever the number of query chunks
    assert out.dtype == q.dtype and out.shape == (2, 3, N_QUERIES, 5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)


def test_default_scale_is_sdpa_default() -> None:
    q, k, v = _qkv(spread=1.0)
    out = softmax_attention(q, _loaders(k, v, [20, 30], []), query_chunk=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_float16_is_close_to_float64() -> None:
    """Half-precision inputs: float32 statistics keep the error at the inputs' rounding level."""
    q, k, v = _qkv(torch.float16, spread=1.5)
    try:
        out = softmax_attention(q, _loaders(k, v, [7, 20, 23], []), scale=0.3, query_chunk=10)
    except (RuntimeError, NotImplementedError) as exc:  # an op without a CPU half kernel
        pytest.skip(f"float16 matmul not supported on this CPU build: {exc}")
    assert out.dtype == torch.float16
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_needs_a_block() -> None:
    q, _, _ = _qkv()
    with pytest.raises(ValueError, match="at least one"):
        softmax_attention(q, [])
