"""Replacing modules inside an unmodified model without changing its parameters or state-dict keys."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def twin(module: nn.Module, cls: type[M]) -> M:
    """An instance of ``cls`` (a subclass of ``type(module)``) holding the very same parameters and buffers,
    so swapping it in changes behaviour but not weights, checkpoints or optimizers."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"{cls.__name__} cannot stand in for {type(module).__name__}")
    copy = cls.__new__(cls)
    copy.__dict__.update(module.__dict__)
    copy._parameters = dict(module._parameters)
    copy._buffers = dict(module._buffers)
    copy._modules = dict(module._modules)
    return copy
