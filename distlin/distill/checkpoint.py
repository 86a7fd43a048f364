"""Checkpoint folders: ``checkpoint-STEP/`` with ``linfusion/`` (the released LinFusion layout, loadable by
``LinFusion.construct_for``), ``state.pt`` (everything else a resumed run needs), ``train_config.json`` and
``log.csv`` up to that step. Each folder is written under a temporary name and renamed into place, so an
interrupted save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distlin.errors import UsageError
from distlin.linfusion import LinFusion

PREFIX = "checkpoint-"
LINFUSION_DIR = "linfusion"
STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "log.csv"
_NAME = re.compile(rf"{PREFIX}(\d+)")


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints in ``out``, by step."""
    found = [p for p in out.glob(f"{PREFIX}*") if checkpoint_step(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def resolve_resume(out: Path, resume: str) -> Path:
    """``latest`` (the newest checkpoint in ``out``) or a checkpoint folder, checked to be complete."""
    if resume == "latest":
        found = checkpoints(out)
        if not found:
            raise UsageError(f"--resume latest: --out {str(out)!r} holds no checkpoint; drop --resume to start")
        return found[-1]
    path = Path(resume).expanduser()
    missing = [name for name in (LINFUSION_DIR, STATE_FILE, CONFIG_FILE) if not (path / name).exists()]
    if missing:
        raise UsageError(
            f"--resume {resume!r} is not a checkpoint folder (missing {', '.join(missing)}); pass "
            f"{PREFIX}STEP or latest"
        )
    return path


def read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(
            f"cannot read {checkpoint / CONFIG_FILE} ({type(err).__name__}); pass a checkpoint "
            "folder written by launch/distill.py train"
        ) from None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, as tensors and plain types (``weights_only``
    loadable). The training data do not depend on them, but anything else random (a dropout) continues exactly."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])


def save_checkpoint(
    out: Path, step: int, linfusion: LinFusion, state: dict[str, Any], config: dict[str, Any], log_csv: str
) -> Path:
    """Write ``out/checkpoint-STEP`` whole or not at all; an older folder of that name is replaced."""
    final = out / f"{PREFIX}{step}"
    tmp = out / f".{final.name}.{secrets.token_hex(4)}.tmp"
    try:
        linfusion.save_pretrained(tmp / LINFUSION_DIR)
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        (tmp / LOG_FILE).write_text(log_csv, encoding="utf-8")
        if final.exists():
            old = final.rename(out / f".{final.name}.{secrets.token_hex(4)}.old")
            shutil.rmtree(old)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
