"""COCO metrics (through faster-coco-eval, or pycocotools) and Darknet's ``detector valid`` JSON.

``detector valid`` (``validate_detector`` / ``print_cocos``, AlexeyAB src/detector.c) with ``eval=coco``:

* detections at ``thresh = .001`` with ``nms = .6`` (the cfg's NMS kind), boxes in pixels of the
  original image (``correct_yolo_boxes`` with ``relative=0``: ``x *= w`` in float32);
* per box, ``xmin = x - w/2.`` (double, stored as float), clipped to ``[0, w]`` / ``[0, h]``,
  ``bbox = [xmin, ymin, xmax - xmin, ymax - ymin]``;
* one line per (box, class) with ``prob > 0``, boxes in Darknet's order after NMS, classes in order:
  ``{"image_id":%d, "category_id":%d, "bbox":[%f, %f, %f, %f], "score":%f},``
* ``category_id = coco_ids[class]`` (Darknet's 80-entry table); ``image_id = atoi(basecfg(path))``
  (the file name up to its first dot).

darkconv writes exactly these lines, with three differences that keep the file usable:
the category id comes from the annotations file when one is given (or is the class index for a model
without COCO's 80 classes, where Darknet would index its table blindly); image ids come from the
annotations file when given, else from the file names when every name is a distinct number, else
they are 1..N in list order (Darknet writes 0 for every non-numeric name); an empty result is ``[]``.

The metrics are never computed here: the ground truth and these detections go to faster-coco-eval
(a C++ port of the official COCOeval, same numbers) or, if it is missing, pycocotools.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from .datasets import COCO_IDS
from .errors import DarkconvError
from .metrics import Truth
from .postprocess import Detections

__all__ = ["VALID_THRESH", "VALID_NMS", "STAT_NAMES", "basecfg", "image_ids", "category_ids", "is_coco_names",
           "detector_valid_entries", "format_detector_valid", "ground_truth", "coco_metrics", "library"]

#: ``validate_detector``'s detection threshold and NMS
VALID_THRESH = 0.001
VALID_NMS = 0.6
#: COCOeval.stats, in order
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
              "AR_1", "AR_10", "AR_100", "AR_small", "AR_medium", "AR_large")

_F32 = np.float32


# --------------------------------------------------------------------------- ids
def basecfg(path) -> str:
    """Darknet ``basecfg``: the part after the last ``/`` (then ``\\``), cut at its first dot."""
    s = str(path)
    s = s.rsplit("/", 1)[-1]
    s = s.rsplit("\\", 1)[-1]
    return s.split(".", 1)[0]


def image_ids(paths: Sequence, known: Sequence[int | None] | None = None) -> tuple[list[int], str]:
    """COCO image ids and where they come from: ``known`` (from an annotations file) when given; else
    the numeric file names (``000000397133.jpg`` -> 397133, Darknet's ``atoi(basecfg(path))``) when
    all are distinct numbers; else 1..N in list order."""
    if known is not None and all(k is not None for k in known):
        return [int(k) for k in known], "annotations"
    stems = [basecfg(p) for p in paths]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems], "file names"
    return list(range(1, len(paths) + 1)), "list order (1..N)"


def is_coco_names(names) -> bool:
    """The model has COCO's 80 classes in Darknet's order (coco.names)."""
    from .pipeline import DATA, read_names

    return len(names) == 80 and tuple(names) == read_names(DATA / "coco.names")


def category_ids(names, category_map: dict[int, int] | None = None) -> list[int | None]:
    """COCO category id per model class: the annotations' (inverse of ``category_map``; None for a
    class the annotations do not have), Darknet's ``coco_ids`` for COCO's 80 classes, else the class index."""
    if category_map is not None:
        inv: dict[int, int] = {}
        for cat, cls in sorted(category_map.items()):
            inv.setdefault(cls, cat)
        return [inv.get(k) for k in range(len(names))]
    if is_coco_names(names):
        return list(COCO_IDS)
    return list(range(len(names)))


# --------------------------------------------------------------------------- detector valid
def detector_valid_entries(dets: Detections, size: tuple[int, int], image_id: int,
                           cat_ids: Sequence[int | None]) -> list[tuple]:
    """``print_cocos`` for one image: ``(image_id, category_id, x, y, w, h, score)`` rows, Darknet's order.

    ``dets`` come from the postprocessor at :data:`VALID_THRESH` / :data:`VALID_NMS`; ``size`` is the
    original (width, height). Classes whose ``cat_ids`` entry is None are left out.
    """
    w, h = int(size[0]), int(size[1])
    order = np.argsort(dets.rank, kind="stable") if dets.rank is not None else np.arange(len(dets))
    b = np.asarray(dets.boxes, _F32).reshape(-1, 4)[order]
    scores = np.asarray(dets.scores, _F32)[order]
    cls = np.asarray(dets.class_ids, np.int64)[order]
    # correct_yolo_boxes, relative=0: float *= int, in float32
    x, y = b[:, 0] * _F32(w), b[:, 1] * _F32(h)
    bw, bh = b[:, 2] * _F32(w), b[:, 3] * _F32(h)
    # float xmin = bbox.x - bbox.w / 2.;  (double arithmetic, stored as float)
    x64, y64, w64, h64 = (v.astype(np.float64) for v in (x, y, bw, bh))
    xmin = (x64 - w64 / 2.0).astype(_F32)
    xmax = (x64 + w64 / 2.0).astype(_F32)
    ymin = (y64 - h64 / 2.0).astype(_F32)
    ymax = (y64 + h64 / 2.0).astype(_F32)
    xmin = np.where(xmin < 0, _F32(0), xmin)
    ymin = np.where(ymin < 0, _F32(0), ymin)
    xmax = np.where(xmax > _F32(w), _F32(w), xmax)
    ymax = np.where(ymax > _F32(h), _F32(h), ymax)
    cats = np.array([-1 if c is None else int(c) for c in cat_ids], np.int64)[cls] if cls.size else cls
    keep = (scores > 0) & (cats >= 0)
    cols = (cats[keep], xmin[keep], ymin[keep], (xmax - xmin)[keep], (ymax - ymin)[keep], scores[keep])
    iid = int(image_id)
    return [(iid, c, x0, y0, bw_, bh_, s) for c, x0, y0, bw_, bh_, s in zip(*(v.tolist() for v in cols))]


def format_detector_valid(rows: Sequence[tuple]) -> str:
    """The text of ``coco_results.json`` as Darknet writes it (Linux: the last ``,\\n`` becomes ``\\n]\\n``)."""
    if not rows:
        return "[\n]\n"
    lines = ['{"image_id":%d, "category_id":%d, "bbox":[%f, %f, %f, %f], "score":%f}' % r for r in rows]
    return "[\n" + ",\n".join(lines) + "\n]\n"


def rows_as_results(rows: Sequence[tuple]) -> list[dict]:
    """The rows as COCO result dicts, with the values the JSON file holds (``%f``: 6 decimals; ``round(v, 6)``
    is the same correctly rounded number as ``float("%f" % v)``, without the text)."""
    return [{"image_id": i, "category_id": c, "bbox": [round(x, 6), round(y, 6), round(w, 6), round(h, 6)],
             "score": round(s, 6)} for i, c, x, y, w, h, s in rows]


# --------------------------------------------------------------------------- ground truth
def ground_truth(truths: Sequence[Truth], sizes: Sequence[tuple[int, int]], ids: Sequence[int],
                 cat_ids: Sequence[int | None], names) -> dict:
    """A COCO ground-truth dict from relative YOLO boxes, clipped to the image like ``print_cocos`` clips the
    detections (area = box area in pixels, no crowd)."""
    images, anns = [], []
    for t, (w, h), iid in zip(truths, sizes, ids):
        images.append({"id": int(iid), "width": int(w), "height": int(h), "file_name": str(iid)})
        for (cx, cy, bw, bh), c in zip(np.asarray(t.boxes, np.float64), t.class_ids):
            cat = cat_ids[int(c)]
            if cat is None:
                continue
            x0, y0 = max((cx - bw / 2) * w, 0.0), max((cy - bh / 2) * h, 0.0)   # clipped like the detections
            x1, y1 = min((cx + bw / 2) * w, float(w)), min((cy + bh / 2) * h, float(h))
            box = [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)]
            anns.append({"id": len(anns) + 1, "image_id": int(iid), "category_id": int(cat), "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": int(c), "name": str(n)} for c, n in zip(cat_ids, names) if c is not None]
    return {"images": images, "annotations": anns, "categories": cats}


def subset_ground_truth(coco: dict, image_ids_: Sequence[int]) -> dict:
    """An annotations dict restricted to the evaluated images (crowd regions kept: COCOeval ignores them)."""
    keep = set(int(i) for i in image_ids_)
    anns = []
    for k, a in enumerate(coco["annotations"]):
        if a["image_id"] in keep:
            a = dict(a)
            a.setdefault("id", k + 1)
            a.setdefault("iscrowd", 0)
            a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
            anns.append(a)
    return {"images": [im for im in coco["images"] if im["id"] in keep], "annotations": anns,
            "categories": coco["categories"]}


# --------------------------------------------------------------------------- metrics
def library() -> tuple[str, str]:
    """(name, version) of the COCO evaluation library that will be used."""
    try:
        import faster_coco_eval
        return "faster-coco-eval", faster_coco_eval.__version__
    except ImportError:
        pass
    try:
        import importlib.metadata

        import pycocotools  # noqa: F401
        return "pycocotools", importlib.metadata.version("pycocotools")
    except ImportError:
        raise DarkconvError("COCO metrics need faster-coco-eval (pip install faster-coco-eval) or pycocotools; "
                            "or pass --no-coco") from None


def coco_metrics(gt: dict, results: list[dict], *, use: str | None = None, copy: bool = True) -> dict:
    """COCOeval (bbox) of ``results`` against ``gt``: the 12 standard figures and per-category AP.

    ``use``: ``faster-coco-eval`` / ``pycocotools`` (default: the first one installed). Figures
    COCOeval reports as -1 (no object in that area range) are None. The libraries add keys to the dicts they
    are given: ``copy=False`` lets them change ``gt`` and ``results`` (for dicts the caller made for this call).
    """
    name, version = library() if use is None else (use, _version(use))
    if copy:
        gt, results = _fresh(gt), [{**r, "bbox": list(r["bbox"])} for r in results]
    if name == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        g = COCO(gt)
        d = g.loadRes(results)
        ev = COCOeval_faster(g, d, "bbox", print_function=lambda *a, **k: None)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    elif name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            g = COCO()
            g.dataset = gt
            g.createIndex()
            if not results:  # pycocotools cannot load an empty result list
                return _empty(gt, name, version)
            d = g.loadRes(results)
            ev = COCOeval(g, d, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    else:
        raise ValueError(f"unknown COCO library {name!r}")
    stats = [float(v) for v in ev.stats[:12]]
    prec = np.asarray(ev.eval["precision"])        # (iou, recall, category, area, maxdets)
    per_cat = []
    objects: dict = {}
    for a in gt["annotations"]:
        if not a.get("iscrowd", 0):
            objects[a["category_id"]] = objects.get(a["category_id"], 0) + 1
    for k, cat in enumerate(ev.params.catIds):
        p = prec[:, :, k, 0, -1]
        p = p[p > -1]
        n_gt = objects.get(cat, 0)
        per_cat.append({"category_id": int(cat), "ap": float(p.mean()) if p.size else None, "objects": n_gt})
    return {"library": name, "version": version,
            "stats": {n: (None if v < 0 else v) for n, v in zip(STAT_NAMES, stats)},
            "per_category": per_cat, "detections": len(results)}


def _fresh(gt: dict) -> dict:
    """A copy of a ground-truth dict that the COCO libraries may change (they add keys to its dicts) without
    touching the caller's: new dicts for the dataset and each image, annotation and category."""
    out = dict(gt)
    for key in ("images", "annotations", "categories"):
        if key in out:
            out[key] = [{**d, "bbox": list(d["bbox"])} if "bbox" in d else dict(d) for d in out[key]]
    return out


def _empty(gt: dict, name: str, version: str) -> dict:
    """No detections: 0 where COCOeval has objects to find (its area ranges), None (its -1) elsewhere."""
    areas = [a["area"] for a in gt["annotations"] if not a.get("iscrowd", 0)]
    has = {"": bool(areas), "small": any(a < 32 ** 2 for a in areas),
           "medium": any(32 ** 2 <= a < 96 ** 2 for a in areas), "large": any(a >= 96 ** 2 for a in areas)}
    stats = {n: (0.0 if has[n.partition("_")[2] if n.partition("_")[2] in has else ""] else None)
             for n in STAT_NAMES}
    return {"library": name, "version": version, "stats": stats, "per_category": [], "detections": 0}


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def write_results(path, rows: Sequence[tuple]) -> Path:
    from .io import atomic_write

    path = Path(path)
    atomic_write(path, [format_detector_valid(rows).encode()])
    return path
