"""Replacing modules inside an unmodified model without changing its parameters or state-dict keys."""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """``root.<name> = module`` for a dotted ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def twin(module: nn.Module, cls: type[M]) -> M:
    """An instance of ``cls`` holding the very same parameters and buffers as ``module``, so swapping it in
    changes how the function is computed (in bands, in chunks, in place) but not weights, checkpoints or
    optimizers. ``cls`` names the class it stands in for as ``cls.twin_of``, a base of ``cls``."""
    if not isinstance(module, cls.twin_of):
        raise TypeError(f"{cls.__name__} cannot stand in for {type(module).__name__}")
    copy = cls.__new__(cls)
    copy.__dict__.update(module.__dict__)
    copy._parameters = dict(module._parameters)
    copy._buffers = dict(module._buffers)
    copy._modules = dict(module._modules)
    return copy


def bound_class(cls: type[M], **attributes: Any) -> type[M]:
    """A subclass of ``cls`` (same name) carrying ``attributes`` as class attributes: state a twin shares with
    every module built as ``type(twin)(...)``, as PEFT builds a LoRA's layers beside the layer it adapts."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__, **attributes})


def original_type(module: nn.Module) -> type:
    """The class ``module`` computes the function of: its own, or for a twin the class it stands in for.

    Code that interprets modules by their parameters (the sequential VAE) asks this instead of ``type()``,
    so every twin is accepted wherever its original is.
    """
    cls = type(module)
    while hasattr(cls, "twin_of"):
        cls = cls.twin_of
    return cls


class Swaps:
    """Module and attention-processor replacements made in a model, undone together by :meth:`restore`.

    The engine (UNet) and the band-parallel VAE both rewrite a model in place and must put it back exactly.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self._modules: dict[str, nn.Module] = {}
        self._processors: dict[str, object] = {}

    def module(self, name: str, replacement: nn.Module) -> None:
        """``root.<name> = replacement``, remembering the first module that was there."""
        self._modules.setdefault(name, self.root.get_submodule(name))
        set_submodule(self.root, name, replacement)

    def processor(self, name: str, processor: object) -> None:
        """``root.<name>.set_processor(processor)`` (a diffusers ``Attention``), remembering the previous one."""
        attention = self.root.get_submodule(name)
        self._processors.setdefault(name, attention.processor)
        attention.set_processor(processor)

    def covers(self, name: str) -> bool:
        """True for a module inside one already replaced (its replacement handles it)."""
        return any(name.startswith(prefix + ".") for prefix in self._modules)

    def restore(self) -> None:
        """Put every original module and processor back."""
        for name, module in self._modules.items():
            set_submodule(self.root, name, module)
        for name, processor in self._processors.items():
            self.root.get_submodule(name).set_processor(processor)
        self._modules, self._processors = {}, {}
