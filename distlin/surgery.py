"""Replacing modules inside an unmodified model without changing its parameters or state-dict keys."""

from __future__ import annotations

import functools
from collections.abc import Callable
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


def around_calls(obj: Any, signal: Callable[[], None]) -> Callable[[], None]:
    """``signal()`` as every ``obj(...)`` begins and ends (even on error), until the returned function restores
    ``obj``: its class becomes a subclass of the same name whose ``__call__`` wraps the original (a call looks
    ``__call__`` up on the class, not the instance), so everything else, the class name included, is unchanged."""
    cls = type(obj)
    original = cls.__call__

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        signal()
        try:
            return original(self, *args, **kwargs)
        finally:
            signal()

    attributes = {"__call__": __call__, "call_signal": staticmethod(signal)}
    obj.__class__ = type(
        cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__, **attributes}
    )

    def restore() -> None:
        obj.__class__ = cls

    return restore


def calls_like(variant: Any, obj: Any) -> Any:
    """``variant`` (an object built from ``obj``'s parts, such as a pipeline's ``from_pipe``) signalling its calls
    as ``obj`` does (:func:`around_calls`), or as it is when ``obj``'s are not signalled."""
    signal = getattr(type(obj), "call_signal", None)
    if signal is not None:
        around_calls(variant, signal)
    return variant


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
    """Replacements made in a model (modules, attention processors, instance attributes such as a compiled
    ``forward``), undone together, last first, by :meth:`restore`: every rewrite of a model goes through one.

    A module's replacement is a twin (:func:`twin`) or holds the same submodules under the same names, so the
    model's state-dict keys stay as they were.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self._replaced: set[str] = set()
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        """How many replacements are in place."""
        return len(self._undo)

    def module(self, name: str, replacement: nn.Module) -> None:
        """``root.<name> = replacement``."""
        original = self.root.get_submodule(name)
        set_submodule(self.root, name, replacement)
        self._replaced.add(name)
        self._undo.append(lambda: set_submodule(self.root, name, original))

    def processor(self, name: str, processor: object) -> None:
        """``root.<name>.set_processor(processor)`` (a diffusers ``Attention``)."""
        attention = self.root.get_submodule(name)
        previous = attention.processor
        attention.set_processor(processor)
        self._undo.append(lambda: attention.set_processor(previous))

    def attribute(self, name: str, attribute: str, value: Any) -> None:
        """``root.<name>.<attribute> = value`` on the instance (a compiled ``forward``); restoring it gives back
        what the instance held, or the class's own when it held nothing."""
        module = self.root.get_submodule(name) if name else self.root
        held = attribute in module.__dict__
        previous = module.__dict__.get(attribute)
        setattr(module, attribute, value)
        self._undo.append(lambda: setattr(module, attribute, previous) if held else delattr(module, attribute))

    def covers(self, name: str) -> bool:
        """True for a module inside one already replaced (its replacement handles it)."""
        return any(name.startswith(prefix + ".") for prefix in self._replaced)

    def restore(self) -> None:
        """Put everything back as it was, last replacement first (a later one may sit inside an earlier one)."""
        while self._undo:
            self._undo.pop()()
        self._replaced.clear()
