"""Which rank does what: the one rule for guidance groups, patch ranks, row units and band rows.

The engine, the memory planner, the VAE and the command line all ask this module, so they cannot disagree
about how many ranks share the latent rows. Pure arithmetic: nothing here starts a process group.

With CFG parallelism (``cfg_parallel``), guidance on and an even world size, ranks ``[0, N/2)`` denoise the
unconditional half of the batch and ``[N/2, N)`` the conditional half, each half patch-parallel over ``N/2``
ranks: a ``("cfg", "patch")`` mesh of shape ``(2, N/2)``. In every other case (guidance off, odd ``N``,
``cfg_parallel`` off) every rank is a patch rank of one ``(1, N)`` mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

from distlin.errors import UsageError
from distlin.parallel.layout import RowLayout

# Image pixels per latent pixel with the SD VAEs (three x2 upsamplings in the decoder).
LATENT_FACTOR = 8


def row_unit(unet_config: dict) -> int:
    """Band boundaries fall on multiples of ``2**L`` latent rows for a UNet with ``L`` downsamplings, so every
    level of the UNet splits exactly (``unet_config``: the UNet's config, a dict or diffusers' FrozenDict)."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


@dataclass(frozen=True)
class Topology:
    """The ranks of one run as a ``(cfg, patch)`` grid; ``rank`` is this process's global rank."""

    world_size: int
    cfg_split: bool
    rank: int = 0

    @classmethod
    def for_run(cls, world_size: int, *, cfg_parallel: bool, guidance: bool, rank: int = 0) -> Topology:
        """The grid a run uses: guidance halves on two rank groups only when there are two halves to split
        (guidance on) and the ranks split evenly; otherwise every rank owns latent rows."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size} is not a rank")
        return cls(world_size, cfg_parallel and guidance and world_size > 1 and world_size % 2 == 0, rank)

    @property
    def cfg_size(self) -> int:
        """Rank groups the guidance batch is split over (1 or 2)."""
        return 2 if self.cfg_split else 1

    @property
    def patch_ranks(self) -> int:
        """Ranks that share the latent rows of one image."""
        return self.world_size // self.cfg_size

    @property
    def mesh_shape(self) -> tuple[int, int]:
        """``(cfg, patch)`` sizes, for ``torch.distributed.device_mesh.init_device_mesh``."""
        return self.cfg_size, self.patch_ranks

    @property
    def cfg_index(self) -> int:
        """Which guidance half this rank denoises (0: unconditional) when split; 0 otherwise."""
        return self.rank // self.patch_ranks

    @property
    def patch_index(self) -> int:
        """This rank's band, top to bottom, within its patch group."""
        return self.rank % self.patch_ranks

    def patch_group(self) -> list[int]:
        """Global ranks of this rank's patch group, in band order."""
        first = self.cfg_index * self.patch_ranks
        return list(range(first, first + self.patch_ranks))

    def layout(self, latent_height: int, latent_width: int, unit: int, factor: int = LATENT_FACTOR) -> RowLayout:
        """The row bands of a latent (raises a UsageError naming the fix when the ranks cannot split it);
        ``factor``: image pixels per latent pixel (the model family's)."""
        try:
            return RowLayout(latent_height, latent_width, unit, self.patch_ranks, factor)
        except UsageError as err:
            if not self.cfg_split:
                raise
            raise UsageError(
                f"{self.world_size} ranks denoise the two guidance halves in groups of {self.patch_ranks}: {err} "
                "(or --no-cfg-parallel)"
            ) from None

    def band_rows(self, latent_height: int, latent_width: int, unit: int) -> int:
        """Rows of the tallest band: what sizes a rank's activations."""
        return max(self.layout(latent_height, latent_width, unit).sizes())

    def check_image(self, height: int, width: int, unit: int, factor: int = LATENT_FACTOR) -> RowLayout:
        """The layout of an image of ``height`` x ``width`` px (sizes already multiples of ``factor``)."""
        return self.layout(height // factor, width // factor, unit, factor)
