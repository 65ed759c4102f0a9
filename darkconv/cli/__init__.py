"""The ``darkconv`` command line (click). One module per command; :mod:`.common` holds the group and helpers."""
from __future__ import annotations

from .common import main
from . import bench, convert, demo, detect, eval, export, parity, serve  # noqa: E402,F401  (each registers its command on main)

__all__ = ["main"]
