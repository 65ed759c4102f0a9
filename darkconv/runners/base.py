"""The one interface every backend implements (in the spirit of Polygraphy's runners)."""
from __future__ import annotations

import abc

import numpy as np

from ..darknet.spec import ModelSpec


class Runner(abc.ABC):
    """A loaded model on one backend.

    ``with Runner(...) as r: heads = r.infer(batch)`` where ``batch`` is float32
    (N, C, H, W) from :func:`darkconv.preprocess` and ``heads`` is a list of
    float32 arrays, one per [yolo]/[region] head in cfg order: the raw tensors
    Darknet feeds into the heads. Decoding is never done here.
    """

    name: str = "runner"
    spec: ModelSpec

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the model / create the session (timed separately by bench)."""

    def deactivate(self) -> None:
        """Release sessions, engines and device memory."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        ...

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.height, self.spec.width)

    def describe(self) -> str:
        return self.name
