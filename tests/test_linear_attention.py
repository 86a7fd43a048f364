"""LinFusion's generalized linear attention: the layer computes the paper's formula, in any chunking,
split into two exactly composable phases, in float32 whatever the input dtype.

The reference (``naive_linfusion`` in conftest) is written independently of the library: it builds the
explicit N x N matrix of phi(q_i) . phi(k_j) in float64 from the layer's weights with torch.nn.functional.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from distlin.linfusion.attention import LinFusionAttention, LinFusionAttnProcessor
from distlin.ops.linear_attention import (
    LinearAttentionState,
    apply_state,
    feature_map,
    linear_attention,
    partial_state,
)

# (tokens N, channels C, heads h); N=1 and a head size of 8 with h=3 are deliberately included.
SHAPES = [(1, 8, 1), (7, 16, 2), (64, 32, 4), (130, 24, 3)]
MID_DIMS = [None, 5, -1]  # m = C, m < C, identity projection


def make_layer(dim: int, heads: int, mid: int | None, seed: int = 0) -> LinFusionAttention:
    """A layer whose every parameter is random (LayerNorm affine and the last Linear of P included)."""
    torch.manual_seed(seed)
    layer = LinFusionAttention(dim, heads, mid).eval()
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, torch.nn.LayerNorm):  # default init is weight 1, bias 0: perturb it
                module.weight.copy_(1.0 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    return layer


def run_layer(layer: LinFusionAttention, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    if chunk_size is not None:
        layer.set_processor(LinFusionAttnProcessor(chunk_size=chunk_size))
    with torch.no_grad():
        return layer(x)


# ---------------------------------------------------------------------------------------------------
# The layer computes LinFusion's formula


@pytest.mark.parametrize("mid", MID_DIMS, ids=lambda m: f"m={m}")
@pytest.mark.parametrize("n,dim,heads", SHAPES, ids=lambda v: str(v))
def test_layer_matches_naive_formula_fp32(naive_linfusion, n: int, dim: int, heads: int, mid: int | None):
    layer = make_layer(dim, heads, mid)
    torch.manual_seed(1)
    x = torch.randn(2, n, dim)
    out = run_layer(layer, x)
    expected = naive_linfusion(x, layer.state_dict(), heads, mid)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_projection_mid_dim_minus_one_means_identity_projection(naive_linfusion):
    """m = -1: P is the identity, so q_in = k_in = 2x, and the layer has no projection parameters."""
    layer = make_layer(16, 2, -1)
    assert not [name for name in layer.state_dict() if name.startswith(("to_q_", "to_k_"))]
    x = torch.randn(1, 9, 16)
    out = run_layer(layer, x).double()
    torch.testing.assert_close(out, naive_linfusion(x, layer.state_dict(), 2, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mid", [None, 5, -1], ids=lambda m: f"m={m}")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float16, 1e-3)], ids=["bf16", "fp16"])
def test_layer_low_precision_matches_naive(naive_linfusion, dtype: torch.dtype, tol: float, mid: int | None):
    layer = make_layer(24, 3, mid).to(dtype)
    torch.manual_seed(2)
    x = torch.randn(2, 96, 24).to(dtype)
    out = run_layer(layer, x)
    assert out.dtype == dtype
    expected = naive_linfusion(x, layer.state_dict(), 3, mid)  # float64 from the same rounded weights/input
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_layer_accepts_image_shaped_hidden_states(naive_linfusion):
    """A (B, C, H, W) input attends over its H*W tokens and comes back in the same layout."""
    layer = make_layer(16, 2, None)
    x = torch.randn(2, 16, 5, 3)
    out = run_layer(layer, x)
    assert out.shape == x.shape
    tokens = x.flatten(2).transpose(1, 2)
    expected = naive_linfusion(tokens, layer.state_dict(), 2, None).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_layer_is_self_attention_only():
    layer = make_layer(16, 2, None)
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="self-attention"):
        layer.processor(layer, x, encoder_hidden_states=torch.randn(1, 3, 16))


def test_denominator_epsilon_is_1e_minus_4():
    """o_i = (phi(q_i) S) / (phi(q_i) . kbar + 1e-4): visible when phi(q) is tiny (very negative queries)."""
    torch.manual_seed(10)
    q = -8.0 + 0.5 * torch.randn(1, 2, 20, 4)  # phi(q) = exp(q) ~ 3e-4, comparable to the epsilon
    k, v = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4)
    scores = feature_map(q.double()) @ feature_map(k.double()).transpose(-1, -2)  # explicit N x N

    def naive(eps: float) -> torch.Tensor:
        return (scores @ v.double() / 20) / (scores.sum(-1, keepdim=True) / 20 + eps)

    out = linear_attention(q, k, v).double()
    # elu(u) + 1 = (exp(u) - 1) + 1 loses ~1e-4 relative precision in float32 at u ~ -8, hence rtol 1e-3.
    torch.testing.assert_close(out, naive(1e-4), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(out, naive(1e-6), rtol=1e-2, atol=1e-3)  # the epsilon's value matters here


def test_feature_map_is_exact_for_small_values_and_has_slope_one_at_zero():
    """phi(u) is exp(u) for u <= 0 to float32 round-off, even where exp(u) ~ 1e-13 ((exp(u) - 1) + 1 gives 0
    there), and u + 1 above; the derivative is 1 at u = 0 from both sides, as for elu(u) + 1."""
    u = torch.linspace(-30.0, 5.0, 3501)
    expected = torch.where(u > 0, u.double() + 1, u.double().exp())
    torch.testing.assert_close(feature_map(u).double(), expected, rtol=2e-7, atol=0.0)
    zero = torch.zeros(3, requires_grad=True)
    feature_map(zero).sum().backward()
    assert torch.equal(zero.grad, torch.ones(3))


# ---------------------------------------------------------------------------------------------------
# Chunking changes memory, not results


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 50, 64, 10_000])
def test_chunked_equals_unchunked_ops(chunk_size: int):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    whole = linear_attention(q, k, v, chunk_size=None)
    chunked = linear_attention(q, k, v, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    state_whole, state_chunked = partial_state(k, v, None), partial_state(k, v, chunk_size)
    torch.testing.assert_close(state_chunked.kv, state_whole.kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_chunked.k, state_whole.k, rtol=1e-5, atol=1e-5)
    assert state_chunked.count == state_whole.count == 50


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50, 64])
def test_chunked_equals_unchunked_layer(naive_linfusion, chunk_size: int):
    layer = make_layer(16, 2, 5)
    torch.manual_seed(4)
    x = torch.randn(2, 50, 16)
    whole = run_layer(copy.deepcopy(layer), x, chunk_size=0)  # 0: one chunk over all tokens
    chunked = run_layer(layer, x, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    expected = naive_linfusion(x, layer.state_dict(), 2, 5)
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Two phases: the state of disjoint token sets adds up to the state of their union


def test_partial_states_of_disjoint_token_sets_add_exactly():
    """With exactly representable values (integers) the sum of the parts is bit-identical to the whole."""
    g = torch.Generator().manual_seed(5)
    n = 41
    k = torch.randint(0, 4, (2, 3, n, 4), generator=g).float()  # phi(k) = k + 1 exactly for k >= 0
    v = torch.randint(-4, 5, (2, 3, n, 6), generator=g).float()
    perm = torch.randperm(n, generator=g)
    part_a, part_b = perm[:17], perm[17:]  # disjoint, interleaved token sets
    state_a = partial_state(k[:, :, part_a], v[:, :, part_a], chunk_size=3)
    state_b = partial_state(k[:, :, part_b], v[:, :, part_b], chunk_size=5)
    combined = state_a + state_b
    whole = partial_state(k, v, None)
    assert torch.equal(combined.kv, whole.kv)
    assert torch.equal(combined.k, whole.k)
    assert combined.count == whole.count == n
    assert whole.kv.shape == (2, 3, 4, 6) and whole.k.shape == (2, 3, 4)


def test_two_phase_composition_equals_single_device_attention():
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 70, 8) for _ in range(3))
    parts = [slice(0, 13), slice(13, 40), slice(40, 70)]
    states = [partial_state(k[:, :, p], v[:, :, p]) for p in parts]
    global_state = states[0] + states[1] + states[2]
    assert isinstance(global_state, LinearAttentionState)
    whole = partial_state(k, v)
    torch.testing.assert_close(global_state.kv, whole.kv, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(global_state.k, whole.k, rtol=1e-6, atol=1e-5)
    # Each part applies the global state to its own queries; concatenated, that is the full attention.
    pieces = [apply_state(q[:, :, p], global_state) for p in parts]
    torch.testing.assert_close(torch.cat(pieces, dim=2), linear_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_layer_reduce_state_hook_gives_the_global_attention_on_local_tokens():
    """What a patch-parallel engine relies on: each device runs the layer on its tokens, and reducing the
    states (here: adding the other part's state) makes its rows equal the full layer's rows."""
    layer = make_layer(16, 2, None)
    torch.manual_seed(7)
    x = torch.randn(2, 60, 16)
    full = run_layer(copy.deepcopy(layer), x)
    captured: list[LinearAttentionState] = []

    def capture(state: LinearAttentionState) -> LinearAttentionState:
        captured.append(state)
        return state

    layer.set_processor(LinFusionAttnProcessor(reduce_state=capture))
    with torch.no_grad():
        layer(x[:, 25:])
    layer.set_processor(LinFusionAttnProcessor(reduce_state=lambda state: state + captured[0]))
    with torch.no_grad():
        local = layer(x[:, :25])
    torch.testing.assert_close(local, full[:, :25], rtol=1e-5, atol=1e-6)


def test_apply_state_rejects_an_empty_state():
    empty = partial_state(torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4))
    with pytest.raises(ValueError):
        apply_state(torch.randn(1, 1, 3, 4), empty)


# ---------------------------------------------------------------------------------------------------
# float32 accumulation: ultra-high resolution in fp16 does not overflow

BIG_N = 512 * 512  # 262144 tokens, a 4096 x 4096 image's latent at SD's first level


def test_fp16_ops_with_262144_tokens_stay_finite_and_accurate():
    torch.manual_seed(8)
    q = (4 * torch.randn(1, 1, BIG_N, 8)).half()
    k = (4 * torch.randn(1, 1, BIG_N, 8)).half()
    v = (200 + 100 * torch.randn(1, 1, BIG_N, 8)).half()  # outputs ~200: well inside fp16's range
    # The regime is real: summing phi(k) or phi(k)^T v over the tokens in fp16 overflows.
    assert torch.isinf(feature_map(k).sum(dim=2, dtype=torch.float16)).all()
    assert torch.isinf(feature_map(k).transpose(-1, -2) @ v).any()

    state = partial_state(k, v)
    assert state.kv.dtype == state.k.dtype == torch.float32
    out = apply_state(q, state)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()

    # float64 reference in the (algebraically equal) associative form.
    fq, fk, vd = feature_map(q.double()), feature_map(k.double()), v.double()
    s_mat = fk.transpose(-1, -2) @ vd / BIG_N
    k_mean = fk.mean(dim=2).unsqueeze(-1)
    expected = (fq @ s_mat) / (fq @ k_mean + 1e-4)
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=1e-2)


def test_fp16_layer_with_262144_tokens_stays_finite_and_close_to_fp32():
    layer16 = make_layer(8, 1, None).half()
    torch.manual_seed(9)
    x = (30 * torch.randn(1, BIG_N, 8)).half()
    with torch.no_grad():
        v = F.linear(x, layer16.to_v.weight)
        k = F.linear(x + layer16.to_k_(x), layer16.to_k.weight)
    assert torch.isinf(feature_map(k).transpose(-1, -2) @ v).any()  # fp16 accumulation would overflow

    out = run_layer(layer16, x)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    reference = run_layer(copy.deepcopy(layer16).float(), x.float())
    scale = reference.abs().max()
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2 * scale.item())


# ---------------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_output_dtype_equals_input_dtype(dtype: torch.dtype):
    layer = make_layer(16, 2, 5).to(dtype)
    x = torch.randn(1, 10, 16).to(dtype)
    assert run_layer(layer, x).dtype == dtype
    q, k, v = (torch.randn(1, 2, 10, 8).to(dtype) for _ in range(3))
    assert linear_attention(q, k, v).dtype == dtype
    state = partial_state(k, v)
    assert state.kv.dtype == state.k.dtype == torch.float32  # accumulated in float32 whatever the input
    assert apply_state(q, state).dtype == dtype
