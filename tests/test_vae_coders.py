"""Which coder a run decodes and encodes with is decided in one place (distlin/vae/coders.py): the run's coder and
the memory planner pick the same path at every size, rank count and ``--vae-decode``."""

from __future__ import annotations

import pytest
import torch

from distlin.errors import UsageError
from distlin.memory.planner import plan
from distlin.parallel.runtime import Runtime
from distlin.thresholds import Thresholds
from distlin.vae.coders import PlainVAE, SequentialVAE, run_coder

LIMITS = Thresholds(sequential_vae_pixels=128 * 128)  # a run's switch-on size, lowered: 128² px per rank


class Vae:
    """What the coders read of a VAE before they decode."""

    config = {"out_channels": 3, "latent_channels": 4}
    dtype = torch.float32


@pytest.mark.parametrize("vae_decode", ["auto", "direct", "sequential"])
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(128, 128), (256, 128), (256, 256)])
def test_the_run_decodes_band_by_band_exactly_where_the_planner_plans_it(
    vae_decode: str, ranks: int, height: int, width: int
) -> None:
    direct = PlainVAE(Vae())
    coder = run_coder(Vae(), direct, Runtime(world_size=ranks), vae_decode=vae_decode, thresholds=LIMITS)
    planned = plan("tiny-sd15", height, width, ranks, vae_decode=vae_decode, thresholds=LIMITS)["vae"]
    assert coder.is_sequential(height, width) == (planned == "sequential")
    assert isinstance(coder.at(height, width), SequentialVAE if planned == "sequential" else PlainVAE)


def test_a_family_without_a_sequential_coder_always_decodes_directly() -> None:
    direct = PlainVAE(Vae())
    coder = run_coder(Vae(), direct, Runtime(), vae_decode="sequential", thresholds=LIMITS, sequential=False)
    assert not coder.is_sequential(4096, 4096) and coder.at(4096, 4096) is direct


def test_an_unknown_vae_decode_is_refused_by_the_planner_in_one_line() -> None:
    with pytest.raises(UsageError, match="unknown VAE decode 'banded'; use one of auto, direct, sequential"):
        plan("tiny-sd15", 128, 128, vae_decode="banded")
