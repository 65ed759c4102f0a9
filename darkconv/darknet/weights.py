"""Read and write Darknet ``.weights`` files (mirrors ``load_weights_upto``/``save_weights_upto``, src/parser.c).

Layout: int32 major, minor, revision; ``seen`` as uint64 when ``major*10+minor >= 2``
else uint32; then float32 little-endian arrays, layer by layer in cfg order.
Darknet silently loads a short file; darkconv counts every float and refuses a
short file, trailing data, and files that are obviously not weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..io import atomic_write


@dataclass(frozen=True)
class WeightsHeader:
    major: int
    minor: int
    revision: int
    seen: int

    @property
    def size(self) -> int:
        return 20 if self.major * 10 + self.minor >= 2 else 16

    @property
    def transpose_connected(self) -> bool:
        return self.major > 1000 or self.minor > 1000


def _sniff(head: bytes, path: str) -> None:
    text = head.lstrip()[:200].lower()
    if text.startswith(b"version https://git-lfs"):
        raise WeightsError("this is a Git LFS pointer, not the weights: run `git lfs pull` "
                           "or download the real file", file=path)
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        raise WeightsError("this is an HTML page, not a .weights file (a download link that "
                           "returned a web page?)", file=path)
    if text.startswith(b"[net]") or text.startswith(b"[network]"):
        raise WeightsError("this is a .cfg, not a .weights file (arguments swapped?)", file=path)


class WeightsReader:
    """Sequential float32 reader over a whole ``.weights`` file with exact accounting."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with open(path, "rb") as f:  # read into a writable buffer: torch can view it without a copy
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
        except OSError as e:
            raise WeightsError(f"cannot read weights: {e.strerror}", file=self.path) from None
        _sniff(bytes(data[:512]), self.path)
        if len(data) < 16:
            raise WeightsError(f"file is {len(data)} bytes: too short for a Darknet header", file=self.path)
        major, minor, revision = (int(v) for v in np.frombuffer(data, "<i4", 3))
        if major * 10 + minor >= 2:
            if len(data) < 20:
                raise WeightsError("file ends inside the header", file=self.path)
            seen = int(np.frombuffer(data, "<u8", 1, 12)[0])
        else:
            seen = int(np.frombuffer(data, "<u4", 1, 12)[0])
        self.header = WeightsHeader(major, minor, revision, seen)
        body = len(data) - self.header.size
        if body % 4:
            raise WeightsError(f"body is {body} bytes, not a whole number of float32 values", file=self.path)
        self._floats = np.frombuffer(data, "<f4", body // 4, self.header.size)  # zero-copy view
        self.offset = 0

    @property
    def remaining(self) -> int:
        return self._floats.size - self.offset

    def take(self, count: int, layer: int, section: str, what: str = "") -> np.ndarray:
        """The next ``count`` floats, or a :class:`WeightsError` naming the layer that ran out."""
        if count > self.remaining:
            part = f" ({what})" if what else ""
            raise WeightsError(f"needs {count} more floats{part}, only {self.remaining} left in the file: "
                               "the weights belong to a different cfg (check filters/classes)",
                               file=self.path, layer=layer, section=section)
        out = self._floats[self.offset:self.offset + count]
        self.offset += count
        return out

    def finish(self) -> None:
        """Fail if the file holds more floats than the cfg uses."""
        if self.remaining:
            raise WeightsError(f"{self.remaining} floats ({self.remaining * 4} bytes) left over after the last "
                               f"layer: the weights belong to a different (larger) cfg", file=self.path)


class WeightsWriter:
    """Collects float32 arrays in file order, then writes a header-version-2 ``.weights`` atomically."""

    def __init__(self, major: int = 0, minor: int = 2, revision: int = 0, seen: int = 0):
        self.header = WeightsHeader(major, minor, revision, seen)
        self.chunks: list[np.ndarray] = []

    def add(self, array) -> None:
        self.chunks.append(np.ascontiguousarray(array, dtype="<f4").ravel())

    def write(self, path: str | Path) -> None:
        h = self.header
        head = np.array([h.major, h.minor, h.revision], "<i4").tobytes()
        head += np.array([h.seen], "<u8" if h.size == 20 else "<u4").tobytes()
        atomic_write(path, [head] + [c.tobytes() for c in self.chunks])
