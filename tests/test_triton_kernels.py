"""The fused Triton kernels compute what the PyTorch ops compute, for every Stable Diffusion head dim; the
``kernel`` setting picks between them and rejects what cannot run with one clear line.

CI has no GPU, so the kernels run on CPU tensors in Triton's interpreter. The interpreter must be switched on
(``TRITON_INTERPRET=1``) before triton is imported, and other test modules import triton through diffusers,
so :func:`test_kernels_match_the_pytorch_ops_in_the_interpreter` runs the ``check_*`` specifications of this
file in a fresh pytest process with the variable set. Everything else runs here directly. The interpreter
multiplies TF32 blocks in full float32, so the GPU's TF32 rounding shows in the ``gpu`` benchmark's error
column, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from distlin.errors import UsageError
from distlin.linfusion.attention import LinFusionAttention, LinFusionAttnProcessor
from distlin.ops import kernels
from distlin.ops import linear_attention as ops
from distlin.ops.linear_attention import (
    apply_state,
    apply_state_torch,
    linear_attention,
    partial_state,
    partial_state_torch,
)

HEAD_DIMS = [40, 64, 80, 160]  # SD-1.5: 40/80/160; SD-2.1 and SDXL: 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 37, 300]  # a single token, less than one block, several blocks and token splits with a ragged tail
# Round-off allowed against the reference, relative to the largest value: float32 sums in another order, or one
# or two units in the last place of the output dtype.
ROUND_OFF = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def token_major_qkv(tokens: int, d: int, dtype: torch.dtype, heads: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """q, k, v as the layer hands them over: ``(B, h, N, d)`` views of one ``(B, N, 3, h, d)`` tensor."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, 3, heads, d, generator=generator).to(dtype)
    return [x[:, :, i].transpose(1, 2) for i in range(3)]


def assert_round_off(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to ``dtype``'s round-off, relative to the largest expected value (sums cancel near zero)."""
    tol = ROUND_OFF[dtype]
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)


def test_kernels_match_the_pytorch_ops_in_the_interpreter() -> None:
    """Runs the ``check_*`` specifications below under ``TRITON_INTERPRET=1``; none may fail or be skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-o", "python_functions=check_*"]
    result = subprocess.run(command, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and "skipped" not in result.stdout, report


# ---------------------------------------------------------------------------------------------------
# Run by the test above, in Triton's interpreter


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
def check_partial_state_matches_the_pytorch_ops(d: int, dtype: torch.dtype, tokens: int) -> None:
    _, k, v = token_major_qkv(tokens, d, dtype)
    state, expected = partial_state(k, v, kernel="triton"), partial_state_torch(k, v)
    assert state.kv.dtype == state.k.dtype == torch.float32 and state.count == tokens
    assert_round_off(state.kv, expected.kv, torch.float32)
    assert_round_off(state.k, expected.k, torch.float32)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
def check_apply_state_matches_the_pytorch_ops(d: int, dtype: torch.dtype, tokens: int) -> None:
    q, k, v = token_major_qkv(tokens, d, dtype)
    state = partial_state_torch(k, v)
    out, expected = apply_state(q, state, kernel="triton"), apply_state_torch(q, state)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.transpose(1, 2).is_contiguous()  # token-major memory: merging the heads is a free view
    assert_round_off(out, expected, dtype)


@pytest.mark.parametrize("d", [40, 160])
def check_every_tiling_the_gpu_check_times_computes_the_same(d: int) -> None:
    """``launch/bench.py gpu`` times each of ``BLOCK_CANDIDATES``: each must be a valid, equal computation."""
    from distlin.ops.triton_linear_attention import (
        APPLY_CANDIDATES,
        BLOCK_CANDIDATES,
        apply_state_triton,
        partial_state_triton,
    )

    q, k, v = token_major_qkv(300, d, torch.float16)  # with 4 steps of 32: a program's last steps are past the end
    expected = partial_state_torch(k, v)
    for blocks in BLOCK_CANDIDATES:
        assert_round_off(partial_state_triton(k, v, blocks).kv, expected.kv, torch.float32)
    for blocks in APPLY_CANDIDATES:
        assert_round_off(apply_state_triton(q, expected, blocks), apply_state_torch(q, expected), torch.float16)


def check_the_gpu_check_times_the_rule_against_every_tiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """``launch/bench.py gpu``'s tiling part: a record per width and phase naming the rule's and the fastest
    tiling (run here on CPU tensors at tiny size; on a GPU it runs at a million tokens); a tiling that does not
    compile on the device (out of shared memory, say) is listed as failed and the others are timed."""
    from argparse import Namespace

    from triton.runtime.errors import OutOfResources

    from distlin.bench.gpu import blocks_markdown, measure_blocks
    from distlin.ops import triton_linear_attention as kernels

    real_apply = kernels.apply_state_triton

    def apply(q: torch.Tensor, state: object, blocks: kernels.KernelBlocks | None = None) -> torch.Tensor:
        if blocks is not None and blocks.block_n == 128:
            raise OutOfResources(300000, 232448, "shared memory")
        return real_apply(q, state, blocks)

    monkeypatch.setattr(kernels, "apply_state_triton", apply)
    args = Namespace(channels=[80], tokens=[64, 200], heads=2, batch=1, warmup=1, repeats=1)
    records = measure_blocks(args, torch.device("cpu"), torch.float16)
    assert [(r["channels"], r["phase"], r["tokens"]) for r in records] == [(80, "partial", 200), (80, "apply", 200)]
    partial_record, apply_record = records
    assert set(partial_record["times_ms"]) == {str(blocks) for blocks in kernels.BLOCK_CANDIDATES}
    too_big = {str(blocks) for blocks in kernels.APPLY_CANDIDATES if blocks.block_n == 128}
    assert set(apply_record["times_ms"]) == {str(blocks) for blocks in kernels.APPLY_CANDIDATES} - too_big
    assert set(apply_record["failed"]) == too_big and partial_record["failed"] == {}
    for r in records:
        assert r["best_ms"] == min(r["times_ms"].values()) <= r["rule_ms"] == r["times_ms"][r["rule"]]
    text = blocks_markdown(records)  # the rules for head dim 40:
    assert "| partial | 64 tokens x 4 warps |" in text and "| apply | 64 tokens x 4 warps x 4 steps |" in text
    assert "Tilings that failed:\n- C=80 apply, 128 tokens x 4 warps: OutOfResources: " in text


def check_head_major_inputs_give_the_same_output() -> None:
    q, k, v = token_major_qkv(100, 64, torch.float16)
    out = linear_attention(q, k, v, kernel="triton")
    contiguous = linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), kernel="triton")
    assert_round_off(contiguous, out, torch.float16)


@pytest.mark.parametrize("d", [40, 160])
def check_states_of_two_token_sets_add_up_to_the_whole(d: int) -> None:
    """What the parallel engine relies on: bands' states summed are the image's state."""
    q, k, v = token_major_qkv(200, d, torch.float16)
    split = 77
    first = partial_state(k[:, :, :split], v[:, :, :split], kernel="triton")
    second = partial_state(k[:, :, split:], v[:, :, split:], kernel="triton")
    whole = partial_state(k, v, kernel="triton")
    total = first + second
    assert total.count == whole.count == 200
    assert_round_off(total.kv, whole.kv, torch.float32)
    assert_round_off(total.k, whole.k, torch.float32)
    band = apply_state(q[:, :, split:], total, kernel="triton")
    assert_round_off(band, apply_state_torch(q, partial_state_torch(k, v))[:, :, split:], torch.float16)


def check_layer_with_the_triton_kernel_matches_the_pytorch_ops() -> None:
    torch.manual_seed(0)
    layer = LinFusionAttention(80, 2).eval()
    x = torch.randn(2, 50, 80)
    with torch.inference_mode():
        layer.set_processor(LinFusionAttnProcessor(chunk_size=32, kernel="triton"))
        out = layer(x)
        layer.set_processor(LinFusionAttnProcessor(chunk_size=32, kernel="torch"))
        expected = layer(x)
    assert_round_off(out, expected, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Choosing the kernel


def usage_error_line(call: Callable[[], object]) -> str:
    """The message of the UsageError ``call`` raises, checked to be one line."""
    with pytest.raises(UsageError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_auto_runs_the_pytorch_ops_off_cuda() -> None:
    q, k, v = token_major_qkv(10, 40, torch.float32)
    assert ops.select_kernel("auto", q) == "torch"
    assert torch.equal(linear_attention(q, k, v), linear_attention(q, k, v, kernel="torch"))


def test_an_unknown_kernel_names_the_choices() -> None:
    message = usage_error_line(lambda: LinFusionAttnProcessor(kernel="cuda"))
    assert "'cuda'" in message and all(name in message for name in kernels.ATTENTION_KERNELS)
    q, k, v = token_major_qkv(10, 40, torch.float32)
    usage_error_line(lambda: partial_state(k, v, kernel="fast"))


def test_triton_without_triton_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert "pip install 'distlin[gpu]'" in usage_error_line(lambda: LinFusionAttnProcessor(kernel="triton"))
    assert LinFusionAttnProcessor(kernel="auto").kernel == "auto"  # auto never needs triton


def test_triton_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = token_major_qkv(10, 40, torch.float32)
    assert "CUDA" in usage_error_line(lambda: partial_state(k, v, kernel="triton"))
    assert "float64" in usage_error_line(lambda: partial_state(k.double(), v.double(), kernel="triton"))
    k.requires_grad_(True)
    assert "backward" in usage_error_line(lambda: partial_state(k, v, kernel="triton"))
    assert ops.select_kernel("auto", k) == "torch"


def test_parallel_processor_keeps_the_kernel() -> None:
    from distlin.parallel import ParallelContext, PatchParallelConfig, Runtime
    from distlin.parallel.attention import parallel_processor

    layer = LinFusionAttention(64, 2)
    layer.set_processor(LinFusionAttnProcessor(kernel="torch"))
    ctx = ParallelContext(Runtime(), PatchParallelConfig(), dry_run_ranks=2)
    assert parallel_processor(layer, ctx, 1024).kernel == "torch"


def test_gpu_benchmark_refuses_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distlin.bench.cli import main
    from distlin.errors import USAGE_EXIT_CODE

    assert main(["gpu", "--out", str(tmp_path / "out"), "--device", "cpu"]) == USAGE_EXIT_CODE
    error = capsys.readouterr().err
    assert error.startswith("error:") and "CUDA" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--parts", "unet,vea"], "'vea'"), (["--generation-size", "16384by8192"], "16384by8192")],
)
def test_gpu_benchmark_names_a_bad_option_before_looking_for_a_gpu(
    flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distlin.bench.cli import main
    from distlin.errors import USAGE_EXIT_CODE

    assert main(["gpu", "--out", str(tmp_path / "out"), "--device", "cpu", *flags]) == USAGE_EXIT_CODE
    error = capsys.readouterr().err
    assert error.startswith("error:") and named in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()
