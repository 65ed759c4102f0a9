"""One exception family for everything a user can get wrong.

Each error carries where it happened (file, line, layer) so the CLI can print
a single line that names the place and the fix, then exit non-zero.
"""
from __future__ import annotations


class DarkconvError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 1

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 layer: int | None = None, section: str | None = None):
        self.file, self.line, self.layer, self.section = file, line, layer, section
        self.bare = message
        where = []
        if file:
            where.append(f"{file}:{line}" if line else str(file))
        if layer is not None:
            where.append(f"layer {layer} [{section}]" if section else f"layer {layer}")
        super().__init__(": ".join(where + [message]))


class CfgError(DarkconvError):
    """The .cfg cannot be parsed or describes an inconsistent network."""


class WeightsError(DarkconvError):
    """The .weights file does not match the cfg (short, long, not a weights file)."""


class ImageError(DarkconvError):
    """An image cannot be read or decoded."""


class ExportError(DarkconvError):
    """ONNX / quantization / engine export failed."""


class BackendUnavailable(DarkconvError):
    """A backend (TensorRT, CUDA, OpenCV DNN) is not installed or has no device."""

    exit_code = 3


class ModelMismatch(DarkconvError):
    """An artifact (engine, ONNX) does not belong to the model or machine at hand."""


class InferenceError(DarkconvError):
    """A backend failed on one batch (e.g. a remote server died mid-request, after retries).

    Jobs report the batch's images as failed and go on with the others.
    """

    exit_code = 2


class DarkconvWarning(UserWarning):
    """Something suspicious but not fatal (e.g. a cfg key Darknet ignores); the CLI prints it as one
    ``darkconv: warning: ...`` line, and ``--strict`` turns cfg warnings into errors."""
