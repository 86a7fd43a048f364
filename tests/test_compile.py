"""``--compile``: the compiled UNet gives the eager image, on one rank and on two (exact and displaced), and
compiles its graphs in the first UNet call only.

Compiled with ``aot_eager`` (dynamo's graph capture and AOTAutograd, then the captured ATen ops run as they
are): inductor's C++ code generation takes ~85 s for the tiny model's 9 graphs on this CI's 2 cores, while the
graph capture, the guards and the recompilation behaviour under test are the same for every backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from multirank import run_ranks
from torch._dynamo.backends.registry import lookup_backend

import distlin.parallel.compile
from distlin.cli.generate import parse
from distlin.parallel import Runtime
from distlin.parallel.compile import compiled_parts
from distlin.run import generate, pipeline_key, prepare_pipeline
from distlin.settings import build_settings

TOL = 1e-5  # relative to the latents' largest magnitude: fp32 round-off
BASE = {"height": 128, "width": 128, "steps": 2, "cfg_parallel": False}  # latent 16 rows: 8 per rank on two
DISPLACED = {"mode": "displaced", "warmup_steps": 0}  # step 0 synchronous, step 1 displaced


class CountingBackend:
    """``aot_eager`` that counts the graphs it is given: one per dynamo compilation."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs += 1
        return lookup_backend("aot_eager")(graph, example_inputs)


def _run(runtime: Runtime, overrides: dict[str, Any], backend: CountingBackend | None = None) -> dict[str, Any]:
    """Latents of one generation (twice on one prepared pipeline when compiled), and the graphs compiled so
    far after each UNet call."""
    settings = build_settings("tiny-sd15", {**BASE, **overrides}, runtime.world_size)
    prepared = prepare_pipeline(settings, runtime)
    graphs: list[int] = []
    if backend is not None:
        prepared.pipe.unet.register_forward_hook(lambda *_: graphs.append(backend.graphs))
    out = {"latents": generate(settings, runtime, prepared).latents, "graphs": graphs}
    if backend is not None:
        out["again"] = generate(settings, runtime, prepared).latents
    return out


def two_rank_job(runtime: Runtime) -> dict[str, Any]:
    backend = CountingBackend()
    distlin.parallel.compile.BACKEND = backend  # this spawned process's own
    return {
        "exact": _run(runtime, {}),
        "exact compiled": _run(runtime, {"compile": True}, backend),
        "displaced": _run(runtime, DISPLACED),
        "displaced compiled": _run(runtime, {**DISPLACED, "compile": True}, backend),
    }


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, Any]:
    return run_ranks(2, two_rank_job)[0]


@pytest.fixture(scope="module")
def one_rank() -> Iterator[dict[str, Any]]:
    backend = CountingBackend()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distlin.parallel.compile, "BACKEND", backend)
        yield {"eager": _run(Runtime(), {}), "compiled": _run(Runtime(), {"compile": True}, backend)}


def _assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= TOL * b.abs().max().item()


def test_compile_flag_is_a_setting_of_the_prepared_pipeline() -> None:
    settings, compiled = (parse(["--preset", "tiny-sd15", *flag])[1] for flag in ([], ["--compile"]))
    assert compiled.compile and not settings.compile and compiled.metadata()["compile"] is True
    assert pipeline_key(compiled) != pipeline_key(settings)


def test_compiled_parts_start_no_exchange() -> None:
    """Feed-forwards, cross-attention and LinFusion's projections; never a banded conv, norm or attn1."""
    unet = prepare_pipeline(build_settings("tiny-sd15", BASE, 1), Runtime()).pipe.unet
    names = {name for name, _ in compiled_parts(unet)}
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    assert leaves == {"ff", "attn2", "to_q_", "to_k_"}


def test_one_rank_compiled_equals_eager(one_rank) -> None:
    _assert_close(one_rank["compiled"]["latents"], one_rank["eager"]["latents"])
    _assert_close(one_rank["compiled"]["again"], one_rank["eager"]["latents"])


def test_two_ranks_compiled_equal_eager_and_one_rank(two_ranks, one_rank) -> None:
    reference = one_rank["eager"]["latents"]
    _assert_close(two_ranks["exact"]["latents"], reference)
    _assert_close(two_ranks["exact compiled"]["latents"], two_ranks["exact"]["latents"])
    _assert_close(two_ranks["exact compiled"]["latents"], reference)


def test_displaced_compiled_equals_displaced_eager(two_ranks, one_rank) -> None:
    displaced = two_ranks["displaced"]["latents"]
    _assert_close(two_ranks["displaced compiled"]["latents"], displaced)
    _assert_close(two_ranks["displaced compiled"]["again"], displaced)
    assert not torch.equal(displaced, one_rank["eager"]["latents"])  # the stale exchanges did change the result


@pytest.mark.parametrize("run", ["one rank", "two ranks exact", "two ranks displaced"])
def test_graphs_compile_in_the_first_unet_call_only(run: str, one_rank, two_ranks) -> None:
    """Later steps (and a second generation on the same pipeline) reuse the graphs: no recompilation."""
    graphs = {
        "one rank": one_rank["compiled"]["graphs"],
        "two ranks exact": two_ranks["exact compiled"]["graphs"],
        "two ranks displaced": two_ranks["displaced compiled"]["graphs"],
    }[run]
    assert len(graphs) == 2 * BASE["steps"]  # two generations, one UNet call per step
    assert graphs[0] > 0 and set(graphs) == {graphs[0]}
