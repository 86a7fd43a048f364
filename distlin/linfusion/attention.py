"""LinFusion's self-attention layer as a diffusers ``Attention`` so it sits where ``attn1`` sat."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from distlin.ops.linear_attention import (
    DEFAULT_CHUNK,
    LinearAttentionState,
    apply_state,
    check_kernel,
    partial_state,
    token_chunks,
)

StateReducer = Callable[[LinearAttentionState], LinearAttentionState]


def _projection(dim: int, mid_dim: int | None) -> nn.Module:
    """P = Linear(C->m) -> LayerNorm(m) -> LeakyReLU(0.01) -> Linear(m->C); ``-1`` is the identity map."""
    if mid_dim == -1:
        return nn.Identity()
    m = dim if mid_dim is None else mid_dim
    return nn.Sequential(nn.Linear(dim, m), nn.LayerNorm(m), nn.LeakyReLU(0.01), nn.Linear(m, dim))


class LinFusionAttnProcessor:
    """Runs a :class:`LinFusionAttention` in two phases: local partial sums, then apply the state.

    ``reduce_state`` turns the local state into the global one (an all-reduce in the parallel
    engine, the identity on one device). ``chunk_size`` bounds the extra memory per token chunk. ``kernel``
    picks the attention ops (:data:`~distlin.ops.kernels.ATTENTION_KERNELS`): ``auto`` runs the fused
    Triton kernels on CUDA at inference and the PyTorch ops elsewhere.
    The phases are public (:meth:`partial`, :meth:`reduce`, :meth:`apply`) so a caller that produces the
    layer's input chunk by chunk (:class:`~distlin.lean.transformer.ChunkedTransformer2D`) can sum the
    partial states of its chunks, reduce once, then apply the state chunk by chunk.
    """

    def __init__(
        self, chunk_size: int | None = DEFAULT_CHUNK, reduce_state: StateReducer | None = None, kernel: str = "auto"
    ):
        check_kernel(kernel)
        self.chunk_size = chunk_size
        self.reduce_state = reduce_state
        self.kernel = kernel

    @staticmethod
    def _heads(attn: LinFusionAttention, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    def partial(self, attn: LinFusionAttention, x: torch.Tensor) -> LinearAttentionState:
        """Local sums of ``phi(k)^T v`` and ``phi(k)`` over the tokens of ``x`` (B, N, C)."""
        state = None
        # Projections run chunk by chunk too, so no full-size Q, K, V or MLP activation ever exists.
        for start, stop in token_chunks(x.shape[1], self.chunk_size, x.device):
            xc = x[:, start:stop]
            k, v = self._heads(attn, attn.to_k(xc + attn.to_k_(xc))), self._heads(attn, attn.to_v(xc))
            part = partial_state(k, v, None, self.kernel)
            state = part if state is None else state + part
        return state

    def reduce(self, state: LinearAttentionState) -> LinearAttentionState:
        """The global state from this rank's (identity on one device)."""
        return state if self.reduce_state is None else self.reduce_state(state)

    def apply(self, attn: LinFusionAttention, x: torch.Tensor, state: LinearAttentionState) -> torch.Tensor:
        """The layer's output for the tokens of ``x`` (B, N, C) under the global ``state``."""
        out = x.new_empty(x.shape[0], x.shape[1], attn.to_out[0].out_features)
        for start, stop in token_chunks(x.shape[1], self.chunk_size, x.device):
            xc = x[:, start:stop]
            o = apply_state(self._heads(attn, attn.to_q(xc + attn.to_q_(xc))), state, None, self.kernel)
            out[:, start:stop] = attn.to_out[1](attn.to_out[0](o.transpose(1, 2).flatten(2)))  # a view: no copy
        return out

    def __call__(
        self,
        attn: LinFusionAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LinFusion attention is self-attention only: no encoder states, no mask")
        shape = hidden_states.shape
        x = hidden_states.flatten(2).transpose(1, 2) if hidden_states.ndim == 4 else hidden_states
        out = self.apply(attn, x, self.reduce(self.partial(attn, x)))
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        return out


class LinFusionAttention(Attention):
    """Normalised non-causal linear attention with residual MLPs before Q and K (LinFusion).

    Parameter names match the released checkpoints: ``to_q``, ``to_k``, ``to_v`` (no bias),
    ``to_out.0`` and the projections ``to_q_`` / ``to_k_``.
    """

    def __init__(self, dim: int, heads: int, projection_mid_dim: int | None = None):
        if dim % heads:
            raise ValueError(f"LinFusion layer dim {dim} is not divisible by heads {heads}")
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False, out_bias=True)
        self.projection_mid_dim = projection_mid_dim
        self.to_q_ = _projection(dim, projection_mid_dim)
        self.to_k_ = _projection(dim, projection_mid_dim)
        self.set_processor(LinFusionAttnProcessor())

    def set_processor(self, processor: object) -> None:
        """Only LinFusion processors: a softmax processor would silently ignore P_q/P_k and normalisation."""
        # Attention.__init__ installs a default processor before our layers exist; that one is replaced below.
        if "to_q_" in self._modules and not isinstance(processor, LinFusionAttnProcessor):
            raise TypeError(
                f"LinFusionAttention runs only LinFusionAttnProcessor, not {type(processor).__name__}; "
                "unmount LinFusion to use another attention processor"
            )
        super().set_processor(processor)

    @property
    def dim(self) -> int:
        return self.query_dim

    def zero_projections(self) -> None:
        """Zero the last Linear of P_q and P_k so q_in = k_in = x (distillation starts from the teacher)."""
        for proj in (self.to_q_, self.to_k_):
            if isinstance(proj, nn.Sequential):
                nn.init.zeros_(proj[-1].weight)
                nn.init.zeros_(proj[-1].bias)

    def copy_projections_from(self, teacher: Attention) -> None:
        """Start from the teacher's own Q/K/V/out projections."""
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                getattr(self, name).weight.copy_(getattr(teacher, name).weight)
            self.to_out[0].weight.copy_(teacher.to_out[0].weight)
            if teacher.to_out[0].bias is not None:
                self.to_out[0].bias.copy_(teacher.to_out[0].bias)
            else:
                self.to_out[0].bias.zero_()
