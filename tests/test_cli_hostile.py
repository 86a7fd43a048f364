"""Hostile command lines, each written as the attack it stops: every one used to load the model and then fail with
a traceback, or run for hours, or silently do something else. Each is now one ``error:`` line, exit code 2, no
file written, and nothing loaded (the run itself is replaced by a tripwire)."""

from __future__ import annotations

import io
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from distlin.cli import generate as cli
from distlin.errors import UsageError
from distlin.inputs import MAX_INPUT_PIXELS, check_image, decode_image
from distlin.settings import build_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current folder, with the run (loading included) replaced by a tripwire."""
    path = tmp_path / "work"
    path.mkdir()
    monkeypatch.chdir(path)
    monkeypatch.setattr(cli, "run", tripwire)
    return path


def tripwire(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded for an input that should have been refused")


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], workdir: Path) -> str:
    """The one error line ``argv`` gets; asserts exit code 2 and that no file was written."""
    code = cli.main(["--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert list(workdir.iterdir()) == []
    return err


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` px of 1-bit gray, with one row of data: a few hundred bytes
    that would decode to gigabytes (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def photo(size: tuple[int, int] = (64, 128)) -> bytes:
    """A small, complete PNG of noise (so its compressed data is long enough to cut)."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def pictures(tmp_path: Path) -> dict[str, str]:
    """A good photo, a truncated one, and bombs above our limit and above PIL's own."""
    files = {
        "photo": photo(),
        "truncated": photo()[: len(photo()) // 2],
        "bomb": png_claiming(100_000, 100_000),
        "above-our-limit": png_claiming(16384, 8200),  # between our limit and PIL's refusal: PIL only warns
    }
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name, data in files.items():
        (folder / f"{name}.png").write_bytes(data)
    return {name: str(folder / f"{name}.png") for name in files}


@pytest.mark.parametrize("picture", ["bomb", "above-our-limit", "truncated"])
@pytest.mark.parametrize("flag", ["--init-image", "--mask"])
def test_a_bomb_or_a_truncated_png_as_init_image_or_mask_is_refused_before_the_model_loads(
    picture: str, flag: str, pictures: dict[str, str], workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Used to: traceback and exit 1 after the model loaded (PIL raised on decoding)."""
    argv = [flag, pictures[picture]] + (["--init-image", pictures["photo"]] if flag == "--mask" else [])
    err = refused(argv, capsys, workdir)
    assert f"{flag} {pictures[picture]!r}" in err
    assert ("pixels" if picture != "truncated" else "not a complete image") in err


def test_a_picture_at_our_limit_is_accepted_and_pil_is_left_as_it_was(pictures: dict[str, str]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert check_image(pictures["photo"], "--init-image") == (64, 128)
    assert 16384 * 8192 == MAX_INPUT_PIXELS
    assert Image.MAX_IMAGE_PIXELS == limit


@pytest.mark.parametrize("data", [png_claiming(100_000, 100_000), photo()[:300], b"GIF89a", b"%!PS-Adobe-3.0 EPSF"])
def test_uploaded_bytes_that_are_not_a_whole_picture_are_one_usage_error(data: bytes) -> None:
    """What the web app decodes on rank 0 before a request is broadcast: no rank fails alone later."""
    with pytest.raises(UsageError, match="^init image (is not a complete image|has more than)"):
        decode_image(data, "init image")


def test_a_device_a_fifo_or_a_folder_named_as_an_input_file_is_refused_without_reading_it(
    tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/dev/zero`` used to be read forever (as init image; as LoRA once loading began); a FIFO blocks its reader
    until a writer comes (a LinFusion folder's config.json blocked the checks)."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo), str(tmp_path)):
        assert "is not a regular file" in refused(["--init-image", path], capsys, workdir)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    for path in (zero, fifo.rename(tmp_path / "pipe.safetensors")):
        assert "is not a regular file or a folder" in refused(["--lora", str(path)], capsys, workdir)
    linfusion = tmp_path / "linfusion"
    linfusion.mkdir()
    os.mkfifo(linfusion / "config.json")  # used to block the checks forever
    assert "config.json is not a regular file" in refused(["--linfusion", str(linfusion)], capsys, workdir)


@pytest.mark.parametrize(
    ("argv", "limit"),
    [
        (["--steps", "100000"], "999"),  # tiny-sd15's own DDIM: a ValueError after loading (1000: an IndexError)
        (["--steps", "100000", "--scheduler", "euler"], "1000"),  # accepted: about 1.5 h of work
        (["--steps", "1000", "--scheduler", "dpm++-2m"], "999"),  # non-finite latents at 1000 of 1000
        (["--steps", "51", "--scheduler", "lcm"], "50"),  # LCM's schedule is a subset of its 50 original steps
    ],
)
def test_more_steps_than_the_scheduler_can_take_are_refused_before_the_model_loads(
    argv: list[str], limit: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert f"pass --steps {limit} or fewer" in refused(argv, capsys, workdir)


def test_the_most_steps_a_scheduler_takes_are_accepted() -> None:
    assert build_settings("tiny-sd15", {"steps": 999}, 1).steps == 999  # DDIM's steps_offset 1: 1000 + 1 > 1000
    assert build_settings("tiny-sd15", {"steps": 1000, "scheduler": "euler"}, 1).steps == 1000
    assert build_settings("tiny-sd15", {"steps": 999, "scheduler": "dpm++-2m"}, 1).steps == 999
    assert build_settings("tiny-sdxl", {"steps": 998, "scheduler": "dpm++-2m"}, 1).steps == 998  # "leading" too


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--height", "800000000"], "height 800000000 is above 1048576 px"),  # --plan used to take minutes
        (["--timeout-s", "inf"], "timeout inf s must be positive and at most"),  # OverflowError on 2 ranks
        (["--timeout-s", "1e300"], "timeout 1e+300 s must be positive and at most"),
        (["--prompt", b"caf\xff".decode("utf-8", "surrogateescape")], "prompt is not UTF-8 text (character 3)"),
        (["--negative-prompt", b"\xff".decode("utf-8", "surrogateescape")], "negative prompt is not UTF-8 text"),
    ],
)
def test_values_that_used_to_fail_only_once_the_model_had_loaded_are_refused_first(
    argv: list[str], message: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prompt of non-UTF-8 bytes from the shell used to be a tokenizer TypeError traceback after loading."""
    assert message in refused(argv, capsys, workdir)


def test_an_output_name_too_long_for_the_temporary_file_is_refused_before_the_run(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 244-character name used to run the whole generation, then fail to write with an OSError traceback."""
    assert "is too long for its folder" in refused(["--output", "a" * 240 + ".png"], capsys, workdir)


def test_a_preset_file_that_is_not_utf_8_is_one_line(
    tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Used to be a UnicodeDecodeError traceback."""
    preset = tmp_path / "binary.yaml"
    preset.write_bytes(b"\xff\xfe: [")
    assert "cannot read preset file" in refused(["--preset", str(preset)], capsys, workdir)


def test_a_mask_without_an_init_image_names_what_is_missing(
    pictures: dict[str, str], workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Used to say "--mask inpaints an --init-image in one pass; without a cascade preset"."""
    assert "--mask needs --init-image" in refused(["--mask", pictures["photo"]], capsys, workdir)


CASCADE = (REPO / "configs" / "tiny-sd15-cascade.yaml").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("strength: 0.4}", "strenght: 0.4}"), "cascade stage 2: unknown key 'strenght' (did you mean 'strength'?)"),
        (("steps: 3", "step: 3"), "unknown key 'step' (did you mean 'steps'?)"),
        (("strength: 0.6}", "strength: high}"), "cascade stage 1: strength must be float, not 'high'"),
        (("- {height: 64, width: 96, strength: 1.0}", "- 64x96"), "cascade stage 0 must be a mapping"),
        (("{height: 128, width: 192,", "{height: 128,"), "cascade stage 1: missing keys ['width']"),
    ],
)
def test_a_misspelled_or_mistyped_key_at_any_level_of_a_preset_is_refused(
    change: tuple[str, str], message: str, tmp_path: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``strenght: 0.4`` in a cascade stage used to be ignored: the stage ran at strength 1.0."""
    preset = tmp_path / "mine.yaml"
    assert change[0] in CASCADE
    preset.write_text(CASCADE.replace(*change))
    assert message in refused(["--preset", str(preset)], capsys, workdir)


@pytest.mark.parametrize(
    ("argv", "host_memory"),
    [
        (["--height", "1000000", "--width", "1000000"], None),  # used to be accepted: swap, then the OOM killer
        ([], "1000000"),  # the tiny preset's ~12 MiB against 1 MB: the threshold is the machine's, lowerable
    ],
)
def test_a_cpu_run_that_cannot_fit_the_machines_ram_is_refused_before_the_model_loads(
    argv: list[str],
    host_memory: str | None,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distlin.run import generate

    monkeypatch.setattr(cli, "run", lambda settings, outputs, quiet: generate(settings))  # the real run ...
    monkeypatch.setattr("distlin.run.prepare_pipeline", tripwire)  # ... where loading is a tripwire
    if host_memory is not None:
        monkeypatch.setenv("DISTLIN_HOST_MEMORY", host_memory)
    err = refused(["--device", "cpu", *argv], capsys, workdir)
    assert "on the CPU needs a predicted" in err and "GiB available; use a smaller size" in err


def test_a_temporary_file_left_by_a_writer_killed_during_the_final_write_is_removed_by_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGKILL during the final write used to leave a hidden ``.out.png.*.tmp`` beside the output forever."""
    out = tmp_path / "out.png"
    killed = subprocess.Popen(  # noqa: S603 - a writer killed inside atomic_write, before the rename
        [sys.executable, "-c", KILLED_WRITER, str(out)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert killed.wait(timeout=60) == -signal.SIGKILL
    left = [path.name for path in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.png.") and left[0].endswith(".tmp")
    live = tmp_path / f".out.png.{left[0].split('.')[3]}.{os.getpid()}.0123abcd.tmp"  # a writer still writing
    live.write_bytes(b"")
    other = tmp_path / ".other.png.host.1.0123abcd.tmp"
    other.write_bytes(b"")
    assert cli.main(["--quiet", "--plan", "--output", str(out)]) == 0
    capsys.readouterr()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name])


KILLED_WRITER = """
import os, signal, sys
from distlin.io import atomic_write

def write_then_die(tmp):
    tmp.write_bytes(b"half a png")
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write_then_die)
"""


def test_a_100_kb_prompt_prints_one_line_not_the_cut_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers' truncation notice used to print the whole cut text (100 KB of stderr) beside distlin's note."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.get_logger("diffusers")  # its handler, as the run will find it, writing where we read
    notices = io.StringIO()
    diffusers_root = logging.getLogger("diffusers")
    for handler in diffusers_root.handlers:  # pytest may add handlers of its own, with no stream
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", notices)
    ours = logging.StreamHandler(notices)  # a handler the run finds like diffusers' own
    diffusers_root.addHandler(ours)
    prompt = "a red cube " * 10_000
    try:
        assert cli.main(["--quiet", "--steps", "1", "--prompt", prompt, "--output", str(tmp_path / "out.png")]) == 0
    finally:
        diffusers_root.removeHandler(ours)
    out, err = capsys.readouterr()
    assert "note: the prompt is " in out and "tokens; the text encoder reads the first 77" in out
    assert "red cube" not in notices.getvalue() + out + err and len(notices.getvalue() + out + err) < 2000


# --nproc-per-node: the ranks' own launcher. Two multi-rank runs, each seconds of sampling on one CPU core per rank.
GENERATE = REPO / "launch" / "generate.py"
LONG_RUN = ["--nproc-per-node", "2", "--no-cfg-parallel", "--steps", "500", "--timeout-s", "10"]


def start(argv: list[str], cwd: Path) -> subprocess.Popen[str]:
    """``launch/generate.py argv`` in a new session (a terminal's foreground group of its own), output merged."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    command = [sys.executable, str(GENERATE), *argv]
    return subprocess.Popen(  # noqa: S603
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for_sampling(process: subprocess.Popen[str]) -> tuple[list[int], str]:
    """The rank processes once rank 0's progress bar shows (sampling runs on every rank), and the output so far."""
    seen = ""
    while "/500 [" not in seen:
        chunk = os.read(process.stdout.fileno(), 4096).decode(errors="replace")  # type: ignore[union-attr]
        assert chunk, seen
        seen += chunk
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    return sorted(map(int, children)), seen


def finish(process: subprocess.Popen[str], seen: str) -> str:
    try:
        return seen + process.communicate(timeout=90)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_two_nproc_runs_at_once_do_not_collide_and_ctrl_c_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """Two runs used to collide on port 29500 (EADDRINUSE traceback); Ctrl-C used to exit 1 with an elastic
    traceback per rank."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    interrupted = start([*LONG_RUN, "--height", "512", "--width", "512", "--output", "x.png"], first)  # minutes
    finishing = start(["--nproc-per-node", "2", "--no-cfg-parallel", "--steps", "2", "--output", "x.png"], second)
    try:
        _, seen = wait_for_sampling(interrupted)
        assert finishing.wait(timeout=120) == 0, finishing.communicate()[0]
        assert interrupted.poll() is None  # the two overlapped from the rendezvous on
        os.killpg(interrupted.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's whole foreground group
        output = finish(interrupted, seen)
    finally:
        finish(finishing, "")
    assert interrupted.returncode == 130, output
    assert "Traceback" not in output and output.rstrip().endswith("interrupted") and output.count("interrupted") == 1
    assert (second / "x.png").is_file() and list(first.iterdir()) == []


def test_a_stopped_rank_gives_every_survivor_the_lost_rank_line_and_exit_code_4(tmp_path: Path) -> None:
    """A rank stopped by SIGSTOP used to make the other abort: "terminate called without an active exception"."""
    run = start([*LONG_RUN, "--output", "x.png"], tmp_path)
    children, seen = wait_for_sampling(run)
    os.kill(children[1], signal.SIGSTOP)
    output = finish(run, seen)
    assert run.returncode == 4, output
    assert "error: lost contact with another rank (it died, or exceeded --timeout-s)" in output
    assert "error: rank 1 was stopped after rank 0 failed; killed it" in output
    assert "terminate called" not in output and "Traceback" not in output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_rank_ends_when_its_launcher_is_killed() -> None:
    """A job scheduler's SIGKILL of the --nproc-per-node process used to leave its ranks computing (and writing)."""
    launcher = subprocess.Popen(  # noqa: S603 - a launcher in miniature: one rank that would sleep a minute
        [sys.executable, "-c", MINIATURE_LAUNCHER], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE
    )
    rank = int(launcher.stdout.readline())  # type: ignore[union-attr]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while running(rank) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(rank)


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie waiting for a reaper has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


MINIATURE_LAUNCHER = """
import subprocess, sys, time
from distlin.cli.launcher import _end_with_parent

rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=_end_with_parent)
print(rank.pid, flush=True)
time.sleep(60)
"""
