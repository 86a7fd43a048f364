"""Memory-bounded execution of diffusers modules: the same function, a bounded working set, exactly."""

from distlin.lean.bound_memory import bound_memory

__all__ = ["bound_memory"]
