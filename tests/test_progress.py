"""A run says what it is doing from its first second: a start line before torch or diffusers is imported, then
each slow phase with its time, on rank 0 only, and nothing of either with ``--quiet``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from distlin.app.coordinator import Job
from distlin.app.page import _progress_text
from distlin.app.request import GenerationRequest
from distlin.progress import PhaseEvent, phase, report_to

# Runs the command line three times in one fresh process, noting for every line it prints whether torch or
# diffusers had been imported by then.
_PROBE = textwrap.dedent(
    """
    import json, os, sys

    lines = []

    class Probe:
        def write(self, text):
            heavy = "torch" in sys.modules or "diffusers" in sys.modules
            lines.extend([line, heavy, run] for line in text.splitlines() if line.strip())
            return len(text)

        def flush(self):
            pass

    real, sys.stdout = sys.stdout, Probe()
    from distlin.cli.generate import main

    common = ["--preset", "tiny-sd15", "--steps", "1", "--height", "64", "--width", "64", "--output"]
    codes = []
    for run, extra in (("loud", []), ("quiet", ["--quiet"]), ("rank1", [])):
        if run == "rank1":
            os.environ["RANK"] = "1"  # as torchrun tells a rank other than 0 (its group is never joined here)
        codes.append(main([*common, f"{run}.png", *extra]))
    sys.stdout = real
    print(json.dumps({"codes": codes, "lines": lines}))
    """
)


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("runs")
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=folder, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def _lines(printed: dict, run: str) -> list[tuple[str, bool]]:
    return [(line, heavy) for line, heavy, which in printed["lines"] if which == run]


def test_the_start_line_comes_before_torch_or_diffusers_is_imported(printed: dict) -> None:
    assert printed["codes"] == [0, 0, 0]
    first, heavy = _lines(printed, "loud")[0]
    assert not heavy
    assert "tiny-sd15" in first and "64×64 px" in first and "1 rank" in first and "device cpu" in first


def test_each_slow_phase_is_printed_with_its_time(printed: dict) -> None:
    text = [line for line, _ in _lines(printed, "loud")]
    for name in ("imports (torch, diffusers)", "loading the model tiny-sd15", "LinFusion layers", "parallelize"):
        (line,) = [line for line in text if line.startswith(name)]
        assert line.endswith(" s"), line
    assert text[-1].startswith("wrote loud.png (64×64)")


def test_quiet_and_other_ranks_print_neither_start_nor_phases(printed: dict) -> None:
    for run in ("quiet", "rank1"):
        assert [line for line, _ in _lines(printed, run)] == [f"wrote {run}.png (64×64)"]


def test_a_registered_sink_sees_each_phase_start_and_finish() -> None:
    seen: list[PhaseEvent] = []
    with report_to(seen.append):
        with phase("loading"):
            pass
    with phase("after"):  # the sink is gone with its block
        pass
    assert [event.name for event in seen] == ["loading", "loading"]
    assert seen[0].seconds is None and seen[1].seconds is not None


def test_the_web_page_shows_the_same_phases_while_a_run_starts() -> None:
    class Idle:
        def ahead_of(self, job: Job) -> int:
            return 0

    job = Job(GenerationRequest.for_preset("tiny-sd15"))
    with report_to(job.report_phase):
        with phase("loading the model tiny-sd15 on cpu"):
            pass
        job.report_phase(PhaseEvent("LinFusion layers (fresh)"))
    text = _progress_text(Idle(), job)  # type: ignore[arg-type]
    assert text.startswith("starting: loading the model tiny-sd15 on cpu ")
    assert text.endswith(" s · LinFusion layers (fresh)…")
