"""Parse a Darknet ``.cfg`` into typed sections (mirrors ``read_cfg``/``option_find*`` in src/parser.c, src/option_list.c).

Darknet strips every whitespace character of a line, skips lines starting with
``#`` or ``;``, and reads ``key=value`` pairs; numbers are read with ``atoi``/``atof``.
darkconv does the same, also tolerates CRLF and inline comments, and keeps the
line number of every key so that any later error can point at it.
"""
from __future__ import annotations

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

    def int(self, key: str, default: int | None = None) -> int | None:
        if key not in self.options:
            return default
        return self._int(self.options[key][0], key)

    def float(self, key: str, default: float | None = None) -> float | None:
        if key not in self.options:
            return default
        return self._float(self.options[key][0], key)

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
            raise self.error(f"{key}={text!r} is not a number", key)
        return int(m.group(0))

    def _float(self, text: str, key: str) -> float:
        m = _FLOAT.match(text)
        if not m:
            raise self.error(f"{key}={text!r} is not a number", key)
        return float(m.group(0))


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
        line = "".join(line.split())  # Darknet's strip(): removes every whitespace char
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]"):
                raise CfgError(f"malformed section header {line!r}: expected [name]", file=path, line=lineno)
            name = line[1:-1].lower()
            if name not in SECTION_ALIASES:
                known = ", ".join(sorted(set(SECTION_ALIASES.values())))
                raise CfgError(f"unknown section [{name}]: darkconv supports {known}", file=path, line=lineno,
                               layer=max(len(sections) - 1, 0) if sections else None)
            current = Section(SECTION_ALIASES[name], len(sections) - 1, path, lineno, name=name)
            sections.append(current)
            continue
        if current is None:
            raise CfgError(f"option {line!r} before any [section]", file=path, line=lineno)
        if "=" not in line:
            raise CfgError(f"line {line!r} is not key=value", file=path, line=lineno)
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
