"""The real TensorRT / cuda-python symbol and enum tables (tests/data/trt_symbols.json).

Extracted from the PyPI wheels by scripts/extract_trt_symbols.py: nothing in the fakes'
enums or member lists is typed in by hand.
"""
from __future__ import annotations

import enum
import functools
import json
from pathlib import Path

TABLE = Path(__file__).resolve().parents[1] / "data" / "trt_symbols.json"
TRT_VERSIONS = ("10.0.1", "10.13.3.9", "11.4.0.106")
CUDA_VERSIONS = ("12.9.10", "13.5.0")


@functools.lru_cache(maxsize=None)
def table() -> dict:
    return json.loads(TABLE.read_text())


def trt(version: str) -> dict:
    return table()["tensorrt"][version]


def cuda(version: str) -> dict:
    return table()["cuda_bindings"][version]


def make_enum(name: str, members: dict[str, int]) -> type[enum.IntEnum]:
    """An IntEnum with exactly the real binding's names and values (``int(x)`` and ``.name`` as in pybind)."""
    return enum.IntEnum(name.rsplit(".", 1)[-1], members)
