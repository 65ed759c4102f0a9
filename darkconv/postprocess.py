"""Decode + NMS of raw Darknet head tensors, reproducing ``detector test`` exactly.

Semantics (AlexeyAB darknet ``src/``), all arithmetic emulated in Darknet's precision
(float32 where the C code uses ``float``, float64 where it calls ``exp``/``pow``):

``[yolo]`` (``forward_yolo_layer``, ``get_yolo_box``, ``get_yolo_detections``)
    ``new_coords=0``: logistic on x, y, objectness and classes (``1.f/(1.f+expf(-x))``);
    ``new_coords=1``: no activation (the previous conv applied it). Then, in both cases,
    ``x' = x*scale_x_y - 0.5*(scale_x_y-1)`` (``scal_add_cpu``), and
    ``bx = (col + x') / lw``; ``bw = exp(tw)*anchor_w / net_w`` (``new_coords=0``) or
    ``bw = tw*tw*4*anchor_w / net_w`` (``new_coords=1``). A cell/anchor is a candidate iff
    ``objectness > thresh``; class ``j`` gets ``prob = objectness*class_j`` iff ``prob > thresh``.
``[region]`` (``forward_region_layer``, ``get_region_box``, ``get_region_boxes``,
``custom_get_region_detections``)
    logistic objectness (``classfix=-1``: 0 where under .5), softmax over classes (float32
    sum in class order) when ``softmax``; ``bx = (col + logistic(tx)) / lw``; ``bw = exp(tw)*anchor_w / lw``
    (anchors in grid cells); ``prob = objectness*class_j`` kept iff ``> thresh``.
Box correction (``correct_yolo_boxes``, used for both kinds in AlexeyAB)
    letterbox: integer ``new_w``/``new_h`` after a float32 aspect comparison;
    ``x = (x - (netw-new_w)/2./netw) / ((float)new_w/netw)``, ``w *= 1/ratiow``;
    without letterbox it is the identity. Boxes stay relative to the image, unclipped.
NMS (``do_nms_sort`` / ``diounms_sort`` in ``src/box.c``), per class, greedy in
descending ``prob``, on the corrected relative boxes; equal ``prob`` keep the order the
previous classes' stable sorts left (ties by ``prob[k-1]``, ..., ``prob[0]``, then candidate
order: see :func:`_tie_first`):
    ``default`` and ``cornersnms``: ``box_iou > nms``;
    ``greedynms``: ``box_diou > nms`` where ``box_diou = iou - ((d/c) ** 0.6)`` (fixed 0.6);
    ``diounms``: ``box_diounms = iou - ((d/c) ** beta_nms)``.
    ``d`` = squared centre distance, ``c`` = squared diagonal of the enclosing box.

Implementation: no Python loop over boxes. Overlapping box pairs are found once,
class-independently, with a pruned sweep (size classes x y-strips x sorted x) that only
uses necessary conditions of ``IoU > nms``; the exact float32 IoU/DIoU then decides.
Greedy NMS for all classes at once is solved exactly on the resulting sparse
"may-suppress" graph by topological propagation (an item is kept iff no kept item
ranked before it in its class overlaps it), which equals sequential greedy NMS.
Where it was built, the compiled ``darkconv._cnms`` does small inputs (a real image's
candidates, at any threshold) class by class in C instead: the same decisions, faster
(``nms_keep`` picks it while the sum over classes of candidates squared is at most
``_C_NMS_MAX_WORK``; ``DARKCONV_NO_C_KERNEL=1`` switches it off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import ckernels
from .darknet.spec import NMS_KINDS, HeadSpec, ModelSpec
from .geometry import letterbox_geometry

__all__ = ["Detections", "postprocess", "postprocess_settings", "decode", "decode_thresholds", "nms_keep", "box_iou",
           "box_diou", "darknet_rank"]

_F32 = np.float32
_F64 = np.float64
_ONE = np.float32(1.0)

#: up to this many valid boxes, all pairs are tested directly
_DENSE_PAIRS_MAX = 160

#: the compiled NMS (``darkconv._cnms``), None where it was not built; used up to this much work
_C = ckernels.load("_cnms")
_C_NMS_MAX_WORK = 1 << 22


# =========================================================================== results
@dataclass
class Detections:
    """Detections of one image: a flat list of (box, class) pairs, like Darknet prints them.

    ``boxes`` are (center_x, center_y, width, height) relative to the original image
    (Darknet's relative coordinates, not clipped unless ``clip=True`` was asked).
    ``scores`` = objectness x class probability. ``box_ids`` index the candidate box
    (in Darknet's candidate order: head by head, cell by cell, anchor by anchor); the
    pairs of a multi-label box share it. Pairs come in candidate order, then class order.
    ``objectness`` is the head's objectness of the candidate (for [region] the logistic
    objectness, where Darknet itself stores 1).
    ``rank`` (optional) is each pair's position in the order Darknet itself lists them
    after NMS (see :func:`darknet_rank`); ``darkconv.metrics`` needs it to mirror
    ``validate_detector_map``. ``None`` means: this order is Darknet's.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    objectness: np.ndarray
    box_ids: np.ndarray
    rank: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def xyxy(self, image_w: int, image_h: int, clip: bool = False) -> np.ndarray:
        """(K, 4) float32 pixel corners ``x1, y1, x2, y2`` for drawing."""
        b = np.asarray(self.boxes, dtype=_F32).reshape(-1, 4)
        iw, ih = _F32(image_w), _F32(image_h)
        out = np.stack([(b[:, 0] - b[:, 2] / 2) * iw, (b[:, 1] - b[:, 3] / 2) * ih,
                        (b[:, 0] + b[:, 2] / 2) * iw, (b[:, 1] + b[:, 3] / 2) * ih], axis=1)
        if clip:
            np.clip(out[:, 0::2], 0, iw, out=out[:, 0::2])
            np.clip(out[:, 1::2], 0, ih, out=out[:, 1::2])
        return out

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), _F32), np.zeros(0, _F32), np.zeros(0, np.int64),
                   np.zeros(0, _F32), np.zeros(0, np.int64))

    def __repr__(self) -> str:
        return f"Detections({len(self)} pairs, {len(np.unique(self.box_ids))} boxes)"


# =========================================================================== float helpers
def _sigmoid32(x: np.ndarray) -> np.ndarray:
    """Darknet ``logistic_activate``: ``1.f/(1.f + expf(-x))`` in float32 (expf correctly rounded)."""
    x = np.asarray(x, dtype=_F32)
    with np.errstate(over="ignore"):
        e = np.exp(-x.astype(_F64)).astype(_F32)
    return _ONE / (_ONE + e)


def _softmax32(x: np.ndarray) -> np.ndarray:
    """Darknet ``softmax`` (src/blas.c) over the last axis, temp = 1: float32, sequential sum."""
    x = np.asarray(x, dtype=_F32)
    if x.shape[-1] == 0:
        return x.copy()
    largest = x.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp((x - largest).astype(_F64)).astype(_F32)
    total = np.cumsum(e, axis=-1, dtype=_F32)[..., -1:]   # float sum += e, left to right
    with np.errstate(divide="ignore", invalid="ignore"):
        return e / total


# =========================================================================== decode
def _decode_head(raw: np.ndarray, head: HeadSpec, net_w: int, net_h: int, thr: np.float32):
    """One head of one image: raw (A*(5+C), gh, gw) -> (boxes, obj, probs) of its candidates."""
    a_n, c_n = head.num_anchors, head.classes
    gh, gw = raw.shape[-2:]
    r = raw.reshape(a_n, 5 + c_n, gh * gw)
    kind = head.kind
    new_coords = kind == "yolo" and int(head.new_coords) == 1

    obj_all = r[:, 4, :]
    if not new_coords:
        obj_all = _sigmoid32(obj_all)
    if kind == "region" and int(head.classfix) == -1:     # get_region_boxes: scale = 0 if < .5
        obj_all = np.where(obj_all < _F32(0.5), _F32(0), obj_all)
    # Darknet's order: cell i (row-major), then anchor n. [yolo] keeps a cell/anchor iff
    # objectness > thresh. [region] keeps all of them, but a pair needs obj*class > thresh,
    # which implies obj > thresh when class <= 1 (softmax); raw classes are unbounded.
    if kind == "region" and not head.softmax:
        live = ((obj_all[:, None, :] * r[:, 5:, :]) > thr).any(axis=1)
    else:
        live = obj_all > thr
    cell, a = np.nonzero(live.T)
    if cell.size == 0:
        return None
    obj = obj_all[a, cell]
    t = r[a, :, cell]                                     # (K, 5 + C), raw values
    col = (cell % gw).astype(_F32)
    row = (cell // gw).astype(_F32)
    anchors = np.asarray(head.anchors, dtype=_F32).reshape(-1, 2)
    aw, ah = anchors[a, 0], anchors[a, 1]

    if kind == "yolo":
        s = _F32(head.scale_x_y)
        beta = _F32(-0.5 * float(s - _ONE))               # -0.5*(l.scale_x_y - 1) -> float
        txy = t[:, 0:2] if new_coords else _sigmoid32(t[:, 0:2])
        txy = txy * s + beta                              # scal_add_cpu: x*ALPHA + BETA
        bx = (col + txy[:, 0]) / _F32(gw)
        by = (row + txy[:, 1]) / _F32(gh)
        if new_coords:
            tw, th = t[:, 2], t[:, 3]
            bw = tw * tw * _F32(4) * aw / _F32(net_w)
            bh = th * th * _F32(4) * ah / _F32(net_h)
            cls = t[:, 5:]
        else:
            with np.errstate(over="ignore"):
                bw = (np.exp(t[:, 2].astype(_F64)) * aw.astype(_F64) / net_w).astype(_F32)
                bh = (np.exp(t[:, 3].astype(_F64)) * ah.astype(_F64) / net_h).astype(_F32)
            cls = _sigmoid32(t[:, 5:])
    elif kind == "region":
        bx = (col + _sigmoid32(t[:, 0])) / _F32(gw)
        by = (row + _sigmoid32(t[:, 1])) / _F32(gh)
        with np.errstate(over="ignore"):
            bw = (np.exp(t[:, 2].astype(_F64)) * aw.astype(_F64) / gw).astype(_F32)
            bh = (np.exp(t[:, 3].astype(_F64)) * ah.astype(_F64) / gh).astype(_F32)
        cls = _softmax32(t[:, 5:]) if head.softmax else t[:, 5:]
    else:
        raise ValueError(f"head kind must be 'yolo' or 'region', not {kind!r}")

    prob = obj[:, None] * cls
    prob = np.where(prob > thr, prob, _F32(0))
    return np.stack([bx, by, bw, bh], axis=1).astype(_F32, copy=False), obj.astype(_F32), prob


def _correct_boxes(boxes: np.ndarray, w: int, h: int, net_w: int, net_h: int, letter: bool) -> np.ndarray:
    """Darknet ``correct_yolo_boxes`` (relative=1) on (K, 4) float32 boxes."""
    if not letter or boxes.shape[0] == 0:
        return boxes                                      # new_w=netw: exact identity
    new_w, new_h, _, _ = letterbox_geometry(w, h, net_w, net_h)
    deltaw, deltah = _F32(net_w - new_w), _F32(net_h - new_h)
    ratiow, ratioh = _F32(new_w) / _F32(net_w), _F32(new_h) / _F32(net_h)
    out = np.empty_like(boxes)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, 0] = ((boxes[:, 0].astype(_F64) - _F64(deltaw) / 2.0 / net_w) / _F64(ratiow)).astype(_F32)
        out[:, 1] = ((boxes[:, 1].astype(_F64) - _F64(deltah) / 2.0 / net_h) / _F64(ratioh)).astype(_F32)
        out[:, 2] = boxes[:, 2] * (_ONE / ratiow)
        out[:, 3] = boxes[:, 3] * (_ONE / ratioh)
    return out


def _check_inputs(heads, spec: ModelSpec, image_sizes):
    if not spec.heads:
        raise ValueError("the model spec has no detection heads")
    if len(heads) != len(spec.heads):
        raise ValueError(f"got {len(heads)} head tensors, the model has {len(spec.heads)} heads")
    classes = spec.heads[0].classes
    arrs, n = [], None
    for i, (t, hs) in enumerate(zip(heads, spec.heads)):
        if hs.classes != classes:
            raise ValueError(f"head {i} has {hs.classes} classes, head 0 has {classes}")
        a = np.asarray(t, dtype=_F32)
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise ValueError(f"head {i} (layer {hs.layer}): expected (N, C, H, W), got shape {a.shape}")
        if a.shape[1] != hs.channels:
            raise ValueError(f"head {i} (layer {hs.layer}): expected {hs.channels} channels "
                             f"({hs.num_anchors} anchors x (5 + {hs.classes})), got {a.shape[1]}")
        if tuple(hs.grid) != (0, 0) and tuple(a.shape[2:]) != tuple(hs.grid):
            raise ValueError(f"head {i} (layer {hs.layer}): expected grid {tuple(hs.grid)}, "
                             f"got {tuple(a.shape[2:])} (was the model run at another input size?)")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(f"head {i} has batch {a.shape[0]}, head 0 has {n}")
        arrs.append(a)
    if isinstance(image_sizes, tuple) and len(image_sizes) == 2 and np.isscalar(image_sizes[0]):
        image_sizes = [image_sizes]
    sizes = [(int(w), int(h)) for w, h in image_sizes]
    if len(sizes) != n:
        raise ValueError(f"got {len(sizes)} image sizes for a batch of {n}")
    for w, h in sizes:
        if w <= 0 or h <= 0:
            raise ValueError(f"image size must be positive, got {w}x{h}")
    return arrs, sizes, classes


def decode(heads: Sequence[np.ndarray], spec: ModelSpec, image_sizes, thresh: float = 0.25,
           letterbox: bool | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Darknet's ``get_network_boxes`` without NMS.

    Returns per image ``(boxes (K,4), objectness (K,), probs (K,C))`` of the candidates
    in Darknet's order; boxes corrected to relative image coordinates, ``probs`` zero
    where ``<= thresh``.
    """
    return [per_thresh[0] for per_thresh in decode_thresholds(heads, spec, image_sizes, [thresh], letterbox)]


def _restrict(part, head: HeadSpec, thr: np.float32):
    """One head's candidates decoded at a lower threshold -> exactly those ``_decode_head`` gives at ``thr``.

    Darknet's filters are per candidate and keep the order: a cell/anchor stays iff objectness > thr ([region]
    without softmax: iff some obj*class > thr), and a class probability stays iff it is > thr. Every value kept
    is the same float32 number, computed once."""
    boxes, obj, prob = part
    if head.kind == "region" and not head.softmax:
        keep = (prob > thr).any(axis=1)
    else:
        keep = obj > thr
    if not keep.any():
        return None
    prob = prob[keep]
    return boxes[keep], obj[keep], np.where(prob > thr, prob, _F32(0))


def decode_thresholds(heads: Sequence[np.ndarray], spec: ModelSpec, image_sizes, thresholds: Sequence[float],
                      letterbox: bool | None = None) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """:func:`decode` at several thresholds, decoding the heads once (at the lowest): ``out[image][k]`` is
    ``decode(..., thresholds[k])[image]``, the same arrays (``eval`` needs 0.005 and 0.001 for every image)."""
    arrs, sizes, classes = _check_inputs(heads, spec, image_sizes)
    letter = spec.letter_box if letterbox is None else bool(letterbox)
    thrs = [_F32(t) for t in thresholds]
    if not thrs:
        return [[] for _ in sizes]
    low = min(thrs)
    empty = (np.zeros((0, 4), _F32), np.zeros(0, _F32), np.zeros((0, classes), _F32))
    out = []
    for b, (w, h) in enumerate(sizes):
        decoded = [(_decode_head(a[b], hs, spec.width, spec.height, low), hs) for a, hs in zip(arrs, spec.heads)]
        per_thresh = []
        for thr in thrs:
            if thr == low:
                parts = [p for p, _ in decoded]
            elif low >= 0:
                parts = [_restrict(p, hs, thr) for p, hs in decoded if p is not None]
            else:  # below 0 the zeroed probabilities would pass a higher threshold: decode at thr itself
                parts = [_decode_head(a[b], hs, spec.width, spec.height, thr) for a, hs in zip(arrs, spec.heads)]
            parts = [p for p in parts if p is not None]
            if len(parts) > 1:
                boxes, obj, probs = (np.concatenate([p[i] for p in parts]) for i in range(3))
            else:
                boxes, obj, probs = parts[0] if parts else empty
            per_thresh.append((_correct_boxes(boxes, w, h, spec.width, spec.height, letter), obj, probs))
        out.append(per_thresh)
    return out


# =========================================================================== box overlap
def _corners(b: np.ndarray):
    x, y, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    w2, h2 = w / _F32(2), h / _F32(2)
    return x - w2, x + w2, y - h2, y + h2


def _iou_parts(a: np.ndarray, b: np.ndarray):
    """Darknet ``box_iou`` on paired float32 boxes; also returns the corners for DIoU."""
    al, ar, at, ab = _corners(a)
    bl, br, bt, bb = _corners(b)
    iw = np.minimum(ar, br) - np.maximum(al, bl)          # overlap(): right - left
    ih = np.minimum(ab, bb) - np.maximum(at, bt)
    inter = np.where((iw < 0) | (ih < 0), _F32(0), iw * ih)
    union = (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where((inter == 0) | (union == 0), _F32(0), inter / union)
    return iou.astype(_F32, copy=False), (al, ar, at, ab, bl, br, bt, bb)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Darknet ``box_iou`` (float32) of paired (..., 4) center-size boxes."""
    a = np.asarray(a, _F32)
    b = np.asarray(b, _F32)
    return _iou_parts(a, b)[0]


def _diou_from(iou, corners, a, b, exponent: float):
    al, ar, at, ab, bl, br, bt, bb = corners
    cw = np.maximum(ar, br) - np.minimum(al, bl)          # box_c: fmin/fmax of the edges
    ch = np.maximum(ab, bb) - np.minimum(at, bt)
    c = cw * cw + ch * ch
    dx = a[..., 0] - b[..., 0]
    dy = a[..., 1] - b[..., 1]
    d = dx * dx + dy * dy
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        u = np.power((d / c).astype(_F64), _F64(exponent)).astype(_F32)   # pow(d / c, beta)
        return np.where(c == 0, iou, iou - u)


def box_diou(a: np.ndarray, b: np.ndarray, beta: float = 0.6) -> np.ndarray:
    """Darknet ``box_diou`` (beta=0.6, used by greedynms) / ``box_diounms(a, b, beta)``."""
    a = np.asarray(a, _F32)
    b = np.asarray(b, _F32)
    iou, corners = _iou_parts(a, b)
    return _diou_from(iou, corners, a, b, beta)


def _nms_exponent(kind: str, beta_nms: float) -> float | None:
    """None for plain IoU, else the DIoU exponent Darknet uses for this nms_kind."""
    if kind in ("default", "cornersnms"):
        return None
    if kind == "greedynms":
        return 0.6                                        # box_diou hard-codes pow(d/c, 0.6)
    if kind == "diounms":
        return float(_F32(beta_nms))                      # box_diounms(a, b, l.beta_nms)
    raise ValueError(f"nms_kind must be one of {', '.join(NMS_KINDS)}, not {kind!r}")


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s+l)`` for all (s, l), vectorised."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.cumsum(lens) - lens
    return np.repeat(starts - offs, lens) + np.arange(total, dtype=np.int64)


def _candidate_pairs(boxes: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray]:
    """A superset of the box pairs (u < v) whose IoU can exceed ``thr`` (0 < thr).

    Necessary conditions of IoU > t (I <= min area, U >= max area, and the overlap
    along x must exceed t*max(w)): ``w`` ratio > t, ``h`` ratio > t,
    ``|dx| < (1-t)*max(wa, wb)``, ``|dy| < (1-t)*max(ha, hb)``. Boxes get a 2-D size
    class (floor(log w / log t), floor(log h / log t)), so partners are in neighbouring
    classes (+-1 each way); each class has a y-strip height and an x half-window that
    bound every pair with its neighbours; one composite-key sorted search over
    (class, strip, x-rank) then returns all candidates. Margins cover float rounding;
    the exact float32 test is done afterwards.
    """
    b64 = boxes.astype(_F64)
    finite = np.isfinite(b64).all(axis=1) & (b64[:, 2] > 0) & (b64[:, 3] > 0)
    idx = np.flatnonzero(finite)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if idx.size < 2:
        return empty
    if idx.size <= _DENSE_PAIRS_MAX:
        iu, iv = np.triu_indices(idx.size, 1)
        return idx[iu], idx[iv]
    b = b64[idx]
    us, vs = [], []
    # boxes far outside the image (garbage predictions) are paired with everything
    extreme = (np.abs(b) > 1e6).any(axis=1)
    if extreme.any():
        ext, norm = idx[extreme], idx[~extreme]
        eu = np.repeat(ext, idx.size)
        ev = np.tile(idx, ext.size)
        keep = (eu != ev) & ~(np.isin(ev, ext) & (ev < eu))   # each pair once
        us.append(np.minimum(eu[keep], ev[keep]))
        vs.append(np.maximum(eu[keep], ev[keep]))
        idx, b = norm, b[~extreme]
        if idx.size < 2:
            return np.concatenate(us), np.concatenate(vs)
    n = idx.size
    eps = 1e-6 * max(1.0, float(np.abs(b).max()))        # > a few float32 ulps of any corner
    # sizes inflated by the float32 slop of Darknet's corner arithmetic: every bound
    # below is then also a bound for the float32 IoU, even for sub-ulp boxes
    x, y, w, h = b[:, 0], b[:, 1], b[:, 2] + 4 * eps, b[:, 3] + 4 * eps

    q = min(float(thr), 0.99) * (1.0 - 1e-6)              # conservative ratio bound
    lq = math.log(q)
    kw = np.floor(np.log(w) / lq).astype(np.int64)
    kh = np.floor(np.log(h) / lq).astype(np.int64)
    kw -= kw.min() - 1                                     # >= 1, so +-1 stays >= 0
    kh -= kh.min() - 1
    span_h = int(kh.max()) + 2
    ckey = kw * span_h + kh
    ukeys, cls = np.unique(ckey, return_inverse=True)
    nc = ukeys.size
    # neighbour table (nc, 9): classes within +-1 in both size axes (-1: absent)
    offs = np.array([dw * span_h + dh for dw in (-1, 0, 1) for dh in (-1, 0, 1)], np.int64)
    nkeys = ukeys[:, None] + offs[None, :]
    pos = np.minimum(np.searchsorted(ukeys, nkeys), nc - 1)
    nbr = np.where(ukeys[pos] == nkeys, pos, -1)
    # per class: max w / h (queries use maxw; the y-strip height uses max h over the neighbours)
    maxw = np.zeros(nc)
    maxh = np.zeros(nc)
    np.maximum.at(maxw, cls, w)
    np.maximum.at(maxh, cls, h)
    nmaxh = np.where(nbr >= 0, maxh[np.maximum(nbr, 0)], 0).max(axis=1)
    strip = (1.0 - q) * nmaxh * (1.0 + 1e-5)               # |dy| < strip
    y0 = float(y.min())
    yspan = float(y.max()) - y0
    strip = np.where(yspan / strip > 2.0 ** 30, np.inf, strip)   # too many strips: one strip
    n_strips = int(np.floor(yspan / strip[np.isfinite(strip)]).max()) + 1 if np.isfinite(strip).any() else 1
    ns = n_strips + 2
    xs = np.sort(x)
    rank = np.searchsorted(xs, x, "left")
    with np.errstate(invalid="ignore"):
        sb = np.where(np.isfinite(strip[cls]), np.floor((y - y0) / strip[cls]), 0).astype(np.int64)
    key = (cls * ns + sb + 1) * (n + 1) + rank
    order = np.argsort(key, kind="stable")
    key_sorted = key[order]

    # queries: every box x every neighbour class; the query window is
    # |dx| < (1-q)*max(w_a, maxw_B), |dy| < (1-q)*max(h_a, maxh_B): at most three strips
    qa, qc = np.nonzero(nbr[cls] >= 0)                     # (box, neighbour slot)
    qb = nbr[cls[qa], qc]                                  # neighbour class
    wx = (1.0 - q) * np.maximum(w[qa], maxw[qb]) * (1.0 + 1e-5) + eps
    wy = (1.0 - q) * np.maximum(h[qa], maxh[qb]) * (1.0 + 1e-5) + eps
    sq = strip[qb]
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(sq)
        s_lo = np.where(fin, np.floor((y[qa] - wy - y0) / sq), 0).astype(np.int64)
        s_hi = np.where(fin, np.floor((y[qa] + wy - y0) / sq), 0).astype(np.int64)
    s_lo = np.maximum(s_lo, -1)
    lo_r = np.searchsorted(xs, x[qa] - wx, "left")
    hi_r = np.searchsorted(xs, x[qa] + wx, "right")
    for d in (0, 1, 2):
        st = s_lo + d
        act = st <= s_hi
        if not act.any():
            continue
        base = (qb[act] * ns + st[act] + 1) * (n + 1)
        lo = np.searchsorted(key_sorted, base + lo_r[act], "left")
        hi = np.searchsorted(key_sorted, base + hi_r[act], "left")
        lens = hi - lo
        if not lens.any():
            continue
        pu = np.repeat(qa[act], lens)
        pv = order[_ranges(lo, lens)]
        m = pu < pv
        pu, pv = pu[m], pv[m]
        # exact necessary conditions (float64, with margins) before the float32 IoU
        wmax, hmax = np.maximum(w[pu], w[pv]), np.maximum(h[pu], h[pv])
        lim = 1.0 - q * (1.0 - 1e-5)
        m = ((np.abs(x[pu] - x[pv]) < lim * wmax * (1.0 + 1e-6) + eps)
             & (np.abs(y[pu] - y[pv]) < lim * hmax * (1.0 + 1e-6) + eps)
             & (np.minimum(w[pu], w[pv]) > q * (1.0 - 1e-5) * wmax)
             & (np.minimum(h[pu], h[pv]) > q * (1.0 - 1e-5) * hmax))
        us.append(idx[pu[m]])
        vs.append(idx[pv[m]])
    if not us:
        return empty
    return np.concatenate(us), np.concatenate(vs)


def _overlap_pairs(boxes: np.ndarray, thr: np.float32, exponent: float | None):
    """All box pairs (u < v) with Darknet's overlap > thr (IoU, or DIoU with ``exponent``)."""
    boxes = np.asarray(boxes, _F32)
    thr = _F32(thr)
    u, v = _candidate_pairs(boxes, float(thr))
    if u.size == 0:
        return u, v
    a, b = boxes[u], boxes[v]
    iou, corners = _iou_parts(a, b)
    m = iou > thr                                         # DIoU <= IoU: a necessary condition
    if exponent is not None and m.any():
        u, v, a, b = u[m], v[m], a[m], b[m]
        iou = iou[m]
        corners = tuple(cc[m] for cc in corners)
        m = _diou_from(iou, corners, a, b, exponent) > thr
    return u[m], v[m]


# =========================================================================== greedy NMS
def _greedy_keep(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Exact greedy NMS on a DAG of "src outranks and overlaps dst" edges.

    ``keep[j]`` iff no kept ``i`` has an edge ``i -> j``. Solved by propagation in
    topological waves: an item is decided kept once all its predecessors are decided
    suppressed, decided suppressed as soon as one predecessor is kept. Each edge is
    visited once; the number of waves is the depth of the suppression chains.
    """
    keep = np.ones(n, bool)
    if src.size == 0:
        return keep
    order = np.argsort(src, kind="stable")
    dst_s = dst[order]
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    pending = np.bincount(dst, minlength=n)               # undecided predecessors
    state = np.zeros(n, np.int8)                          # 0 undecided, 1 kept, 2 suppressed
    hit = np.zeros(n, bool)                               # has a kept predecessor
    kept = np.flatnonzero(pending == 0)
    supp = np.zeros(0, np.int64)
    state[kept] = 1
    big = n > 4096
    while kept.size or supp.size:
        dk = dst_s[_ranges(indptr[kept], indptr[kept + 1] - indptr[kept])] if kept.size else supp[:0]
        ds = dst_s[_ranges(indptr[supp], indptr[supp + 1] - indptr[supp])] if supp.size else supp[:0]
        if dk.size:
            hit[dk] = True
        touched = np.concatenate([dk, ds])
        if touched.size == 0:
            break
        if big and touched.size * 8 > n:
            pending -= np.bincount(touched, minlength=n)
            mark = np.zeros(n, bool)
            mark[touched] = True
            touched = np.flatnonzero(mark)
        else:
            np.subtract.at(pending, touched, 1)
            touched = np.unique(touched)
        und = touched[state[touched] == 0]
        h = hit[und]
        supp = und[h]
        kept = und[~h & (pending[und] == 0)]
        state[supp] = 2
        state[kept] = 1
    keep = state == 1
    return keep


def _tie_first(probs: np.ndarray, u: np.ndarray, v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """For candidates ``u < v`` with equal ``probs[:, c]``: does ``u`` come first in the array
    that ``do_nms_sort`` / ``diounms_sort`` (src/box.c) walk for class ``c``?

    Darknet sorts one detection array in place, once per class, with ``qsort`` and
    ``nms_comparator_v3``; glibc's ``qsort`` is a stable merge sort (``msort_with_tmp``;
    its in-place fallback only runs when the temporary array cannot be allocated), and a
    class's suppression only zeroes that class's probabilities, which no later sort reads.
    So the array for class ``c`` is ordered by ``prob[c]`` descending, ties by ``prob[c-1]``,
    ..., ``prob[0]`` (the original, pre-NMS values), then by candidate order. ``u`` is first
    unless the last class ``j < c`` where the two differ has ``probs[v, j] > probs[u, j]``.
    """
    out = np.ones(u.size, bool)
    c_n = probs.shape[1]
    cols = np.arange(c_n)
    step = max(1, (1 << 20) // max(c_n, 1))
    for s0 in range(0, u.size, step):                      # bounded memory for T x C
        pu, pv = probs[u[s0:s0 + step]], probs[v[s0:s0 + step]]
        diff = (pu != pv) & (cols[None, :] < c[s0:s0 + step, None])
        last = c_n - 1 - np.argmax(diff[:, ::-1], axis=1)  # last differing class before c
        rows = np.arange(pu.shape[0])
        out[s0:s0 + step] = ~diff.any(axis=1) | (pu[rows, last] > pv[rows, last])
    return out


def _class_ranks(probs: np.ndarray) -> np.ndarray:
    """(K, C) position of each candidate in the array ``do_nms_sort`` walks for each class: the
    stable sorts of :func:`_tie_first`, done once per class (C stable sorts of K items)."""
    k_n, c_n = probs.shape
    order = np.arange(k_n)
    ranks = np.empty((k_n, c_n), np.int64)
    for c in range(c_n):
        order = order[np.argsort(-probs[order, c], kind="stable")]
        ranks[order, c] = np.arange(k_n)
    return ranks


#: tie edges per candidate box above which :func:`_class_ranks` replaces :func:`_tie_first`
_TIE_RANKS_MIN = 2


def nms_keep(boxes: np.ndarray, probs: np.ndarray, nms: float = 0.45, nms_kind: str = "default",
             beta_nms: float = 0.6, agnostic: bool = False):
    """Darknet NMS on decoded candidates.

    ``boxes`` (K, 4) float32 relative boxes, ``probs`` (K, C) with zeros for pairs under the
    threshold. Returns ``(box_index, class_index)`` of the surviving pairs in (box, class)
    order. ``nms <= 0`` keeps everything; ``agnostic`` (a darkconv option) keeps at most one
    class per box and suppresses across classes (by each box's best class score; equal scores
    by candidate order).
    """
    boxes = np.asarray(boxes, _F32).reshape(-1, 4)
    probs = np.asarray(probs, _F32)
    thr = _F32(nms)
    exponent = _nms_exponent(nms_kind, beta_nms)
    if agnostic:
        best = probs.argmax(axis=1) if probs.shape[1] else np.zeros(probs.shape[0], np.int64)
        score = probs[np.arange(probs.shape[0]), best] if probs.shape[1] else np.zeros(0, _F32)
        bidx = np.flatnonzero(score > 0)
        if not (nms > 0) or bidx.size < 2:
            return bidx, best[bidx]
        sc = score[bidx]
        u, v = _overlap_pairs(boxes[bidx], thr, exponent)
        first = (sc[u] >= sc[v])                           # no Darknet counterpart: ties by index
        src = np.where(first, u, v)
        dst = np.where(first, v, u)
        keep = _greedy_keep(bidx.size, src, dst)
        return bidx[keep], best[bidx[keep]]

    if nms > 0 and _C is not None:
        k_n, c_n = probs.shape
        per_class = np.count_nonzero(probs > 0, axis=0).astype(np.int64)
        if int(per_class @ per_class) <= _C_NMS_MAX_WORK:
            keep = np.empty((k_n, c_n), np.uint8)
            _C.nms_keep(np.ascontiguousarray(boxes), np.ascontiguousarray(probs), k_n, c_n, float(thr),
                        exponent is not None, 0.0 if exponent is None else exponent, keep)
            return np.nonzero(keep)
    item_box, item_cls = np.nonzero(probs)
    if not (nms > 0) or item_box.size < 2:
        return item_box, item_cls
    score = probs[item_box, item_cls]
    has = np.flatnonzero(probs.any(axis=1))
    u, v = _overlap_pairs(boxes[has], thr, exponent)
    if u.size == 0:
        return item_box, item_cls
    u, v = has[u], has[v]
    k_n, c_n = probs.shape
    item_id = np.full((k_n, c_n), -1, np.int64)
    item_id[item_box, item_cls] = np.arange(item_box.size)
    srcs, dsts = [], []
    chunk = max(1, (1 << 22) // max(c_n, 1))
    present = probs > 0
    ranks = None
    for s0 in range(0, u.size, chunk):                     # bounded memory for E x C
        uu, vv = u[s0:s0 + chunk], v[s0:s0 + chunk]
        e, c = np.nonzero(present[uu] & present[vv])       # classes both boxes carry
        ia, ib = item_id[uu[e], c], item_id[vv[e], c]
        sa, sb = score[ia], score[ib]
        first = sa > sb
        tie = np.flatnonzero(sa == sb)
        if tie.size:                                       # Darknet's order of equal scores
            tu, tv, tc = uu[e[tie]], vv[e[tie]], c[tie]
            if ranks is None and tie.size > _TIE_RANKS_MIN * has.size:
                ranks = _class_ranks(probs)                # many ties: one table is cheaper
            first[tie] = ranks[tu, tc] < ranks[tv, tc] if ranks is not None else _tie_first(probs, tu, tv, tc)
        srcs.append(np.where(first, ia, ib))
        dsts.append(np.where(first, ib, ia))
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    keep = _greedy_keep(item_box.size, src, dst)
    return item_box[keep], item_cls[keep]


# =========================================================================== Darknet's output order
def darknet_rank(box_idx: np.ndarray, class_idx: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Position of each kept (box, class) pair in the order Darknet lists them after NMS.

    ``do_nms_sort`` / ``diounms_sort`` (src/box.c) ``qsort`` the whole detection array by
    ``prob[k]`` (descending) once per class ``k = 0 .. classes-1``, each time before that
    class's suppression, so the array ends sorted by ``prob[classes-1]``, ties by
    ``prob[classes-2]``, ..., then by candidate order (glibc's qsort is a stable merge
    sort). Loops over the detections (``validate_detector_map``, ``draw_detections``) then
    visit box by box, class by class. ``probs`` are the pre-NMS probabilities (K, C) of
    all candidates; only the kept boxes' own keys matter for their relative order.
    """
    box_idx = np.asarray(box_idx, np.int64)
    class_idx = np.asarray(class_idx, np.int64)
    if box_idx.size == 0:
        return np.zeros(0, np.int64)
    boxes = np.unique(box_idx)
    keys = np.vstack([boxes[None].astype(_F64), -probs[boxes].T.astype(_F64)])  # last row = primary key
    box_pos = np.empty(int(boxes.max()) + 1, np.int64)
    box_pos[boxes[np.lexsort(keys)]] = np.arange(boxes.size)
    order = np.lexsort((class_idx, box_pos[box_idx]))
    rank = np.empty(box_idx.size, np.int64)
    rank[order] = np.arange(box_idx.size)
    return rank


def _pair_ranks(box_idx: np.ndarray, class_idx: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """:func:`darknet_rank` of pairs in (box, class) order (what :func:`nms_keep` returns), compiled where built."""
    if _C is None or box_idx.size == 0:
        return darknet_rank(box_idx, class_idx, probs)
    probs = np.ascontiguousarray(probs, _F32)
    rank = np.empty(box_idx.size, np.int64)
    _C.pair_ranks(probs, probs.shape[0], probs.shape[1], np.ascontiguousarray(box_idx, np.int64),
                  np.ascontiguousarray(class_idx, np.int64), box_idx.size, rank)
    return rank


# =========================================================================== public API
def postprocess(heads: Sequence[np.ndarray], spec: ModelSpec, image_sizes: Sequence[tuple[int, int]],
                thresh: float = 0.25, nms: float = 0.45, letterbox: bool | None = None,
                agnostic: bool = False, max_det: int | None = None, clip: bool = False,
                nms_kind: str | None = None) -> list[Detections]:
    """Raw head tensors -> per-image :class:`Detections`, as ``darknet detector test``.

    ``heads``: one (N, A*(5+C), gh, gw) float tensor per spec head, in spec order, holding
    what Darknet feeds into the [yolo]/[region] layer (pre-activation, except that for
    ``new_coords=1`` the previous conv already applied logistic). ``image_sizes``: the
    original (width, height) of each image. ``letterbox`` None -> ``spec.letter_box``;
    ``nms_kind`` None -> the last head's (Darknet uses the last detection layer's);
    ``nms <= 0`` disables NMS. ``agnostic``, ``max_det`` (top scores kept) and ``clip``
    (to [0, 1]) are darkconv options, off by default (Darknet has none of them).
    """
    return [per[0] for per in postprocess_settings(heads, spec, image_sizes, [(thresh, nms)], letterbox=letterbox,
                                                   agnostic=agnostic, max_det=max_det, clip=clip, nms_kind=nms_kind)]


def postprocess_settings(heads: Sequence[np.ndarray], spec: ModelSpec, image_sizes: Sequence[tuple[int, int]],
                         settings: Sequence[tuple[float, float]], letterbox: bool | None = None,
                         agnostic: bool = False, max_det: int | None = None, clip: bool = False,
                         nms_kind: str | None = None) -> list[list[Detections]]:
    """:func:`postprocess` under several ``(thresh, nms)`` settings: ``out[image][k]`` is what setting ``k``
    gives, the heads decoded once (:func:`decode_thresholds`), NMS run per setting."""
    kind = spec.nms_kind if nms_kind is None else nms_kind
    _nms_exponent(kind, spec.beta_nms)                    # validate early
    if max_det is not None and int(max_det) < 0:
        raise ValueError(f"max_det must be >= 0, got {max_det}")
    settings = [(float(t), float(n)) for t, n in settings]
    decoded = decode_thresholds(heads, spec, image_sizes, [t for t, _ in settings], letterbox)
    return [[_nms_detections(boxes, obj, probs, nms, kind, spec.beta_nms, agnostic, max_det, clip)
             for (boxes, obj, probs), (_, nms) in zip(per_thresh, settings)] for per_thresh in decoded]


def _nms_detections(boxes, obj, probs, nms, kind, beta_nms, agnostic, max_det, clip) -> Detections:
    bi, ci = nms_keep(boxes, probs, nms, kind, beta_nms, agnostic)
    scores = probs[bi, ci]
    if max_det is not None and bi.size > int(max_det):
        top = np.lexsort((np.arange(bi.size), -scores))[:int(max_det)]
        top.sort()
        bi, ci, scores = bi[top], ci[top], scores[top]
    # without NMS Darknet sorts nothing: candidate order (= rank None)
    rank = _pair_ranks(bi, ci, probs) if nms > 0 else None
    out_boxes = boxes[bi]
    if clip and out_boxes.size:
        l, r, t, b = (np.clip(v, _F32(0), _ONE) for v in _corners(out_boxes))
        out_boxes = np.stack([(l + r) / _F32(2), (t + b) / _F32(2), r - l, b - t], axis=1)
    return Detections(boxes=np.ascontiguousarray(out_boxes, _F32), scores=scores.astype(_F32, copy=False),
                      class_ids=ci.astype(np.int64, copy=False), objectness=obj[bi].astype(_F32, copy=False),
                      box_ids=bi.astype(np.int64, copy=False), rank=rank)
