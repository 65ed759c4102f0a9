"""Layer-builder registry keyed by cfg section name.

A builder is ``fn(section, ctx) -> Built``: it reads its options, checks its
inputs, and returns its output shape, the number of floats it reads from the
.weights file, and its torch module -- or, for modules that allocate parameters,
a zero-argument factory, so that the whole network's memory can be checked
before anything is allocated. Adding a layer type is one decorated function
(and one test).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..darknet.cfg import Section
from ..darknet.spec import HeadSpec

Shape = tuple[int, int, int]  # (c, h, w)


@dataclass
class Built:
    module: torch.nn.Module | Callable[[bool], torch.nn.Module]  # factory(init) if the module allocates
    shape: Shape
    inputs: tuple[int, ...] | None = None  # absolute layer indices fed to forward(); None = previous layer
    head: HeadSpec | None = None
    params: int = 0     # floats this layer reads from the .weights file
    workspace: int = 0  # floats of its largest temporary: im2col (get_workspace_size32), padded input
    key: str | None = None  # the option that sizes the parameters (named in a memory error)
    share: int | None = None  # layer whose parameters this one uses (share_index); the module gets share_parameters()
    info: dict = field(default_factory=dict)  # what later builders may ask about this layer (conv geometry)

    def make(self, init: bool = True) -> torch.nn.Module:
        """The module; ``init=False`` leaves parameters uninitialised (the .weights will overwrite them)."""
        return self.module if isinstance(self.module, torch.nn.Module) else self.module(init)


@dataclass
class BuildContext:
    """What a builder may look at: earlier layers' output shapes and the [net] section."""

    net: Section
    index: int
    shapes: list[Shape] = field(default_factory=list)
    input_shape: Shape = (3, 416, 416)
    built: list[Built] = field(default_factory=list)  # the earlier layers' Built, in order

    @property
    def prev(self) -> Shape:
        return self.shapes[self.index - 1] if self.index > 0 else self.input_shape

    def shape_of(self, i: int) -> Shape:
        return self.input_shape if i < 0 else self.shapes[i]

    def resolve(self, section: Section, key: str, raw: int) -> int:
        """Darknet layer reference: negative = relative to this layer, else absolute; must be earlier."""
        idx = self.index + raw if raw < 0 else raw
        if not 0 <= idx < self.index:
            raise section.error(f"{key}={raw} points to layer {idx}, but only layers 0..{self.index - 1} "
                                "come before this one", key)
        return idx


Builder = Callable[[Section, BuildContext], Built]
BUILDERS: dict[str, Builder] = {}


def register(*names: str):
    def deco(fn: Builder) -> Builder:
        for n in names:
            BUILDERS[n] = fn
        return fn
    return deco
