"""``darkconv detect``: images, videos, streams or a camera in; Darknet-identical detections out
(drawn images or an annotated video, Darknet's ``-out`` JSON, one line per frame).

Darknet's counterparts: ``detector test -out result.json`` (images: one entry per image with ``frame_id``
and ``filename``, ``src/detector.c``) and ``detector demo -out_filename out.avi -json_file_output f.json``
(videos: one ``{"frame_id", "objects"}`` entry per frame, ``src/demo.c`` + ``detection_to_json`` in
``src/network.c``; the annotated video keeps the source's fps and size). Frames run through
:func:`darkconv.pipeline.stream_detect` (decode, preprocess, inference and postprocess overlap, bounded
queues); outputs are written to temp files and renamed when complete, and Ctrl-C / SIGTERM finishes them
with the frames so far.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DarkconvError, ImageError, InferenceError
from .io import AtomicFile, atomic_write, check_output_path, prepare_output_dir
from .pipeline import Timings, stream_detect
from .postprocess import Detections
from .sources import DEFAULT_FPS, Source, open_source

#: per image/frame, the stdout line names at most this many boxes ("... and N more"); --json has them all
MAX_PRINT = 20
#: at most this many labels are drawn per image (the highest scores); every box is drawn
MAX_LABELS = 300
#: image extensions written as they came (others are written as .jpg)
IMAGE_OUT_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: annotated-video containers and the codecs tried for each (this OpenCV's FFmpeg; no H.264 encoder here)
VIDEO_OUT = {".mp4": ("mp4v",), ".m4v": ("mp4v",), ".mov": ("mp4v",), ".mkv": ("mp4v", "MJPG"),
             ".avi": ("XVID", "MJPG")}
MAX_FAILED_KEPT = 1000  # failed frames kept for the closing message (all are counted)
STATUS_INTERVAL_S = 5.0  # non-TTY progress: one status line at most this often
RANDOM_NOTE = "RANDOM WEIGHTS: detections are meaningless (structure/speed check)"


def expand_inputs(paths) -> list[Path]:
    """Files as given, directories expanded to their images (sorted), ``.txt`` files read as lists;
    missing paths are kept, so that they are reported one by one."""
    from .preprocess import list_images

    return list_images(list(paths))


@dataclass
class ImageResult:
    """One image's or frame's outcome: ``detections``, or ``error`` (and the stage that failed)."""

    path: Path | None
    size: tuple[int, int]  # (w, h)
    detections: Detections | None
    error: str | None = None
    failed_stage: str | None = None  # "read" (the file) or "inference" (the backend gave up on its batch)
    index: int = 0  # position in the source (frame_id - 1)
    name: str = ""

    def __post_init__(self):
        if not self.name:
            self.name = str(self.path)


FrameResult = ImageResult


# --------------------------------------------------------------------------- Darknet's JSON
def darknet_objects(d: Detections, names) -> list[dict]:
    """``detection_to_json``'s objects: one per (box, class) above threshold, Darknet's relative boxes."""
    return [{"class_id": int(c), "name": names[int(c)],
             "relative_coordinates": {"center_x": float(b[0]), "center_y": float(b[1]),
                                      "width": float(b[2]), "height": float(b[3])},
             "confidence": float(s)}
            for b, s, c in zip(d.boxes, d.scores, d.class_ids)]


def darknet_entry(r: ImageResult, names, *, video: bool = False, random_weights: bool = False) -> dict:
    """One frame of Darknet's ``-out`` JSON: ``frame_id`` (1-based position in the source) and, for image
    files, ``filename``; a random-weights run says so in every entry."""
    e = {"frame_id": r.index + 1}
    if not video:
        e["filename"] = str(r.path)
    e["objects"] = darknet_objects(r.detections, names)
    if random_weights:
        e["random_weights"] = True
    return e


def darknet_json(results: list[ImageResult], names) -> list[dict]:
    """Darknet's ``-out result.json`` format for images: one entry per readable image."""
    return [darknet_entry(r, names) for r in results if r.detections is not None]


def entry_text(entry: dict) -> str:
    """One entry laid out as Darknet's ``detection_to_json`` does: its keys one per line, one object per line."""
    head = ", \n".join(f" {json.dumps(k)}:{json.dumps(v)}" for k, v in entry.items() if k != "objects")
    objs = ", \n".join("  " + json.dumps(o, separators=(", ", ":")) for o in entry["objects"])
    return "{\n" + head + ", \n \"objects\": [ \n" + objs + ("\n" if objs else "") + " ] \n}"


class JsonStream:
    """Darknet's JSON written entry by entry (a long video costs no memory), renamed into place at the end."""

    def __init__(self, path):
        self.path = check_output_path(path)
        self.count = 0
        self._file = self._atomic = None

    def add(self, entry: dict) -> None:
        try:
            self._add(entry)
        except OSError as e:
            self.discard()
            raise DarkconvError(f"cannot write the JSON: {e.strerror or e}", file=str(self.path)) from None

    def _add(self, entry: dict) -> None:
        if self._file is None:
            self._atomic = AtomicFile(self.path)
            fd = os.open(self._atomic.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._file = os.fdopen(fd, "w", encoding="utf-8")
            self._file.write("[\n")
        self._file.write((",\n" if self.count else "") + entry_text(entry))
        self.count += 1

    def finish(self) -> bool:
        """Close the list and rename it into place; False (nothing written) when there was no entry."""
        if self._file is None:
            return False
        try:
            self._file.write("\n]\n")
            self._file.close()
        except OSError as e:
            self.discard()
            raise DarkconvError(f"cannot write the JSON: {e.strerror or e}", file=str(self.path)) from None
        self._file = None
        self._atomic.commit()
        return True

    def discard(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError:  # a full disk fails the flush too: the temp file goes anyway
                pass
        if self._atomic is not None and not self._atomic.done:
            self._atomic.discard()


# --------------------------------------------------------------------------- drawing
def label_style(w: int, h: int) -> tuple[int, float, int]:
    """(box line thickness, font scale, text thickness) for a ``w`` x ``h`` image: all proportional to its
    smaller side (576 px: 2, 0.48, 1; 6000 px: 20, 5.0, 8), so that labels stay readable at any size."""
    s = min(w, h)
    font = max(0.4, s / 1200)
    return max(1, round(s / 300)), font, max(1, round(font * 1.5))


def label_size(text: str, font: float, thick: int) -> tuple[int, int, int]:
    """(width, height, baseline) of a label's filled rectangle (text plus padding)."""
    import cv2

    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, thick)
    pad = max(1, round(font * 3))
    return tw + 2 * pad, th + base + 2 * pad, base + pad


def layout_labels(boxes, sizes, image_size, *, taken=()) -> list[tuple[int, int] | None]:
    """Top-left corners for label rectangles, one per box, so that no two labels overlap.

    ``boxes``: (x1, y1, x2, y2) pixels, in priority order (the caller puts the highest score first);
    ``sizes``: (w, h) of each label; ``taken``: rectangles (x1, y1, x2, y2) labels must avoid.
    Each label goes to the first free place of: above the box's top-left corner, inside the top, below the
    box, inside the bottom, then the same at the right edge, then stacked further above, inside and below;
    all kept in the image. A label with no free place near its box is left out (None): its box is drawn.
    """
    W, H = image_size
    placed = np.zeros((len(boxes) + len(taken), 4), np.int64)
    n = 0
    for t in taken:
        placed[n] = t
        n += 1
    out: list[tuple[int, int] | None] = []
    for (x1, y1, x2, y2), (lw, lh) in zip(boxes, sizes):
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        xs = list(dict.fromkeys(min(max(x, 0), max(W - lw, 0)) for x in (x1, x2 - lw)))
        ys = [y1 - lh, y1, y2, y2 - lh]
        for k in range(1, 6):
            ys += [y1 - (k + 1) * lh, y1 + k * lh, y2 + k * lh]
        ys = list(dict.fromkeys(min(max(y, 0), max(H - lh, 0)) for y in ys))
        spot = None
        for y in ys:
            for x in xs:
                if n == 0:
                    spot = (x, y)
                    break
                p = placed[:n]
                hit = (p[:, 0] < x + lw) & (x < p[:, 2]) & (p[:, 1] < y + lh) & (y < p[:, 3])
                if not hit.any():
                    spot = (x, y)
                    break
            if spot is not None:
                break
        out.append(spot)
        if spot is not None:
            placed[n] = (spot[0], spot[1], spot[0] + lw, spot[1] + lh)
            n += 1
    return out


def _color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.RandomState(class_id * 7 + 3)
    return tuple(int(v) for v in rng.randint(60, 255, 3))


def box_labels(det: Detections, names) -> list[tuple[int, str, float, int]]:
    """Per box (highest score first): (index of its best (box, class) pair, label text, best score, class)."""
    out = []
    for box_id in dict.fromkeys(det.box_ids.tolist()):  # each box once, with the labels of all its classes
        idx = np.flatnonzero(det.box_ids == box_id)
        idx = idx[np.argsort(-det.scores[idx], kind="stable")]
        text = ", ".join(f"{names[int(det.class_ids[i])]} {det.scores[i]:.2f}" for i in idx)
        out.append((int(idx[0]), text, float(det.scores[idx[0]]), int(det.class_ids[idx[0]])))
    out.sort(key=lambda b: -b[2])
    return out


def plan_drawing(det: Detections, names, w: int, h: int, banner: str | None = None):
    """What :func:`draw` draws: (style, banner rect or None, [(xyxy, color, text, label rect or None)])."""
    box_t, font, text_t = label_style(w, h)
    xyxy = det.xyxy(w, h, clip=True)
    taken = []
    banner_rect = None
    if banner:
        bw, bh, _ = label_size(banner, font, text_t)
        banner_rect = (0, max(h - bh, 0), bw, h)
        taken.append(banner_rect)
    labels = box_labels(det, names)
    boxes = [tuple(int(round(v)) for v in xyxy[i]) for i, _, _, _ in labels]
    sizes = [label_size(t, font, text_t)[:2] for _, t, _, _ in labels]
    spots = layout_labels(boxes[:MAX_LABELS], sizes[:MAX_LABELS], (w, h), taken=taken)
    spots += [None] * (len(boxes) - len(spots))
    items = []
    for (i, text, _, cls), b, (lw, lh), s in zip(labels, boxes, sizes, spots):
        items.append((b, _color(cls), text, None if s is None else (s[0], s[1], s[0] + lw, s[1] + lh)))
    return (box_t, font, text_t), banner_rect, items


def draw(image_rgb: np.ndarray, det: Detections, names, *, banner: str | None = None) -> np.ndarray:
    """A BGR copy of the image with one rectangle per box and its label ("car 0.71, truck 0.41": all its
    classes), line and text sizes proportional to the image, labels laid out so that none hides another
    (:func:`layout_labels`); ``banner`` (e.g. the random-weights note) is written at the bottom left."""
    import cv2

    img = np.ascontiguousarray(image_rgb[:, :, ::-1])
    h, w = img.shape[:2]
    (box_t, font, text_t), banner_rect, items = plan_drawing(det, names, w, h, banner)
    for (x1, y1, x2, y2), color, _, _ in reversed(items):  # the strongest box's lines on top
        cv2.rectangle(img, (x1, y1), (x2, y2), color, box_t)
    for _, color, text, rect in items:  # labels last: no line crosses them
        if rect is not None:
            _put_label(img, text, rect, color, (0, 0, 0), font, text_t)
    if banner_rect is not None:
        _put_label(img, banner, banner_rect, (255, 255, 255), (0, 0, 255), font, text_t)
    return img


def _put_label(img, text, rect, fill, ink, font, thick):
    import cv2

    x1, y1, x2, y2 = rect
    _, _, base = label_size(text, font, thick)
    pad = max(1, round(font * 3))
    cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), fill, -1)
    cv2.putText(img, text, (x1 + pad, y2 - base), cv2.FONT_HERSHEY_SIMPLEX, font, ink, thick, cv2.LINE_AA)


# --------------------------------------------------------------------------- output lines
def summary_line(r: ImageResult, names, max_print: int = MAX_PRINT) -> str:
    """``NAME (WxH): N boxes: car 0.71 + truck 0.41, dog 0.81`` (at most ``max_print`` boxes named, then
    "... and K more"); ``NAME: ERROR reason`` for a frame that failed."""
    if r.error:
        return f"{r.name}: ERROR {r.error}"
    d = r.detections
    boxes: dict = {}  # box id -> its labels, in Darknet's order; a multi-label box reads "car 0.71 + truck 0.41"
    for b, c, s in zip(d.box_ids.tolist(), d.class_ids, d.scores):
        boxes.setdefault(b, []).append(f"{names[int(c)]} {s:.2f}")
    parts = [" + ".join(labels) for labels in list(boxes.values())[:max_print]]
    more = len(boxes) - len(parts)
    return f"{r.name} ({r.size[0]}x{r.size[1]}): {len(boxes)} box{'es' if len(boxes) != 1 else ''}" + \
        (": " + ", ".join(parts) if parts else "") + (f", ... and {more} more" if more > 0 else "")


class Progress:
    """A tqdm bar with the live fps on a terminal; elsewhere (a log, a pipe) one status line on stderr at most
    every ``interval`` seconds. Lines for stdout go through :meth:`write` so that they never garble the bar."""

    def __init__(self, total: int | None, unit: str = "frame", desc: str = "detect", *, tty: bool | None = None,
                 interval: float = STATUS_INTERVAL_S, clock=time.monotonic, err=None):
        self.err = err or sys.stderr
        self.tty = self.err.isatty() if tty is None else tty
        self.total, self.unit, self.desc, self.interval, self.clock = total, unit, desc, interval, clock
        self.n = 0
        self.start = self.last_status = clock()
        self._window: list[tuple[float, int]] = [(self.start, 0)]
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, file=self.err, dynamic_ncols=True)

    def fps(self) -> float:
        """Frames per second over the last few seconds."""
        now = self.clock()
        t0, n0 = self._window[0]
        return (self.n - n0) / (now - t0) if now > t0 else 0.0

    def update(self, k: int = 1) -> None:
        self.n += k
        now = self.clock()
        self._window.append((now, self.n))
        while len(self._window) > 2 and now - self._window[1][0] >= 3.0:
            self._window.pop(0)
        if self.bar is not None:
            self.bar.update(k)
            self.bar.set_postfix_str(f"{self.fps():.1f} fps", refresh=False)
        elif now - self.last_status >= self.interval:
            self.last_status = now
            of = f" of {self.total}" if self.total else ""
            print(f"darkconv: {self.desc}: {self.n}{of} {self.unit}s, {self.fps():.1f} fps", file=self.err,
                  flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- outputs
class AnnotatedImages:
    """Drawn images in a folder, named after their inputs (extension kept: a .png stays .png); two inputs with
    the same name (a/img.jpg, b/img.jpg) get img.jpg and img-1.jpg. The folder is made when it did not exist
    and removed again if nothing was written in it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.created = not os.path.lexists(self.folder)
        prepare_output_dir(self.folder)
        self.names: set[str] = set()
        self.count = 0

    def _name(self, p: Path | None, index: int) -> str:
        stem = p.stem if p is not None else f"frame{index + 1:06d}"
        ext = p.suffix.lower() if p is not None and p.suffix.lower() in IMAGE_OUT_EXTS else ".jpg"
        ext = p.suffix if p is not None and p.suffix.lower() == ext else ext
        name, k = stem + ext, 1
        while name.lower() in self.names:
            name, k = f"{stem}-{k}{ext}", k + 1
        self.names.add(name.lower())
        return name

    def add(self, frame, bgr: np.ndarray) -> Path:
        import cv2

        path = self.folder / self._name(frame.path, frame.index)
        ok, buf = cv2.imencode(path.suffix.lower(), bgr)
        if not ok:
            raise ImageError("cannot encode the annotated image", file=str(path))
        atomic_write(path, [buf.tobytes()])
        self.count += 1
        return path

    def finish(self) -> bool:
        self._tidy()
        return self.count > 0

    def discard(self) -> None:
        self._tidy()

    def _tidy(self) -> None:
        if self.created and self.count == 0:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def describe(self) -> str:
        return f"{self.count} annotated image(s) in {self.folder}{os.sep}"


class AnnotatedVideo:
    """The annotated video: same size as the source, its fps (divided by ``every``, so that the video keeps its
    duration), written to a temp file (same extension: FFmpeg picks the container by it) and renamed when
    finished. Opened when created, so a container this OpenCV cannot write fails before any work."""

    def __init__(self, path, fps: float | None, size: tuple[int, int], every: int = 1):
        import cv2

        self.path = check_output_path(path)
        ext = self.path.suffix.lower()
        if ext not in VIDEO_OUT:
            raise DarkconvError(f"an annotated video is written as {', '.join(VIDEO_OUT)}: give --out a video name "
                                f"(e.g. {self.path.with_suffix('.mp4').name})", file=str(path))
        self.fps = (fps or DEFAULT_FPS) / max(int(every), 1)
        self.size = tuple(size)
        self.count = 0
        self._atomic = AtomicFile(self.path, suffix=ext)
        from .native_stderr import run_silenced

        self.writer = None
        for codec in VIDEO_OUT[ext]:
            w, _ = run_silenced(lambda: cv2.VideoWriter(str(self._atomic.tmp), cv2.VideoWriter_fourcc(*codec),
                                                        self.fps, self.size))
            if w.isOpened():
                self.writer, self.codec = w, codec
                break
            w.release()
        if self.writer is None:
            self._atomic.discard()
            raise DarkconvError(f"this OpenCV build cannot write {ext} video (tried {', '.join(VIDEO_OUT[ext])}); "
                                "use .mp4 or .avi", file=str(path))

    def add(self, frame, bgr: np.ndarray) -> None:
        if (bgr.shape[1], bgr.shape[0]) != self.size:  # a stream that changed resolution mid-way
            import cv2

            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(bgr)
        self.count += 1

    def finish(self) -> bool:
        """Close the container (an MP4 is playable only once its index is written) and rename it into place."""
        self.writer.release()
        if self.count == 0:
            self._atomic.discard()
            return False
        self._atomic.commit()
        return True

    def discard(self) -> None:
        self.writer.release()
        self._atomic.discard()

    def describe(self) -> str:
        return f"{self.path} ({self.count} frames, {self.size[0]}x{self.size[1]}, {self.fps:g} fps, {self.codec})"


class Outputs:
    """Where a detect run writes: annotated images (a folder) or an annotated video (a file), and Darknet's
    JSON. Created before the model is loaded, so that a bad output path fails in milliseconds."""

    def __init__(self, source: Source, out=None, json_path=None, *, random_weights: bool = False):
        self.video = source.kind != "images"
        self.random_weights = random_weights
        self.drawn = self.json = None
        self.json_path = Path(json_path) if json_path else None
        if out is not None:
            o = Path(out)
            if self.json_path is not None and _same(o, self.json_path):
                raise DarkconvError("--out and --json name the same file", file=str(o))
            src = getattr(source, "path", None)
            if src is not None and _same(o, src):
                raise DarkconvError("is the input video: writing it would destroy it; give another --out",
                                    file=str(o))
            if self.video:
                if o.is_dir() or str(out).endswith(("/", os.sep)):
                    raise DarkconvError("for a video, stream or camera --out is the annotated video file "
                                        f"({', '.join(VIDEO_OUT)}), not a folder", file=str(out))
            elif o.suffix.lower() in VIDEO_OUT:
                raise DarkconvError("for images --out is a folder for the annotated images (an annotated video "
                                    "is made from a video, stream or camera)", file=str(out))
        if self.json_path is not None:
            self.json = JsonStream(self.json_path)
        if out is not None:
            self.drawn = AnnotatedVideo(out, source.fps, source.size, getattr(source, "every", 1)) \
                if self.video else AnnotatedImages(out)

    def add(self, frame, r: ImageResult, names) -> None:
        try:
            if self.drawn is not None:
                banner = RANDOM_NOTE if self.random_weights else None
                if r.detections is not None:
                    self.drawn.add(frame, draw(frame.image, r.detections, names, banner=banner))
                elif self.video:  # a failed frame is written as it came, so that the video keeps its length
                    self.drawn.add(frame, np.ascontiguousarray(frame.image[:, :, ::-1]))
        finally:  # even when Ctrl-C lands in the drawing: the JSON and the video hold the same frames
            if self.json is not None and r.detections is not None:
                self.json.add(darknet_entry(r, names, video=self.video, random_weights=self.random_weights))

    def finish(self) -> list[str]:
        """Finish every output; one phrase per output saying what was (or was not) written."""
        said = []
        if self.drawn is not None:
            if self.drawn.finish():
                said.append("wrote " + self.drawn.describe())
            else:
                said.append(f"no annotated {'video' if self.video else 'images'} written (no frame was processed)")
        if self.json is not None:
            if self.json.finish():
                said.append(f"wrote {self.json_path} ({self.json.count} frame(s))")
            else:
                said.append(f"{self.json_path} not written (no frame was processed)")
        return said

    def discard(self) -> None:
        for o in (self.drawn, self.json):
            if o is not None:
                o.discard()


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.abspath(a) == os.path.abspath(b) or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


# --------------------------------------------------------------------------- the run
@dataclass
class DetectReport:
    """What a run did: frames processed, the failed ones, results (when kept), stage timings, what was written."""

    kind: str
    frames: int = 0
    boxes: int = 0
    failed: list = field(default_factory=list)  # the first MAX_FAILED_KEPT failed frames (a stream may fail long)
    failed_counts: dict = field(default_factory=dict)  # stage ("read" / "inference") -> how many frames
    results: list = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    written: list = field(default_factory=list)
    seconds: float = 0.0
    interrupted: str | None = None  # "SIGINT" / "SIGTERM"
    source: Source | None = None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a run, raised after the outputs were finished with the frames so far."""

    def __init__(self, report: DetectReport, signal_name: str):
        super().__init__(signal_name)
        self.report, self.signal_name = report, signal_name


@contextmanager
def _stop_on_signal(source: Source):
    """During a run the first Ctrl-C / SIGTERM asks it to stop after the frame in hand (and stops the source,
    so a stalled stream does not keep it waiting); a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    asked: list[int] = []

    def handler(signum, frame):
        if asked:
            if signum == signal.SIGTERM:
                from .cli.common import Terminated

                raise Terminated()
            raise KeyboardInterrupt()
        asked.append(signum)
        source.stop()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_held():
    """Ctrl-C / SIGTERM wait while outputs are finished (a second Ctrl-C must not leave a broken file)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    pending: list[int] = []
    handler = lambda signum, frame: pending.append(signum)  # noqa: E731
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def detect_source(runner, source: Source, names, *, thresh=0.25, nms=0.45, letterbox=None, agnostic=False,
                  max_det=None, batch=1, outputs: Outputs | None = None, echo=print, progress: Progress | None = None,
                  max_print: int = MAX_PRINT, keep_results: bool = True, quiet: bool = False) -> DetectReport:
    """Run every frame of ``source`` through ``runner`` (:func:`darkconv.pipeline.stream_detect`), print one
    line per frame, and write ``outputs``. A frame that fails (unreadable image, a batch the backend gave up
    on) is reported and the run goes on. Ctrl-C / SIGTERM finish the outputs with the frames so far and raise
    :class:`Interrupted`; any other error discards them (nothing half-written is left)."""
    report = DetectReport(source.kind, source=source)
    say = progress.write if progress is not None else echo
    t_start = time.perf_counter()
    gen = stream_detect(runner, source, batch=batch, thresh=thresh, nms=nms, letterbox=letterbox,
                        agnostic=agnostic, max_det=max_det, timings=report.timings)
    ok = False
    try:
        with _stop_on_signal(source) as asked:
            try:
                for frame, det in gen:
                    r = _result(frame, det)
                    if r.error is None:
                        report.boxes += len(set(r.detections.box_ids.tolist()))
                    else:
                        report.failed_counts[r.failed_stage] = report.failed_counts.get(r.failed_stage, 0) + 1
                        if len(report.failed) < MAX_FAILED_KEPT:
                            report.failed.append(r)
                    if keep_results:
                        report.results.append(r)
                    if not quiet or r.error:
                        say(summary_line(r, names, max_print))
                    if outputs is not None and (r.error is None or source.kind != "images"):
                        outputs.add(frame, r, names)
                    report.frames += 1  # counted once every output has it
                    if progress is not None:
                        progress.update(1)
                    del frame, det, r
                    if asked:  # Ctrl-C / SIGTERM: stop between frames, the outputs hold whole frames
                        break
                ok = True
            except KeyboardInterrupt as e:  # a second signal, or one that landed outside the loop
                report.interrupted = "SIGTERM" if type(e).__name__ == "Terminated" else "SIGINT"
            if asked and report.interrupted is None:
                report.interrupted = "SIGTERM" if asked[0] == signal.SIGTERM else "SIGINT"
    finally:
        with _signals_held() as pending:
            source.stop()
            gen.close()
            source.close()
            if progress is not None:
                progress.close()
            report.seconds = time.perf_counter() - t_start
            if outputs is not None:
                if ok or report.interrupted:
                    report.written = outputs.finish()
                else:
                    outputs.discard()
        if pending and report.interrupted is None:
            report.interrupted = "SIGTERM" if pending[0] == signal.SIGTERM else "SIGINT"
    if report.interrupted:
        raise Interrupted(report, report.interrupted)
    return report


def _result(frame, det) -> ImageResult:
    if isinstance(det, BaseException):
        stage = "inference" if isinstance(det, InferenceError) else "read"  # anything before inference: read
        bare = getattr(det, "bare", None) or str(det)
        im = None if stage == "read" else getattr(frame, "image", None)
        size = (im.shape[1], im.shape[0]) if im is not None else (0, 0)
        return ImageResult(frame.path, size, None, bare, stage, frame.index, frame.name)
    im = frame.image
    return ImageResult(frame.path, (im.shape[1], im.shape[0]), det, None, None, frame.index, frame.name)


def run_detect(runner, paths, names, *, thresh=0.25, nms=0.45, letterbox=None, agnostic=False, max_det=None,
               out_dir=None, json_path=None, batch=1, progress=None, echo=print,
               max_print: int = MAX_PRINT) -> tuple[list[ImageResult], Timings]:
    """Detect on every image of ``paths`` (files, folders, lists); unreadable ones are reported and skipped.
    Annotated images go to ``out_dir``, Darknet's JSON to ``json_path``. Returns results and stage timings."""
    source = open_source(list(paths) if not isinstance(paths, (str, Path)) else paths)
    outputs = Outputs(source, out_dir, json_path) if (out_dir or json_path) else None
    bar = progress(total=source.total) if progress else None
    report = detect_source(runner, source, names, thresh=thresh, nms=nms, letterbox=letterbox, agnostic=agnostic,
                           max_det=max_det, batch=batch, outputs=outputs, echo=echo, max_print=max_print,
                           progress=_BarAdapter(bar, echo) if bar is not None else None)
    return report.results, report.timings


class _BarAdapter:
    """A plain tqdm-like bar (``progress`` argument of :func:`run_detect`) as a :class:`Progress`."""

    def __init__(self, bar, echo):
        self.bar, self.echo = bar, echo

    def update(self, k=1):
        self.bar.update(k)

    def write(self, line):
        if getattr(self.bar, "disable", True):
            self.echo(line)
        else:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)

    def close(self):
        self.bar.close()


# --------------------------------------------------------------------------- the command's job
class Detect:
    """``darkconv detect`` as a job: every input and output is checked when it is created (before any model is
    loaded: a missing file, an absent camera, an unwritable --out fail in milliseconds); :meth:`run` loads
    the model, runs, and returns the report; :meth:`summary` gives the closing lines."""

    def __init__(self, model, weights, inputs, *, backend=None, out=None, json_path=None, every=1, max_frames=None,
                 live=None, random_weights=False, width=None, height=None, served=False):
        from .pipeline import model_kind

        kind = model_kind(model)
        if random_weights:
            if served or kind != "cfg":
                raise DarkconvError("--random-weights is for a .cfg (an .onnx, an engine or a served model carries "
                                    "its own weights)", file=None if served else str(model))
            if weights:
                raise DarkconvError("give the .weights or --random-weights, not both", file=str(weights))
            if (backend or "").lower() in ("tensorrt", "trt", "triton"):
                raise DarkconvError(f"--random-weights runs the cfg on torch, onnxruntime or opencv, not {backend}")
        elif kind == "cfg" and weights is None and not served:
            raise DarkconvError("detect needs the .weights after the cfg: darkconv detect MODEL.cfg MODEL.weights "
                                "INPUT... (or --random-weights for a structure/speed check)", file=str(model))
        if (width or height) and kind != "cfg":
            raise DarkconvError("--size: an .onnx or engine has a fixed input size; --size applies to cfg models")
        self.model, self.weights, self.backend, self.width, self.height = model, weights, backend, width, height
        self.random_weights, self.where = random_weights, None
        self.source = open_source(list(inputs), every=every, max_frames=max_frames, live=live)
        try:
            if self.source.kind == "images" and not self.source.total:
                raise _no_images(inputs)
            self.outputs = Outputs(self.source, out, json_path, random_weights=random_weights) \
                if (out or json_path) else None
        except BaseException:
            self.source.close()
            raise

    def run(self, *, threads=None, lanes=None, url=None, device=None, names=None, thresh=0.25, nms=0.45, letterbox=None, agnostic=False,
            max_det=None, batch=1, print_max=MAX_PRINT, quiet=False, log=print, progress=True):
        import warnings

        from .errors import DarkconvWarning
        from .pipeline import default_lanes, open_runner, resolve_backend, resolve_names

        tmp = None
        try:
            weights = self.weights
            if self.random_weights:
                warnings.warn(DarkconvWarning(f"--random-weights: {RANDOM_NOTE}; every output says so"))
                if (self.backend or "").lower() == "opencv":  # OpenCV reads a .weights file itself
                    import darkconv

                    tmp = tempfile.mkdtemp(prefix="darkconv-random-")
                    weights = str(Path(tmp) / (Path(self.model).stem + "-random.weights"))
                    darkconv.load(self.model).randomize(0).save_weights(weights)
            if lanes is None:  # throughput for files, latency for live sources
                total = self.source.total
                lanes = default_lanes(resolve_backend(self.model, self.backend, url), live=self.source.live, threads=threads,
                                      batches=-(-total // batch) if total else None)
            runner = open_runner(self.model, weights, self.backend, threads=threads, width=self.width,
                                 height=self.height, log=log, url=url, device=device, lanes=lanes,
                                 random_weights=self.random_weights and weights is None)
            with runner:
                class_names = resolve_names(runner.spec, names)
                self.where = runner.describe() + (" with random weights" if self.random_weights else "")
                if self.source.kind != "images":
                    log(f"{self.source.describe()} on {self.where}")
                bar = Progress(self.source.total, "img" if self.source.kind == "images" else "frame") \
                    if progress else None
                report = detect_source(runner, self.source, class_names, thresh=thresh, nms=nms, letterbox=letterbox,
                                       agnostic=agnostic, max_det=max_det, batch=batch, outputs=self.outputs,
                                       echo=log, progress=bar, max_print=print_max,
                                       keep_results=self.source.kind == "images", quiet=quiet)
            return report, self.where
        except BaseException as e:
            if not isinstance(e, Interrupted):
                self.source.close()
                if self.outputs is not None:
                    self.outputs.discard()
            raise
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def summary(self, report: DetectReport, where=None) -> list[str]:
        """The closing lines: count, fps, per-stage times, what was written (and what not)."""
        t, n = report.timings, max(report.frames, 1)
        unit = "image(s)" if report.kind == "images" else "frame(s)"
        fps = report.frames / report.seconds if report.seconds > 0 else 0.0
        lines = [f"{'interrupted' if report.interrupted else 'done'}: {report.frames} {unit} on {where or self.where or '?'} in {report.seconds:.1f} s "
                 f"({fps:.1f} per second), {report.boxes} box(es); per {unit[:-3]} decode {t.decode / n * 1e3:.1f} ms, "
                 f"preprocess {t.preprocess / n * 1e3:.1f} ms, inference {t.inference_busy / max(t.images, 1) * 1e3:.1f} ms, "
                 f"postprocess {t.postprocess / n * 1e3:.2f} ms"]
        src = report.source
        if src is not None and getattr(src, "dropped", 0):
            lines.append(f"{src.dropped} frame(s) of the {src.kind} arrived while the detector was busy and were "
                         "skipped (--all-frames: detect on every frame)")
        if src is not None and getattr(src, "ended_early", None):
            lines.append(f"darkconv: warning: {src.name}: decoding stopped after frame {src.ended_early} of the "
                         f"{src.frame_count} its header announces (truncated or damaged file?)")
        lines += report.written
        if self.random_weights:
            lines.append(f"note: {RANDOM_NOTE}")
        return lines


def _no_images(inputs) -> DarkconvError:
    from .sources import VIDEO_EXTS

    videos = []
    for p in map(Path, inputs):
        if p.is_dir():
            try:
                videos += [q for q in p.iterdir() if q.suffix.lower() in VIDEO_EXTS]
            except OSError:
                pass
    hint = f" (it holds {len(videos)} video file(s): give one video at a time, e.g. {videos[0]})" if videos else ""
    e = DarkconvError("no images found in " + ", ".join(map(str, inputs)) + hint)
    e.exit_code = 2
    return e
