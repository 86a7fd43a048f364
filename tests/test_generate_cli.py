"""launch/generate.py end to end on the offline tiny presets, and every bad input rejected in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from distlin.cli import generate as cli
from distlin.errors import UsageError
from distlin.io import atomic_write
from distlin.presets import list_presets, load_preset

REPO = Path(__file__).resolve().parents[1]
GENERATE = REPO / "launch" / "generate.py"
TINY_PRESETS = ("tiny-sd15", "tiny-sdxl")
METADATA_KEYS = {
    "prompt",
    "negative_prompt",
    "seed",
    "height",
    "width",
    "steps",
    "guidance_scale",
    "preset",
    "model",
    "linfusion",
    "dtype",
    "mode",
    "world_size",
    "distlin_version",
    "torch_version",
    "diffusers_version",
}


# Launcher runs by name. All start when this module's tests do and are checked last: each spends most of its
# time importing torch and diffusers on one core, so they overlap each other and the in-process tests.
LAUNCHES: dict[str, list[str]] = {
    **{
        preset: ["--preset", preset, "--output", "img.png", "--save-latents", "img.safetensors", "--report-comm"]
        for preset in TINY_PRESETS
    },
    "unknown-preset": ["--preset", "tiny-sd99"],
    "model-not-cached": ["--model", "distlin-test/no-such-model"],
}


@dataclass
class Launch:
    """One launcher process and the empty folder it runs in."""

    cwd: Path
    process: subprocess.Popen[str]

    def finish(self) -> tuple[int, str, str]:
        stdout, stderr = self.process.communicate(timeout=300)
        return self.process.returncode, stdout, stderr


@pytest.fixture(scope="module", autouse=True)
def launches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Launch]]:
    """``launch/generate.py`` in fresh single processes: offline, one thread each, an empty HF cache, no
    torchrun variables, each in an empty current folder (so "no output file" means it stays empty)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hf-home")))
    runs = {}
    for name, args in LAUNCHES.items():
        cwd = tmp_path_factory.mktemp(name)
        command = [sys.executable, str(GENERATE), *args]
        runs[name] = Launch(
            cwd, subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
        run.process.communicate()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty current folder, so "no output file" means the folder stays empty."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_presets_are_complete() -> None:
    assert {"sd15", "sd21", "sdxl", *TINY_PRESETS} <= set(list_presets())
    for name in list_presets():
        load_preset(name)  # raises on a missing, unknown or mistyped key
    assert load_preset("sd21")["dtype"] == "bfloat16"


def test_softmax_attention_and_default_output(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--linfusion none`` keeps the UNet's own attention; the PNG defaults to ./<preset>.png."""
    monkeypatch.chdir(workdir)
    assert cli.main(["--linfusion", "none", "--steps", "1"]) == 0
    with Image.open(workdir / "tiny-sd15.png") as image:
        assert image.text["linfusion"] == "none"


BAD_INPUTS = [
    (["--preset", "nope"], "'nope'"),
    (["--height", "100"], "height 100"),
    (["--width", "0"], "width 0"),
    (["--steps", "0"], "steps 0"),
    (["--guidance-scale", "-1"], "-1"),
    (["--seed", "-5"], "seed -5"),
    (["--dtype", "float7"], "'float7'"),
    (["--device", "tpu"], "'tpu'"),
    (["--linfusion", "/nonexistent/dir"], "'/nonexistent/dir'"),
    (["--output", "missing/out.png"], "'missing'"),
    (["--output", "out.jpg"], "'out.jpg'"),
    (["--save-latents", "out.pt"], "'out.pt'"),
    (["--mode", "fast"], "'fast'"),
    (["--guidance-scale", "nan"], "guidance scale nan"),
    (["--height", "4096", "--width", "4096", "--device", "cuda"], "'cuda'"),  # no CUDA here
    (["--attention-kernel", "fastest"], "'fastest'"),
    (["--preset", "missing.yaml"], "'missing.yaml'"),
    (["--model", "./no/such/folder"], "'./no/such/folder'"),
    (["--vae-decode", "tiled"], "'tiled'"),
    (["--nproc-per-node", "40"], "40 ranks"),  # checked for 40 ranks before any rank starts
    (["--nproc-per-node", "0"], "--nproc-per-node 0"),
]


def assert_one_error_line(stderr: str, value: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and value in lines[0], stderr


@pytest.mark.parametrize(("args", "value"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_in_process(
    args: list[str],
    value: str,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(workdir)
    assert cli.main(args) == 2
    assert_one_error_line(capsys.readouterr().err, value)
    assert list(workdir.iterdir()) == []


def test_unwritable_output_folder(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder no process may create files in (procfs refuses even root): one line, exit 2, nothing written."""
    monkeypatch.chdir(workdir)
    assert cli.main(["--output", "/proc/distlin-out.png"]) == 2
    assert_one_error_line(capsys.readouterr().err, "'/proc'")
    assert list(workdir.iterdir()) == []


def test_interrupt_leaves_no_file(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = workdir / "out.bin"

    def interrupted(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert list(workdir.iterdir()) == []

    def stop(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(cli, "run", stop)
    assert cli.main([]) == 130
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "value"), [("unknown-preset", "'tiny-sd99'"), ("model-not-cached", "'distlin-test/no-such-model'")]
)
def test_bad_input_subprocess(name: str, value: str, launches: dict[str, Launch]) -> None:
    """The real launcher: an unknown preset, and a Hub id that is not in the (empty) cache while offline."""
    run = launches[name]
    code, _, stderr = run.finish()
    assert code == 2
    assert_one_error_line(stderr, value)
    assert list(run.cwd.iterdir()) == []


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_end_to_end(preset: str, launches: dict[str, Launch]) -> None:
    run = launches[preset]
    code, stdout, stderr = run.finish()
    assert code == 0, stderr
    assert "bytes_per_step" in stdout
    values = load_preset(preset)
    with Image.open(run.cwd / "img.png") as image:
        assert image.size == (values["width"], values["height"])
        text = dict(image.text)
    assert METADATA_KEYS <= text.keys()
    assert (text["preset"], text["model"], text["prompt"]) == (preset, values["model"], values["prompt"])
    assert (text["seed"], text["steps"], text["world_size"]) == ("0", str(values["steps"]), "1")
    with safe_open(str(run.cwd / "img.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["latents"]
        assert f.get_tensor("latents").shape == (1, 4, values["height"] // 8, values["width"] // 8)
    assert sorted(p.name for p in run.cwd.iterdir()) == ["img.png", "img.safetensors"]  # no temp files left


def _damaged_folder(root: Path, marker: str, text: str) -> Path:
    root.mkdir()
    (root / marker).write_text(text)
    return root


@pytest.mark.parametrize(
    ("flag", "marker", "text", "needle"),
    [
        ("--linfusion", "config.json", "{not json", "config.json is not valid JSON"),
        ("--linfusion", "config.json", '{"_class_name": "UNet2DConditionModel"}', "has no modules_list"),
        ("--model", "model_index.json", "[1, 2]", "not a JSON object"),
        ("--model", "model_index.json", '{"vae": ["diffusers", "AutoencoderKL"]}', "names no unet"),
    ],
)
def test_a_damaged_folder_names_the_file_and_what_is_wrong(
    flag: str, marker: str, text: str, needle: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = _damaged_folder(workdir.parent / "damaged", marker, text)
    monkeypatch.chdir(workdir)
    assert cli.main([flag, str(folder)]) == 2
    assert_one_error_line(capsys.readouterr().err, needle)
    assert list(workdir.iterdir()) == []


def test_linfusion_weights_of_the_wrong_shape_are_one_line(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LinFusion checkpoint made for another UNet (here: SDXL's for SD-1.5) is refused by name, exit 2."""
    from distlin import LinFusion
    from distlin.models.tiny import build_pipeline

    LinFusion.construct_for(build_pipeline("tiny-sdxl"), load_pretrained=False).save_pretrained(workdir.parent / "xl")
    monkeypatch.chdir(workdir)
    assert cli.main(["--linfusion", str(workdir.parent / "xl"), "--steps", "1"]) == 2
    assert_one_error_line(capsys.readouterr().err, "does not fit")
    assert list(workdir.iterdir()) == []


def test_a_users_own_yaml_preset_runs_and_is_checked_like_a_built_in_one(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workdir)
    text = (cli.list_presets.__globals__["CONFIG_DIR"] / "tiny-sd15.yaml").read_text()
    (workdir.parent / "mine.yaml").write_text(text.replace("steps: 3", "steps: 1"))
    assert cli.main(["--preset", str(workdir.parent / "mine.yaml")]) == 0
    with Image.open(workdir / "mine.png") as image:
        assert image.text["steps"] == "1"
    capsys.readouterr()
    (workdir.parent / "bad.yaml").write_text(text.replace("steps: 3", "steps: many"))
    assert cli.main(["--preset", str(workdir.parent / "bad.yaml")]) == 2
    assert_one_error_line(capsys.readouterr().err, "steps must be int")


def test_an_over_long_prompt_is_said_in_one_line(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(workdir)
    assert cli.main(["--prompt", "a red cube " * 40, "--steps", "1"]) == 0
    out, err = capsys.readouterr()
    assert "note: the prompt is" in out and "the rest is ignored" in out
    assert "Token indices sequence length" not in err


def test_a_half_precision_cascade_prints_no_library_notices(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The VAE runs in float32 between float16 cascade stages; diffusers' notice on each cast stays out."""
    monkeypatch.chdir(workdir)
    assert cli.main(["--preset", "tiny-sd15-cascade", "--dtype", "float16", "--steps", "3"]) == 0
    out, err = capfd.readouterr()
    assert "stage 3/3" in out
    assert "should be kept in float32" not in out + err


def test_module_entry_point_runs_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "distlin.cli.generate", "--height", "7"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.startswith("error: height 7")


@pytest.mark.parametrize(("kernel", "said"), [("foo", "unknown attention kernel 'foo'"), ("triton", "runs on CUDA")])
def test_the_attention_kernel_is_checked_with_the_other_flags(kernel: str, said: str) -> None:
    """Refused by the flag checks (``parse``: nothing imported, nothing loaded), on the tiny preset's CPU."""
    with pytest.raises(UsageError, match=said):
        cli.parse(["--attention-kernel", kernel])


def test_a_cascade_stage_too_short_for_the_ranks_is_named_with_the_height_that_works() -> None:
    with pytest.raises(UsageError) as refusal:
        cli.parse(["--preset", "tiny-sd15-cascade", "--nproc-per-node", "2", "--no-cfg-parallel"])
    message = str(refusal.value)
    assert message.startswith("cascade stage 1 of 3 is 96×64 px") and "pass --height 512 or more" in message
    cli.parse(["--preset", "tiny-sd15-cascade", "--nproc-per-node", "2", "--no-cfg-parallel", "--height", "512"])
