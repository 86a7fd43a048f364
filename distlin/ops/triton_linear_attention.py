"""Fused Triton kernels for the two phases of LinFusion's linear attention (see :mod:`.linear_attention`).

The PyTorch ops make several float32 passes over every token (upcast, feature map, matmul, division, downcast);
each kernel here reads its inputs once in their own dtype and writes its output once, so both phases run at
memory bandwidth. Inputs keep any strides (token-major head views need no copy); everything past the load is
float32. Half-precision inputs multiply on TF32 tensor cores, which hold fp16/bf16 values exactly and round the
feature map and the state to fp16's precision; float32 inputs multiply in full precision. (Operands in bf16
would round to 8 bits, and Triton's CPU interpreter, which the tests run in, cannot multiply bf16 blocks.)

Triton blocks are powers of two, so a head dim d pads up to ``BLOCK_D`` (40 -> 64, 80 -> 128, 160 -> 256) with
masked loads, and the value dim is split into tiles of at most 64 columns to bound the accumulator's registers.
Tokens per step, warps and (``apply_state``) token blocks per program are chosen by rule (:func:`default_blocks`),
not tuned on hardware yet; ``launch/bench.py gpu`` times the rule against :data:`BLOCK_CANDIDATES` and
:data:`APPLY_CANDIDATES`, so one GPU run says what to change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from distlin.ops.attention_state import EPS, LinearAttentionState

MAX_BLOCK_E = 64  # value columns per program: a 256 x 64 float32 accumulator is the most registers one holds
PROGRAMS_PER_SM = 4  # partial-state programs to keep each multiprocessor busy with
PROGRAMS_OFF_GPU = 8  # the interpreter has no multiprocessors; a few splits still exercise the reduction


@triton.jit
def _feature_map(x):
    """phi(u) = elu(u) + 1 as ``max(u, 0) + exp(min(u, 0))``, like the PyTorch op (full precision near 0)."""
    return tl.maximum(x, 0.0) + tl.exp(tl.minimum(x, 0.0))


@triton.jit
def _partial_state_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    ksum_ptr,
    heads,
    tokens,
    tokens_per_split,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ve,
    D: tl.constexpr,
    E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    E_TILES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (token split, value tile) of one (batch, head): sums phi(k)^T v and phi(k) into this split's slot."""
    split = tl.program_id(0) // E_TILES
    e_tile = tl.program_id(0) % E_TILES
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = e_tile * BLOCK_E + tl.arange(0, BLOCK_E)
    d_mask, e_mask = offs_d < D, offs_e < E
    kv = tl.zeros((BLOCK_D, BLOCK_E), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, tokens)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        n_mask = offs_n < stop
        k_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=k_mask, other=0.0)
        v_mask = n_mask[:, None] & e_mask[None, :]
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_e[None, :] * stride_ve, mask=v_mask, other=0.0)
        # phi(0) = 1, so padding is zeroed explicitly: it must add nothing to the sums.
        phi = tl.where(k_mask, _feature_map(k.to(tl.float32)), 0.0)
        kv += tl.dot(tl.trans(phi), v.to(tl.float32), input_precision=PRECISION)
        ksum += tl.sum(phi, axis=0)
    slot = (split * tl.num_programs(1) + bh).to(tl.int64)
    kv_ptrs = kv_ptr + slot * D * E + offs_d[:, None] * E + offs_e[None, :]
    tl.store(kv_ptrs, kv, mask=d_mask[:, None] & e_mask[None, :])
    ksum_rows = tl.where(e_tile == 0, D, 0)  # every value tile has the sum; the first one stores it
    tl.store(ksum_ptr + slot * D + offs_d, ksum, mask=offs_d < ksum_rows)


@triton.jit
def _apply_state_kernel(
    q_ptr,
    kv_ptr,
    ksum_ptr,
    out_ptr,
    inv_count,
    heads,
    tokens,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_oe,
    D: tl.constexpr,
    E: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    E_TILES: tl.constexpr,
    STEPS: tl.constexpr,
    PRECISION: tl.constexpr,
    EPS: tl.constexpr,
):
    """``STEPS`` consecutive token blocks and one value tile of one (batch, head): ``phi(q) S / (phi(q) . kbar +
    EPS)``, the tile of S loaded once for all of them."""
    first_block = (tl.program_id(0) // E_TILES) * STEPS
    e_tile = tl.program_id(0) % E_TILES
    bh = tl.program_id(1)
    batch, head = bh // heads, bh % heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = e_tile * BLOCK_E + tl.arange(0, BLOCK_E)
    d_mask, e_mask = offs_d < D, offs_e < E
    state = bh.to(tl.int64)
    s_ptrs = kv_ptr + state * D * E + offs_d[:, None] * E + offs_e[None, :]
    s = tl.load(s_ptrs, mask=d_mask[:, None] & e_mask[None, :], other=0.0) * inv_count
    kbar = tl.load(ksum_ptr + state * D + offs_d, mask=d_mask, other=0.0) * inv_count
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    for step in range(STEPS):
        offs_n = (first_block + step) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n.to(tl.int64)
        n_mask = offs_n < tokens
        q_mask = n_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        phi = tl.where(q_mask, _feature_map(q.to(tl.float32)), 0.0)
        num = tl.dot(phi, s, input_precision=PRECISION)
        den = tl.sum(phi * kbar[None, :], axis=1) + EPS
        out_ptrs = out_base + rows[:, None] * stride_on + offs_e[None, :] * stride_oe
        out = (num / den[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, out, mask=n_mask[:, None] & e_mask[None, :])


class KernelBlocks(NamedTuple):
    """How a launch tiles its tokens: ``block_n`` tokens per step (a power of two >= 16, as tl.dot needs),
    ``num_warps`` per program and, in ``apply_state``, ``steps`` token blocks per program (its tile of the state
    loaded once for all of them; ``partial_state`` sizes its programs' token ranges by the device instead)."""

    block_n: int
    num_warps: int
    steps: int = 1

    def __str__(self) -> str:
        return f"{self.block_n} tokens x {self.num_warps} warps" + (f" x {self.steps} steps" if self.steps > 1 else "")


# What the gpu check times: for both phases, and with 4 steps per program for apply_state alone.
BLOCK_CANDIDATES = tuple(KernelBlocks(n, w) for n in (32, 64, 128) for w in (4, 8))
APPLY_CANDIDATES = BLOCK_CANDIDATES + tuple(blocks._replace(steps=4) for blocks in BLOCK_CANDIDATES)


def _padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def default_blocks(d: int, phase: str = "partial") -> KernelBlocks:
    """The rule for head dim ``d``: fewer tokens per step and more warps as the padded head dim grows; in the
    ``apply`` phase, 4 token blocks per program, so each program reads its tile of the state once per 4 blocks."""
    block_d = _padded_head_dim(d)
    steps = 4 if phase == "apply" else 1
    return KernelBlocks(64 if block_d <= 128 else 32, 4 if block_d <= 64 else 8, steps)


def _value_tiles(e: int) -> tuple[int, int]:
    """``(BLOCK_E, tiles)``: the value columns in tiles of at most :data:`MAX_BLOCK_E`."""
    block_e = min(max(16, triton.next_power_of_2(e)), MAX_BLOCK_E)
    return block_e, triton.cdiv(e, block_e)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's precision for float32 operands made from ``dtype`` inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _program_budget(device: torch.device) -> int:
    """How many partial-state programs fill the device."""
    if device.type != "cuda":
        return PROGRAMS_OFF_GPU
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def partial_state_triton(k: torch.Tensor, v: torch.Tensor, blocks: KernelBlocks | None = None) -> LinearAttentionState:
    """:func:`~distlin.ops.linear_attention.partial_state` as one kernel over token splits plus a float32 sum
    of the per-split slots (a fixed order: the same inputs give the same state, run after run). ``blocks``:
    the tiling, :func:`default_blocks` unless given."""
    b, h, n, d = k.shape
    e = v.shape[-1]
    if n == 0:
        zeros = torch.zeros(b, h, d, e, dtype=torch.float32, device=k.device)
        return LinearAttentionState(zeros, zeros.new_zeros(b, h, d), 0.0)
    block_n, num_warps, _ = blocks or default_blocks(d)
    block_e, e_tiles = _value_tiles(e)
    token_blocks = triton.cdiv(n, block_n)
    splits = max(1, min(token_blocks, _program_budget(k.device) // (b * h * e_tiles)))
    tokens_per_split = triton.cdiv(token_blocks, splits) * block_n
    splits = triton.cdiv(n, tokens_per_split)
    kv = torch.empty(splits, b, h, d, e, dtype=torch.float32, device=k.device)
    ksum = torch.empty(splits, b, h, d, dtype=torch.float32, device=k.device)
    _partial_state_kernel[(splits * e_tiles, b * h)](
        k, v, kv, ksum, h, n, tokens_per_split, *k.stride(), *v.stride(),
        D=d, E=e, BLOCK_N=block_n, BLOCK_D=_padded_head_dim(d), BLOCK_E=block_e, E_TILES=e_tiles,
        PRECISION=_precision(k.dtype), num_warps=num_warps,
    )  # fmt: skip
    return LinearAttentionState(kv.sum(0), ksum.sum(0), float(n))


def apply_state_triton(
    q: torch.Tensor, state: LinearAttentionState, blocks: KernelBlocks | None = None
) -> torch.Tensor:
    """:func:`~distlin.ops.linear_attention.apply_state` in one kernel; the same token-major output layout.
    ``blocks``: the tiling, :func:`default_blocks` unless given."""
    b, h, n, d = q.shape
    e = state.kv.shape[-1]
    out = torch.empty(b, n, h, e, dtype=q.dtype, device=q.device).transpose(1, 2)
    if n == 0:
        return out
    block_n, num_warps, steps = blocks or default_blocks(d, "apply")
    block_e, e_tiles = _value_tiles(e)
    kv = state.kv.to(torch.float32).contiguous()
    ksum = state.k.to(torch.float32).contiguous()
    _apply_state_kernel[(triton.cdiv(n, block_n * steps) * e_tiles, b * h)](
        q, kv, ksum, out, 1.0 / state.count, h, n, *q.stride(), *out.stride(),
        D=d, E=e, BLOCK_N=block_n, BLOCK_D=_padded_head_dim(d), BLOCK_E=block_e, E_TILES=e_tiles, STEPS=steps,
        PRECISION=_precision(q.dtype), EPS=EPS, num_warps=num_warps,
    )  # fmt: skip
    return out
