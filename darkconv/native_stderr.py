"""Catch what C libraries print on file descriptor 2 during a call (libjpeg's "Corrupt JPEG data ...").

libjpeg, inside OpenCV's decoder, writes its warnings straight to ``stderr`` with fprintf:
no Python or OpenCV log setting reaches them, and they would leak as extra stderr lines
next to darkconv's one-line messages. :func:`run_captured` points fd 2 at a temp file while
decoding, hands the decoder's own lines back to the caller (which turns them into one
:class:`~darkconv.errors.ImageError`), and passes everything else through to the real stderr.

Decodes may run in parallel threads (one process-wide fd 2): captures share one window,
each remembers the byte range written while it ran, and a capture that overlapped another
and saw decoder lines is re-run alone, so that a warning is never blamed on the wrong image.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

#: lines libjpeg / libpng / OpenCV's codecs print on their own (jerror.h JWRN_*/JERR_*, png_warning)
DECODER_LINE = re.compile(
    rb"(Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|Inconsistent progression|"
    rb"Unknown Adobe color transform|Warning: unknown JFIF|Application transferred too many scanlines|"
    rb"Not a JPEG file|Bogus |Unsupported marker|Huffman|libpng (warning|error)|"
    rb"JPEG datastream contains no image|Quantization table 0x)[^\r\n]*")

_DECODER_LINE_EOL = re.compile(DECODER_LINE.pattern + rb"\r?\n?")

_cond = threading.Condition()
_state = {"depth": 0, "solo": False, "solo_waiting": 0, "starts": 0, "file": None, "saved": None, "forwarded": 0}


def _size() -> int:
    return os.fstat(_state["file"].fileno()).st_size


def _read(start: int, end: int) -> bytes:
    return os.pread(_state["file"].fileno(), end - start, start) if end > start else b""


def _open_window() -> None:
    _flush()
    f = tempfile.TemporaryFile(prefix="darkconv-stderr-")
    try:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
    except OSError:
        f.close()
        raise
    _state.update(file=f, saved=saved, forwarded=0)


def _forward(final: bool) -> None:
    """Pass captured bytes that are not decoder lines on to the real stderr (whole lines, or all at the end)."""
    start, end = _state["forwarded"], _size()
    data = _read(start, end)
    if not final:  # keep a partial line for later (a decoder may be in the middle of printing)
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        data = data[:cut + 1] if cut >= 0 else b""
    _state["forwarded"] = start + len(data)
    rest = _DECODER_LINE_EOL.sub(b"", data)
    if rest:
        try:
            os.write(_state["saved"], rest)
        except OSError:
            pass


def _close_window() -> None:
    _flush()
    os.dup2(_state["saved"], 2)
    _forward(final=True)
    os.close(_state["saved"])
    _state["file"].close()
    _state.update(file=None, saved=None)


def _flush() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass


def _run(fn, solo: bool, swallow: bool = False):
    with _cond:
        if solo:
            _state["solo_waiting"] += 1
            while _state["solo"] or _state["depth"]:
                _cond.wait()
            _state["solo_waiting"] -= 1
            _state["solo"] = True
        else:
            while _state["solo"] or _state["solo_waiting"]:
                _cond.wait()
        if _state["depth"] == 0:
            try:
                _open_window()
            except OSError:  # no temp file / no fd to spare: decode uncaptured rather than not at all
                if solo:
                    _state["solo"] = False
                    _cond.notify_all()
                return fn(), b"", True
        _state["depth"] += 1
        _state["starts"] += 1
        ticket, start, alone = _state["starts"], _size(), _state["depth"] == 1
    try:
        result = fn()
    finally:
        _flush()
        with _cond:
            end = _size()
            alone = alone and _state["starts"] == ticket  # no other capture started while this one ran
            text = _read(start, end)
            if swallow:  # solo: nothing else wrote meanwhile that would be lost
                _state["forwarded"] = max(_state["forwarded"], end)
            _state["depth"] -= 1
            if _state["depth"] == 0:
                _close_window()
            else:
                _forward(final=False)
            if solo:
                _state["solo"] = False
            _cond.notify_all()
    return result, text, alone


def run_captured(fn):
    """``fn()`` with fd 2 captured: returns (result, decoder_lines) where decoder_lines are the lines
    that libjpeg/libpng printed during *this* call (other output is passed on to stderr)."""
    result, text, alone = _run(fn, solo=False)
    lines = [m.group(0).decode(errors="replace") for m in DECODER_LINE.finditer(text)]
    if lines and not alone:  # another decode ran meanwhile: run this one alone to know whose lines they are
        result, text, _ = _run(fn, solo=True)
        lines = [m.group(0).decode(errors="replace") for m in DECODER_LINE.finditer(text)]
    return result, lines


def run_silenced(fn):
    """``fn()`` alone with fd 2 captured and *not* passed on: returns (result, everything printed during the
    call). For calls whose native chatter becomes part of a one-line error (FFmpeg opening a video)."""
    result, text, _ = _run(fn, solo=True, swallow=True)
    return result, text
