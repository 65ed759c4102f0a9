"""``darkconv detect``: images in, Darknet-identical detections out (drawings, Darknet JSON)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import atomic_write
from .errors import ImageError, InferenceError
from .pipeline import Timings, detect_arrays
from .postprocess import Detections
from .preprocess import list_images, load_images


def expand_inputs(paths) -> list[Path]:
    """Files as given, directories expanded to their images (sorted), ``.txt`` files read as lists;
    missing paths are kept, so that they are reported one by one."""
    return list_images(list(paths))


@dataclass
class ImageResult:
    path: Path
    size: tuple[int, int]  # (w, h)
    detections: Detections | None
    error: str | None = None
    failed_stage: str | None = None  # "read" (the file) or "inference" (the backend gave up on its batch)


def darknet_json(results: list[ImageResult], names) -> list[dict]:
    """Darknet's ``-out result.json`` format: one entry per (box, class) above threshold."""
    out = []
    for frame, r in enumerate(results, start=1):
        if r.detections is None:
            continue
        d = r.detections
        objects = [{"class_id": int(c), "name": names[int(c)],
                    "relative_coordinates": {"center_x": float(b[0]), "center_y": float(b[1]),
                                             "width": float(b[2]), "height": float(b[3])},
                    "confidence": float(s)}
                   for b, s, c in zip(d.boxes, d.scores, d.class_ids)]
        out.append({"frame_id": frame, "filename": str(r.path), "objects": objects})
    return out


def _color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.RandomState(class_id * 7 + 3)
    return tuple(int(v) for v in rng.randint(60, 255, 3))


def draw(image_rgb: np.ndarray, det: Detections, names) -> np.ndarray:
    """A BGR copy of the image with one rectangle per box, labelled with all its classes and scores."""
    import cv2

    img = np.ascontiguousarray(image_rgb[:, :, ::-1])
    h, w = img.shape[:2]
    thick = max(1, round(min(w, h) / 300))
    xyxy = det.xyxy(w, h, clip=True)
    for box_id in dict.fromkeys(det.box_ids.tolist()):  # each box once, labels of all its classes
        idx = np.flatnonzero(det.box_ids == box_id)
        idx = idx[np.argsort(-det.scores[idx])]
        x1, y1, x2, y2 = (int(round(v)) for v in xyxy[idx[0]])
        color = _color(int(det.class_ids[idx[0]]))
        label = ", ".join(f"{names[int(det.class_ids[i])]} {det.scores[i]:.2f}" for i in idx)
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
        scale = 0.4 + 0.1 * thick
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2
        cv2.rectangle(img, (x1, ty - th - base), (x1 + tw + 2, ty + 1), color, -1)
        cv2.putText(img, label, (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return img


def write_image(path: Path, bgr: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(path.suffix if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") else ".jpg", bgr)
    if not ok:
        raise ImageError("cannot encode the output image", file=str(path))
    atomic_write(path, [buf.tobytes()])


def summary_line(r: ImageResult, names) -> str:
    if r.error:
        return f"{r.path}: ERROR {r.error}"
    d = r.detections
    boxes = {}  # box id -> its labels, in Darknet's order; a multi-label box reads "car 0.71 + truck 0.41"
    for b, c, s in zip(d.box_ids.tolist(), d.class_ids, d.scores):
        boxes.setdefault(b, []).append(f"{names[int(c)]} {s:.2f}")
    parts = [" + ".join(labels) for labels in boxes.values()]
    return f"{r.path} ({r.size[0]}x{r.size[1]}): {len(boxes)} box{'es' if len(boxes) != 1 else ''}" + \
        (": " + ", ".join(parts) if parts else "")


def run_detect(runner, paths, names, *, thresh=0.25, nms=0.45, letterbox=None, agnostic=False, max_det=None,
               out_dir=None, json_path=None, batch=1, progress=None, echo=print) -> tuple[list[ImageResult], Timings]:
    """Detect on every image; unreadable ones are reported and skipped. Returns results and stage timings."""
    files = expand_inputs(paths)
    timings = Timings()
    results: list[ImageResult] = []
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    bar = progress(total=len(files)) if progress else None
    written: set[str] = set()

    def out_name(p: Path) -> str:  # a/dog.jpg and b/dog.png must not overwrite each other's drawing
        name, k = p.stem + ".jpg", 1
        while name in written:
            name, k = f"{p.stem}-{k}.jpg", k + 1
        written.add(name)
        return name

    for start in range(0, len(files), batch):
        chunk = files[start:start + batch]
        t = time.perf_counter()
        loaded = load_images(chunk)  # a batch is decoded in parallel
        timings.decode += time.perf_counter() - t
        good = [im for im in loaded if not isinstance(im, ImageError)]
        failed = None
        try:
            dets = iter(detect_arrays(runner, good, thresh=thresh, nms=nms, letterbox=letterbox, agnostic=agnostic,
                                      max_det=max_det, timings=timings) if good else [])
        except InferenceError as e:  # only this batch's images fail; the run goes on
            failed = e
        for p, im in zip(chunk, loaded):  # results in input order
            if isinstance(im, ImageError):
                r = ImageResult(p, (0, 0), None, im.bare, "read")
            elif failed is not None:
                r = ImageResult(p, (im.shape[1], im.shape[0]), None, failed.bare, "inference")
            else:
                r = ImageResult(p, (im.shape[1], im.shape[0]), next(dets))
                if out_dir:
                    write_image(Path(out_dir) / out_name(p), draw(im, r.detections, names))
            results.append(r)
            echo(summary_line(r, names))
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    if json_path and any(r.error is None for r in results):
        text = json.dumps(darknet_json(results, names), indent=1)
        atomic_write(json_path, [text.encode()])
    return results, timings
