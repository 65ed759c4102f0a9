"""The one interface every backend implements (in the spirit of Polygraphy's runners).

The output contract, the same for every backend: ``infer(batch)`` returns a list of float32
arrays, one per head of ``runner.spec.heads`` and in that order, where the array for head
``h`` is the backend's output named ``h.name`` (``head_<darknet layer index>``). A runner maps
its backend's outputs by these names, never by position, and checks once when it opens the
artifact that every name is there (:func:`outputs_by_name`): an ONNX file, engine or served model
whose outputs come in another order still gives the heads in spec order, and one that lacks a
head is refused with :class:`~darkconv.errors.ModelMismatch`. Callers pass the list straight to
:func:`darkconv.postprocess.postprocess` (which zips it with ``spec.heads``).
"""
from __future__ import annotations

import abc

import numpy as np

from ..darknet.spec import ModelSpec
from ..errors import ModelMismatch


def outputs_by_name(spec: ModelSpec, available, *, where: str | None = None, hint: str = "") -> list[str]:
    """The names to read, in ``spec.heads`` order, after checking each is among ``available``
    (the artifact's output names, in whatever order it lists them)."""
    have = list(available)
    wanted = spec.head_names
    missing = [n for n in wanted if n not in have]
    if missing:
        raise ModelMismatch(f"the model's outputs are {have} but its heads need {wanted} (missing "
                            f"{missing}){'; ' + hint if hint else ''}", file=where)
    return wanted


class Runner(abc.ABC):
    """A loaded model on one backend.

    ``with Runner(...) as r: heads = r.infer(batch)`` where ``batch`` is float32
    (N, C, H, W) from :func:`darkconv.preprocess` and ``heads`` follows the module's
    output contract: one float32 array per ``spec.heads`` entry, in that order, taken
    from the backend's output of that head's name. Decoding is never done here.
    """

    name: str = "runner"
    spec: ModelSpec
    #: how many ``infer`` calls may run at once, from different threads (the stream pipeline keeps that many
    #: batches in inference); 1 = one call at a time
    concurrency: int = 1

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
        """Raw head tensors for ``batch``, in ``spec.heads`` order (see the module docstring)."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.spec.channels, self.spec.height, self.spec.width)

    def describe(self) -> str:
        return self.name
