"""Image preprocessing exactly as Darknet's ``detector test`` does it.

Darknet (AlexeyAB, ``src/detector.c`` ``test_detector``) does, for every image:

1. ``load_image(path, 0, 0, 3)``: with OpenCV builds ``cv::imread(path, IMREAD_COLOR)``
   (so EXIF orientation is applied, grey/alpha images become 3-channel), BGR -> RGB, then
   ``mat_to_image``: ``u8 / 255.0f`` into a planar float32 C x H x W image.
2. ``letterbox_image(im, net.w, net.h)`` when ``letter_box=1`` in ``[net]`` or the
   ``-letter_box`` flag is given, else ``resize_image(im, net.w, net.h)``. Both work on
   the float image (conversion to float happens *before* resizing).

``resize_image`` (``src/image.c``) is Darknet's own separable bilinear filter: a
horizontal pass into a ``new_w x im.h`` "part" image, then a vertical pass, with
``w_scale = (float)(im.w-1)/(w-1)`` and ``h_scale = (float)(im.h-1)/(h-1)``, all in
float32. Its edge handling is reproduced bit for bit:

* the last output column copies the last input column (no interpolation);
* every output row first gets ``(1-dy)*part[iy]``; the ``dy*part[iy+1]`` term is added
  afterwards, except on the last output row, which keeps only ``(1-dy)*part[iy]``;
* a same-size resize is a plain copy.

No mean/std normalisation: the network sees RGB in [0, 1].
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import ckernels
from .errors import DarkconvError, DarkconvWarning, ImageError
from .geometry import letterbox_geometry

__all__ = ["list_images", "load_image", "load_images", "to_float", "resize", "letterbox", "letterbox_geometry",
           "preprocess", "preprocess_into", "preprocess_batch"]

_F32 = np.float32


# --------------------------------------------------------------------------- loading
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _read_list(p: Path) -> list[Path]:
    """An image list (.txt): one path per line, UTF-8; unreadable or undecodable lists are one-line errors."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read the image list: {e.strerror or e}", file=str(p)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ImageError("the image list is not UTF-8 text (byte 0x%02x): save it as UTF-8, one path per line"
                         % data[e.start], file=str(p), line=data.count(b"\n", 0, e.start) + 1) from None
    if "\x00" in text:
        raise ImageError("the image list contains a NUL byte: it must be text, one path per line", file=str(p),
                         line=text.count("\n", 0, text.index("\x00")) + 1)
    return [Path(line.strip()) for line in text.splitlines() if line.strip()]


def list_images(paths) -> list[Path]:
    """Expand files, directories (their images, sorted) and text files listing one path per line."""
    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if p.is_dir():
            try:
                out += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS)
            except OSError as e:
                raise ImageError(f"cannot list the folder: {e.strerror or e}", file=str(p)) from None
        elif p.suffix.lower() == ".txt" and p.is_file():
            out += _read_list(p)
        else:
            out.append(p)
    return out


#: images above this many pixels are refused before decoding (``DARKCONV_MAX_IMAGE_PIXELS`` overrides)
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_PIXELS_ENV = "DARKCONV_MAX_IMAGE_PIXELS"
# libjpeg lines after which the image is not what the file meant; others (unknown JFIF revision,
# libpng's "iCCP: known incorrect sRGB profile") leave a good image and become warnings
_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters", "Inconsistent progression",
            "Application transferred too many scanlines", "Bogus ", "Huffman", "libpng error")


def max_image_pixels() -> float:
    """The pixel limit: ``DARKCONV_MAX_IMAGE_PIXELS`` (a number, or ``inf``) or 100 megapixels."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1:
        raise DarkconvError(f"{MAX_PIXELS_ENV}={text!r} must be a number of pixels (e.g. 250000000, or inf)")
    return value


def load_image(path, *, max_pixels: float | None = None) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB, as Darknet's OpenCV loader does
    (``cv::imread(path, IMREAD_COLOR)``: EXIF orientation applied, BGR -> RGB; decoded from memory).

    Raises :class:`ImageError` (one line: the path and the reason) when the file is missing,
    unreadable, empty, larger than ``max_pixels`` (default :func:`max_image_pixels`, read from the
    header before decoding), corrupt (libjpeg's own complaint, which is not printed) or undecodable.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ImageError("image file not found", file=p)
    if os.path.isdir(p):
        raise ImageError("is a directory, not an image file", file=p)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(f"cannot read the file ({exc.strerror or exc})", file=p) from None
    if not data:
        raise ImageError("file is empty", file=p)
    if data.startswith(b"version https://git-lfs"):
        raise ImageError("file is a Git LFS pointer, not the image itself (run `git lfs pull`)",
                         file=p)
    from .imagesize import header_size

    limit = max_image_pixels() if max_pixels is None else max_pixels
    size = header_size(data)
    if size is not None and size[0] * size[1] > limit:
        w, h = size
        raise ImageError(f"the image is {w}x{h} ({w * h / 1e6:,.0f} megapixels), above darkconv's limit of "
                         f"{limit / 1e6:,.0f} megapixels; it was not decoded (set {MAX_PIXELS_ENV} to raise "
                         "the limit)", file=p)
    import cv2  # decoding only

    from .native_stderr import run_captured

    buf = np.frombuffer(data, np.uint8)
    rgb_flag = getattr(cv2, "IMREAD_COLOR_RGB", None)     # OpenCV >= 4.10: the decoder writes RGB itself
    flag = cv2.IMREAD_COLOR if rgb_flag is None else rgb_flag
    try:
        im, lines = run_captured(lambda: cv2.imdecode(buf, flag))
    except cv2.error as exc:  # e.g. above OpenCV's own OPENCV_IO_MAX_IMAGE_PIXELS
        raise ImageError(f"OpenCV cannot decode the file ({_one_line(str(exc))})", file=p) from None
    corrupt = [ln for ln in lines if ln.startswith(_CORRUPT)]
    if corrupt:
        raise ImageError(f"corrupt image data ({corrupt[0].strip()}): re-encode or replace the file", file=p)
    if im is None or im.ndim != 3 or im.shape[2] != 3 or im.size == 0:
        raise ImageError("cannot decode the image (corrupt, truncated or unsupported format)",
                         file=p)
    if lines:
        import warnings

        for ln in lines:
            warnings.warn(DarkconvWarning(f"{p}: {ln.strip()} (the image was decoded)"), stacklevel=2)
    if rgb_flag is not None:                              # the same pixels as IMREAD_COLOR, in RGB order
        return im
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)  # a byte swap, as [:, :, ::-1], 30x faster than numpy's copy


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def load_images(paths) -> list:
    """``load_image`` of each path, decoded in parallel (OpenCV releases the GIL); an unreadable
    file gives its :class:`ImageError` in its place instead of an image."""
    def one(p):
        try:
            return load_image(p)
        except ImageError as e:
            return e

    paths = list(paths)
    return list(_pool().map(one, paths)) if len(paths) > 1 else [one(p) for p in paths]


def to_float(image_u8: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W float32 in [0, 1] (Darknet's ``mat_to_image``: u8 / 255.0f)."""
    im = _check_u8_hwc(image_u8)
    return np.ascontiguousarray(im.transpose(2, 0, 1)).astype(_F32) / _F32(255.0)


def _check_u8_hwc(image) -> np.ndarray:
    im = np.asarray(image)
    if im.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 RGB image, got dtype {im.dtype}")
    if im.ndim == 2:
        im = np.repeat(im[:, :, None], 3, axis=2)  # grey -> 3 channels, as IMREAD_COLOR
    if im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 RGB image, got shape {im.shape}")
    if im.shape[0] < 1 or im.shape[1] < 1:
        raise ValueError(f"empty image of shape {im.shape}")
    return im


# --------------------------------------------------------------------------- layout helpers
def _to_chw(image: np.ndarray, layout: str) -> tuple[np.ndarray, str]:
    """View ``image`` as (C, H, W); returns the view and the layout it came in."""
    im = np.asarray(image)
    if im.ndim == 2:
        return im[None], "hw"
    if im.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {im.shape}")
    if layout == "auto":
        c_first, c_last = im.shape[0] <= 4, im.shape[2] <= 4
        if c_first and not c_last:
            layout = "chw"
        elif c_last and not c_first:
            layout = "hwc"
        else:
            raise ValueError(f"cannot tell whether shape {im.shape} is CHW or HWC; "
                             "pass layout='chw' or layout='hwc'")
    if layout == "chw":
        return im, "chw"
    if layout == "hwc":
        return im.transpose(2, 0, 1), "hwc"
    raise ValueError(f"layout must be 'auto', 'chw' or 'hwc', not {layout!r}")


def _from_chw(im: np.ndarray, layout: str) -> np.ndarray:
    if layout == "hw":
        return im[0]
    if layout == "hwc":
        return np.ascontiguousarray(im.transpose(1, 2, 0))
    return im


# --------------------------------------------------------------------------- resize
def _resize_chw(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Darknet ``resize_image`` on a float32 (C, H, W) array, vectorised, bit-exact."""
    c, ih, iw = im.shape
    if iw == w and ih == h:
        return im.astype(_F32, copy=True)
    if w < 0 or h < 0:
        raise ValueError(f"resize target must be non-negative, got {w}x{h}")
    if w == 0 or h == 0 or c == 0:
        return np.zeros((c, h, w), _F32)
    one = _F32(1.0)

    # horizontal pass: (C, ih, iw) -> part (C, ih, w)
    if iw == 1:
        part = np.repeat(im[:, :, :1], w, axis=2)
    else:
        # (float)(im.w - 1) / (w - 1); w == 1 never uses the scale (last column rule)
        w_scale = _F32(iw - 1) / _F32(w - 1) if w > 1 else _F32(0.0)
        sx = np.arange(w, dtype=_F32) * w_scale            # c * w_scale, float32
        ix = sx.astype(np.int64)                           # (int) sx, truncation
        dx = sx - ix.astype(_F32)
        ix0 = np.minimum(ix, iw - 1)
        ix1 = np.minimum(ix + 1, iw - 1)                   # Darknet never reads past the edge
        part = (one - dx) * im[:, :, ix0] + dx * im[:, :, ix1]
        part[:, :, w - 1] = im[:, :, iw - 1]               # last column: plain copy

    # vertical pass: part (C, ih, w) -> resized (C, h, w)
    # h == 1 would make Darknet divide by zero (undefined); darkconv uses scale 0 there.
    h_scale = _F32(ih - 1) / _F32(h - 1) if h > 1 else _F32(0.0)
    sy = np.arange(h, dtype=_F32) * h_scale
    iy = sy.astype(np.int64)
    dy = sy - iy.astype(_F32)
    iy0 = np.minimum(iy, ih - 1)
    out = (one - dy)[None, :, None] * part[:, iy0, :]     # set_pixel: (1-dy) * part[iy]
    if ih != 1 and h > 1:
        rows = slice(0, h - 1)                             # the last row gets no second term
        iy1 = np.minimum(iy[rows] + 1, ih - 1)
        out[:, rows, :] += dy[rows][None, :, None] * part[:, iy1, :]   # add_pixel
    return out


def resize(image: np.ndarray, w: int, h: int, layout: str = "auto") -> np.ndarray:
    """Darknet's ``resize_image`` (``src/image.c``): float32 separable bilinear.

    ``image`` is float (C x H x W, H x W x C or H x W); the result has the same layout,
    size ``w`` x ``h``, dtype float32. Equal to a loop transcription of the C code bit for bit.
    """
    chw, lay = _to_chw(image, layout)
    out = _resize_chw(np.asarray(chw, dtype=_F32), int(w), int(h))
    return _from_chw(out, lay)


# --------------------------------------------------------------------------- letterbox
def _letterbox_chw(im: np.ndarray, w: int, h: int) -> np.ndarray:
    c, ih, iw = im.shape
    new_w, new_h, dx, dy = letterbox_geometry(iw, ih, w, h)
    boxed = np.full((c, h, w), 0.5, dtype=_F32)            # fill_image(boxed, .5)
    if new_w <= 0 or new_h <= 0:
        return boxed
    resized = _resize_chw(im, new_w, new_h)
    # embed_image: set_pixel silently ignores pixels outside the canvas
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + new_w, w), min(dy + new_h, h)
    if x1 > x0 and y1 > y0:
        boxed[:, y0:y1, x0:x1] = resized[:, y0 - dy:y1 - dy, x0 - dx:x1 - dx]
    return boxed


def letterbox(image: np.ndarray, w: int, h: int, layout: str = "auto") -> np.ndarray:
    """Darknet's ``letterbox_image``: aspect-preserving ``resize_image`` centred on a 0.5 canvas."""
    chw, lay = _to_chw(image, layout)
    out = _letterbox_chw(np.asarray(chw, dtype=_F32), int(w), int(h))
    return _from_chw(out, lay)


# --------------------------------------------------------------------------- pipeline
def _size(size) -> tuple[int, int]:
    try:
        w, h = size
        w, h = int(w), int(h)
    except (TypeError, ValueError):
        raise ValueError(f"size must be (width, height), got {size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive, got {w}x{h}")
    return w, h


def preprocess(image: np.ndarray, size: Sequence[int], letterbox: bool = False) -> np.ndarray:
    """uint8 H x W x 3 RGB -> float32 (3, H, W) network input, exactly as ``detector test``.

    ``size`` is the network (width, height). ``letterbox`` selects ``letterbox_image``
    (``letter_box=1`` / ``-letter_box``), otherwise ``resize_image`` stretches.
    """
    w, h = _size(size)
    out = np.empty((3, h, w), _F32)
    preprocess_into(image, (w, h), letterbox, out)
    return out


def preprocess_into(image: np.ndarray, size: Sequence[int], letterbox: bool, out: np.ndarray) -> None:
    """:func:`preprocess` written into ``out`` (a float32 (3, H, W) array, e.g. one slot of a batch).

    The uint8 fast path of ``mat_to_image`` + ``resize_image`` (+ ``embed_image`` for letterbox): the compiled
    kernel ``darkconv._cresize`` where it was built (one pass, no GIL, only the rows the vertical pass reads),
    otherwise NumPy (``u8 / 255.0f`` through a 256-entry table, the horizontal pass on gathered columns with
    per-column weights, the vertical pass on gathered rows). Both round each float32 product and sum where
    Darknet's C code rounds it: the same numbers as :func:`resize` (tests/test_preprocess.py checks both
    kernels against the loop transcription). :func:`kernel` says which one runs.
    """
    w, h = _size(size)
    im = _check_u8_hwc(image)
    ih, iw = im.shape[:2]
    if letterbox:
        new_w, new_h, dx, dy = letterbox_geometry(iw, ih, w, h)
    else:
        new_w, new_h, dx, dy = w, h, 0, 0
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + new_w, w), min(dy + new_h, h)
    if new_w <= 0 or new_h <= 0 or x1 <= x0 or y1 <= y0:   # nothing of the picture lands on the canvas
        out.fill(_F32(0.5))
        return
    whole = (x0, y0, x1, y1) == (dx, dy, dx + new_w, dy + new_h)   # embed_image: the whole picture fits
    if letterbox and whole:                                # fill_image(boxed, .5) around the picture
        out[:, :y0] = out[:, y1:] = _F32(0.5)
        out[:, y0:y1, :x0] = out[:, y0:y1, x1:] = _F32(0.5)
    elif letterbox:
        out.fill(_F32(0.5))
    c_kernel = (_C is not None and out.dtype == _F32 and out.flags.c_contiguous and out.flags.aligned
                and out.shape == (3, h, w))
    if c_kernel and whole:
        src = im if im.flags.c_contiguous else np.ascontiguousarray(im)
        _C.resize_u8(src, ih, iw, out, h, w, new_w, new_h, dx, dy)
    elif whole:
        _resize_u8_into(im, new_w, new_h, out[:, y0:y1, x0:x1])
    else:                                                  # pixels off the canvas are dropped
        tmp = preprocess(im, (new_w, new_h))
        out[:, y0:y1, x0:x1] = tmp[:, y0 - dy:y1 - dy, x0 - dx:x1 - dx]


_C = ckernels.load("_cresize")


def kernel() -> str:
    """Which resize kernel :func:`preprocess_into` runs: ``"c"`` (``darkconv._cresize``) or ``"numpy"``."""
    return "c" if _C is not None else "numpy"


#: u8 -> float32 exactly as ``mat_to_image``: ``(float)u8 / 255.0f``
_U8_TO_F32 = (np.arange(256, dtype=_F32) / _F32(255.0)).reshape(1, 256)
_SCRATCH_MAX_BYTES = 64 << 20                              # larger scratch is not kept between images
_local = None


@functools.lru_cache(maxsize=256)
def _axis_table(n_in: int, n_out: int):
    """Darknet's sample positions for one axis: (i0, i1, 1 - d, d) with ``s = i * ((float)(n_in-1)/(n_out-1))``,
    ``i0 = (int)s``, ``d = s - i0`` (all float32); indices clamped to the edge (Darknet never reads past it)."""
    scale = _F32(n_in - 1) / _F32(n_out - 1) if n_out > 1 else _F32(0.0)
    s = np.arange(n_out, dtype=_F32) * scale
    i = s.astype(np.int64)
    d = s - i.astype(_F32)
    i0 = np.minimum(i, n_in - 1)
    i1 = np.minimum(i + 1, n_in - 1)
    for a in (i0, i1, d):
        a.setflags(write=False)
    one_minus = _F32(1.0) - d
    one_minus.setflags(write=False)
    return i0, i1, one_minus, d


def _scratch(name: str, shape) -> np.ndarray:
    global _local
    if _local is None:
        import threading

        _local = threading.local()
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    nbytes = 4 * int(np.prod(shape))
    if nbytes > _SCRATCH_MAX_BYTES:
        return np.empty(shape, _F32)
    buf = cache.get(name)
    if buf is None or buf.size < np.prod(shape):
        buf = cache[name] = np.empty(max(int(np.prod(shape)), 1), _F32)
    return buf[:int(np.prod(shape))].reshape(shape)


def _resize_u8_into(im: np.ndarray, w: int, h: int, out: np.ndarray) -> None:
    """``resize_image(mat_to_image(im), w, h)`` for HxWx3 uint8 ``im``, written into float32 (3, h, w) ``out``."""
    import cv2

    ih, iw = im.shape[:2]
    v = _scratch("v", (3, ih, iw))
    for k in range(3):                                      # planar float image, as mat_to_image
        res = cv2.LUT(cv2.extractChannel(im, k), _U8_TO_F32, dst=v[k])
        if not np.shares_memory(res, v):
            v[k] = res
    if iw == w and ih == h:                                 # Darknet: a plain copy
        out[...] = v
        return
    # horizontal pass -> part (3, ih, w). iw == w is that pass with weights (1, 0): the same numbers.
    if iw == w:
        part = v
    elif iw == 1:
        part = _scratch("part", (3, ih, w))
        part[...] = v[:, :, :1]
    else:
        i0, i1, a, b = _axis_table(iw, w)
        v2 = v.reshape(3 * ih, iw)
        g0 = _scratch("part", (3 * ih, w))
        g1 = _scratch("g1", (3 * ih, w))
        np.take(v2, i0, axis=1, out=g0, mode="clip")
        np.take(v2, i1, axis=1, out=g1, mode="clip")
        np.multiply(g0, a, out=g0)                          # (1-dx) * im[ix]
        np.multiply(g1, b, out=g1)                          # dx * im[ix+1]
        np.add(g0, g1, out=g0)
        g0[:, w - 1] = v2[:, iw - 1]                        # the last column: a plain copy
        part = g0.reshape(3, ih, w)
    # vertical pass -> (3, h, w). ih == h is that pass with weights (1, 0): the same numbers.
    if ih == h:
        out[...] = part
        return
    j0, j1, c, d = _axis_table(ih, h)
    dst = out if out.flags.c_contiguous else _scratch("out", (3, h, w))
    np.take(part, j0, axis=1, out=dst, mode="clip")
    np.multiply(dst, c[None, :, None], out=dst)             # set_pixel: (1-dy) * part[iy]
    if ih != 1 and h > 1:                                   # add_pixel, except on the last row
        r1 = _scratch("g1", (3, h - 1, w))
        np.take(part, j1[:h - 1], axis=1, out=r1, mode="clip")
        np.multiply(r1, d[:h - 1, None], out=r1)
        np.add(dst[:, :h - 1], r1, out=dst[:, :h - 1])
    if dst is not out:
        out[...] = dst


_POOL = None


def _pool():
    """A small shared thread pool for :func:`load_images` (OpenCV releases the GIL while decoding)."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1), thread_name_prefix="darkconv-pre")
    return _POOL


def preprocess_batch(images: Iterable[np.ndarray], size: Sequence[int],
                     letterbox: bool = False) -> np.ndarray:
    """Several uint8 RGB images -> float32 (N, 3, H, W)."""
    w, h = _size(size)
    images = list(images)
    out = np.empty((len(images), 3, h, w), _F32)
    for i, im in enumerate(images):
        preprocess_into(im, (w, h), letterbox, out[i])
    return out


class _CallableModule(type(os)):
    """``darkconv.preprocess(image, size, letterbox)`` calls :func:`preprocess`, while
    ``darkconv.preprocess.load_image`` etc. stay reachable as module attributes."""

    def __call__(self, image, size, letterbox=False):
        return preprocess(image, size, letterbox)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
