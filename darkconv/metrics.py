"""Darknet's ``detector map``, exactly, and agreement between two runs (numpy only).

Mirrors ``validate_detector_map`` in AlexeyAB ``src/detector.c``:

1. Per image, every (box, class) pair with ``prob > 0`` after NMS becomes one detection,
   in the order Darknet lists them (``Detections.rank``: the box order ``do_nms_sort``
   leaves, then class order).
2. Each detection is matched to the truth of its class with the highest float32
   ``box_iou`` strictly above ``iou_thresh`` (the first such truth on equal IoU); it
   keeps that truth even when another detection also claims it.
3. At ``thresh`` (``thresh_calc_avg_iou``, ``prob > thresh``): a matched detection is a
   TP unless an *earlier detection of the same image* (in Darknet's order, at any prob)
   matched the same truth; otherwise an FP. Average IoU is the float32 sum of the TPs'
   IoUs over TP + FP.
4. All detections of all images are sorted by prob, descending (glibc's ``qsort`` is a
   stable merge sort: ties keep image order, then Darknet's per-image order). Walking
   that ranking, a matched detection is a TP the first time its truth is hit, later an FP.
5. Per class, precision ``tp/(tp+fp)`` and recall ``tp/truths`` (doubles) at every rank;
   AP is the area under the PR curve with precision made monotone from the right
   (``points=0``, Darknet's default), or the mean over 11 / 101 recall points of the
   best precision at recall >= the point.
6. mAP = sum of APs / ``classes``: **every** class counts, a class without truths has
   AP 0 (Darknet's own figure). ``map_gt`` averages over the classes that have truths.

Not mirrored: the ``difficult=`` list (VOC), and Darknet's undefined behaviour on an
empty detection list (here AP 0).

Agreement (:func:`agreement`): one run's detections with ``score > ref_thresh`` are the
truths for the other run's detections at Darknet's map threshold; ``map_gt`` is then
the agreement figure (1.0 when the second run finds every reference object first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .postprocess import Detections, box_iou

__all__ = ["Truth", "ClassAP", "MapResult", "darknet_map", "truths_from_detections", "agreement", "MAP_THRESH"]

_F32 = np.float32
#: the detection threshold ``validate_detector_map`` uses (``const float thresh = .005``), with NMS 0.45
MAP_THRESH = 0.005
MAP_NMS = 0.45


@dataclass(frozen=True)
class Truth:
    """Labelled objects of one image: relative (cx, cy, w, h) boxes and class ids (a YOLO label file)."""

    boxes: np.ndarray
    class_ids: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "boxes", np.asarray(self.boxes, _F32).reshape(-1, 4))
        object.__setattr__(self, "class_ids", np.asarray(self.class_ids, np.int64).reshape(-1))
        if len(self.boxes) != len(self.class_ids):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.class_ids)} class ids")

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])

    @classmethod
    def empty(cls) -> "Truth":
        return cls(np.zeros((0, 4), _F32), np.zeros(0, np.int64))


@dataclass
class ClassAP:
    """One class's line of ``detector map``, plus its PR curve (in rank order) for plots."""

    class_id: int
    name: str
    ap: float
    truths: int
    detections: int
    tp: int                 # at thresh
    fp: int                 # at thresh
    precision: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    recall: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, _F32))

    def as_dict(self) -> dict:
        return {"class_id": self.class_id, "name": self.name, "ap": self.ap, "truths": self.truths,
                "detections": self.detections, "tp": self.tp, "fp": self.fp}


@dataclass
class MapResult:
    """Everything ``darknet detector map`` prints, as numbers."""

    classes: list[ClassAP]
    map: float                  # Darknet's: mean over all classes
    map_gt: float               # mean over classes with at least one truth (nan if none)
    iou_thresh: float
    points: int
    thresh: float
    precision: float            # at thresh (float32 arithmetic, nan when undefined, as Darknet)
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    avg_iou: float
    images: int
    detections: int
    truths: int

    def darknet_report(self) -> str:
        """The lines ``detector map`` prints after its progress counter, in its format."""
        def f(fmt, v):  # glibc prints a float32 0/0 as -nan
            return "-nan" if isinstance(v, float) and math.isnan(v) else fmt % v

        lines = [f" detections_count = {self.detections}, unique_truth_count = {self.truths}  "]
        for c in self.classes:
            lines.append(f"class_id = {c.class_id}, name = {c.name}, ap = {c.ap * 100:2.2f}%   \t "
                         f"(TP = {c.tp}, FP = {c.fp}) ")
        lines.append("")
        lines.append(f" for conf_thresh = {self.thresh:1.2f}, precision = {f('%1.2f', self.precision)}, "
                     f"recall = {f('%1.2f', self.recall)}, F1-score = {f('%1.2f', self.f1)} ")
        lines.append(f" for conf_thresh = {self.thresh:0.2f}, TP = {self.tp}, FP = {self.fp}, FN = {self.fn}, "
                     f"average IoU = {f('%2.2f', self.avg_iou * 100)} % ")
        lines.append("")
        how = f"used {self.points} Recall-points " if self.points else "used Area-Under-Curve for each unique Recall "
        lines.append(f" IoU threshold = {self.iou_thresh * 100:2.0f} %, {how}")
        lines.append(f" mean average precision (mAP@{self.iou_thresh:0.2f}) = {self.map:f}, or "
                     f"{self.map * 100:2.2f} % ")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        def num(v):
            return None if isinstance(v, float) and math.isnan(v) else v
        return {"map": self.map, "map_gt": num(self.map_gt), "iou_thresh": self.iou_thresh, "points": self.points,
                "thresh": self.thresh, "precision": num(self.precision), "recall": num(self.recall),
                "f1": num(self.f1), "tp": self.tp, "fp": self.fp, "fn": self.fn, "avg_iou": self.avg_iou,
                "images": self.images, "detections": self.detections, "truths": self.truths,
                "classes": [c.as_dict() for c in self.classes]}


def _ordered(d: Detections):
    """(boxes, scores, class_ids) of one image in Darknet's listing order."""
    if d.rank is None:
        return d.boxes, d.scores, d.class_ids
    order = np.argsort(np.asarray(d.rank), kind="stable")
    return d.boxes[order], d.scores[order], d.class_ids[order]


def _class_ap(prec: np.ndarray, rec: np.ndarray, points: int) -> float:
    """AP of one class from its PR values at its own ranks (the ranks where nothing changes add 0)."""
    if prec.size == 0:
        return 0.0
    if points == 0:
        p = np.concatenate([[0.0], prec])                       # recall 0 before the class's first detection
        r = np.concatenate([[0.0], rec])
        best = np.maximum.accumulate(p[::-1])[::-1]             # running max from the last rank down
        terms = (r[1:] - r[:-1]) * best[:-1]                    # delta_recall * last_precision, per step
        return float(np.add.accumulate(terms[::-1])[-1])        # summed from the last rank down, in double
    suffix = np.maximum.accumulate(prec[::-1])[::-1]            # recall is non-decreasing along the ranks
    total = 0.0
    for point in range(points):
        cur = point * 1.0 / (points - 1)
        k = int(np.searchsorted(rec, cur, "left"))              # first rank with recall >= cur
        total += float(suffix[k]) if k < rec.size and suffix[k] > 0 else 0.0
    return total / points


def darknet_map(truths: Sequence[Truth], detections: Sequence[Detections], classes: int, *,
                iou_thresh: float = 0.5, points: int = 0, thresh: float = 0.25, names=None) -> MapResult:
    """Darknet's ``detector map`` on ``detections`` (one :class:`Detections` per image, from the
    postprocessor at :data:`MAP_THRESH` with NMS 0.45 and the cfg's NMS kind) against ``truths``.

    ``points``: 0 (area under the curve, Darknet's default), or 11 / 101 recall points.
    ``thresh``: the confidence threshold for the precision/recall/F1/TP/FP/avg-IoU figures.
    """
    if len(truths) != len(detections):
        raise ValueError(f"{len(truths)} truth sets for {len(detections)} images")
    if points < 0 or points == 1:
        raise ValueError(f"points must be 0 (area under the curve) or >= 2, got {points}")
    classes = int(classes)
    names = list(names) if names is not None else [str(i) for i in range(classes)]
    iou_thr, thr = _F32(iou_thresh), _F32(thresh)

    truth_count = np.zeros(classes, np.int64)
    probs, cls, tidx, first_hit, ious = [], [], [], [], []
    base = 0
    for t, d in zip(truths, detections):
        if len(t) and (t.class_ids.min() < 0 or t.class_ids.max() >= classes):
            raise ValueError(f"a truth has class id {int(t.class_ids.max())}, outside 0..{classes - 1}")
        truth_count += np.bincount(t.class_ids, minlength=classes)[:classes]
        boxes, scores, cids = _ordered(d)
        boxes = np.asarray(boxes, _F32).reshape(-1, 4)
        scores = np.asarray(scores, _F32)
        cids = np.asarray(cids, np.int64)
        keep = scores > 0
        boxes, scores, cids = boxes[keep], scores[keep], cids[keep]
        if cids.size and (cids.min() < 0 or cids.max() >= classes):
            raise ValueError(f"a detection has class id {int(cids.max())}, outside 0..{classes - 1}")
        n = scores.size
        best = np.full(n, -1, np.int64)
        best_iou = np.zeros(n, _F32)
        if n and len(t):
            iou = box_iou(boxes[:, None, :], t.boxes[None, :, :])          # (n, M) float32, Darknet's box_iou
            ok = (iou > iou_thr) & (cids[:, None] == t.class_ids[None, :])
            masked = np.where(ok, iou, _F32(0))
            j = np.argmax(masked, axis=1)                                    # first truth on equal IoU
            hit = ok[np.arange(n), j]
            best = np.where(hit, base + j, -1)
            best_iou = np.where(hit, masked[np.arange(n), j], _F32(0))
        # an earlier detection of this image (any prob) matched the same truth -> not a TP at thresh
        first = np.zeros(n, bool)
        if n:
            matched = np.flatnonzero(best >= 0)
            _, at = np.unique(best[matched], return_index=True)
            first[matched[at]] = True
        probs.append(scores)
        cls.append(cids)
        tidx.append(best)
        first_hit.append(first)
        ious.append(best_iou)
        base += len(t)

    p = np.concatenate(probs) if probs else np.zeros(0, _F32)
    c = np.concatenate(cls) if cls else np.zeros(0, np.int64)
    ti = np.concatenate(tidx) if tidx else np.zeros(0, np.int64)
    fh = np.concatenate(first_hit) if first_hit else np.zeros(0, bool)
    iu = np.concatenate(ious) if ious else np.zeros(0, _F32)

    # figures at thresh (in Darknet's visiting order: image, then its own order)
    above = p > thr
    tp_mask = above & (ti >= 0) & fh
    fp_mask = above & ~tp_mask
    tp_t, fp_t = int(tp_mask.sum()), int(fp_mask.sum())
    tp_cls = np.bincount(c[tp_mask], minlength=classes)
    fp_cls = np.bincount(c[fp_mask], minlength=classes)
    tp_ious = iu[tp_mask]
    iou_sum = np.add.accumulate(tp_ious, dtype=_F32)[-1] if tp_ious.size else _F32(0)  # float avg_iou += ...
    avg_iou = float(iou_sum / _F32(tp_t + fp_t)) if tp_t + fp_t else float(iou_sum)
    truths_total = int(truth_count.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = _F32(tp_t) / (_F32(tp_t) + _F32(fp_t))
        rec = _F32(tp_t) / (_F32(tp_t) + _F32(truths_total - tp_t))
        f1 = _F32(2) * prec * rec / (prec + rec)

    # the ranking: all detections by prob, descending, stable
    order = np.argsort(-p, kind="stable")
    c_r, ti_r, p_ranked = c[order], ti[order], p[order]
    is_tp = np.zeros(order.size, bool)
    m = np.flatnonzero(ti_r >= 0)
    _, at = np.unique(ti_r[m], return_index=True)              # first time each truth is hit in the ranking
    is_tp[m[at]] = True

    per_class, aps = [], []
    for k in range(classes):
        idx = np.flatnonzero(c_r == k)
        tp = np.cumsum(is_tp[idx]).astype(np.float64)
        fp = np.cumsum(~is_tp[idx]).astype(np.float64)
        n_truth = int(truth_count[k])
        precision = tp / (tp + fp) if idx.size else np.zeros(0)
        recall = tp / n_truth if n_truth > 0 else np.zeros(idx.size)
        ap = _class_ap(precision, recall, points)
        aps.append(ap)
        per_class.append(ClassAP(k, names[k] if k < len(names) else str(k), ap, n_truth, int(idx.size),
                                 int(tp_cls[k]), int(fp_cls[k]), precision, recall, p_ranked[idx]))
    total = 0.0
    for ap in aps:                                              # sequential double sum, class order
        total += ap
    with_gt = [ap for ap, n in zip(aps, truth_count) if n > 0]
    return MapResult(per_class, total / classes if classes else 0.0,
                     (math.fsum(with_gt) / len(with_gt)) if with_gt else float("nan"),
                     float(iou_thresh), int(points), float(thresh), float(prec), float(rec), float(f1),
                     tp_t, fp_t, truths_total - tp_t, avg_iou, len(truths), int(p.size), truths_total)


def truths_from_detections(dets: Sequence[Detections], min_score: float = 0.25) -> list[Truth]:
    """Every (box, class) pair with ``score > min_score`` as a truth (one per pair of a multi-label box)."""
    out = []
    for d in dets:
        keep = np.asarray(d.scores, _F32) > _F32(min_score)
        out.append(Truth(np.asarray(d.boxes, _F32)[keep], np.asarray(d.class_ids, np.int64)[keep]))
    return out


def agreement(reference: Sequence[Detections], test: Sequence[Detections], classes: int, *,
              ref_thresh: float = 0.25, iou_thresh: float = 0.5, points: int = 0, names=None,
              thresh: float | None = None) -> MapResult:
    """Agreement of ``test`` with ``reference`` on the same images: Darknet's map with the reference's
    detections above ``ref_thresh`` as truths. ``test`` should come from the postprocessor at
    :data:`MAP_THRESH`. Read ``.map_gt`` (classes the reference found); ``.precision``/``.recall``
    are taken at ``thresh`` (default: ``ref_thresh``)."""
    if len(reference) != len(test):
        raise ValueError(f"{len(reference)} reference images, {len(test)} test images")
    return darknet_map(truths_from_detections(reference, ref_thresh), test, classes, iou_thresh=iou_thresh,
                       points=points, thresh=ref_thresh if thresh is None else thresh, names=names)
