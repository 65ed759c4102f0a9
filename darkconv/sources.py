"""Where frames come from: image files, folders, ``.txt`` lists, video files, streams and cameras.

Darknet's own inputs, mirrored: ``detector test`` reads image files (``load_image``: ``cv::imread``,
see :func:`darkconv.preprocess.load_image`, which keeps darkconv's pixel limit and corrupt-JPEG checks);
``detector demo`` opens a video file or stream with ``cv::VideoCapture(path)``
(``get_capture_video_stream``, ``src/image_opencv.cpp``) or a webcam by index (``get_capture_webcam``),
takes the output fps from ``CAP_PROP_FPS`` (25 when unknown: ``get_stream_fps_cpp_cv``) and treats any
path with ``://`` as a live stream (``is_live_stream``, ``src/utils.c``) on which frames that arrive
while the detector is busy are skipped (``consume_frame`` in ``src/demo.c``).

``open_source(spec)`` tells the kinds apart by content, not by name alone: a file whose first bytes are
an MP4/MOV, AVI, Matroska/WebM, MPEG, FLV, ASF or Ogg container is a video whatever its extension,
so a video is never reported as a corrupt image.
"""
from __future__ import annotations

import math
import os
import sys
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DarkconvError, ImageError

__all__ = ["Frame", "Source", "open_source", "classify", "VIDEO_EXTS", "DEFAULT_FPS"]

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
              ".flv", ".wmv", ".asf", ".ogv", ".3gp", ".mjpeg", ".mjpg", ".h264", ".264", ".hevc", ".h265")
DEFAULT_FPS = 25.0  # Darknet's get_stream_fps_cpp_cv default
OPEN_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0
_CAMERA_RE = re.compile(r"^\d{1,3}$")


@dataclass
class Frame:
    """One picture from a source: ``index`` is its position in the source (0-based: the file's place in the
    list, the video's frame number), ``name`` what to call it in messages, ``image`` HxWx3 uint8 RGB,
    ``path`` the file it came from (None for streams and cameras), ``fps`` the source's frame rate (videos)."""

    index: int
    name: str
    image: np.ndarray
    path: Path | None = None
    fps: float | None = None


class ImageFileFrame(Frame):
    """A frame of an image file, decoded on first access of ``image`` (in the pipeline's preprocessing
    threads, so decoding runs in parallel with inference); an unreadable file raises its
    :class:`ImageError` there (``darkconv.pipeline.stream_detect`` turns it into that frame's result)."""

    def __init__(self, index: int, path, source: "Source | None" = None):
        path = Path(path)
        self.index, self.name, self.path, self.fps = index, str(path), path, None
        self._source, self._image, self._error = source, None, None
        self._lock = threading.Lock()

    @property
    def image(self) -> np.ndarray:
        with self._lock:
            if self._image is None and self._error is None:
                t0 = time.perf_counter()
                try:
                    self._image = _load_image_file(self.path)
                except ImageError as e:
                    self._error = e
                finally:
                    if self._source is not None:
                        self._source._add_decode(time.perf_counter() - t0)
            if self._error is not None:
                raise self._error
            return self._image

    @image.setter
    def image(self, value):
        self._image = value

    def __repr__(self) -> str:
        return f"Frame(index={self.index}, name={self.name!r}, path={self.path!r})"


# --------------------------------------------------------------------------- what a path is
_VIDEO_MAGIC = (
    (lambda d: d[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip") and d[4:8] != b"", "MP4/QuickTime"),
    (lambda d: d[:4] == b"RIFF" and d[8:12] == b"AVI ", "AVI"),
    (lambda d: d[:4] == b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (lambda d: d[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"), "MPEG"),
    (lambda d: len(d) > 188 and d[0] == 0x47 and d[188] == 0x47, "MPEG-TS"),
    (lambda d: d[:3] == b"FLV", "FLV"),
    (lambda d: d[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "ASF/WMV"),
    (lambda d: d[:4] == b"OggS", "Ogg"),
)
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"GIF8", b"P1", b"P2", b"P3", b"P4",
                b"P5", b"P6")


def _sniff(path: Path) -> str | None:
    """'video', 'image' or None (unknown / unreadable) from a file's first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if any(test(head) for test, _ in _VIDEO_MAGIC):
        return "video"
    return None


def classify(spec) -> str:
    """What ``spec`` (one command-line input) is: 'camera' (a number such as ``0``, or ``/dev/videoN``),
    'stream' (anything with ``://``, as Darknet's ``is_live_stream``), 'video' (a video file, by content,
    else by extension), 'images' (an image file, a folder of images or a ``.txt`` list)."""
    s = os.fspath(spec)
    if "://" in s:
        return "stream"
    p = Path(s)
    if _CAMERA_RE.match(s) and not p.exists():
        return "camera"
    if s.startswith("/dev/video"):
        return "camera"
    if p.is_dir() or (p.suffix.lower() == ".txt" and p.is_file()):
        return "images"
    if p.is_file():
        kind = _sniff(p)
        if kind is not None:
            return "video" if kind == "video" else "images"
    return "video" if p.suffix.lower() in VIDEO_EXTS else "images"


def _load_image_file(path: Path) -> np.ndarray:
    from .preprocess import load_image

    try:
        return load_image(path)
    except ImageError:
        if Path(path).is_file() and _sniff(Path(path)) == "video":
            raise ImageError("is a video file, not an image: give it on its own "
                             "(darkconv detect MODEL video.mp4 --out annotated.mp4)", file=str(path)) from None
        raise


# --------------------------------------------------------------------------- sources
class Source:
    """An iterable of :class:`Frame` (and a context manager that releases the file/stream/camera).

    ``kind``: 'images' | 'video' | 'stream' | 'camera'; ``fps``: frames per second of a video/stream
    (None for images or when the container does not say); ``size``: (width, height) of a video/stream
    (None for images); ``total``: how many frames iterating will give at most (None when unknown: a stream,
    a camera); ``name``: the input as given; ``decode_seconds``: time spent decoding so far; ``live``: frames
    arrive in real time (a stream or camera: frames that come while the detector is busy are skipped).
    """

    kind = "images"
    live = False

    def __init__(self, name: str, every: int, max_frames: int | None):
        if int(every) < 1:
            raise DarkconvError(f"--every must be >= 1, not {every}")
        if max_frames is not None and int(max_frames) < 1:
            raise DarkconvError(f"--max-frames must be >= 1, not {max_frames}")
        self.name, self.every, self.max_frames = name, int(every), (None if max_frames is None else int(max_frames))
        self.fps: float | None = None
        self.size: tuple[int, int] | None = None
        self.total: int | None = None
        self.decode_seconds = 0.0
        self.frames_read = 0  # frames given out so far
        self._decode_lock = threading.Lock()
        self._closed = threading.Event()

    def _add_decode(self, dt: float) -> None:
        with self._decode_lock:
            self.decode_seconds += dt

    def __iter__(self):
        raise NotImplementedError

    def stop(self) -> None:
        """Ask iteration to end at the next frame (safe from any thread, e.g. a signal handler)."""
        self._closed.set()

    def close(self) -> None:
        self._closed.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def describe(self) -> str:
        return self.name


class ImageSource(Source):
    """Image files (folders expanded to their images, sorted; ``.txt`` lists read one path per line)."""

    kind = "images"

    def __init__(self, paths, every=1, max_frames=None):
        from .preprocess import list_images

        paths = list(paths)
        super().__init__(", ".join(map(str, paths)), every, max_frames)
        self.files = list_images(paths)
        self.selected = [(i, p) for i, p in enumerate(self.files)][::self.every][:self.max_frames]
        self.total = len(self.selected)

    def __iter__(self):
        for i, p in self.selected:
            if self._closed.is_set():
                return
            self.frames_read += 1
            yield ImageFileFrame(i, Path(p), self)

    def describe(self) -> str:
        return f"{self.total} image(s)"


class VideoSource(Source):
    """A video file, stream or camera through OpenCV's ``VideoCapture`` (FFmpeg; V4L2 for cameras).

    Opened (and its first frame read) when created, so a missing file, an unreachable stream or an absent
    camera is a one-line error before any model is loaded. ``live`` (default: streams and cameras, as
    Darknet) reads in a background thread that keeps only the newest frame, so a detector slower than the
    stream skips frames instead of falling behind; ``Frame.index`` stays the stream's own frame number.
    """

    def __init__(self, spec, kind: str, every=1, max_frames=None, live: bool | None = None,
                 open_timeout: float = OPEN_TIMEOUT_S, read_timeout: float = READ_TIMEOUT_S):
        super().__init__(os.fspath(spec), every, max_frames)
        self.kind = kind
        self.path = Path(spec) if kind == "video" else None
        self.live = (kind in ("stream", "camera")) if live is None else bool(live)
        self.frame_count: int | None = None  # a video file's own count (its header's; None when it has none)
        self.dropped = 0  # live: frames skipped because the consumer was busy
        self.ended_early: int | None = None  # a video that stopped before its header's count: frames decoded
        self._first = None
        self._lock = threading.Lock()  # one call into the capture at a time (read vs release)
        self._cap = self._open(spec, open_timeout, read_timeout)
        first = self._read(retrieve=True)
        if first is None:
            self._release()
            raise self._error("opened, but no frame could be decoded (corrupt file or unsupported codec)")
        self._first = first
        h, w = first.shape[:2]
        self.size = (w, h)
        import cv2

        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and math.isfinite(fps) and 0 < fps < 1000 else None
        if kind == "video":
            n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            if n > 0:
                self.frame_count = n
                self.total = len(range(0, n, self.every))
                if self.max_frames is not None:
                    self.total = min(self.total, self.max_frames)

    # -- opening
    def _error(self, msg: str) -> DarkconvError:
        if self.kind == "camera":
            return DarkconvError(f"camera {self.name}: {msg}")
        if self.kind == "stream":
            return DarkconvError(f"stream {self.name}: {msg}")
        return ImageError(msg, file=self.name)

    def _open(self, spec, open_timeout, read_timeout):
        import cv2

        from .native_stderr import run_silenced

        s = os.fspath(spec)
        if self.kind == "camera":
            index = int(s) if _CAMERA_RE.match(s) else None
            dev = f"/dev/video{index}" if index is not None else s
            if sys.platform.startswith("linux") and not os.path.exists(dev):  # V4L2 names; macOS has none
                raise self._error(f"no such camera ({dev} does not exist on this machine); give a video file "
                                  "or a stream URL instead, or check the camera's index with `v4l2-ctl --list-devices`")
            target = index if index is not None else s
            cap, text = run_silenced(lambda: cv2.VideoCapture(target))
            if not cap.isOpened():
                raise self._error(f"cannot open the camera {dev} ({_reason(text) or 'busy, or no permission'})")
            return cap
        if self.kind == "video":
            p = Path(s)
            if not p.exists():
                raise self._error("video file not found")
            if p.is_dir():
                raise self._error("is a folder, not a video file")
            try:
                if p.stat().st_size == 0:
                    raise self._error("file is empty")
                with open(p, "rb"):
                    pass
            except OSError as e:
                raise self._error(f"cannot read the file ({e.strerror or e})") from None
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_timeout * 1000)]
        cap, text = run_silenced(lambda: cv2.VideoCapture(s, cv2.CAP_FFMPEG, params))
        if not cap.isOpened():
            why = _reason(text)
            if self.kind == "stream":
                raise self._error(f"cannot open the stream ({why or 'unreachable, refused, or not a video'}; "
                                  f"waited up to {open_timeout:g} s)")
            raise self._error(f"cannot open the video ({why + ': ' if why else ''}corrupt, truncated, or a "
                              "codec this OpenCV build cannot decode)")
        return cap

    # -- reading
    def _read(self, retrieve: bool) -> np.ndarray | None:
        """The next frame as RGB (``retrieve``), or just advance past it; None at the end."""
        t0 = time.perf_counter()
        with self._lock:
            if self._cap is None:
                return None
            if not retrieve:
                ok = self._cap.grab()
                self._add_decode(time.perf_counter() - t0)
                return np.empty(0) if ok else None
            ok, bgr = self._cap.read()
        if not ok or bgr is None or bgr.size == 0:
            return None
        if bgr.ndim == 2:
            bgr = np.repeat(bgr[:, :, None], 3, axis=2)
        rgb = np.ascontiguousarray(bgr[:, :, 2::-1])
        self._add_decode(time.perf_counter() - t0)
        return rgb

    def _frames(self):
        """(index, rgb) for every frame the source gives, honouring --every (skipped frames are only grabbed)."""
        index = 0
        first, self._first = self._first, None
        if first is not None:
            yield 0, first
            index = 1
        while not self._closed.is_set():
            want = index % self.every == 0
            im = self._read(retrieve=want)
            if im is None:
                return
            if want:
                yield index, im
            index += 1

    def _make(self, index, im) -> Frame:
        name = f"{self.name}:{index + 1}" if self.kind == "video" else f"{self.kind} {self.name} frame {index + 1}"
        return Frame(index, name, im, self.path, self.fps)

    def __iter__(self):
        it = self._live() if self.live else self._frames()
        last = -1
        for index, im in it:
            if self.max_frames is not None and self.frames_read >= self.max_frames:
                break
            self.frames_read += 1
            last = index
            yield self._make(index, im)
        if (self.kind == "video" and self.frame_count and not self._closed.is_set()
                and (self.max_frames is None or self.frames_read < self.max_frames)
                and last + self.every < self.frame_count - 1):
            self.ended_early = last + 1  # the header promised more frames than could be decoded

    def _live(self):
        """A reader thread keeps the newest wanted frame; the consumer takes it (older ones are dropped)."""
        slot: list = []
        cond = threading.Condition()
        done = threading.Event()
        failure: list = []

        def reader():
            try:
                for item in self._frames():
                    with cond:
                        if slot:
                            self.dropped += 1
                            slot.clear()
                        slot.append(item)
                        cond.notify_all()
                    if self._closed.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                failure.append(e)
            finally:
                done.set()
                with cond:
                    cond.notify_all()

        th = threading.Thread(target=reader, name="darkconv-source-reader", daemon=True)
        th.start()
        try:
            while True:
                with cond:
                    while not slot and not done.is_set() and not self._closed.is_set():
                        cond.wait(0.1)
                    if slot:
                        item = slot.pop()
                    elif failure:
                        raise failure[0]
                    else:
                        return
                yield item
        finally:
            self._closed.set()
            th.join(timeout=READ_TIMEOUT_S + 1)

    def _release(self) -> None:
        with self._lock:
            if self._cap is not None:
                self._cap.release()
                self._cap = None

    def close(self) -> None:
        super().close()
        self._release()

    def describe(self) -> str:
        w, h = self.size
        fps = f"{self.fps:g} fps" if self.fps else "fps unknown"
        n = f", {self.frame_count} frames" if self.frame_count else ""
        return f"{self.kind} {self.name} ({w}x{h}, {fps}{n})"


def _reason(text: bytes | str) -> str:
    """The most telling line OpenCV/FFmpeg printed while failing to open (e.g. 'moov atom not found')."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = []
    for ln in text.splitlines():
        ln = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", ln.strip())      # "[mov,mp4,... @ 0x55..] "
        ln = re.sub(r"^\[\s*(WARN|ERROR|INFO)[^\]]*\]\s*global \S+ \S+ ", "", ln)  # OpenCV's log prefix
        if ln and "backend is generally available" not in ln:
            lines.append(ln)
    return lines[0][:160] if lines else ""


def open_source(spec, *, every: int = 1, max_frames: int | None = None, live: bool | None = None,
                open_timeout: float = OPEN_TIMEOUT_S) -> Source:
    """A :class:`Source` for ``spec``: one string/path, or a list of them.

    Image files, folders and ``.txt`` lists (any number of them) make one 'images' source; a video file,
    stream URL (``rtsp://``, ``http(s)://``, ``udp://``...) or camera (``0``, ``/dev/video0``) must come
    alone. ``every``: take every N-th frame (or file); ``max_frames``: stop after that many frames.
    ``live``: skip frames when the consumer is slower than the source (default: for streams and cameras).
    Errors (missing file, unreadable video, unreachable stream, absent camera) are one-line
    :class:`~darkconv.errors.DarkconvError` s naming the input.
    """
    specs = [spec] if isinstance(spec, (str, Path, os.PathLike)) else list(spec)
    if not specs:
        raise DarkconvError("no input given")
    kinds = [classify(s) for s in specs]
    if all(k == "images" for k in kinds):
        return ImageSource(specs, every, max_frames)
    if len(specs) > 1:
        other = next(s for s, k in zip(specs, kinds) if k != "images")
        raise DarkconvError(f"{other} is a {next(k for k in kinds if k != 'images')}: give one video, stream or "
                            "camera at a time, without other inputs")
    return VideoSource(specs[0], kinds[0], every, max_frames, live=live, open_timeout=open_timeout)
