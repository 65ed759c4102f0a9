"""The optional compiled kernels: ``darkconv._cresize`` (Darknet's resize) and ``darkconv._cnms`` (Darknet's NMS).

``setup.py`` builds them where a C compiler is found; elsewhere, or with ``DARKCONV_NO_C_KERNEL=1`` in the
environment, darkconv computes the same numbers in NumPy (slower).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType


def load(name: str) -> ModuleType | None:
    """``darkconv.<name>``, or None where it was not built or the environment switches compiled kernels off."""
    if os.environ.get("DARKCONV_NO_C_KERNEL"):
        return None
    try:
        return importlib.import_module(f"darkconv.{name}")
    except ImportError:
        return None
