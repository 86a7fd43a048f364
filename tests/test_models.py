"""Offline model builders: what tests, benchmarks and the CLI rely on when no weights can be downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTokenizer

from distlin.errors import UsageError
from distlin.models.tiny import (
    FULL_NAMES,
    TINY_NAMES,
    build_controlnet,
    build_pipeline,
    build_unet,
    is_builtin,
    load_architecture,
    load_tokenizer,
)

PROMPTS = [
    "A photo of an astronaut riding a horse on the moon, 8k, highly detailed!!",
    "naïve café — crème brûlée, 日本語のテキスト, emoji 🙂🚀, tabs\tand\nnewlines",
    "",
    "word " * 200,  # longer than the 77-token context
]


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def num_downsamplings(unet: UNet2DConditionModel) -> int:
    return sum(1 for block in unet.down_blocks if block.downsamplers)


@pytest.fixture(scope="module", params=TINY_NAMES)
def tiny_pipe(request: pytest.FixtureRequest) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    pipe = build_pipeline(request.param, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_loads_offline_as_a_77_token_clip_tokenizer(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer()
    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.model_max_length == 77
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["english", "unicode", "empty", "too-long"])
def test_tokenizer_encodes_any_prompt_into_the_text_encoders_vocabulary(prompt: str):
    tokenizer = load_tokenizer()
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids
    assert max(ids) < len(tokenizer)
    for name in TINY_NAMES + FULL_NAMES:
        assert max(ids) < load_architecture(name)["text_encoder"]["vocab_size"]


def test_tokenizer_round_trips_lowercase_english():
    tokenizer = load_tokenizer()
    text = "a red fox jumps over the lazy dog at sunset"
    assert tokenizer.decode(tokenizer(text.upper()).input_ids, skip_special_tokens=True) == text


# ---------------------------------------------------------------------------------------------------
# Tiny pipelines


def test_tiny_pipeline_generates_a_finite_image_of_the_requested_size(tiny_pipe):
    images = tiny_pipe(
        "a cat on a chair, café ☕",
        height=128,
        width=192,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 128, 192, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0  # not a blank image


def test_pipeline_is_recognisable_by_its_name(tiny_pipe):
    name = tiny_pipe.name_or_path
    assert name.startswith("distlin/tiny-")
    assert is_builtin(name)
    rebuilt = build_pipeline(name, seed=0)  # the prefixed name is accepted back
    assert type(rebuilt) is type(tiny_pipe) and rebuilt.name_or_path == name


def test_tiny_sdxl_is_an_sdxl_pipeline_with_two_text_encoders():
    pipe = build_pipeline("tiny-sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert config.cross_attention_dim == hidden
    pooled = pipe.text_encoder_2.config.projection_dim
    assert config.projection_class_embeddings_input_dim == pooled + 6 * config.addition_time_embed_dim


# ---------------------------------------------------------------------------------------------------
# Seeded weights


@pytest.mark.parametrize("name", TINY_NAMES)
def test_same_seed_gives_bit_identical_weights_and_another_seed_different_ones(name: str):
    a, b, c = (build_pipeline(name, seed=s) for s in (0, 0, 1))
    for component in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if name == "tiny-sdxl" else ()):
        assert same_weights(state(getattr(a, component)), state(getattr(b, component))), component
        assert not same_weights(state(getattr(a, component)), state(getattr(c, component))), component


def test_build_unet_gives_the_pipelines_unet():
    alone, in_pipeline = build_unet("tiny-sd15", seed=3), build_pipeline("tiny-sd15", seed=3).unet
    assert same_weights(state(alone), state(in_pipeline))


def test_sdxl_text_encoders_are_not_copies_of_each_other():
    pipe = build_pipeline("tiny-sdxl")
    first, second = pipe.text_encoder.get_input_embeddings(), pipe.text_encoder_2.get_input_embeddings()
    assert not torch.equal(first.weight, second.weight)


def test_torch_dtype_only_casts_the_same_weights():
    half = build_unet("tiny-sd15", seed=0, torch_dtype=torch.bfloat16)
    full = build_unet("tiny-sd15", seed=0)
    assert half.dtype == torch.bfloat16
    assert same_weights(state(half), {k: v.to(torch.bfloat16) for k, v in state(full).items()})


def test_building_leaves_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_pipeline("tiny-sd15", seed=7)
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize("name,downsamplings", [("tiny-sd15", 3), ("tiny-sdxl", 2)])
def test_tiny_unets_have_the_stated_number_of_downsamplings(name: str, downsamplings: int):
    unet = build_unet(name)
    assert num_downsamplings(unet) == downsamplings
    mid_shapes: list[torch.Size] = []
    unet.mid_block.register_forward_hook(lambda module, args, out: mid_shapes.append(out.shape))
    latents = torch.randn(1, 4, 16, 24)
    conditioning = {}
    if unet.config.addition_embed_type == "text_time":
        conditioning["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 32),
            "time_ids": torch.tensor([[128.0, 192.0, 0.0, 0.0, 128.0, 192.0]]),
        }
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        out = unet(latents, 10, text, **conditioning).sample
    assert out.shape == latents.shape
    bottom = (16 >> downsamplings, 24 >> downsamplings)
    assert mid_shapes == [torch.Size([1, unet.config.block_out_channels[-1], *bottom])]


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_vae_downsamples_by_8_like_sd(name: str):
    pipe = build_pipeline(name)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipe.vae.encode(torch.rand(1, 3, 64, 96) * 2 - 1).latent_dist.mean
    assert latents.shape == (1, 4, 8, 12)


@pytest.mark.parametrize("name", FULL_NAMES)
def test_full_size_vaes_downsample_by_8(name: str):
    vae = load_architecture(name)["vae"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert vae["latent_channels"] == 4


@pytest.mark.parametrize(
    "name,attn1_layers,parameters",
    [("full-sd15", 16, 860e6), ("full-sd21", 16, 865e6), ("full-sdxl", 70, 2.57e9)],
)
def test_full_size_unets_build_on_meta_with_the_published_size(name: str, attn1_layers: int, parameters: float):
    unet = build_unet(name, device="meta")
    assert all(p.is_meta for p in unet.parameters())  # nothing allocated
    assert sum(1 for module_name, _ in unet.named_modules() if module_name.endswith("attn1")) == attn1_layers
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(parameters, rel=0.005)


def test_full_size_configs_carry_the_published_model_choices():
    sd15, sd21, sdxl = (load_architecture(name) for name in FULL_NAMES)
    assert sd15["unet"]["cross_attention_dim"] == sd15["text_encoder"]["hidden_size"] == 768
    assert sd21["unet"]["attention_head_dim"] == [5, 10, 20, 20] and sd21["unet"]["use_linear_projection"]
    assert sd21["unet"]["cross_attention_dim"] == sd21["text_encoder"]["hidden_size"] == 1024
    assert sd21["scheduler"]["prediction_type"] == "v_prediction"
    assert sd21["unet"]["sample_size"] * 8 == 768
    assert (
        sdxl["unet"]["cross_attention_dim"]
        == 768 + 1280
        == sum(sdxl[key]["hidden_size"] for key in ("text_encoder", "text_encoder_2"))
    )
    assert sdxl["unet"]["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    for architecture in (sd15, sd21, sdxl):
        assert architecture["scheduler"]["steps_offset"] == 1
        assert architecture["scheduler"]["set_alpha_to_one"] is False


def test_load_architecture_returns_a_fresh_copy():
    load_architecture("full-sd15")["unet"]["sample_size"] = 1
    assert load_architecture("full-sd15")["unet"]["sample_size"] == 64


def test_unknown_names_are_rejected_with_the_valid_choices():
    assert not is_builtin("runwayml/stable-diffusion-v1-5")
    with pytest.raises(UsageError, match="tiny-sd15"):
        build_pipeline("tiny-sd16")


# ---------------------------------------------------------------------------------------------------
# ControlNet


def test_controlnet_residuals_fit_the_tiny_unet_and_change_its_output():
    unet, controlnet = build_unet("tiny-sd15"), build_controlnet("tiny-sd15")
    latents, text = torch.randn(1, 4, 16, 24), torch.randn(1, 77, 32)
    control_image = torch.rand(1, 3, 128, 192)
    with torch.no_grad():
        down, mid = controlnet(latents, 10, text, control_image, return_dict=False)
        plain = unet(latents, 10, text).sample
        controlled = unet(
            latents, 10, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    assert controlled.shape == plain.shape
    assert not torch.allclose(controlled, plain)


def test_a_controlnet_seed_gives_one_controlnet():
    """Tests compare runs that each build their ControlNet: the same seed must give the same weights."""
    first, again, other = build_controlnet("tiny-sd15"), build_controlnet("tiny-sd15"), build_controlnet(seed=1)
    weights = (model.state_dict().values() for model in (first, again, other))
    pairs = list(zip(*weights, strict=True))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)
