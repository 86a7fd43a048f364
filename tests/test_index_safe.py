"""No kernel that indexes with 32 bits sees a tensor above 2**31 - 1 elements, even for SD-1.5 at 16384² on one
rank; the banded kernel calls give exactly the whole-tensor result."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from distlin.lean import bound_memory
from distlin.linfusion import LinFusion
from distlin.models.tiny import build_unet, load_architecture
from distlin.ops.index_safe import INDEX_LIMIT, conv2d_rows, upsample_nearest2x
from distlin.parallel import PatchParallelConfig, parallelize_unet

# The aten kernels known to need 32-bit indexable tensors (cuDNN convolution, nearest upsampling) and the
# GroupNorm kernel, which distlin keeps below the limit too.
GUARDED = ("convolution", "upsample_nearest2d", "native_group_norm")


class LargestTensors(TorchDispatchMode):
    """Records, per aten op, the largest element count among its tensor inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        self.largest[name] = max(self.largest.get(name, 0), *sizes, 0)
        return out


@pytest.mark.parametrize(("batch", "stride", "padding", "dilation"), [(2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 2)])
def test_conv_split_to_fit_the_limit_equals_whole_conv(batch: int, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, 3, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(batch, 5, 23, 9)
    with torch.no_grad():
        banded = conv2d_rows(x, conv.weight, conv.bias, stride, padding, dilation, max_elements=300)
        torch.testing.assert_close(banded, conv(x))


def test_upsampling_split_to_fit_the_limit_equals_the_whole_upsampling() -> None:
    x = torch.randn(2, 3, 11, 5)
    assert torch.equal(upsample_nearest2x(x, max_elements=100), F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_sd15_at_16k_on_one_rank_keeps_guarded_kernels_below_2_pow_31() -> None:
    """Full SD-1.5 UNet with LinFusion at 16384² px (latent 2048², one guidance half), as generate.py runs it,
    traced on the meta device: 4 G-element tensors exist, but no guarded kernel receives one."""
    arch = load_architecture("full-sd15")["unet"]
    unet = build_unet("full-sd15", torch_dtype=torch.float16, device="meta")
    LinFusion.construct_for(unet=unet, load_pretrained=False, init="random")
    bound_memory(unet, 16384)
    parallelize_unet(unet, PatchParallelConfig(check_finite=False))
    sample = torch.empty(1, arch["in_channels"], 2048, 2048, dtype=torch.float16, device="meta")
    context = torch.empty(1, 77, arch["cross_attention_dim"], dtype=torch.float16, device="meta")
    with torch.no_grad(), LargestTensors() as seen:
        unet(sample, 10.0, context)
    assert max(seen.largest.values()) > INDEX_LIMIT  # the limit is really reached at this size
    for op in GUARDED:
        assert 0 < seen.largest[op] <= INDEX_LIMIT, (op, seen.largest[op])
