"""Compare raw heads and detections between two backends or precisions (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _xyxy(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between (N,4) and (M,4) center-xywh boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    A, B = _xyxy(a)[:, None], _xyxy(b)[None]
    wh = np.clip(np.minimum(A[..., 2:], B[..., 2:]) - np.maximum(A[..., :2], B[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3] - inter
    return inter / np.maximum(union, 1e-12)


@dataclass
class DetectionDiff:
    """How detections ``other`` differ from ``ref`` (same class, IoU >= iou_thr, greedy by score)."""

    matched: int = 0
    lost: int = 0          # in ref, not in other
    new: int = 0           # in other, not in ref
    max_dscore: float = 0.0
    sum_dscore: float = 0.0
    min_iou: float = 1.0
    lost_items: list = field(default_factory=list)
    new_items: list = field(default_factory=list)

    @property
    def mean_dscore(self) -> float:
        return self.sum_dscore / self.matched if self.matched else 0.0

    def add(self, other: "DetectionDiff") -> "DetectionDiff":
        self.matched += other.matched
        self.lost += other.lost
        self.new += other.new
        self.max_dscore = max(self.max_dscore, other.max_dscore)
        self.sum_dscore += other.sum_dscore
        self.min_iou = min(self.min_iou, other.min_iou)
        self.lost_items += other.lost_items
        self.new_items += other.new_items
        return self

    def as_dict(self) -> dict:
        return {"matched": self.matched, "lost": self.lost, "new": self.new, "max_dscore": self.max_dscore,
                "mean_dscore": self.mean_dscore, "min_iou": self.min_iou if self.matched else None}


def compare_detections(ref, other, iou_thr: float = 0.5) -> DetectionDiff:
    """Match two :class:`darkconv.postprocess.Detections` class by class."""
    d = DetectionDiff()
    for c in np.union1d(ref.class_ids, other.class_ids):
        ia, ib = np.flatnonzero(ref.class_ids == c), np.flatnonzero(other.class_ids == c)
        iou = iou_matrix(ref.boxes[ia], other.boxes[ib])
        used_b = np.zeros(len(ib), bool)
        for k in np.argsort(-ref.scores[ia], kind="stable"):
            cand = np.where(~used_b & (iou[k] >= iou_thr), iou[k], -1.0)
            j = int(np.argmax(cand)) if len(cand) else -1
            if j >= 0 and cand[j] >= iou_thr:
                used_b[j] = True
                ds = abs(float(ref.scores[ia[k]]) - float(other.scores[ib[j]]))
                d.matched += 1
                d.sum_dscore += ds
                d.max_dscore = max(d.max_dscore, ds)
                d.min_iou = min(d.min_iou, float(iou[k, j]))
            else:
                d.lost += 1
                d.lost_items.append((int(c), float(ref.scores[ia[k]])))
        for j in np.flatnonzero(~used_b):
            d.new += 1
            d.new_items.append((int(c), float(other.scores[ib[j]])))
    return d


def head_errors(ref: list[np.ndarray], other: list[np.ndarray]) -> list[tuple[float, float]]:
    """Per head (max |Δ|, max |Δ| / max |ref|)."""
    out = []
    for a, b in zip(ref, other):
        if a.shape != b.shape:
            raise ValueError(f"head shapes differ: {a.shape} vs {b.shape}")
        m = float(np.abs(a - b).max()) if a.size else 0.0
        out.append((m, m / max(float(np.abs(a).max()), 1e-12)))
    return out
