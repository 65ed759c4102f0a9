"""Image dimensions from the file header, without decoding (so a huge image can be refused first).

A 400 KB PNG can hold 20000x20000 pixels (7.5 GB once decoded and preprocessed): the
header says so in its first bytes. Supported: JPEG, PNG, BMP, GIF, WebP, TIFF, PNM. For
other formats :func:`header_size` returns None and OpenCV's own limit
(``OPENCV_IO_MAX_IMAGE_PIXELS``, 2^30 by default) is the only guard.
"""
from __future__ import annotations

import struct

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an image file's bytes, or None if unknown/unreadable."""
    try:
        for sniff, parse in _PARSERS:
            if data.startswith(sniff):
                return parse(data)
    except (struct.error, IndexError, ValueError):
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        try:
            return _webp(data)
        except (struct.error, IndexError, ValueError):
            return None
    return None


def _png(d: bytes):
    if d[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", d[16:24])


def _jpeg(d: bytes):
    i = 2
    while i + 4 <= len(d):
        if d[i] != 0xFF:
            return None
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", d[i + 2:i + 4])
        if marker in _SOF:
            h, w = struct.unpack(">HH", d[i + 5:i + 9])
            return w, h
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / scan data before any frame header
            return None
        i += 2 + length
    return None


def _bmp(d: bytes):
    (dib,) = struct.unpack("<I", d[14:18])
    if dib == 12:  # BITMAPCOREHEADER
        w, h = struct.unpack("<HH", d[18:22])
    else:
        w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)


def _gif(d: bytes):
    return struct.unpack("<HH", d[6:10])


def _tiff(d: bytes):
    end = "<" if d[:2] == b"II" else ">"
    (offset,) = struct.unpack(end + "I", d[4:8])
    (count,) = struct.unpack(end + "H", d[offset:offset + 2])
    size = {}
    for k in range(count):
        e = d[offset + 2 + 12 * k: offset + 14 + 12 * k]
        tag, typ = struct.unpack(end + "HH", e[:4])
        if tag in (256, 257):
            size[tag] = struct.unpack(end + "H", e[8:10])[0] if typ == 3 else struct.unpack(end + "I", e[8:12])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _pnm(d: bytes):
    tokens, i = [], 2
    while len(tokens) < 2 and i < len(d):
        c = d[i:i + 1]
        if c == b"#":  # comment to end of line
            while i < len(d) and d[i:i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isspace():
            i += 1
        else:
            j = i
            while j < len(d) and d[j:j + 1].isdigit():
                j += 1
            if j == i:
                return None
            tokens.append(int(d[i:j]))
            i = j
    return tuple(tokens) if len(tokens) == 2 else None


def _webp(d: bytes):
    chunk = d[12:16]
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        (b,) = struct.unpack("<I", d[21:25])
        return 1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF)
    if chunk == b"VP8X":
        return 1 + int.from_bytes(d[24:27], "little"), 1 + int.from_bytes(d[27:30], "little")
    return None


_PARSERS = [
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8", _jpeg),
    (b"BM", _bmp),
    (b"GIF87a", _gif), (b"GIF89a", _gif),
    (b"II*\x00", _tiff), (b"MM\x00*", _tiff),
    *[(f"P{k}".encode(), _pnm) for k in range(1, 7)],
]
