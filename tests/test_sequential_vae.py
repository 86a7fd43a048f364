"""Sequential band decode and encode equal the plain VAE's, where diffusers' tiled decode does not; the encode
needs no more device memory than the decode the planner counts."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import SpatialNorm
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distlin.errors import UsageError
from distlin.models.architectures import load_architecture
from distlin.models.tiny import build_pipeline
from distlin.vae.peak import device_peak_elements
from distlin.vae.sequential import UnsupportedDecoderError, decode_sequential, encode_sequential
from distlin.vae.transfer import HostStore, ahead

LATENT_H, LATENT_W = 24, 16
TOL = 1e-4


class LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any op but ``cat`` materialises: a proxy for peak compute memory on CPU.

    Store and compute are both the CPU here; the big ``cat``s of the sequential decode are store-side (a
    band with its halo rows, the final image), and the plain decode has no big ``cat``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if func is torch.ops.aten.cat.default else tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


class ComputePeak(TorchDispatchMode):
    """Peak bytes of live compute-side storages, with store and compute both the CPU.

    Every storage an op creates goes to the side a real store/compute pair would put it on: the copies of
    :class:`HostStore` (patched by :meth:`patch` to always copy, as a transfer between two devices does) create compute
    and store storages; any other op runs on the store exactly when all its tensor inputs are store storages
    (a band's rows cut across band borders, the final image), else on compute. A compute storage counts from
    its creation until Python frees it (a finalizer on the storage). Weights exist before and are not
    counted; views and in-place results share a storage already seen and are not counted again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.store: weakref.WeakSet = weakref.WeakSet()
        self.compute: weakref.WeakSet = weakref.WeakSet()
        self.side: str | None = None
        self.current = self.peak = 0

    @contextmanager
    def on(self, side: str) -> Iterator[None]:
        self.side = side
        try:
            yield
        finally:
            self.side = None

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def to_compute(host: HostStore, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            with self.on("compute"):
                return t.to(host.compute, dtype, copy=True)

        def to_store(host: HostStore, t: torch.Tensor) -> torch.Tensor:
            with self.on("store"):
                return t.to(host.store, copy=True)

        monkeypatch.setattr(HostStore, "_to_compute", to_compute)
        monkeypatch.setattr(HostStore, "_to_store", to_store)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t.untyped_storage() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        side = self.side or ("store" if inputs and all(s in self.store for s in inputs) else "compute")
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            if s.nbytes() == 0 or s in self.store or s in self.compute or any(s is i for i in inputs):
                continue
            if side == "store":
                self.store.add(s)
                continue
            self.compute.add(s)
            self.current += s.nbytes()
            weakref.finalize(s, self._free, s.nbytes())
            self.peak = max(self.peak, self.current)
        return out


def _latents(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, LATENT_H, LATENT_W, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vae() -> nn.Module:
    return build_pipeline("tiny-sd15").vae.eval()


@pytest.fixture(scope="module")
def plain(vae) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(_latents()).sample


@pytest.fixture(scope="module")
def error(vae, plain) -> float:
    return (decode_sequential(vae, _latents(), band_rows=3) - plain).abs().max().item()


@pytest.mark.parametrize("band_rows", [1, 3, 5, 24])
def test_equals_plain_decode(vae, plain, band_rows) -> None:
    # query_chunk 7 splits the 16-token rows, so query chunks straddle rows and bands
    out = decode_sequential(vae, _latents(), band_rows, query_chunk=7)
    assert out.shape == plain.shape and out.dtype == plain.dtype
    assert (out - plain).abs().max().item() < TOL


def test_batch_of_two(vae) -> None:
    z = _latents(2)
    with torch.no_grad():
        plain = vae.decode(z).sample
    assert (decode_sequential(vae, z, band_rows=5) - plain).abs().max().item() < TOL


def test_float16_store_is_close(vae, plain) -> None:
    out = decode_sequential(vae, _latents(), band_rows=5, store_dtype=torch.float16)
    assert out.dtype == torch.float32
    assert (out - plain).abs().max().item() < 0.02 * plain.abs().max().item()


def test_float16_vae_is_close() -> None:
    vae = build_pipeline("tiny-sd15", torch_dtype=torch.float16).vae.eval()
    z = _latents().half()
    try:
        with torch.no_grad():
            plain = vae.decode(z).sample
    except (RuntimeError, NotImplementedError) as exc:  # an op without a CPU half kernel
        pytest.skip(f"float16 VAE decode not supported on this CPU build: {exc}")
    out = decode_sequential(vae, z, band_rows=5)
    assert out.dtype == torch.float16
    assert (out.float() - plain.float()).abs().max().item() < 0.02 * plain.float().abs().max().item()


def _spatial_norm(vae: nn.Module) -> None:
    vae.decoder.conv_norm_out = SpatialNorm(32, 4)


def _wide_shortcut(vae: nn.Module) -> None:
    vae.decoder.up_blocks[3].resnets[0].conv_shortcut = nn.Conv2d(16, 8, 3, padding=1)


def _transposed_upsampler(vae: nn.Module) -> None:
    vae.decoder.up_blocks[0].upsamplers[0].use_conv_transpose = True


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (_spatial_norm, "conv_norm_out"),
        (_wide_shortcut, r"up_blocks\[3\].resnets\[0\].conv_shortcut"),
        (_transposed_upsampler, r"up_blocks\[0\].upsamplers\[0\]"),
    ],
)
def test_unsupported_decoder_raises(mutate: Callable[[nn.Module], None], where: str) -> None:
    vae = build_pipeline("tiny-sd15").vae.eval()
    mutate(vae)
    with pytest.raises(UnsupportedDecoderError, match=where):
        decode_sequential(vae, _latents(), band_rows=3)


def test_bad_band_rows_raises(vae) -> None:
    with pytest.raises(ValueError, match="band_rows=0"):
        decode_sequential(vae, _latents(), band_rows=0)


@pytest.mark.parametrize(("band_rows", "attention_rows"), [(5, 1), (5, 2), (7, 3)])
def test_streamed_attention_equals_plain_decode(vae, plain, band_rows: int, attention_rows: int) -> None:
    # query groups and K/V blocks of 1-3 rows straddle the 5- and 7-row bands; query chunks of 20 straddle rows
    out = decode_sequential(vae, _latents(), band_rows, query_chunk=20, attention_rows=attention_rows)
    assert (out - plain).abs().max().item() < TOL


@pytest.mark.parametrize("attention_rows", [0, -2])
def test_bad_attention_rows_raises(vae, attention_rows: int) -> None:
    with pytest.raises(UsageError, match=f"attention_rows={attention_rows}"):
        decode_sequential(vae, _latents(), band_rows=3, attention_rows=attention_rows)


# Two levels (x2 upsampling): small full-resolution convs, so the attention's working set is the peak.
SHALLOW_VAE = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
}


def fetch_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA schedule on the CPU: the next band's rows fetched while one computes (copies stay synchronous)."""
    monkeypatch.setattr(HostStore, "lookahead", property(lambda host: 1))


def test_double_buffered_decode_equals_plain_decode(monkeypatch, vae, plain) -> None:
    fetch_ahead(monkeypatch)
    out = decode_sequential(vae, _latents(), 5, query_chunk=7)
    assert (out - plain).abs().max().item() < TOL


@pytest.mark.parametrize("ahead_of_compute", [False, True], ids=["cpu-schedule", "cuda-schedule"])
@pytest.mark.parametrize(
    ("config", "latent", "band_rows", "attention_rows"),
    [
        (load_architecture("tiny-sd15")["vae"], (LATENT_H, LATENT_W), 5, None),  # peak: a full-resolution conv
        (SHALLOW_VAE, (16, 16), 3, 8),  # peak: the attention's 128 x 128 score tile
    ],
    ids=["tiny-sd15-conv", "shallow-attention"],
)
def test_device_peak_prediction(
    monkeypatch, config: dict, latent: tuple[int, int], band_rows: int, attention_rows, ahead_of_compute: bool
):
    """device_peak_elements within 20 % of the compute-side peak measured by :class:`ComputePeak`, with the
    next band fetched ahead (as on CUDA) or not (as on the CPU).

    Tiny shapes are meaningful: the prediction counts the same band-, group- and tile-sized tensors the code
    creates, so only per-channel vectors and GroupNorm moments (well under 1 %) separate the two.
    """
    vae = AutoencoderKL.from_config(config).eval()
    z = torch.randn(1, 4, *latent, generator=torch.Generator().manual_seed(0))
    tracker = ComputePeak()
    tracker.patch(monkeypatch)
    if ahead_of_compute:
        fetch_ahead(monkeypatch)
    with tracker:
        decode_sequential(vae, z, band_rows, attention_rows=attention_rows)
    assert tracker.current == 0  # every compute storage was freed
    measured = tracker.peak / z.element_size()
    predicted = device_peak_elements(
        config, *latent, band_rows, attention_rows, dtype=torch.float32, fetch_ahead=ahead_of_compute
    )
    print(f"\ncompute peak: measured {measured:.0f}, predicted {predicted} elements")
    assert abs(predicted / measured - 1) < 0.2


def test_diffusers_tiling_is_far_worse(vae, plain, error) -> None:
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 32, 4, 0.25
    try:
        with torch.no_grad():
            tiled = vae.decode(_latents()).sample
    finally:
        vae.disable_tiling()
    tiled_error = (tiled - plain).abs().max().item()
    print(f"\nmax abs error vs plain decode: sequential {error:.2e}, diffusers tiled {tiled_error:.2e}")
    assert tiled_error > 100 * max(error, 1e-6)


def test_largest_tensor_is_a_band(vae) -> None:
    z = torch.randn(1, 4, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), LargestTensor() as plain:
        vae.decode(z)
    with LargestTensor() as banded:
        decode_sequential(vae, z, band_rows=4)
    print(f"\nlargest tensor, 256x128 px: plain {plain.largest} B, sequential (4-row bands) {banded.largest} B")
    assert banded.largest * 6 < plain.largest  # 8 bands, each with 2 halo rows


def _image(batch: int = 1) -> torch.Tensor:
    """Pixels of the size :func:`_latents` decodes to, in [-1, 1]."""
    shape = (batch, 3, 8 * LATENT_H, 8 * LATENT_W)
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize(("band_rows", "attention_rows"), [(1, None), (5, None), (24, None), (5, 2)])
def test_encode_equals_plain_encode(name: str, band_rows: int, attention_rows: int | None) -> None:
    vae = build_pipeline(name).vae.eval()
    image = _image(2)
    with torch.no_grad():
        plain = vae.encode(image).latent_dist
    out = encode_sequential(vae, image, band_rows, query_chunk=20, attention_rows=attention_rows)
    assert out.parameters.shape == plain.parameters.shape
    assert (out.mean - plain.mean).abs().max().item() < TOL
    assert (out.std - plain.std).abs().max().item() < TOL


def test_encode_rejects_a_size_the_encoder_cannot_halve(vae) -> None:
    with pytest.raises(UsageError, match="multiples of 8"):
        encode_sequential(vae, torch.zeros(1, 3, 36, 64), band_rows=3)


def test_unsupported_encoder_raises() -> None:
    vae = build_pipeline("tiny-sd15").vae.eval()
    vae.encoder.down_blocks[1].downsamplers[0].conv.stride = (3, 3)
    with pytest.raises(UnsupportedDecoderError, match=r"down_blocks\[1\].downsamplers\[0\]"):
        encode_sequential(vae, _image(), band_rows=3)


def test_encode_compute_peak_is_below_the_decode_prediction(monkeypatch, vae) -> None:
    """The planner counts the sequential decode's device peak; the encode between cascade stages, at the same
    size and band rows, must stay under it (its widest maps are the decoder's last, at the same resolution)."""
    tracker = ComputePeak()
    tracker.patch(monkeypatch)
    with tracker:
        encode_sequential(vae, _image(), band_rows=5)
    assert tracker.current == 0
    measured = tracker.peak / 4
    predicted = device_peak_elements(dict(vae.config), LATENT_H, LATENT_W, 5, None, dtype=torch.float32)
    print(f"\nencode compute peak: measured {measured:.0f}, decode predicted {predicted} elements")
    assert measured <= predicted


@pytest.mark.parametrize(
    ("depth", "order"),
    [
        (1, ["fetch 0", "fetch 1", "compute 0", "fetch 2", "compute 1", "compute 2"]),  # CUDA: double buffering
        (0, ["fetch 0", "compute 0", "fetch 1", "compute 1", "fetch 2", "compute 2"]),  # CPU: nothing to overlap
    ],
)
def test_bands_are_fetched_depth_ahead_of_compute(depth: int, order: list[str]) -> None:
    """Band r + depth's copy is queued before band r's compute: never later (no overlap), never earlier."""
    events: list[str] = []

    def fetch(r: int) -> int:
        events.append(f"fetch {r}")
        return r

    for r, fetched in ahead(3, fetch, depth):
        assert fetched == r
        events.append(f"compute {r}")
    assert events == order
    assert list(ahead(0, fetch, depth)) == []


def test_cpu_store_copies_synchronously_and_counts_bytes() -> None:
    """Without CUDA: no pinning, no side stream; every byte that crosses is counted once, in the store's dtype."""
    host = HostStore(torch.device("cpu"), torch.device("cpu"))
    assert not host.overlap and host.stream is None and host.lookahead == 0
    band = torch.randn(2, 3, 4, 5)
    stored = host.save(band, torch.float16)
    assert stored.dtype == torch.float16 and not stored.is_pinned() and host.moved == band.numel() * 2
    halves = [stored[:, :, :1], stored[:, :, 1:]]  # rows across a band border: joined on the host
    fetched = host.fetch(halves, torch.float32)
    assert fetched.copied is None and host.moved == 2 * band.numel() * 2
    torch.testing.assert_close(fetched.get(), band.half().float(), rtol=0, atol=0)


def test_decode_reports_every_byte_it_copies(monkeypatch, vae) -> None:
    """``on_done``'s byte count (the timing line's GB) is the sum of the copies made, both ways."""
    copied: list[int] = []
    to_compute, to_store = HostStore._to_compute, HostStore._to_store

    def counted_to_compute(host: HostStore, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        copied.append(t.numel() * t.element_size())
        return to_compute(host, t, dtype)

    def counted_to_store(host: HostStore, t: torch.Tensor) -> torch.Tensor:
        copied.append(t.numel() * t.element_size())
        return to_store(host, t)

    monkeypatch.setattr(HostStore, "_to_compute", counted_to_compute)
    monkeypatch.setattr(HostStore, "_to_store", counted_to_store)
    reported: list[int] = []
    decode_sequential(
        vae, _latents(), 5, store_dtype=torch.float16, attention_rows=2, on_done=lambda b, s: reported.append(b)
    )
    assert reported == [sum(copied)] and sum(copied) > 0
