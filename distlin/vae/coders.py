"""How a run decodes and encodes, in one place: which coder, with which options, at which image size.

Several ranks decode and encode band-parallel (:class:`~distlin.vae.parallel.ParallelVAE` or a family's own band
coder: exact, without seams); one rank uses the same band layers on the whole image. Above the run's
sequential-VAE threshold (:func:`decodes_sequentially`, also the memory planner's rule) rank 0 alone goes band
by band, its full-size activations in host RAM or on the device (:class:`SequentialVAE`, or the family's
``sequential_coder``), so no device holds a full-resolution activation: at 16K the encoder's full-resolution maps
fit no GPU either. :func:`run_coder` builds the :class:`SizedCoder` that picks between the two per image size,
for the final decode (:func:`decode_latents`) and for the decode, upscale and encode between cascade stages
alike. Latent (un)scaling and the float32 upcast come from the VAE's config (:mod:`distlin.vae.latents`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from distlin.errors import UsageError
from distlin.parallel.runtime import Runtime
from distlin.parallel.topology import LATENT_FACTOR
from distlin.thresholds import Thresholds
from distlin.vae.latents import unscaled, vae_in_float32_if_needed

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

TransferReport = Callable[[str, int, float], None]  # (what, bytes moved, seconds)


class Coder(Protocol):
    """What decodes unscaled latents into an image in [-1, 1] and encodes one back (a posterior, ``.mean``)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode(self, image: torch.Tensor) -> Any: ...


# A family's own sequential coder: (vae, runtime, band_rows, store, on_done) -> Coder.
SequentialFactory = Callable[[Any, Runtime, int, "torch.device | str", "TransferReport | None"], Coder]


def decodes_sequentially(
    height: int,
    width: int,
    ranks: int,
    vae_decode: str = "auto",
    pixels_per_rank: int = Thresholds.sequential_vae_pixels,
    holds_less: Callable[[int, int, int], bool] | None = None,
) -> bool:
    """Whether an image of ``height`` x ``width`` px is decoded (and encoded) band by band on rank 0 rather than
    directly on the device(s) (plain on one rank, band-parallel on several): when asked to (``vae_decode``
    ``sequential``), or in ``auto`` above ``pixels_per_rank`` pixels per rank, where a direct decode (~3 KB per
    pixel in fp16) would set the run's peak, and where the model family can tell (``holds_less(height, width,
    ranks)``, its ``sequential_holds_less``) only if a band-by-band pass holds less than a rank's direct band.
    ``vae_decode`` is checked by the caller (``settings.VAE_DECODES``)."""
    if vae_decode != "auto":
        return vae_decode == "sequential"
    large = height * width > pixels_per_rank * ranks
    return large and (holds_less is None or holds_less(height, width, ranks))


def sequential_options(attention_rows: int | None, band_rows: int = Thresholds.sequential_band_rows) -> dict[str, Any]:
    """:func:`~distlin.vae.sequential.decode_sequential`'s keyword arguments as a run uses them: ``band_rows``
    latent rows per band; with ``attention_rows`` the mid-block's keys/values stream from host RAM that many
    latent rows at a time, with a smaller score tile."""
    if attention_rows is not None and attention_rows < 1:
        raise UsageError(f"VAE attention rows {attention_rows} must be at least 1")
    query_chunk = 4096 if attention_rows is None else 1024
    return {"band_rows": band_rows, "attention_rows": attention_rows, "query_chunk": query_chunk}


def rank0_placeholder(latents: torch.Tensor, channels: int, factor: int) -> torch.Tensor:
    """What a rank other than 0 holds for the image a rank-0-only coder decodes from ``latents``: a ``meta``
    tensor of its shape (``channels``, ``factor`` pixels per latent pixel), which costs nothing to upscale."""
    batch, _, rows, cols = latents.shape
    return torch.empty((batch, channels, rows * factor, cols * factor), device="meta", dtype=latents.dtype)


def from_rank0(
    runtime: Runtime, compute: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """``compute()`` on rank 0 alone, received by every other rank (as ``shape`` and ``dtype`` on its device) in
    one broadcast: what a rank-0-only coder encodes."""
    if runtime.is_main:
        out = compute().contiguous()  # a collective sends the storage as it lies in memory
    else:
        out = torch.empty(shape, device=runtime.device, dtype=dtype)
    if runtime.distributed:
        dist.broadcast(out, src=0)
    return out


class PlainVAE:
    """The decode/encode interface of :class:`~distlin.vae.parallel.ParallelVAE` on an unparallelized VAE."""

    def __init__(self, vae: Any):
        self.vae = vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Any:
        return self.vae.encode(image).latent_dist


class SequentialVAE:
    """The decode/encode interface band by band (:mod:`distlin.vae.sequential`) on rank 0 alone, its full-size
    activations in ``store`` (host RAM, or the device), so no device holds a full-resolution activation.

    The image stays in the store (upscaled there between stages, then encoded band by band from it). Other
    ranks compute nothing: their decoded image is a ``meta`` placeholder of the right shape (the bicubic
    upscale between stages costs nothing on it), and they receive the posterior rank 0 encodes, one broadcast of
    latent size. ``options`` are :func:`~distlin.vae.sequential.decode_sequential`'s keyword arguments as
    :func:`sequential_options` gives them; ``on_done`` (rank 0) gets each pass's bytes moved and seconds.
    """

    def __init__(
        self,
        vae: Any,
        runtime: Runtime,
        options: dict[str, Any],
        on_done: TransferReport | None = None,
        store: torch.device | str = "cpu",
    ):
        self.vae, self.runtime, self.options, self.on_done, self.store = vae, runtime, options, on_done, store

    def _report(self, what: str) -> Callable[[int, float], None] | None:
        on_done = self.on_done
        return None if on_done is None else lambda moved, seconds: on_done(what, moved, seconds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        from distlin.vae.sequential import decode_sequential  # here: diffusers' VAE blocks, not for the planner

        if not self.runtime.is_main:
            return rank0_placeholder(latents, self.vae.config.out_channels, LATENT_FACTOR)
        return decode_sequential(self.vae, latents, store=self.store, on_done=self._report("decoded"), **self.options)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from distlin.vae.sequential import encode_sequential

        def posterior() -> torch.Tensor:
            report = self._report("encoded")
            return encode_sequential(self.vae, image, store=self.store, on_done=report, **self.options).parameters

        batch, _, height, width = image.shape
        shape = (batch, 2 * self.vae.config.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
        return DiagonalGaussianDistribution(from_rank0(self.runtime, posterior, shape, self.vae.dtype))


class SizedCoder:
    """A run's coder: the direct one (band-parallel, or the same layers on one rank), or ``sequential`` (None: the
    family has none) for images that ``is_large(height, width)`` in pixels (:func:`decodes_sequentially`)."""

    def __init__(
        self,
        direct: Coder,
        sequential: Coder | None,
        is_large: Callable[[int, int], bool],
        factor: int = LATENT_FACTOR,  # image pixels per latent pixel (the model family's)
    ):
        self.direct, self.sequential, self.is_large, self.factor = direct, sequential, is_large, factor

    def is_sequential(self, height: int, width: int) -> bool:
        """Whether an image of ``height`` x ``width`` px goes band by band on rank 0 (the other ranks idle)."""
        return self.sequential is not None and self.is_large(height, width)

    def at(self, height: int, width: int) -> Coder:
        """The coder of an image of ``height`` x ``width`` px."""
        return self.sequential if self.sequential is not None and self.is_large(height, width) else self.direct

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rows, cols = latents.shape[-2:]
        return self.at(rows * self.factor, cols * self.factor).decode(latents)

    def encode(self, image: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.at(*image.shape[-2:]).encode(image)


def _transfer_printer(what: str, moved: int, seconds: float) -> None:
    """A sequential VAE pass's one line: how much crossed between host RAM and the device, and how fast."""
    rate = moved / seconds / 1e9 if seconds > 0 else float("inf")
    print(f"VAE {what} band by band: {moved / 1e9:.2f} GB host<->device in {seconds:.1f} s ({rate:.2f} GB/s)")


def _on_device_printer(what: str, moved: int, seconds: float) -> None:
    """A sequential VAE pass's one line when its activations stay on the device: nothing crossed to the host."""
    print(f"VAE {what} band by band on the device (activations kept there, --vae-store device) in {seconds:.1f} s")


def run_coder(
    vae: Any,
    direct: Coder,
    runtime: Runtime,
    *,
    vae_decode: str = "auto",
    thresholds: Thresholds | None = None,
    attention_rows: int | None = None,
    vae_store: str = "host",
    factor: int = LATENT_FACTOR,
    sequential: bool = True,
    sequential_coder: SequentialFactory | None = None,
    holds_less: Callable[[Any, int, int, int, int], bool] | None = None,
    report: TransferReport | None = None,
) -> SizedCoder:
    """The coder of a run (a ``RunSettings``' ``vae_decode``, ``thresholds``, ``vae_attention_rows`` and
    ``vae_store``) on ``runtime``'s ranks: ``direct`` (the prepared band coder of ``vae``) or, where
    :func:`decodes_sequentially`, the VAE band by band on rank 0, with the run's band rows and attention
    streaming, its activations in host RAM or (``vae_store`` ``device``) on the device; rank 0 prints one line
    per sequential pass (``report``: gets each pass's what, bytes moved and seconds instead). ``factor``: image
    pixels per latent pixel; ``sequential``: whether the model family has a sequential coder
    (``sequential_coder``: its own; None: :class:`SequentialVAE`, for an AutoencoderKL; ``holds_less``: its
    ``sequential_holds_less``, ``(vae_config, band_rows, height, width, ranks) -> bool``)."""
    limits = thresholds or Thresholds()
    smaller = None if holds_less is None else partial(holds_less, dict(vae.config), limits.sequential_band_rows)

    def is_large(height: int, width: int) -> bool:
        return decodes_sequentially(
            height, width, runtime.world_size, vae_decode, limits.sequential_vae_pixels, smaller
        )

    if not sequential:
        return SizedCoder(direct, None, is_large, factor)
    options = sequential_options(attention_rows, limits.sequential_band_rows)
    on_device = vae_store == "device"
    if report is None and runtime.is_main:
        report = _on_device_printer if on_device else _transfer_printer
    store = runtime.device if on_device else torch.device("cpu")
    if sequential_coder is not None:
        coder = sequential_coder(vae, runtime, options["band_rows"], store, report)
    else:
        coder = SequentialVAE(vae, runtime, options, report, store)
    return SizedCoder(direct, coder, is_large, factor)


@torch.no_grad()
def decode_latents(
    pipe: Any,
    latents: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    output_type: str = "pil",
) -> Any:
    """Decode the first latent of a batch into an image with the pipeline's VAE, as diffusers would (a run's
    final decode, ``decode`` its coder's at the image's size): a PIL image, or with ``output_type="pt"`` the
    float32 RGB tensor in [0, 1] before 8-bit quantisation (what the fidelity benchmark compares).

    Undoes the VAE's scaling (and shift, or SDXL-style per-channel mean/std), decodes in float32 where the VAE
    asks for it (``force_upcast``: the SDXL VAE overflows in float16) and applies the pipeline's watermark.
    ``decode`` replaces ``vae.decode`` (e.g. the band-parallel VAE's; then every rank must call this).
    """
    vae = pipe.vae
    with vae_in_float32_if_needed(vae) as dtype:
        latents = unscaled(latents[:1].to(device=vae.device, dtype=dtype), vae.config)
        image = decode(latents) if decode is not None else vae.decode(latents, return_dict=False)[0]
    watermark = getattr(pipe, "watermark", None)
    if watermark is not None:
        image = watermark.apply_watermark(image)
    picture = pipe.image_processor.postprocess(image, output_type=output_type)[0]
    return picture.float() if output_type == "pt" else picture
