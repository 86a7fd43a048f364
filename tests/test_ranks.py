"""Where this process stands among torchrun's ranks, read from its variables in one place."""

from __future__ import annotations

import pytest

from distlin.errors import UsageError
from distlin.ranks import Ranks, ranks_from_env


def test_without_torchrun_a_process_is_rank_0_of_1() -> None:
    assert ranks_from_env({}) == Ranks(rank=0, world_size=1, local_rank=0, launched=False)


def test_torchrun_variables_give_the_rank_and_its_device_index() -> None:
    ranks = ranks_from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert ranks == Ranks(rank=5, world_size=8, local_rank=1, launched=True) and not ranks.is_main


def test_a_variable_that_is_no_number_is_refused_naming_it() -> None:
    with pytest.raises(UsageError, match="^WORLD_SIZE='two' is not a whole number; unset it"):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "two"})
