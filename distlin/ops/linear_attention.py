"""LinFusion's generalized linear attention as pure tensor functions.

The attention is split into two phases so that a parallel engine can combine the
state of several token sets exactly:

* :func:`partial_state` sums ``phi(k)^T v`` and ``phi(k)`` over the given tokens
  (in float32) and counts them. Sums from disjoint token sets add up.
* :func:`apply_state` normalises a (possibly global) state by its token count and
  applies it to local queries.

Both phases walk the tokens in chunks so the extra memory is bounded by the chunk
size, whatever the resolution (on CPU the chunks are also capped at :data:`CPU_CHUNK` tokens).
Shapes: ``q``, ``k``, ``v`` are ``(B, heads, N, d)``, any strides: token-major views such as
``x.view(B, N, heads, d).transpose(1, 2)`` need no copy.

Each phase has two implementations, picked by ``kernel`` (:data:`distlin.ops.kernels.ATTENTION_KERNELS`): the
PyTorch ops here (``*_torch``, the naive reference, any device, differentiable) and fused Triton kernels
(:mod:`distlin.ops.triton_linear_attention`, CUDA, inference only). ``auto`` takes the kernels where they apply.
"""

from __future__ import annotations

import torch

from distlin.errors import UsageError
from distlin.ops.attention_state import EPS, LinearAttentionState
from distlin.ops.kernels import check_kernel, triton_available, triton_interprets

DEFAULT_CHUNK = 65536
# On CPU, chunks this small reuse the allocator's freed blocks instead of page-faulting fresh 20 MB buffers on every
# call, and stay in cache: the SD-1.5 layer (C=320, 16K tokens, 1 thread) runs ~15-20 % faster than in one chunk.
CPU_CHUNK = 1024
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(u) = elu(u) + 1: positive, so the normaliser never changes sign.

    Written as ``max(u, 0) + exp(min(u, 0))``, i.e. ``u + 1`` / ``exp(u)``, so that small values keep full
    precision (``(exp(u) - 1) + 1`` does not). Same values as ``torch.where(u > 0, u + 1, exp(min(u, 0)))``
    in ~60 % of its CPU time (``where`` costs more than ``exp``). ``exp_`` runs in place on the clamp's fresh
    output, which autograd does not keep; ``relu``'s zero slope at 0 keeps phi'(0) = 1.
    """
    return torch.relu(x) + torch.clamp(x, max=0.0).exp_()


def token_chunks(n: int, chunk_size: int | None, device: torch.device | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``n`` tokens, ``chunk_size`` at a time (all at once if None/0);
    at most :data:`CPU_CHUNK` at a time on a CPU ``device``."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    if device is not None and device.type == "cpu":
        step = min(step, CPU_CHUNK)
    return [(s, min(s + step, n)) for s in range(0, n, max(step, 1))] or [(0, 0)]


def select_kernel(kernel: str, *tensors: torch.Tensor) -> str:
    """``torch`` or ``triton``: the implementation that runs a phase on ``tensors`` (the first one sets the device).

    ``auto`` takes Triton for CUDA tensors of a supported dtype that need no gradient (the kernels have no
    backward, so distillation keeps the PyTorch ops). Triton runs CPU tensors only in its interpreter
    (``TRITON_INTERPRET=1``, how the tests check the kernels without a GPU).
    """
    check_kernel(kernel)
    x = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if kernel == "auto":
        fits = x.is_cuda and x.dtype in TRITON_DTYPES and not needs_grad
        return "triton" if fits and triton_available() else "torch"
    if kernel == "triton":
        if x.dtype not in TRITON_DTYPES:
            raise UsageError(f"attention kernel 'triton' takes float16, bfloat16 or float32, not {x.dtype}")
        if needs_grad:
            raise UsageError("attention kernel 'triton' has no backward pass; use auto or torch for training")
        if not x.is_cuda and not triton_interprets():
            raise UsageError(f"attention kernel 'triton' runs on CUDA tensors, not {x.device.type}; use auto or torch")
    return kernel


def partial_state(
    k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK, kernel: str = "auto"
) -> LinearAttentionState:
    """Sum of ``phi(k)^T v`` and ``phi(k)`` over the tokens of ``k``/``v``, accumulated in float32.

    ``chunk_size`` bounds the PyTorch ops' float32 temporaries; the kernel has none to bound.
    """
    if select_kernel(kernel, k, v) == "triton":
        from distlin.ops.triton_linear_attention import partial_state_triton  # here: triton loads only if used

        return partial_state_triton(k, v)
    return partial_state_torch(k, v, chunk_size)


def partial_state_torch(
    k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK
) -> LinearAttentionState:
    """:func:`partial_state` in PyTorch ops, chunk by chunk: the reference the kernel is checked against."""
    b, h, n, d = k.shape
    kv = torch.zeros(b, h, d, v.shape[-1], dtype=torch.float32, device=k.device)
    ks = torch.zeros(b, h, d, dtype=torch.float32, device=k.device)
    for s, e in token_chunks(n, chunk_size):
        fk = feature_map(k[:, :, s:e].float())
        kv += fk.transpose(-1, -2) @ v[:, :, s:e].float()
        ks += fk.sum(dim=2)
    return LinearAttentionState(kv, ks, float(n))


def apply_state(
    q: torch.Tensor, state: LinearAttentionState, chunk_size: int | None = DEFAULT_CHUNK, kernel: str = "auto"
) -> torch.Tensor:
    """``o_i = phi(q_i) S / (phi(q_i) . kbar + eps)`` with ``S = kv/N`` and ``kbar = k/N``; returns q's dtype.

    The result is a ``(B, h, N, e)`` view of token-major ``(B, N, h, e)`` memory, so merging the heads is free.
    """
    if state.count <= 0:
        raise ValueError("linear attention state holds no tokens")
    if select_kernel(kernel, q, state.kv, state.k) == "triton":
        from distlin.ops.triton_linear_attention import apply_state_triton

        return apply_state_triton(q, state)
    return apply_state_torch(q, state, chunk_size)


def apply_state_torch(
    q: torch.Tensor, state: LinearAttentionState, chunk_size: int | None = DEFAULT_CHUNK
) -> torch.Tensor:
    """:func:`apply_state` in PyTorch ops, chunk by chunk (``state`` must hold tokens): the kernel's reference."""
    b, h, n, _ = q.shape
    # [S | kbar]: one matmul gives numerator and normaliser (a d x 1 matmul alone is slow).
    s_mat = torch.cat([state.kv, state.k.unsqueeze(-1)], dim=-1) / state.count
    out = torch.empty(b, n, h, s_mat.shape[-1] - 1, dtype=q.dtype, device=q.device).transpose(1, 2)
    for s, e in token_chunks(n, chunk_size, q.device):
        num_den = feature_map(q[:, :, s:e].float()) @ s_mat
        out[:, :, s:e] = (num_den[..., :-1] / (num_den[..., -1:] + EPS)).to(q.dtype)
    return out


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int | None = DEFAULT_CHUNK, kernel: str = "auto"
) -> torch.Tensor:
    """Single-device linear attention: both phases over the same tokens."""
    return apply_state(q, partial_state(k, v, chunk_size, kernel), chunk_size, kernel)
