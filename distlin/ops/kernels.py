"""Which implementation runs LinFusion's attention, checked without importing torch.

``torch``: the PyTorch ops (any device, differentiable); ``triton``: the fused kernels (CUDA, inference only);
``auto``: the kernels where they apply. A name that cannot run on the asked device is refused with the other
flags, before anything loads; :func:`distlin.ops.linear_attention.select_kernel` decides per tensor.
"""

from __future__ import annotations

import importlib.util
import os

from distlin.errors import UsageError

ATTENTION_KERNELS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interprets() -> bool:
    """Whether triton's interpreter is on (``TRITON_INTERPRET=1``, triton's own switch): the kernels then run on
    CPU tensors, which is how the tests check them without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_kernel(kernel: str, device: str | None = None) -> None:
    """Reject an unknown kernel name, ``triton`` where triton is not installed, or ``triton`` on a device that is
    not CUDA (``device`` as the user gave it: ``cpu``, ``cuda:1``; ``auto`` and None are checked per tensor)."""
    if kernel not in ATTENTION_KERNELS:
        raise UsageError(
            f"unknown attention kernel {kernel!r}; pass --attention-kernel with one of {', '.join(ATTENTION_KERNELS)}"
        )
    if kernel != "triton":
        return
    if not triton_available():
        raise UsageError(
            "attention kernel 'triton' needs the triton package: pip install 'distlin[gpu]', or use auto/torch"
        )
    on_cpu = device is not None and device.split(":")[0] in ("cpu", "mps")
    if on_cpu and not triton_interprets():
        raise UsageError(
            f"attention kernel 'triton' runs on CUDA, and the device is {device}; pass --attention-kernel auto "
            "or torch (or a CUDA --device)"
        )
