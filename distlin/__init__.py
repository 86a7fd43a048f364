"""distlin: ultra-high-resolution Stable Diffusion with LinFusion linear attention, patch-parallel."""

__version__ = "0.1.0"

from distlin.linfusion import LinFusion, LinFusionAttention, LinFusionAttnProcessor

__all__ = ["LinFusion", "LinFusionAttention", "LinFusionAttnProcessor", "__version__"]
