"""Every command in README.md and docs/*.md that runs offline on a CPU is run, as written in the document, so a
document that drifts from the code turns this red. The others are listed here with what they need.

A fenced block runs as one shell script (its offline lines in order, in one empty folder with ``launch/``
beside them), so a block may prepare what its next line uses; an inline command runs alone. A ``python`` block
runs as a script, alone and under ``torchrun`` on 2 ranks, as the README says it does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND_START = re.compile(r"^(OMP_NUM_THREADS=\S+ )?(python|torchrun|pip|sbatch|distlin-\w+|mkdir|hf)\b")
INSTALL_PREFIX = re.compile(r"^(pip install [^&]+&& )+")

# What a documented command needs when it cannot run here, by the first pattern it matches.
NEEDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"python -m pytest"), "nothing new: it is the test command, what .ci/run runs"),
    (re.compile(r"\.\.\.|\bSUITE\b"), "nothing: a template with placeholders"),
    (re.compile(r"\bsbatch\b|--nnodes"), "a SLURM cluster / several nodes"),
    (re.compile(r"bench\.py gpu\b"), "a CUDA GPU"),
    (re.compile(r"^pip download|--no-index"), "wheels carried to a GPU machine that has no package index"),
    (re.compile(r"from_pretrained\(\""), "real model weights from the Hugging Face Hub"),
    (re.compile(r"--preset (?!tiny-)\S+(?!.*--plan)"), "real model weights from the Hugging Face Hub"),
    (re.compile(r"^pip install [^&]*$"), "nothing new: an install, what .ci/run does"),
    (re.compile(r"launch/app\.py|distlin-app"), "nothing: a server that runs until stopped (tests/test_app* start it)"),
    (re.compile(r"path/to/|--data data/|runs/sd15|(?<![\w-])run/checkpoint"), "the user's own model, images or run"),
    (
        re.compile(r"bench\.py (?!.*--quick)"),
        "a full benchmark (minutes to hours on a CPU); tests/test_bench.py runs every suite in its --quick form",
    ),
]


@dataclass(frozen=True)
class Block:
    """Commands of one fenced block (or one inline command) of a document, with their line numbers."""

    document: str
    line: int
    commands: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def _join_continuations(text: str) -> list[tuple[int, str]]:
    lines, out, start, current = text.splitlines(), [], 0, ""
    for number, line in enumerate(lines):
        if not current:
            start = number
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            out.append((start, re.sub(r"\s+", " ", current).strip()))
            current = ""
    return out


def documented_blocks() -> list[Block]:
    blocks = []
    for path in DOCUMENTS:
        text, name = path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix()
        for fence in re.finditer(r"^```(bash|sh|shell)?\n(.*?)^```", text, re.S | re.M):
            first = text[: fence.start()].count("\n") + 2
            commands = [
                (first + offset, line.split(" # ")[0].strip())
                for offset, line in _join_continuations(fence.group(2))
                if COMMAND_START.match(line)
            ]
            if commands:
                blocks.append(Block(name, commands[0][0], tuple(c for _, c in commands)))
        for span in re.finditer(r"`((?:OMP_NUM_THREADS=\S+ )?(?:python|torchrun) [^`]*launch/[^`]+)`", text):
            command = re.sub(r"\s+", " ", span.group(1))
            blocks.append(Block(name, text[: span.start()].count("\n") + 1, (command,)))
    return blocks


def need_of(command: str) -> str | None:
    """What ``command`` needs that this machine lacks, or None when it runs offline on a CPU."""
    return next((reason for pattern, reason in NEEDS if pattern.search(command)), None)


def python_blocks() -> list[Block]:
    """The ``python`` fenced blocks of the documents that need nothing this machine lacks."""
    blocks = []
    for path in DOCUMENTS:
        text, name = path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix()
        for fence in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            if need_of(fence.group(1)) is None:
                blocks.append(Block(name, text[: fence.start()].count("\n") + 2, (fence.group(1),)))
    return blocks


def offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTLIN_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


BLOCKS = documented_blocks()
PYTHON = [(block, ranks) for block in python_blocks() for ranks in (1, 2)]
OFFLINE = [b for b in BLOCKS if any(need_of(c) is None for c in b.commands)]


def test_the_documents_hold_offline_commands_and_every_other_one_is_accounted_for() -> None:
    listed = {c: need_of(c) for b in BLOCKS for c in b.commands if need_of(c) is not None}
    ran = [c for b in OFFLINE for c in b.commands if need_of(c) is None]
    assert any("tiny-sd15" in c and "torchrun" in c for c in ran)  # the README quickstart
    assert any("--plan" in c for c in ran) and any("distill.py train" in c for c in ran)
    assert all(reason for reason in listed.values())
    print("\n".join(f"not run ({reason}): {command}" for command, reason in sorted(listed.items())))


@pytest.mark.parametrize("block", OFFLINE, ids=[b.id for b in OFFLINE])
def test_documented_offline_commands_run(block: Block, tmp_path: Path) -> None:
    (tmp_path / "launch").symlink_to(REPO / "launch")
    script = ["set -euo pipefail"] + [INSTALL_PREFIX.sub("", c) for c in block.commands if need_of(c) is None]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{block.id}: {script}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    for command in script[1:]:
        for output in re.findall(r"--output (\S+)", command):
            if "$" not in output:
                assert (tmp_path / output).is_file(), f"{block.id}: {command} wrote no {output}"


@pytest.mark.parametrize(("block", "ranks"), PYTHON, ids=[f"{b.id}-{r}rank" for b, r in PYTHON])
def test_documented_python_runs(block: Block, ranks: int, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.commands[0], encoding="utf-8")
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"] if ranks > 1 else [])
    done = subprocess.run(
        [*launcher, str(script)], cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{block.id}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    saved = re.findall(r"\.save\(\"([^\"]+)\"\)", block.commands[0])
    assert saved and all((tmp_path / name).is_file() for name in saved)


def test_the_documented_pipeline_gives_one_image_per_seed_across_calls_in_displaced_mode(tmp_path: Path) -> None:
    """The Python API's own example (a diffusers pipeline given to ``parallelize``) in displaced mode, on 2 ranks,
    called twice with one seed: each call is a generation that warms up again, so both give the same image."""
    example = next(b.commands[0] for b, _ in PYTHON if "parallelize(pipe" in b.commands[0])
    lines = example.splitlines()
    seeded = next(line for line in lines if line.startswith("generator = "))
    called = next(line for line in lines if line.startswith("image = pipe("))
    # warm-up 1 of 3 steps: the last step of a call reads the step before's exchanges, made between the 2 ranks'
    # bands (not split across the guidance halves, where a rank would exchange nothing)
    config = 'PatchParallelConfig(mode="displaced", warmup_steps=1, cfg_parallel=False)'
    displaced = example.replace("PatchParallelConfig()", config)
    assert displaced != example
    again = f"{seeded}\n{called.replace('image = ', 'again = ', 1)}\n"
    same = "assert list(image.getdata()) == list(again.getdata()), 'the second call gave another image'\n"
    (tmp_path / "example.py").write_text(displaced + again + same, encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "example.py"]
    done = subprocess.run(launcher, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
