"""Fitting a run to its device: the planner asked with a run's settings, the memory savers switched on in order.

Savers never change the image; they trade time for memory. When a run's predicted peak exceeds the device's
memory, the savers the user left unset are switched on one by one until it fits; if none suffices the run is
refused with one line naming how many ranks would do. The capacity is the GPU's memory, or
``DISTLIN_DEVICE_MEMORY`` (bytes) on any device (:mod:`distlin.thresholds`). A CPU run is checked against the
machine's available RAM (or ``DISTLIN_HOST_MEMORY``) instead, which all its ranks on the machine share.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from distlin.errors import UsageError
from distlin.families import family_of_model, load
from distlin.memory.planner import component_parameters, ranks_needed
from distlin.ranks import ranks_from_env
from distlin.settings import RunSettings
from distlin.sizes import format_size
from distlin.sources import base_family, local_path, read_json, safetensors_parameters, unet_config
from distlin.vae.transfer import copies_overlap

# In this order: the guidance halves one after the other, the VAE decoded band by band through host RAM, then
# its mid-block keys/values streamed from there too. The last two cost host transfers.
SAVERS: tuple[tuple[str, Any, str], ...] = (
    ("micro_batch", 1, "--micro-batch 1"),
    ("vae_decode", "sequential", "--vae-decode sequential"),
    ("vae_attention_rows", 64, "--vae-attention-rows 64"),
)


def component_configs(settings: RunSettings) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """The configs of a run's own components found on disk (each ControlNet, an IP-Adapter's image encoder) and
    the parameter count of an IP-Adapter's weights file, read from its header; Hub ids are not looked up."""
    configs: dict[str, dict[str, Any]] = {}
    for index, source in enumerate(settings.controlnet):
        path = local_path(source)
        if path is not None and (path / "config.json").is_file():
            configs[f"controlnet{index if index else ''}"] = read_json(path / "config.json", source, "--controlnet")
    counts: dict[str, int] = {}
    unet = unet_config(settings.model)
    for index, spec in enumerate(settings.ip_adapters if unet is not None else ()):
        files = spec.files(base_family(unet))
        root, subfolder, local = spec.encoder_location(files)
        encoder_config = Path(root, subfolder, "config.json")
        if index == 0 and local and encoder_config.is_file():  # several share the first one's
            configs["ip_image_encoder"] = read_json(encoder_config, spec.source, "--ip-adapter")
        if files.local and files.weights.suffix == ".safetensors" and files.weights.is_file():
            counts[f"ip_adapter{index if index else ''}"] = safetensors_parameters(files.weights)
    return configs, counts


def plan_kwargs(settings: RunSettings) -> dict[str, Any]:
    """The planner's keyword arguments for a run's settings (everything but the model, size and ranks)."""
    device = "cuda" if settings.device == "auto" else settings.device  # auto: planned for a GPU
    return {
        "extra_parameters": component_parameters(*component_configs(settings)),
        "controlnets": len(settings.controlnet),
        "dtype": settings.dtype,
        "cfg": settings.guidance,
        "cfg_parallel": settings.engine.cfg_parallel,
        "micro_batch": settings.engine.micro_batch,
        "vae_attention_rows": settings.vae_attention_rows,
        "vae_decode": settings.vae_decode,
        "thresholds": settings.thresholds,
        "vae_fetch_ahead": copies_overlap(device, device if settings.vae_store == "device" else "cpu"),
        "vae_store": "device" if settings.vae_store == "device" else "host",  # auto: host until placed
    }


def plan_run(settings: RunSettings, ranks: int) -> dict[str, Any] | None:
    """The planner's prediction for this run (its model family's formula), or None for a model whose
    architecture is not known offline."""
    family = family_of_model(settings.model)
    arch = family.architecture(settings.model)
    if arch is None or not family.plan:
        return None
    return load(family.plan)(arch, settings.height, settings.width, ranks, **plan_kwargs(settings))


def _saver(settings: RunSettings, name: str) -> Any:
    """A saver's current value; None (or ``auto``) when the user left it to the run."""
    value = settings.engine.micro_batch if name == "micro_batch" else getattr(settings, name)
    return None if value == "auto" else value


def _with(settings: RunSettings, name: str, value: Any) -> RunSettings:
    if name == "micro_batch":
        return replace(settings, engine=replace(settings.engine, micro_batch=value))
    return replace(settings, **{name: value})


def saver_flags(before: RunSettings, after: RunSettings) -> str:
    """The command-line flags that turn ``before``'s memory savers into ``after``'s."""
    return " ".join(flag for name, _, flag in SAVERS if _saver(before, name) != _saver(after, name))


def place_vae_store(settings: RunSettings, ranks: int, capacity: int) -> RunSettings:
    """``vae_store`` auto made ``device`` where the sequential VAE's activations fit the device beside the rest
    (no host transfers), else ``host``."""
    if settings.vae_store != "auto":
        return settings
    on_device = replace(settings, vae_store="device")
    planned = plan_run(on_device, ranks)
    fits = planned is not None and planned["peak_bytes_per_rank"] <= capacity
    return on_device if fits else replace(settings, vae_store="host")


def fit_to_capacity(settings: RunSettings, ranks: int, capacity: int, device: str) -> RunSettings:
    """``settings`` with the savers its model family's plan reads switched on until the plan fits ``capacity``
    bytes per rank, then the sequential VAE's store placed (:func:`place_vae_store`); UsageError if no saver
    suffices (the same on every rank: it depends on the settings alone)."""
    result = plan_run(settings, ranks)
    if result is None or result["peak_bytes_per_rank"] <= capacity:
        return place_vae_store(settings, ranks, capacity)
    family = family_of_model(settings.model)
    fitted = settings
    for name, value, _ in SAVERS:
        if name not in family.savers or _saver(fitted, name) is not None:
            continue
        fitted = _with(fitted, name, value)
        planned = plan_run(fitted, ranks)
        if planned is not None and planned["peak_bytes_per_rank"] <= capacity:
            return place_vae_store(fitted, ranks, capacity)
    raise UsageError(
        f"predicted peak {result['peak_bytes_per_rank'] / 2**30:.1f} GiB per rank does not fit {device} "
        f"({capacity / 2**30:.1f} GiB); use {_advice(settings, fitted, capacity)} (see --plan)"
    )


def _advice(settings: RunSettings, fitted: RunSettings, capacity: int) -> str:
    """The fewest ranks that fit ``capacity`` with the savers of ``fitted``, or with the user's own VAE path
    (band by band on rank 0 may hold more than a band-parallel decode on many ranks), and the flags; else a
    smaller size."""
    family = family_of_model(settings.model)
    arch, planner = family.architecture(settings.model), load(family.plan)
    own_vae = replace(fitted, vae_decode=settings.vae_decode)
    options = []
    for candidate in [fitted] if own_vae == fitted else [fitted, own_vae]:
        try:
            kwargs = plan_kwargs(candidate)
            needed = ranks_needed(capacity, arch, settings.height, settings.width, planner=planner, **kwargs)
        except UsageError:
            continue
        options.append((needed, saver_flags(settings, candidate)))
    if not options:
        return "a smaller size"
    needed, flags = min(options, key=lambda option: option[0])
    return f"at least {needed} ranks with {flags}" if flags else f"{needed} ranks"


def available_host_memory() -> int | None:
    """Bytes of RAM this process can still use: the kernel's MemAvailable, capped by a cgroup (v2) limit when
    one is set (a container); None where neither can be read (not Linux)."""
    sizes = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                sizes.append(int(line.split()[1]) * 1024)
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            sizes.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(sizes) if sizes else None


def host_capacity(settings: RunSettings, held: int = 0) -> int | None:
    """The RAM a CPU run must fit: ``DISTLIN_HOST_MEMORY`` if set, else what the machine has available plus
    ``held``, the bytes of the pipelines its ranks already hold, which the run reuses or frees before it loads
    (the plan counts the weights: without this, a web app's second request would count them twice)."""
    if settings.thresholds.host_memory:
        return settings.thresholds.host_memory
    available = available_host_memory()
    return None if available is None else available + held


def check_host_memory(settings: RunSettings, ranks: int, local_ranks: int, capacity: int) -> None:
    """Refuse a CPU run whose ``local_ranks`` ranks on this machine (of ``ranks``) cannot fit ``capacity``
    bytes of RAM together: the planner's peak per rank, plus rank 0's host-RAM store of a sequential decode."""
    result = plan_run(settings, ranks)
    if result is None:
        return
    per_rank = result["peak_bytes_per_rank"]
    total = per_rank * local_ranks + result["breakdown"].get("vae_host_ram_not_on_device", 0)
    if total > capacity:
        gib = 2**30
        shared = f" ({local_ranks} ranks of {per_rank / gib:.3g} GiB)" if local_ranks > 1 else ""
        raise UsageError(
            f"{format_size(settings.width, settings.height)} px on the CPU needs a predicted {total / gib:.3g} GiB "
            f"of RAM{shared}, more than the {capacity / gib:.3g} GiB available; use a smaller size, fewer ranks or "
            "a GPU (see --plan)"
        )


def local_ranks(world_size: int) -> int:
    """The ranks sharing this machine's RAM (torchrun's LOCAL_WORLD_SIZE; all of them without torchrun)."""
    return ranks_from_env().local_world_size or world_size
