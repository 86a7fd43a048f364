"""The presets and architecture files have one home, the top-level ``configs/``, and a wheel ships exactly it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, caches left out."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the source tree (the checkout itself stays free of build folders)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("distlin", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."]
    subprocess.run(command, cwd=source, check=True, capture_output=True)
    (built,) = dist.glob("distlin-*.whl")
    return built


def test_the_wheel_ships_every_file_of_configs_unchanged(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            name.removeprefix("distlin/configs/"): archive.read(name)
            for name in archive.namelist()
            if name.startswith("distlin/configs/") and not name.endswith(".py")
        }
    assert shipped == _files(CONFIGS)


def test_an_installed_wheel_lists_the_checkouts_presets(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import json; from distlin.presets import CONFIG_DIR, list_presets;"
        "from distlin.models.architectures import ARCHITECTURES_DIR;"
        "print(json.dumps([str(CONFIG_DIR), list_presets(), sorted(p.name for p in ARCHITECTURES_DIR.iterdir())]))"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-c", probe]
    out = subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    folder, presets, architectures = json.loads(out.stdout)
    assert Path(folder) == site / "distlin" / "configs"
    assert presets == sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert architectures == sorted(path.name for path in (CONFIGS / "architectures").iterdir())


def test_the_checkout_reads_the_top_level_configs_and_holds_no_second_copy() -> None:
    from distlin.models.architectures import ARCHITECTURES_DIR
    from distlin.presets import CONFIG_DIR

    assert CONFIG_DIR == CONFIGS and ARCHITECTURES_DIR == CONFIGS / "architectures"
    assert not (ROOT / "distlin" / "configs").exists()
    preset_names = {path.name for path in CONFIGS.rglob("*") if path.is_file()}
    assert not [path for path in (ROOT / "distlin").rglob("*") if path.name in preset_names]
