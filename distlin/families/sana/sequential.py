"""SANA's DC-AE band by band on one device, its bands kept in host RAM (or on the device): exact, with device
memory bounded by a band whatever the image height.

The DC-AE has no GroupNorm; what couples distant rows is only its multiscale linear attention, whose state
``Σ_j [v_j; 1] relu(k_j)ᵀ`` is a sum over tokens. So the part (decoder or encoder) runs on one row band at a
time, each band with ``margin`` rows of its neighbours on either side (the part's receptive field, found by a
probe: every convolution's padding at its resolution), and only the band's own rows are kept:

1. one pass over the bands per attention layer, in order: each band runs the part up to that layer and adds
   its own rows' share of the state (:class:`SequentialAttention`), the earlier layers using the states
   already summed; the part stops there (the layers after it need that state);
2. a last pass runs every band through the whole part with every state known and keeps its rows in the store.

After each level a band drops the neighbours' rows the rest of the part no longer needs, so at full resolution
it carries 2 latent rows on either side (SANA's DC-AE), not the 21 its input needs. The attention layers sit
at the deepest levels, so the extra passes run the small part of the network. The rows next to a band's edge
are recomputed by its neighbours (the margin), not exchanged: nothing here needs more than one device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from distlin.families.sana.family import dc_ae_factor
from distlin.families.sana.vae import Encoded, StateAttention
from distlin.parallel.runtime import Runtime
from distlin.sizes import format_size
from distlin.surgery import Swaps, bound_class, original_type, twin
from distlin.vae.coders import from_rank0, rank0_placeholder


class StopPart(Exception):
    """Raised by the attention layer whose state a pass sums: nothing after it can run yet."""


@dataclass
class Pass:
    """What the attention layers of one band's run need: the band's own rows among the rows it runs on, the
    layer whose state is being summed (None: the last pass) and the states summed so far."""

    rows: int = 1  # input rows the band runs on (its own and its margins), in the part's input units
    own: tuple[int, int] = (0, 1)  # its own rows among them
    summing: int | None = None
    states: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0  # attention layers met in this run
    window: tuple[int, int] = (0, 1)  # the input units the band's current activation covers


class SequentialAttention(StateAttention):
    """The multiscale linear attention of a band run: it adds the band's own tokens' share to the state being
    summed, or applies a state already summed."""

    current: ClassVar[Pass]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        run = self.current
        index, run.seen = run.seen, run.seen + 1
        query, key, value = self.parts(hidden_states)
        if index == run.summing:
            height, width = hidden_states.shape[-2:]
            start, stop = (row * height // run.rows * width for row in run.own)
            share = self.state(key[..., start:stop], value[..., start:stop])
            if index == len(run.states):
                run.states.append(share)
            else:
                run.states[index] += share
            raise StopPart
        return self.finish(hidden_states, run.states[index], query)


def stages(part: nn.Module) -> list[nn.Module]:
    """The part's levels (the members of its ``up_blocks`` / ``down_blocks`` lists), where a band's rows are cut
    back to what the rest of the part needs."""
    return [stage for child in part.children() if isinstance(child, nn.ModuleList) for stage in child]


def receptive_rows(part: nn.Module, x: torch.Tensor, unit: int) -> tuple[int, dict[nn.Module, int]]:
    """Input units (``unit`` input rows each) of neighbours a band needs for its own rows to come out exact, in
    all and after each stage: every convolution's padding in input rows at its resolution, summed on a small
    probe input in the order they run (plus one unit, so a fraction never falls short)."""
    probe = x[..., : 2 * unit, : 2 * unit]
    radius, after = [0.0], {}

    def conv(module: nn.Module, args: tuple) -> None:
        radius[0] += module.padding[0] * module.dilation[0] * probe.shape[-2] / args[0].shape[-2]

    hooks = [m.register_forward_pre_hook(conv) for m in part.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(lambda m, a, o: after.__setitem__(m, radius[0])) for m in stages(part)]
    try:
        part(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return math.ceil(radius[0] / unit) + 1, {m: math.ceil((radius[0] - r) / unit) + 1 for m, r in after.items()}


class BandedPart:
    """A DC-AE part (decoder or encoder) run band by band on ``x`` (see the module doc): ``unit`` input rows per
    indivisible row (1 for a latent, the DC-AE factor for an image); inside ``with``, its attention layers are
    :class:`SequentialAttention` and after each stage a band keeps only the neighbours' rows the rest needs."""

    def __init__(self, part: nn.Module, x: torch.Tensor, unit: int, store: torch.device | str):
        self.part, self.x, self.unit, self.store = part, x, unit, store
        self.units = x.shape[-2] // unit
        self.margin, self.remaining = receptive_rows(part, x, unit)
        self.attention = bound_class(SequentialAttention, current=Pass())
        self.layers = 0
        self._swaps, self._hooks = Swaps(part), []

    def __enter__(self) -> BandedPart:
        for name, module in list(self.part.named_modules()):
            if original_type(module) is StateAttention.twin_of and not self._swaps.covers(name):
                self._swaps.module(name, twin(module, self.attention))
                self.layers += 1
        self._hooks = [stage.register_forward_hook(self._cut) for stage in stages(self.part)]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._swaps.restore()

    def bands(self, band_units: int) -> list[tuple[int, int]]:
        return [(start, min(start + band_units, self.units)) for start in range(0, self.units, band_units)]

    def _cut(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        run = self.attention.current
        low, high = run.window
        start, stop = (low + row for row in run.own)
        keep = max(low, start - self.remaining[module]), min(high, stop + self.remaining[module])
        scale = out.shape[-2] // (high - low)
        run.window, run.rows, run.own = keep, keep[1] - keep[0], (start - keep[0], stop - keep[0])
        return out[..., (keep[0] - low) * scale : (keep[1] - low) * scale, :]

    def band(self, start: int, stop: int, summing: int | None = None) -> torch.Tensor | None:
        """Input units ``[start, stop)`` through the part (on ``store``), or, ``summing`` layer ``i``, only their
        share of its state added (None returned)."""
        low, high = max(0, start - self.margin), min(self.units, stop + self.margin)
        run = Pass(high - low, (start - low, stop - low), summing, self.attention.current.states, window=(low, high))
        self.attention.current = run
        try:
            out = self.part(self.x[..., low * self.unit : high * self.unit, :])
        except StopPart:
            return None
        low, high = run.window
        scale = out.shape[-2] // (high - low)
        return out[..., (start - low) * scale : (stop - low) * scale, :].to(self.store)

    def sum_states(self, bands: list[tuple[int, int]]) -> None:
        """Every attention layer's state, in order, summed over ``bands``."""
        for layer in range(self.layers):
            for start, stop in bands:
                self.band(start, stop, layer)


def run_in_bands(part: nn.Module, x: torch.Tensor, unit: int, band_units: int, store: torch.device | str) -> Any:
    """``part(x)`` band by band, ``band_units`` indivisible rows per band, the output's bands kept on ``store``."""
    with BandedPart(part, x, unit, store) as banded:
        bands = banded.bands(band_units)
        banded.sum_states(bands)
        return torch.cat([banded.band(start, stop) for start, stop in bands], dim=-2)


class SequentialDCAE:
    """The DC-AE's decode and encode band by band on rank 0 alone (:func:`run_in_bands`), bands of
    ``band_rows`` latent rows kept on ``store`` (host RAM, or the device). Other ranks compute nothing: their
    decoded image is a ``meta`` placeholder of the right shape, and they receive the latent rank 0 encodes (one
    broadcast of latent size). ``on_done`` (rank 0) gets each pass's bytes moved to the store and seconds."""

    def __init__(
        self,
        vae: nn.Module,
        runtime: Runtime,
        band_rows: int,
        store: torch.device | str = "cpu",
        on_done: Callable[[str, int, float], None] | None = None,
    ):
        self.vae, self.runtime, self.band_rows, self.store, self.on_done = vae, runtime, band_rows, store, on_done
        self.factor = dc_ae_factor(vae.config)

    def _run(self, what: str, part: nn.Module, x: torch.Tensor, unit: int, store: torch.device | str) -> torch.Tensor:
        began = time.perf_counter()
        out = run_in_bands(part, x, unit, self.band_rows, store)
        if self.on_done is not None:
            moved = out.numel() * out.element_size() if out.device != x.device else 0
            self.on_done(what, moved, time.perf_counter() - began)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``vae.decode(latents).sample`` (unscaled latents in, image in [-1, 1] out)."""
        if not self.runtime.is_main:
            return rank0_placeholder(latents, self.vae.config.in_channels, self.factor)
        return self._run("decoded", self.vae.decoder, latents, 1, self.store)

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> Encoded:
        """``vae.encode(image).latent`` (unscaled) as ``.mean``; sides multiples of the factor."""
        batch, _, height, width = image.shape
        if height % self.factor or width % self.factor:
            raise ValueError(f"image of {format_size(width, height)} px: both sides must be multiples of {self.factor}")
        shape = (batch, self.vae.config.latent_channels, height // self.factor, width // self.factor)
        encoded = partial(self._run, "encoded", self.vae.encoder, image, self.factor, self.runtime.device)
        return Encoded(from_rank0(self.runtime, encoded, shape, self.vae.dtype))
