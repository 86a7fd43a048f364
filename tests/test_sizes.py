"""One size vocabulary: width×height in every message, plan and table, and the same order when a size is typed."""

from __future__ import annotations

import pytest

from distlin.cli import generate as cli
from distlin.errors import UsageError
from distlin.sizes import format_size, parse_size


def test_a_size_is_written_width_first_and_read_back_the_same() -> None:
    assert format_size(1024, 512) == "1024×512"
    assert parse_size("1024x512") == parse_size("1024×512") == parse_size(format_size(1024, 512)) == (1024, 512)


@pytest.mark.parametrize("text", ["1024", "1024x", "x512", "1024by512", "0x512", "1024x512x2"])
def test_a_malformed_size_is_refused_naming_it(text: str) -> None:
    with pytest.raises(UsageError, match=f"'{text}' is not WIDTHxHEIGHT"):
        parse_size(text)


def test_the_plan_gives_the_size_width_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--preset", "tiny-sd15", "--width", "256", "--height", "128", "--plan"]) == 0
    assert "(256×128 px," in capsys.readouterr().out
