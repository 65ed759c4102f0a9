"""Backends behind one interface: ``with runner_class(name)(...) as r: heads = r.infer(batch)``.

Each backend lives in its own module, imports its heavy library lazily, and
never imports another backend. ``runner_class`` resolves a name (and aliases).
"""
from __future__ import annotations

import importlib

from ..errors import DarkconvError
from .base import Runner  # noqa: F401

#: backend name -> (module, class); aliases share an entry
BACKENDS = {
    "torch": ("darkconv.runners.torch", "TorchRunner"),
    "onnxruntime": ("darkconv.runners.onnxruntime", "OnnxRuntimeRunner"),
    "tensorrt": ("darkconv.runners.tensorrt", "TensorRTRunner"),
    "opencv": ("darkconv.runners.opencv", "OpenCVRunner"),
    "triton": ("darkconv.runners.triton", "TritonRunner"),
}
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "pytorch": "torch", "cv2": "opencv"}


def canonical(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in BACKENDS:
        raise DarkconvError(f"unknown backend {name!r}: choose from {', '.join(BACKENDS)} "
                            f"(aliases: {', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    return name


def runner_class(name: str):
    module, cls = BACKENDS[canonical(name)]
    return getattr(importlib.import_module(module), cls)
