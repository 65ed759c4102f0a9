"""Parse a Darknet ``.cfg`` into typed sections (mirrors ``read_cfg``/``option_find*`` in src/parser.c, src/option_list.c).

Darknet strips every whitespace character of a line, skips lines starting with
``#`` or ``;``, and reads ``key=value`` pairs; numbers are read with ``atoi``/``atof``.
darkconv does the same, also tolerates CRLF and inline comments, and keeps the
line number of every key so that any later error can point at it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CfgError

#: cfg section name (and Darknet's aliases) -> canonical name
SECTION_ALIASES = {
    "net": "net", "network": "net",
    "conv": "convolutional", "convolutional": "convolutional",
    "max": "maxpool", "maxpool": "maxpool",
    "avg": "avgpool", "avgpool": "avgpool",
    "local_avg": "local_avgpool", "local_avgpool": "local_avgpool",
    "conn": "connected", "connected": "connected",
    "soft": "softmax", "softmax": "softmax",
    "route": "route", "shortcut": "shortcut", "upsample": "upsample",
    "sam": "sam", "scale_channels": "scale_channels",
    "reorg": "reorg", "reorg3d": "reorg3d",
    "dropout": "dropout", "yolo": "yolo", "region": "region",
    "batchnorm": "batchnorm", "activation": "activation", "empty": "empty", "silence": "silence",
    "implicit_add": "implicit_add", "implicit_mul": "implicit_mul",
}

_INT = re.compile(r"^[+-]?\d+")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
INT_MIN, INT_MAX = -2**31, 2**31 - 1  # Darknet's atoi() into a C int
FLT_MAX = 3.4028234663852886e38       # atof() stored in a C float


def _shown(text: str, limit: int = 24) -> str:
    """A value as it appears in a message: long ones are cut (a 6,000-digit number is one line too)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


@dataclass
class Section:
    """One ``[section]`` of a cfg: its canonical type, options and where it came from.

    ``index`` is the Darknet layer index (``-1`` for ``[net]``). Accessors follow
    Darknet's ``option_find_*``: a missing key gives the default.
    """

    type: str
    index: int
    file: str
    line: int
    options: dict[str, tuple[str, int]] = field(default_factory=dict)
    name: str = ""  # the name as written, e.g. "conv"

    # -- errors -----------------------------------------------------------------
    def error(self, message: str, key: str | None = None) -> CfgError:
        line = self.options[key][1] if key in self.options else self.line
        layer = None if self.index < 0 else self.index
        return CfgError(message, file=self.file, line=line, layer=layer, section=self.type)

    # -- typed accessors --------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.options

    def str(self, key: str, default: str | None = None) -> str | None:
        return self.options[key][0] if key in self.options else default

    def int(self, key: str, default: int | None = None, *, lo: int | None = None,
            hi: int | None = None) -> int | None:
        """``option_find_int``; with ``lo``/``hi`` a given value outside [lo, hi] is a CfgError naming the key."""
        if key not in self.options:
            return default
        return self._check_range(key, self._int(self.options[key][0], key), lo, hi)

    def float(self, key: str, default: float | None = None, *, lo: float | None = None,
              hi: float | None = None, positive: bool = False) -> float | None:
        if key not in self.options:
            return default
        v = self._float(self.options[key][0], key)
        if positive and not v > 0:
            raise self.error(f"{key}={v:g} must be positive", key)
        return self._check_range(key, v, lo, hi)

    def _check_range(self, key, v, lo, hi):
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                want = f"between {lo} and {hi}"
            else:
                want = f"at least {lo}" if lo is not None else f"at most {hi}"
            raise self.error(f"{key}={v:g} must be {want}" if isinstance(v, float) else f"{key}={v} must be {want}", key)
        return v

    def ints(self, key: str, default: list[int] | None = None) -> list[int] | None:
        if key not in self.options:
            return default
        return [self._int(v, key) for v in self._items(key)]

    def floats(self, key: str, default: list[float] | None = None) -> list[float] | None:
        if key not in self.options:
            return default
        return [self._float(v, key) for v in self._items(key)]

    def _items(self, key: str) -> list[str]:
        return [v for v in self.options[key][0].split(",") if v != ""]

    def _int(self, text: str, key: str) -> int:
        m = _INT.match(text)  # atoi: leading integer, "0.5" -> 0
        if not m:
            raise self.error(f"{key}={_shown(text)} is not a number", key)
        digits = m.group(0).lstrip("+-").lstrip("0")
        v = int(m.group(0)) if len(digits) <= 10 else None  # no int() of thousands of digits
        if v is None or not INT_MIN <= v <= INT_MAX:
            raise self.error(f"{key}={_shown(m.group(0))} is out of range: Darknet reads it as a 32-bit int "
                             f"(between {INT_MIN} and {INT_MAX})", key)
        return v

    def _float(self, text: str, key: str) -> float:
        m = _FLOAT.match(text)
        if not m:
            raise self.error(f"{key}={_shown(text)} is not a number", key)
        v = float(m.group(0))
        if not math.isfinite(v) or abs(v) > FLT_MAX:
            raise self.error(f"{key}={_shown(m.group(0))} is out of range: Darknet reads it as a 32-bit float "
                             "(at most 3.4e38 in magnitude)", key)
        return v


@dataclass
class Cfg:
    """A parsed cfg: the ``[net]`` section and the layer sections in order."""

    path: str
    net: Section
    layers: list[Section]


def parse_cfg(path: str | Path, text: str | None = None) -> Cfg:
    """Read a cfg file (or ``text`` as if it were that file) into a :class:`Cfg`."""
    path = str(path)
    if text is None:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise CfgError(f"cannot read cfg: {e.strerror}", file=path) from None
        if b"\x00" in raw[:4096]:
            raise CfgError("this is a binary file, not a Darknet .cfg (swapped cfg and weights?)", file=path)
        text = raw.decode("utf-8", errors="replace")
    sections: list[Section] = []
    current: Section | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if "\x00" in line:  # Darknet's fgetl would silently cut the line there ("filters=1\x006" reads as 1)
            raise CfgError("the line contains a NUL byte (Darknet would silently cut the line there): remove it",
                           file=path, line=lineno)
        line = "".join(line.split())  # Darknet's strip(): removes every whitespace char
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]"):
                raise CfgError(f"malformed section header {_shown(line, 60)}: expected [name]", file=path, line=lineno)
            name = line[1:-1].lower()
            if name not in SECTION_ALIASES:
                known = ", ".join(sorted(set(SECTION_ALIASES.values())))
                raise CfgError(f"unknown section [{name if len(name) <= 40 else name[:40] + '...'}]: darkconv supports {known}", file=path, line=lineno,
                               layer=max(len(sections) - 1, 0) if sections else None)
            current = Section(SECTION_ALIASES[name], len(sections) - 1, path, lineno, name=name)
            sections.append(current)
            continue
        if current is None:
            raise CfgError(f"option {_shown(line, 60)} before any [section]", file=path, line=lineno)
        if "=" not in line:
            raise CfgError(f"line {_shown(line, 60)} is not key=value", file=path, line=lineno)
        key, value = line.split("=", 1)
        for c in "#;":  # inline comment (Darknet would choke on it silently)
            if c in value:
                value = value.split(c, 1)[0]
        # option_find returns the first match: a repeated key keeps its first value
        current.options.setdefault(key.lower(), (value, lineno))
    if not sections:
        raise CfgError("no sections found: is this a Darknet .cfg?", file=path)
    if sections[0].type != "net":
        raise CfgError(f"the first section must be [net], found [{sections[0].name}]", file=path,
                       line=sections[0].line)
    layers = sections[1:]
    for s in layers:
        if s.type == "net":
            raise CfgError("a second [net] section", file=path, line=s.line)
    if not layers:
        raise CfgError("the cfg has [net] but no layers", file=path)
    return Cfg(path, sections[0], layers)
