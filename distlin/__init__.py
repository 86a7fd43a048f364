"""distlin: ultra-high-resolution Stable Diffusion with LinFusion linear attention, patch-parallel."""

__version__ = "0.1.0"
