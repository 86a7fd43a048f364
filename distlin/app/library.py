"""The operator's components (``distlin-app --components DIR``): the LoRAs, ControlNets and IP-Adapters a request
may name.

``DIR/loras/<name>.safetensors`` are LoRAs (kohya or diffusers layout), ``DIR/controlnets/<name>/`` are
diffusers ControlNet folders (``config.json`` + weights) and ``DIR/ip-adapters/<name>/`` are folders laid out as
h94/IP-Adapter (``models/ip-adapter_sd15.safetensors`` and/or ``sdxl_models/ip-adapter_sdxl.safetensors``, each
with its ``image_encoder`` folder beside it). The folder is listed once at start, on every rank
alike; a request carries names only and each name is looked up in that list, so no request reaches a file the
operator did not put there. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from distlin.errors import UsageError
from distlin.sources import IP_ADAPTER_WEIGHTS

LORA_FOLDER, CONTROLNET_FOLDER, IP_ADAPTER_FOLDER = "loras", "controlnets", "ip-adapters"
LAYOUT = (
    f"DIR/{LORA_FOLDER}/<name>.safetensors (LoRAs), DIR/{CONTROLNET_FOLDER}/<name>/ (diffusers ControlNet "
    f"folders with a config.json) and DIR/{IP_ADAPTER_FOLDER}/<name>/ (IP-Adapter folders laid out as h94/IP-Adapter)"
)


@dataclass(frozen=True)
class ComponentLibrary:
    """Names a request may use, each with the path it stands for; empty without ``--components``."""

    loras: Mapping[str, str] = field(default_factory=dict)
    controlnets: Mapping[str, str] = field(default_factory=dict)
    ip_adapters: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: str | Path) -> ComponentLibrary:
        """The components in ``root``; UsageError when it is not a folder or holds none."""
        folder = Path(root).expanduser().resolve()
        if not folder.is_dir():
            raise UsageError(f"--components {str(root)!r} is not a folder; pass a folder DIR holding {LAYOUT}")
        loras, controlnets, ip_adapters = folder / LORA_FOLDER, folder / CONTROLNET_FOLDER, folder / IP_ADAPTER_FOLDER
        library = cls(
            {path.stem: str(path) for path in sorted(loras.glob("*.safetensors")) if path.is_file()},
            {path.name: str(path) for path in sorted(controlnets.glob("*")) if (path / "config.json").is_file()},
            {path.name: str(path) for path in sorted(ip_adapters.glob("*")) if _holds_ip_adapter(path)},
        )
        if not library.loras and not library.controlnets and not library.ip_adapters:
            raise UsageError(f"--components {str(root)!r} holds no component; pass a folder DIR holding {LAYOUT}")
        for path in (*library.loras.values(), *library.controlnets.values(), *library.ip_adapters.values()):
            _check_inside(Path(path), folder, root)
        return library

    def lora(self, name: str) -> str:
        """The file of the LoRA called ``name``; UsageError for any other name."""
        return _look_up(self.loras, name, "LoRA")

    def controlnet(self, name: str) -> str:
        """The folder of the ControlNet called ``name``; UsageError for any other name."""
        return _look_up(self.controlnets, name, "ControlNet")

    def ip_adapter(self, name: str) -> str:
        """The folder of the IP-Adapter called ``name``; UsageError for any other name."""
        return _look_up(self.ip_adapters, name, "IP-Adapter")

    def describe(self) -> str:
        """One line for the log: what a request may name."""
        return (
            f"LoRAs: {_listed(self.loras)}; ControlNets: {_listed(self.controlnets)}; "
            f"IP-Adapters: {_listed(self.ip_adapters)}"
        )


def _check_inside(entry: Path, folder: Path, root: str | Path) -> None:
    """UsageError if ``entry`` or anything in it is a link that leaves ``folder``: the folder is the whole of
    what a request may reach, so a link out of it would widen that behind the operator's listing."""
    inside = [entry, *entry.rglob("*")] if entry.is_dir() else [entry]
    for path in inside:
        if not path.resolve().is_relative_to(folder):
            raise UsageError(
                f"--components {str(root)!r}: {path.relative_to(folder)} is a link that leaves the folder (to "
                f"{str(path.resolve())!r}); copy what it points to into the folder instead"
            )


def _holds_ip_adapter(folder: Path) -> bool:
    """Whether ``folder`` has the weights of an IP-Adapter for some base (which one runs is the model's choice)."""
    return any((folder / weights).is_file() for weights in IP_ADAPTER_WEIGHTS.values())


def _look_up(known: Mapping[str, str], name: str, kind: str) -> str:
    if name not in known:
        raise UsageError(f"unknown {kind} {name!r}; this server offers {_listed(known)}")
    return known[name]


def _listed(known: Mapping[str, str]) -> str:
    return ", ".join(sorted(known)) or "none"
