"""SANA through the model-family seam: its transformer on row bands equals one process, and each layer's
exchange is one linear-attention state whose size does not grow with the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from multirank import run_ranks
from PIL import Image
from safetensors.torch import save_file

from distlin.families import FAMILIES, family_of_pipeline
from distlin.families.sana.tiny import TINY_SANA
from distlin.parallel.config import PatchParallelConfig

# patch size 2 with a sin-cos positional embedding: every band cuts whole patches and takes its rows of it.
CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "num_cross_attention_heads": 2,
    "cross_attention_head_dim": 8,
    "cross_attention_dim": 16,
    "caption_channels": 16,
    "sample_size": 16,
    "patch_size": 2,
    "interpolation_scale": 1,
}
# latent rows x columns: the model's native grid (its cached positional embedding) and another (recomputed)
SIZES = [(16, 16), (12, 20)]
STEPS = 3
GENERATE = Path(__file__).resolve().parents[1] / "launch" / "generate.py"


def transformer() -> SanaTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return SanaTransformer2DModel.from_config(CONFIG).eval()


def inputs(height: int, width: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
        "timestep": torch.tensor([500.0, 500.0]),
    }


def dc_ae() -> AutoencoderDC:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderDC.from_config(TINY_SANA["vae"]).eval()


def coder_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A latent of 12x10 rows and columns and an image of its size (the tiny DC-AE's factor is 4)."""
    generator = torch.Generator().manual_seed(2)
    return torch.randn(1, 8, 12, 10, generator=generator), torch.rand(1, 3, 48, 40, generator=generator) * 2 - 1


def build_lora(path: Path, rank: int = 2) -> None:
    """A LoRA for tiny-sana's transformer in diffusers' layout (peft ``lora_A``/``lora_B`` under
    ``transformer.``, as ``SanaPipeline.load_lora_weights`` reads): every attention projection, random weights."""
    from distlin.families.sana.tiny import build_sana_pipeline

    generator, weights = torch.Generator().manual_seed(3), {}
    for name, module in build_sana_pipeline("tiny-sana").transformer.transformer_blocks.named_modules():
        if isinstance(module, torch.nn.Linear) and (".attn1." in f".{name}" or ".attn2." in f".{name}"):
            key = f"transformer.transformer_blocks.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
            weights[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
    save_file(weights, path)


def lora_outputs(runtime, lora: str) -> list[torch.Tensor]:
    """tiny-sana's transformer with the LoRA fused before parallelize (as a run does) and after (the Python API)."""
    from distlin.components import Lora, apply_loras
    from distlin.families.sana.tiny import build_sana_pipeline
    from distlin.families.sana.transformer import parallelize_transformer

    config = PatchParallelConfig(cfg_parallel=False)  # every rank a band of both guidance halves
    tensors = {
        "hidden_states": torch.randn(2, 8, 12, 10, generator=torch.Generator().manual_seed(4)),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5)),
        "timestep": torch.tensor([500.0, 500.0]),
    }
    outputs = []
    for before in (True, False):
        pipe = build_sana_pipeline("tiny-sana")
        if before and lora:
            apply_loras(pipe, (Lora(lora, 0.8),))
        handle = parallelize_transformer(pipe.transformer, config, runtime, 4) if runtime is not None else None
        if not before and lora:
            apply_loras(pipe, (Lora(lora, 0.8),))
        with torch.no_grad():
            outputs.append(pipe.transformer(**tensors).sample)
        if handle is not None:
            handle.undo()
    return outputs


def on_ranks(runtime, lora: str) -> dict:
    """On every rank: the transformer's outputs and bytes per step at each size, the DC-AE's decode and encode,
    tiny-sana's transformer with a LoRA."""
    from distlin.families.sana.transformer import parallelize_transformer
    from distlin.families.sana.vae import parallelize_dc_ae

    model = transformer()
    handle = parallelize_transformer(model, PatchParallelConfig(), runtime)
    results: dict = {"transformer": []}
    with torch.no_grad():
        for height, width in SIZES:
            handle.ctx.stats.reset()
            outputs = [model(**inputs(height, width)).sample for _ in range(STEPS)]
            results["transformer"].append((outputs, handle.ctx.stats.summary()["bytes_per_step"]))
    handle.undo()
    coder = parallelize_dc_ae(dc_ae(), runtime)
    latent, image = coder_inputs()
    results["decoded"], results["encoded"] = coder.decode(latent), coder.encode(image).mean
    results["vae_bytes"] = coder.ctx.stats.totals()["bytes"]
    results["lora"] = lora_outputs(runtime, lora)
    results["displaced calls"] = displaced_calls(runtime)
    return results


def displaced_calls(runtime) -> list[torch.Tensor]:
    """Two calls of a parallelized tiny-sana pipeline in displaced mode with one seed: each call a generation."""
    from distlin.families.sana.tiny import build_sana_pipeline
    from distlin.parallel import parallelize

    pipe = build_sana_pipeline("tiny-sana")
    pipe.set_progress_bar_config(disable=True)
    handle = parallelize(pipe, PatchParallelConfig(mode="displaced", warmup_steps=0, cfg_parallel=False), runtime)
    options = {"height": 64, "width": 96, "num_inference_steps": 3, "use_resolution_binning": False}
    generator = torch.Generator()
    calls = [pipe("a cube", generator=generator.manual_seed(0), output_type="latent", **options).images for _ in "ab"]
    handle.undo()
    return calls


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "sana-lora.safetensors"
    build_lora(path)
    return path


@pytest.fixture(scope="module")
def four_ranks(lora_file: Path) -> dict:
    """Four ranks (the generate test below runs two and three): the transformer's guidance halves on two
    groups of two bands each, the DC-AE in four bands."""
    return run_ranks(4, on_ranks, str(lora_file))[0]


def test_sana_pipelines_find_their_family() -> None:
    pipe = type("SanaPipeline", (), {})()
    assert family_of_pipeline(pipe) is FAMILIES["sana"]
    assert family_of_pipeline(type("StableDiffusionPipeline", (), {})()) is FAMILIES["sd"]


@pytest.mark.parametrize(
    ("preset", "overrides", "ranks"),
    [
        ("tiny-sana", {"height": 8}, 3),
        ("sana-4k", {"height": 64}, 8),
        ("sana-4k", {"model": "full-sana", "height": 64}, 8),
    ],
)
def test_a_sana_size_the_ranks_cannot_split_is_refused_with_the_settings(preset, overrides, ranks) -> None:
    """Built-in SANA models and the Hub ones its presets use: checked before any rank starts or anything loads."""
    from distlin.errors import UsageError
    from distlin.settings import build_settings

    with pytest.raises(UsageError, match="at most 2 ranks work for this height"):
        build_settings(preset, overrides, ranks)


def test_transformer_on_four_ranks_equals_one_process(four_ranks) -> None:
    model = transformer()
    for (height, width), (outputs, _) in zip(SIZES, four_ranks["transformer"], strict=True):
        with torch.no_grad():
            reference = model(**inputs(height, width)).sample
        for output in outputs:
            torch.testing.assert_close(output, reference, rtol=0, atol=2e-6)


def test_attention_bytes_do_not_grow_with_the_image(four_ranks) -> None:
    (_, small), (_, large) = four_ranks["transformer"]
    # per layer and step: B * h * (d + 1) * d float32 (2 layers, one guidance half per rank, 2 heads of 8)
    assert small["attention"] == large["attention"] == 2 * 1 * 2 * 9 * 8 * 4
    assert large["halo"] > small["halo"]  # the Mix-FFN conv's halo rows grow with the width


def test_dc_ae_on_four_ranks_equals_one_process(four_ranks) -> None:
    vae = dc_ae()
    latent, image = coder_inputs()
    with torch.no_grad():
        torch.testing.assert_close(four_ranks["decoded"], vae.decode(latent).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(four_ranks["encoded"], vae.encode(image).latent, rtol=0, atol=1e-5)
    assert four_ranks["vae_bytes"]["attention"] > 0  # its linear attention's state, all-reduced


def test_a_lora_on_sanas_transformer_gives_the_one_process_output_on_four_ranks(four_ranks, lora_file) -> None:
    """Fused before parallelize (a run's --lora) or after (the Python API), the LoRA changes the output and four
    ranks give what one process does."""
    alone, plain = lora_outputs(None, str(lora_file)), lora_outputs(None, "")
    for banded, reference, without in zip(four_ranks["lora"], alone, plain, strict=True):
        torch.testing.assert_close(banded, reference, rtol=0, atol=2e-6)
        assert (reference - without).abs().max() > 1e-3


def test_every_call_of_a_parallelized_sana_pipeline_is_a_generation(four_ranks) -> None:
    """Displaced mode warms up again at each call: the second call reuses nothing stale from the first."""
    first, second = four_ranks["displaced calls"]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("band_rows", [3, 5])
def test_dc_ae_band_by_band_equals_the_whole_decode_and_encode(band_rows: int) -> None:
    """Above the size threshold (and between cascade stages) one device runs the DC-AE band by band."""
    from distlin.families.sana.sequential import SequentialDCAE
    from distlin.parallel.runtime import Runtime

    vae = dc_ae()
    latent, image = coder_inputs()
    coder = SequentialDCAE(vae, Runtime(), band_rows)
    with torch.no_grad():
        torch.testing.assert_close(coder.decode(latent), vae.decode(latent).sample, rtol=0, atol=1e-5)
        torch.testing.assert_close(coder.encode(image).mean, vae.encode(image).latent, rtol=0, atol=1e-5)


def generate(tmp: Path, name: str, ranks: int, *flags: str, **environment: str) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    argv = [sys.executable, *launcher, str(GENERATE), "--preset", "tiny-sana", "--output", "out.png", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTLIN_") and k not in ("RANK", "WORLD_SIZE")}
    folder = tmp / name
    folder.mkdir()
    return subprocess.Popen(
        argv,
        cwd=folder,
        env={**env, "OMP_NUM_THREADS": "1", **environment},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_generate_tiny_sana_on_two_and_three_ranks_writes_the_one_process_image(tmp_path: Path) -> None:
    """Also above a lowered size threshold, where rank 0 decodes band by band through host RAM."""
    runs = {str(ranks): generate(tmp_path, str(ranks), ranks, "--report-comm") for ranks in (1, 2, 3)}
    lowered = {"DISTLIN_SEQUENTIAL_VAE_PIXELS": "64", "DISTLIN_SEQUENTIAL_BAND_ROWS": "3"}
    runs["2 sequential"] = generate(tmp_path, "2 sequential", 2, **lowered)
    images, outputs = {}, {}
    for name, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        outputs[name] = stdout
        with Image.open(tmp_path / name / "out.png") as image:
            images[name] = np.asarray(image).astype(np.int16)
    for name in ("2", "3", "2 sequential"):
        difference = np.abs(images[name] - images["1"])
        assert difference.max() <= 1 and difference.mean() < 0.01, (name, difference.max(), difference.mean())
    assert "VAE decoded band by band" in outputs["2 sequential"] and "band by band" not in outputs["2"]
    reports = {ranks: json.loads(outputs[str(ranks)][outputs[str(ranks)].index("{") :]) for ranks in (2, 3)}
    # the bytes are reported under the denoiser's own name; 2 ranks: one guidance half each, nothing to exchange
    # but the gather; 3 ranks: one state per layer and step
    assert reports[2].keys() == reports[3].keys() == {"transformer", "vae"}
    assert reports[2]["transformer"]["bytes_per_step"]["attention"] == 0
    assert reports[3]["transformer"]["bytes_per_step"]["attention"] == 2 * 2 * 2 * 9 * 8 * 4


def test_a_refining_stage_runs_the_last_steps_of_the_schedule_to_sigma_zero() -> None:
    """SDEdit for SANA (cascades, --init-image): strength s keeps the last int(steps * s) steps, finite."""
    from distlin.families.sana.sdedit import refine
    from distlin.families.sana.tiny import build_sana_pipeline

    pipe = build_sana_pipeline("tiny-sana")
    pipe.set_progress_bar_config(disable=True)
    reference = torch.randn(1, 8, 16, 24, generator=torch.Generator().manual_seed(0))
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        latents = refine(pipe, reference, 0.7, 6, 0, prompt="a cube", negative_prompt="", use_resolution_binning=False)
    hook.remove()
    assert len(calls) == int(6 * 0.7)
    assert pipe.scheduler.sigmas[-1] == 0 and bool(torch.isfinite(latents).all())
