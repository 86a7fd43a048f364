"""``--compile``: torch.compile of the band's pure compute, with the engine's exchanges left eager.

Compiling the whole patch-parallel UNet does not work well: measured on the tiny SD-1.5 model on 2 gloo ranks
(4 steps, displaced mode, dynamo with the eager backend), dynamo split it into 76 graphs at 58 graph breaks
(the point-to-point halo exchanges, the finite check's ``.item()``, an ``RLock`` context manager), and
stopped compiling the chunked transformer when it hit its recompile limit (8), its input changing shape
level by level; tracing alone took the first step from under a second to 83 s. So only modules that read no
engine state and start no collective are compiled, each on its own:

* every feed-forward (``FeedForward``: the GEGLU, the widest token-local activation);
* every cross-attention (``attn2``: projections, SDPA on the prompt, output projection);
* LinFusion's query and key MLPs (``to_q_``, ``to_k_``).

Everything that exchanges rows or statistics (``PatchConv2d``, ``PatchGroupNorm``, the self-attention's state
all-reduce or K/V gather) runs as before, so exact and displaced modes are unchanged. Instances of one class
share their compiled graphs (dynamo inlines the modules, weights are graph inputs), and a second shape makes
the token and channel dims dynamic, so a run compiles a few graphs in its first step and none after. The
linear-attention ops stay as they are: on CUDA they are already fused Triton kernels, and the state's token
count is a Python number that would specialise a graph per band size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from distlin.linfusion.attention import LinFusionAttention
from distlin.surgery import Swaps

Backend = str | Callable
BACKEND: Backend = "inductor"  # what ``--compile`` compiles with


def compiled_parts(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of ``unet`` (named) that :func:`compile_unet` compiles: pure compute, no exchange."""
    parts: list[tuple[str, nn.Module]] = []
    for name, module in unet.named_modules():
        if isinstance(module, FeedForward):
            parts.append((name, module))
        elif isinstance(module, Attention) and module.is_cross_attention:
            parts.append((name, module))
        elif isinstance(module, LinFusionAttention):
            parts += [(f"{name}.{p}", getattr(module, p)) for p in ("to_q_", "to_k_")]
    return [(name, part) for name, part in parts if not isinstance(part, nn.Identity)]


def compile_unet(unet: nn.Module, backend: Backend | None = None) -> Swaps:
    """Compile the pure-compute modules of ``unet`` in place (after the engine: see the module docstring),
    with ``backend`` (default :data:`BACKEND`).

    Each module's ``forward`` (or the method it names as ``compiled_method``: a chunked feed-forward's per-chunk
    one) becomes its compiled version, so parameters, state-dict keys and hooks stay the module's own. Returns
    the swaps (``len``: how many modules were compiled; ``restore()``: eager again).
    """
    swaps = Swaps(unet)
    for name, module in compiled_parts(unet):
        method = getattr(module, "compiled_method", "forward")
        swaps.attribute(name, method, torch.compile(getattr(module, method), backend=backend or BACKEND))
    return swaps
