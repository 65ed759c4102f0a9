"""darkconv.postprocess against loop transcriptions of AlexeyAB darknet's C code.

The ``ref_*`` functions follow src/yolo_layer.c (forward_yolo_layer, get_yolo_box,
get_yolo_detections, correct_yolo_boxes), src/region_layer.c (forward_region_layer,
get_region_box, get_region_boxes, custom_get_region_detections in network.c),
src/blas.c (softmax, scal_add_cpu) and src/box.c (box_iou, box_diou, box_diounms,
do_nms_sort, diounms_sort) statement by statement on flat float32 arrays in Darknet's
memory layout, with numpy float32 scalars (double where the C calls exp/pow).
``qsort`` in do_nms_sort / diounms_sort is transcribed as glibc's (stdlib/msort.c
``msort_with_tmp``: top-down merge sort, the left run wins when the comparator returns <= 0,
hence stable; detections are 88 bytes > 32, so glibc sorts pointers and then permutes, which
gives the same order), and checked against the real glibc ``qsort`` through ctypes.
"""
from __future__ import annotations

import math
import platform

import numpy as np
import pytest

from conftest import compiled_kernel
from darkconv.darknet.spec import HeadSpec, ModelSpec
from darkconv.postprocess import (Detections, box_diou, box_iou, decode, decode_thresholds, postprocess,
                                  postprocess_settings)

F = np.float32
D = np.float64


# ============================================================================ references
def logistic(x):
    return F(1) / (F(1) + F(np.exp(D(-F(x)))))


def ref_forward_yolo(raw: np.ndarray, head: HeadSpec) -> np.ndarray:
    """forward_yolo_layer (CPU) on one image: raw (A*(5+C), h, w) -> flat l.output."""
    out = raw.astype(F).ravel().copy()
    lwh = raw.shape[1] * raw.shape[2]
    size = 5 + head.classes
    for n in range(head.num_anchors):
        base = n * lwh * size
        if not head.new_coords:
            for i in range(2 * lwh):
                out[base + i] = logistic(out[base + i])
            for i in range((1 + head.classes) * lwh):
                out[base + 4 * lwh + i] = logistic(out[base + 4 * lwh + i])
        alpha = F(head.scale_x_y)
        beta = F(-0.5 * D(F(head.scale_x_y) - F(1)))
        for i in range(2 * lwh):                      # scal_add_cpu
            out[base + i] = out[base + i] * alpha + beta
    return out


def ref_get_yolo_box(x, anchors, n, index, i, j, lw, lh, w, h, stride, new_coords):
    bx = (F(i) + x[index + 0 * stride]) / F(lw)
    by = (F(j) + x[index + 1 * stride]) / F(lh)
    if new_coords:
        bw = x[index + 2 * stride] * x[index + 2 * stride] * F(4) * F(anchors[n][0]) / F(w)
        bh = x[index + 3 * stride] * x[index + 3 * stride] * F(4) * F(anchors[n][1]) / F(h)
    else:
        bw = F(np.exp(D(x[index + 2 * stride])) * D(F(anchors[n][0])) / D(w))
        bh = F(np.exp(D(x[index + 3 * stride])) * D(F(anchors[n][1])) / D(h))
    return [F(bx), F(by), F(bw), F(bh)]


def ref_correct_yolo_boxes(dets, w, h, netw, neth, letter):
    if letter:
        if (F(netw) / F(w)) < (F(neth) / F(h)):
            new_w, new_h = netw, (h * netw) // w
        else:
            new_h, new_w = neth, (w * neth) // h
    else:
        new_w, new_h = netw, neth
    deltaw, deltah = F(netw - new_w), F(neth - new_h)
    ratiow, ratioh = F(new_w) / F(netw), F(new_h) / F(neth)
    for d in dets:
        b = d["bbox"]
        b[0] = F((D(b[0]) - D(deltaw) / 2.0 / netw) / D(ratiow))
        b[1] = F((D(b[1]) - D(deltah) / 2.0 / neth) / D(ratioh))
        b[2] = b[2] * (F(1) / ratiow)
        b[3] = b[3] * (F(1) / ratioh)


def ref_get_yolo_detections(raw, head, w, h, netw, neth, thresh, letter):
    out = ref_forward_yolo(raw, head)
    lh, lw = raw.shape[1:]
    lwh = lw * lh
    size = 5 + head.classes
    thresh = F(thresh)
    dets = []
    for i in range(lwh):
        row, col = i // lw, i % lw
        for n in range(head.num_anchors):
            obj_index = n * lwh * size + 4 * lwh + i
            objectness = out[obj_index]
            if objectness > thresh:
                box_index = n * lwh * size + i
                bbox = ref_get_yolo_box(out, head.anchors, n, box_index, col, row, lw, lh,
                                        netw, neth, lwh, head.new_coords)
                prob = []
                for j in range(head.classes):
                    p = objectness * out[n * lwh * size + (5 + j) * lwh + i]
                    prob.append(p if p > thresh else F(0))
                dets.append({"bbox": bbox, "objectness": objectness, "prob": prob})
    ref_correct_yolo_boxes(dets, w, h, netw, neth, letter)
    return dets


def ref_softmax(vals):
    largest = -np.finfo(F).max
    for v in vals:
        if v > largest:
            largest = v
    s = F(0)
    e = []
    for v in vals:
        ev = F(np.exp(D(v / F(1) - largest / F(1))))
        s = F(s + ev)
        e.append(ev)
    return [F(x / s) for x in e]


def ref_custom_get_region_detections(raw, head, w, h, netw, neth, thresh, letter):
    lh, lw = raw.shape[1:]
    lwh = lw * lh
    size = 5 + head.classes
    flat = raw.astype(F).ravel()
    # forward_region_layer: flatten to location-major, logistic objectness, softmax
    out = np.zeros_like(flat)
    for i in range(lwh):
        for c in range(size * head.num_anchors):
            out[i * size * head.num_anchors + c] = flat[c * lwh + i]
    for i in range(lwh * head.num_anchors):
        out[i * size + 4] = logistic(out[i * size + 4])
        if head.softmax:
            out[i * size + 5:i * size + 5 + head.classes] = ref_softmax(out[i * size + 5:i * size + 5 + head.classes])
    thresh = F(thresh)
    dets = []
    for i in range(lwh):                               # get_region_boxes(l, 1, 1, ...)
        row, col = i // lw, i % lw
        for n in range(head.num_anchors):
            index = i * head.num_anchors + n
            scale = out[index * size + 4]
            if head.classfix == -1 and scale < .5:
                scale = F(0)
            bi = index * size
            bx = (F(col) + logistic(out[bi + 0])) / F(lw)
            by = (F(row) + logistic(out[bi + 1])) / F(lh)
            bw = F(np.exp(D(out[bi + 2])) * D(F(head.anchors[n][0])) / D(lw))
            bh = F(np.exp(D(out[bi + 3])) * D(F(head.anchors[n][1])) / D(lh))
            bbox = [F(bx * F(1)), F(by * F(1)), F(bw * F(1)), F(bh * F(1))]
            prob = []
            for j in range(head.classes):
                p = scale * out[bi + 5 + j]
                prob.append(p if p > thresh else F(0))
            dets.append({"bbox": bbox, "objectness": F(1), "prob": prob, "scale": scale})
    ref_correct_yolo_boxes(dets, w, h, netw, neth, letter)
    return dets


# ---- box.c
def overlap(x1, w1, x2, w2):
    l1 = x1 - w1 / F(2)
    l2 = x2 - w2 / F(2)
    left = l1 if l1 > l2 else l2
    r1 = x1 + w1 / F(2)
    r2 = x2 + w2 / F(2)
    right = r1 if r1 < r2 else r2
    return right - left


def box_intersection(a, b):
    w = overlap(a[0], a[2], b[0], b[2])
    h = overlap(a[1], a[3], b[1], b[3])
    if w < 0 or h < 0:
        return F(0)
    return w * h


def ref_box_iou(a, b):
    i = box_intersection(a, b)
    u = a[2] * a[3] + b[2] * b[3] - i
    if i == 0 or u == 0:
        return F(0)
    return i / u


def ref_box_diounms(a, b, beta):
    top = F(min(a[1] - a[3] / F(2), b[1] - b[3] / F(2)))
    bot = F(max(a[1] + a[3] / F(2), b[1] + b[3] / F(2)))
    left = F(min(a[0] - a[2] / F(2), b[0] - b[2] / F(2)))
    right = F(max(a[0] + a[2] / F(2), b[0] + b[2] / F(2)))
    w = right - left
    h = bot - top
    c = w * w + h * h
    iou = ref_box_iou(a, b)
    if c == 0:
        return iou
    d = (a[0] - b[0]) * (a[0] - b[0]) + (a[1] - b[1]) * (a[1] - b[1])
    u = F(math.pow(D(d / c), D(beta)))
    return iou - u


def ref_box_diou(a, b):
    return ref_box_diounms(a, b, 0.6)                  # box_diou: pow(d / c, 0.6)


def glibc_msort(items: list, cmp) -> list:
    """glibc ``qsort`` when its temporary array can be allocated (``msort_with_tmp``): split at
    n/2, sort both halves, merge taking from the left run while ``cmp(left, right) <= 0``."""
    n = len(items)
    if n <= 1:
        return list(items)
    n1 = n // 2
    b1, b2 = glibc_msort(items[:n1], cmp), glibc_msort(items[n1:], cmp)
    out, i, j = [], 0, 0
    while i < len(b1) and j < len(b2):
        if cmp(b1[i], b2[j]) <= 0:
            out.append(b1[i])
            i += 1
        else:
            out.append(b2[j])
            j += 1
    return out + b1[i:] + b2[j:]


def nms_comparator_v3(a, b) -> int:
    """box.c: ``diff = a.prob[b.sort_class] - b.prob[b.sort_class]`` in float; -1 puts ``a`` first."""
    k = b["sort_class"]
    diff = F(a["prob"][k] - b["prob"][k]) if k >= 0 else F(a["objectness"] - b["objectness"])
    return 1 if diff < 0 else (-1 if diff > 0 else 0)


def _nms(dets, classes, thresh, overlap_fn, qsort=glibc_msort):
    """do_nms_sort / diounms_sort: objectness == 0 swapped to the end, then per class k the array
    is re-sorted in place (qsort, nms_comparator_v3 with sort_class = k) and walked greedily.
    Returns the array in its final order. Darknet also evaluates the overlap for pairs whose prob
    is already 0; that cannot change anything (it only zeroes), so the transcription skips those
    evaluations and caches the class-independent overlap of a pair."""
    k = len(dets) - 1
    i = 0
    while i <= k:
        if dets[i]["objectness"] == 0:
            dets[i], dets[k] = dets[k], dets[i]
            k -= 1
            i -= 1
        i += 1
    total = k + 1
    thresh = F(thresh)
    cache = {}
    for c in range(classes):
        for d in dets[:total]:
            d["sort_class"] = c
        dets[:total] = qsort(dets[:total], nms_comparator_v3)
        for ii in range(total):
            di = dets[ii]
            if di["prob"][c] == 0:
                continue
            for jj in range(ii + 1, total):
                dj = dets[jj]
                if dj["prob"][c] == 0:
                    continue
                key = (id(di), id(dj))
                if key not in cache:
                    cache[key] = overlap_fn(di["bbox"], dj["bbox"]) > thresh
                if cache[key]:
                    dj["prob"][c] = F(0)
    return dets


def ref_nms(dets, classes, thresh, kind, beta=0.6, qsort=glibc_msort):
    if kind in ("default", "cornersnms"):
        _nms(dets, classes, thresh, ref_box_iou, qsort)       # do_nms_sort / CORNERS_NMS: box_iou
    elif kind == "greedynms":
        _nms(dets, classes, thresh, ref_box_diou, qsort)
    elif kind == "diounms":
        _nms(dets, classes, thresh, lambda a, b: ref_box_diounms(a, b, F(beta)), qsort)
    else:
        raise AssertionError(kind)


def index_tie_sort(items, cmp):
    """NOT Darknet: the per-class sort with ties by candidate index (darkconv's old rule)."""
    return sorted(items, key=lambda d: (-float(d["prob"][d["sort_class"]]), d["index"]))


def ref_detect(raws, spec, w, h, thresh=0.25, nms=0.45, letter=None, kind=None, qsort=glibc_msort):
    """get_network_boxes + NMS + the (prob > thresh) pairs draw_detections_v3 prints, in the
    order of Darknet's array after NMS."""
    letter = spec.letter_box if letter is None else letter
    kind = spec.nms_kind if kind is None else kind
    dets = []
    for raw, head in zip(raws, spec.heads):
        if head.kind == "yolo":
            dets += ref_get_yolo_detections(raw, head, w, h, spec.width, spec.height, thresh, letter)
        else:
            dets += ref_custom_get_region_detections(raw, head, w, h, spec.width, spec.height, thresh, letter)
    for i, d in enumerate(dets):
        d["index"] = i
    if nms:
        ref_nms(dets, spec.classes, nms, kind, spec.beta_nms, qsort)
    out = []
    for d in dets:
        for j, p in enumerate(d["prob"]):
            if p > F(thresh):
                out.append((j, float(p), *[float(v) for v in d["bbox"]]))
    return out


def as_tuples(det: Detections):
    return [(int(c), float(s), *[float(v) for v in b]) for c, s, b in zip(det.class_ids, det.scores, det.boxes)]


def assert_same(got, ref, tol=1e-5):
    assert len(got) == len(ref), f"{len(got)} pairs vs reference {len(ref)}"
    g = np.array(sorted(got)) if got else np.zeros((0, 6))
    r = np.array(sorted(ref)) if ref else np.zeros((0, 6))
    np.testing.assert_array_equal(g[:, 0], r[:, 0])
    np.testing.assert_allclose(g[:, 1:], r[:, 1:], atol=tol, rtol=0)


# ============================================================================ specs / data
YOLO_ANCHORS_A = ((116.0, 90.0), (156.0, 198.0), (373.0, 326.0))
YOLO_ANCHORS_B = ((30.0, 61.0), (62.0, 45.0), (59.0, 119.0))


def yolo_spec(classes=4, new_coords=0, scale=1.0, grids=((4, 6), (8, 12)), nms_kind="default",
              beta=0.6, letter=False, net=(448, 320)):
    anchors = (YOLO_ANCHORS_A, YOLO_ANCHORS_B)
    heads = tuple(HeadSpec("yolo", 10 + i, classes, anchors[i], (), g, scale, new_coords, nms_kind, beta)
                  for i, g in enumerate(grids))
    return ModelSpec(net[0], net[1], letter_box=letter, heads=heads)


def region_spec(classes=5, softmax=True, grid=(5, 7), classfix=0):
    anchors = ((0.57, 0.68), (1.87, 2.06), (3.34, 5.47), (7.88, 3.53), (9.77, 9.17))
    return ModelSpec(288, 224, heads=(HeadSpec("region", 30, classes, anchors, (), grid, softmax=softmax,
                                               classfix=classfix),))


def random_heads(spec, rng, n=1, obj_bias=0.0, new_coords=False):
    out = []
    for hs in spec.heads:
        t = rng.normal(0, 1.2, size=(n, hs.num_anchors, 5 + hs.classes) + tuple(hs.grid)).astype(F)
        t[:, :, 4] += obj_bias
        t[:, :, 5:] += 0.5
        if new_coords:                                  # the conv already applied logistic
            t = 1 / (1 + np.exp(-t))
        out.append(t.reshape(n, hs.channels, *hs.grid).astype(F))
    return out


# ============================================================================ the two NMS kernels
@pytest.fixture(params=["compiled", "numpy"])
def nms_kernel(request, monkeypatch):
    """Run a test through each NMS: the compiled ``darkconv._cnms`` (small inputs) and the NumPy one."""
    import darkconv.postprocess as pp

    monkeypatch.setattr(pp, "_C", compiled_kernel("_cnms") if request.param == "compiled" else None)
    return request.param


# ============================================================================ random tests
@pytest.mark.parametrize("new_coords,scale,kind", [
    (0, 1.0, "default"), (0, 1.05, "greedynms"), (1, 2.0, "default"), (1, 2.0, "diounms"),
    (0, 1.2, "cornersnms"),
])
@pytest.mark.parametrize("letter", [False, True])
def test_yolo_random_vs_reference(new_coords, scale, kind, letter, nms_kernel):
    rng = np.random.default_rng(100 * new_coords + int(scale * 10) + 7 * letter + len(kind))
    spec = yolo_spec(new_coords=new_coords, scale=scale, nms_kind=kind, beta=0.8)
    raws = random_heads(spec, rng, obj_bias=-0.5, new_coords=bool(new_coords))
    size = (500, 375)
    got = postprocess(raws, spec, [size], letterbox=letter)[0]
    ref = ref_detect([r[0] for r in raws], spec, *size, letter=letter)
    assert len(ref) > 20                                   # many pairs, NMS does work
    assert_same(as_tuples(got), ref)
    no_nms = ref_detect([r[0] for r in raws], spec, *size, letter=letter, nms=0)
    assert len(no_nms) > len(ref)


@pytest.mark.parametrize("softmax,classfix", [(True, 0), (False, 0), (True, -1), (False, -1)])
def test_region_random_vs_reference(softmax, classfix, nms_kernel):
    rng = np.random.default_rng(3 + softmax)
    spec = region_spec(softmax=softmax, classfix=classfix)
    raws = random_heads(spec, rng, obj_bias=1.0)
    for size, letter in (((640, 480), False), ((480, 640), True)):
        got = postprocess(raws, spec, [size], letterbox=letter, thresh=0.2)[0]
        ref = ref_detect([r[0] for r in raws], spec, *size, thresh=0.2, letter=letter)
        assert len(ref) > 10
        assert_same(as_tuples(got), ref)
    if classfix == -1:
        # get_region_boxes: objectness under .5 gives no classes, even with raw class values > 1
        assert got.objectness.min() >= 0.5
        plain = postprocess(raws, region_spec(softmax=softmax), [size], letterbox=letter, thresh=0.2)[0]
        assert np.any(plain.objectness < 0.5)
    elif not softmax:
        # raw (unbounded) class values: Darknet's region keeps pairs whose objectness
        # alone is under the threshold; make sure some exist and are found
        assert np.any((got.objectness <= 0.2) & (got.scores > 0.2))


@pytest.mark.parametrize("which", ["yolo", "yolo-new-coords", "region", "region-raw", "region-classfix"])
def test_settings_decode_once_and_equal_each_setting_alone(which):
    """eval's two passes (0.005/0.45 and 0.001/0.6) decode the heads once: every setting gives exactly what
    postprocess gives alone (and the loop transcription), whatever the order of the settings."""
    rng = np.random.default_rng(len(which))
    spec = {"yolo": lambda: yolo_spec(scale=1.05), "yolo-new-coords": lambda: yolo_spec(new_coords=1, scale=2.0),
            "region": lambda: region_spec(), "region-raw": lambda: region_spec(softmax=False),
            "region-classfix": lambda: region_spec(softmax=False, classfix=-1)}[which]()
    raws = random_heads(spec, rng, n=2, obj_bias=0.5, new_coords=which == "yolo-new-coords")
    sizes = [(500, 375), (333, 640)]
    settings = [(0.25, 0.45), (0.005, 0.45), (0.001, 0.6), (0.6, 0.3), (0.005, 0.45)]
    fields = ("boxes", "scores", "class_ids", "objectness", "box_ids", "rank")
    for letter in (False, True):
        got = postprocess_settings(raws, spec, sizes, settings, letterbox=letter)
        for k, (t, n) in enumerate(settings):
            alone = postprocess(raws, spec, sizes, thresh=t, nms=n, letterbox=letter)
            for b, size in enumerate(sizes):
                for f in fields:
                    np.testing.assert_array_equal(getattr(got[b][k], f), getattr(alone[b], f), err_msg=f)
                assert_same(as_tuples(got[b][k]), ref_detect([r[b] for r in raws], spec, *size, thresh=t, nms=n,
                                                             letter=letter))
        ts = (0.3, 0.001, 0.02, -0.5, -1.0)                     # negative: API callers, decoded at that value
        per = decode_thresholds(raws, spec, sizes, ts, letterbox=letter)
        for k, t in enumerate(ts):
            for b, one in enumerate(decode(raws, spec, sizes, t, letterbox=letter)):
                for x, y in zip(per[b][k], one):
                    np.testing.assert_array_equal(x, y)
    assert sum(len(d) for d in got[0]) > 50                    # enough pairs that the filters matter
    assert postprocess_settings(raws, spec, sizes, []) == [[], []]


def test_many_candidates_sparse_path_vs_reference(nms_kernel):
    """Enough candidates (> 160 boxes) to use the sparse pair search, dense overlaps."""
    rng = np.random.default_rng(21)
    spec = yolo_spec(classes=3, grids=((5, 7), (10, 14)), net=(448, 320))
    raws = random_heads(spec, rng, obj_bias=3.0)
    for r in raws:                                         # fewer class pairs, same boxes
        r.reshape(3, 8, *r.shape[2:])[:, 5:] -= 2.0
    for kind in ("default", "greedynms"):
        got = postprocess(raws, spec, [(448, 320)], nms_kind=kind)[0]
        ref = ref_detect([r[0] for r in raws], spec, 448, 320, kind=kind)
        probs = decode(raws, spec, [(448, 320)])[0][2]
        assert (probs > 0).any(axis=1).sum() > 200            # > 160: sparse pair search
        assert_same(as_tuples(got), ref)


def test_overlap_functions_vs_reference():
    rng = np.random.default_rng(8)
    a = np.concatenate([rng.random((300, 2)), rng.random((300, 2)) * 0.5 + 0.01], 1).astype(F)
    b = (a + rng.normal(0, 0.05, a.shape)).astype(F)
    b[:, 2:] = np.abs(b[:, 2:]) + F(0.001)
    iou = box_iou(a, b)
    dio = box_diou(a, b)
    dnm = box_diou(a, b, beta=F(0.9))
    for k in range(len(a)):
        assert iou[k] == ref_box_iou(a[k], b[k])
        assert dio[k] == ref_box_diou(a[k], b[k])
        assert dnm[k] == ref_box_diounms(a[k], b[k], F(0.9))



def test_compiled_overlaps_equal_numpy_overlaps_bit_for_bit():
    """The IoU / DIoU the compiled NMS thresholds, on 200k random pairs (overlapping, nested, disjoint, tiny,
    huge), bit for bit the float32 numbers of box_iou / box_diou (checked against box.c just above): a
    reordered sum or a fused multiply-add would change some last bits."""
    c = compiled_kernel("_cnms")
    rng = np.random.default_rng(9)
    n = 200_000
    a = np.concatenate([rng.random((n, 2)), rng.random((n, 2)) * 0.5 + 1e-4], 1).astype(F)
    b = (a + rng.normal(0, 0.05, a.shape) * rng.choice([0.01, 1.0, 10.0], (n, 1))).astype(F)
    b[:, 2:] = np.abs(b[:, 2:]) + F(1e-4)
    a[:1000] *= F(1e4)                                                   # large values, coarse floats
    b[:1000] *= F(1e4)
    for diou, exponent, want in ((False, 0.0, box_iou(a, b)), (True, 0.6, box_diou(a, b)),
                                 (True, float(F(0.9)), box_diou(a, b, beta=F(0.9)))):
        got = np.empty(n, F)
        c.overlap_values(a, b, n, diou, exponent, got)
        np.testing.assert_array_equal(got, want)
        assert (want > 0.3).sum() > 10000 and (want <= 0).sum() > 1000          # overlapping and disjoint
    with pytest.raises(ValueError, match="must hold"):
        c.overlap_values(a, b[:-1], n, False, 0.0, np.empty(n, F))


# ============================================================================ crafted heads
def craft(spec: ModelSpec, boxes, n=1):
    """Raw heads with given detections: boxes = [(head, cell_row, cell_col, anchor, x, y, w, h,
    obj, {class: p}, image)] with x, y, w, h relative to the network input. Everything else
    is far below any threshold."""
    raws = [np.full((n, hs.num_anchors, 5 + hs.classes) + tuple(hs.grid), -30.0, F) for hs in spec.heads]
    for hi, r, c, a, x, y, w, h, obj, probs, img in boxes:
        hs = spec.heads[hi]
        gh, gw = hs.grid
        assert hs.kind == "yolo" and not hs.new_coords and hs.scale_x_y == 1.0
        fx, fy = x * gw - c, y * gh - r
        assert 0 < fx < 1 and 0 < fy < 1
        v = raws[hi][img, a, :, r, c]
        v[0], v[1] = math.log(fx / (1 - fx)), math.log(fy / (1 - fy))
        v[2] = math.log(w * spec.width / hs.anchors[a][0])
        v[3] = math.log(h * spec.height / hs.anchors[a][1])
        v[4] = math.log(obj / (1 - obj))
        for k, p in probs.items():
            v[5 + k] = math.log(p / (1 - p))
    return [r.reshape(n, spec.heads[i].channels, *spec.heads[i].grid) for i, r in enumerate(raws)]


def square_spec(kind="default", beta=0.6, classes=3):
    return ModelSpec(416, 416, heads=(HeadSpec("yolo", 5, classes, YOLO_ANCHORS_B, (), (13, 13),
                                               nms_kind=kind, beta_nms=beta),))


def test_iou_vs_diou_nms_differ(nms_kernel):
    # A: 0.4 x 0.4 at (0.5, 0.5); B shifted by 0.1333 in x: IoU ~ 0.50 > 0.45, but
    # (d/c)^0.6 ~ 0.145 so DIoU ~ 0.355 < 0.45; (d/c)^1 = 0.04 -> DIoU ~ 0.46 > 0.45
    boxes = [(0, 6, 6, 0, 0.5, 0.5, 0.4, 0.4, 0.95, {1: 0.9}, 0),
             (0, 6, 8, 1, 0.6333, 0.5, 0.4, 0.4, 0.9, {1: 0.9}, 0)]
    results = {}
    for kind, beta in (("default", 0.6), ("cornersnms", 0.6), ("greedynms", 0.6),
                       ("diounms", 0.6), ("diounms", 1.0)):
        spec = square_spec(kind, beta)
        raws = craft(spec, boxes)
        got = postprocess(raws, spec, [(416, 416)])[0]
        assert_same(as_tuples(got), ref_detect([r[0] for r in raws], spec, 416, 416))
        results[(kind, beta)] = len(got)
    assert results == {("default", 0.6): 1, ("cornersnms", 0.6): 1, ("greedynms", 0.6): 2,
                       ("diounms", 0.6): 2, ("diounms", 1.0): 1}
    # the spec's nms_kind can be overridden per call
    spec = square_spec("default")
    raws = craft(spec, boxes)
    assert len(postprocess(raws, spec, [(416, 416)], nms_kind="greedynms")[0]) == 2


def test_diou_is_computed_on_relative_image_boxes(nms_kernel):
    """DIoU depends on the aspect ratio: the same network output NMS'ed for a wide image."""
    boxes = [(0, 6, 6, 0, 0.5, 0.5, 0.4, 0.4, 0.95, {0: 0.9}, 0),
             (0, 6, 8, 1, 0.5 + 0.135, 0.5, 0.4, 0.4, 0.9, {0: 0.9}, 0)]
    spec = square_spec("greedynms")
    raws = craft(spec, boxes)
    for size in ((416, 416), (1280, 300), (300, 1280)):
        got = postprocess(raws, spec, [size], letterbox=True)[0]
        assert_same(as_tuples(got), ref_detect([r[0] for r in raws], spec, *size, letter=True))


def test_multilabel_and_per_class_nms(nms_kernel):
    # A and B overlap (IoU ~ 0.67). class 0: A 0.9 > B 0.8 -> B suppressed;
    # class 1: B 0.7 > A 0.6 -> A suppressed. C is alone with two labels: both kept.
    boxes = [(0, 6, 6, 0, 0.50, 0.50, 0.30, 0.30, 0.99, {0: 0.91, 1: 0.61}, 0),
             (0, 6, 7, 2, 0.55, 0.50, 0.30, 0.30, 0.99, {0: 0.81, 1: 0.71}, 0),
             (0, 2, 2, 1, 0.20, 0.20, 0.10, 0.10, 0.99, {1: 0.5, 2: 0.45}, 0)]
    spec = square_spec()
    raws = craft(spec, boxes)
    got = postprocess(raws, spec, [(416, 416)])[0]
    assert_same(as_tuples(got), ref_detect([r[0] for r in raws], spec, 416, 416))
    pairs = {(int(b), int(c)) for b, c in zip(got.box_ids, got.class_ids)}
    # candidate order: cell (2,2) first, then (6,6), then (6,7)
    assert pairs == {(0, 1), (0, 2), (1, 0), (2, 1)}
    c_rows = got.box_ids == 0
    assert np.all(got.boxes[c_rows] == got.boxes[c_rows][0])         # shared box
    assert np.allclose(got.objectness, 0.99, atol=1e-6)
    assert np.allclose(got.scores[(got.box_ids == 1)], 0.99 * 0.91, atol=1e-6)
    # argmax-only (a common mistake) would lose (0, 2); class-agnostic NMS keeps one label per box
    agn = postprocess(raws, spec, [(416, 416)], agnostic=True)[0]
    assert {(int(b), int(c)) for b, c in zip(agn.box_ids, agn.class_ids)} == {(0, 1), (1, 0)}


def test_letterbox_offsets_non_square_image():
    boxes = [(0, 3, 3, 0, 0.25, 0.25, 0.2, 0.1, 0.9, {2: 0.9}, 0),
             (0, 9, 10, 2, 0.8, 0.7, 0.1, 0.3, 0.9, {0: 0.9}, 0)]
    spec = square_spec()
    raws = craft(spec, boxes)
    w, h = 640, 360                                      # new 416x234, dy = 91
    lb = postprocess(raws, spec, [(w, h)], letterbox=True)[0]
    st = postprocess(raws, spec, [(w, h)], letterbox=False)[0]
    assert_same(as_tuples(lb), ref_detect([r[0] for r in raws], spec, w, h, letter=True))
    assert_same(as_tuples(st), ref_detect([r[0] for r in raws], spec, w, h, letter=False))
    dec = decode(raws, spec, [(w, h)], letterbox=False)[0][0]
    np.testing.assert_array_equal(st.boxes, dec)         # stretch: identity correction
    k = int(np.flatnonzero(lb.class_ids == 2)[0])
    ny = (st.boxes[k, 1] - 91 / 416) / (234 / 416)
    assert abs(lb.boxes[k, 1] - ny) < 1e-6 and abs(lb.boxes[k, 0] - st.boxes[k, 0]) < 1e-7
    assert abs(lb.boxes[k, 3] - st.boxes[k, 3] * 416 / 234) < 1e-6
    # spec.letter_box is the default
    lb2 = postprocess(raws, spec.with_letterbox(True), [(w, h)])[0]
    np.testing.assert_array_equal(lb2.boxes, lb.boxes)


def test_score_ties_in_the_first_class_go_to_candidate_order(nms_kernel):
    boxes = [(0, 6, 6, 0, 0.5, 0.5, 0.3, 0.3, 0.9, {0: 0.8}, 0),
             (0, 6, 6, 1, 0.5, 0.5, 0.3, 0.3, 0.9, {0: 0.8}, 0)]
    spec = square_spec()
    raws = craft(spec, boxes)
    dec_boxes, _, probs = decode(raws, spec, [(416, 416)])[0]
    assert probs[0, 0] == probs[1, 0]
    got = postprocess(raws, spec, [(416, 416)])[0]
    assert got.box_ids.tolist() == [0]


def test_score_ties_in_a_later_class_follow_the_previous_classes_sort(nms_kernel):
    """A (candidate 0) and B (candidate 1) overlap and tie in class 2. do_nms_sort's class-0 sort
    put B first (0.9 > 0.8); class 1 (both 0) keeps that order; the stable class-2 sort too, so B
    suppresses A in class 2. (A lower-index tie-break keeps A instead.)"""
    boxes = [(0, 6, 6, 0, 0.5, 0.5, 0.3, 0.3, 0.9, {0: 0.8, 2: 0.7}, 0),
             (0, 6, 6, 1, 0.52, 0.5, 0.3, 0.3, 0.9, {0: 0.9, 2: 0.7}, 0)]
    spec = square_spec()
    raws = craft(spec, boxes)
    probs = decode(raws, spec, [(416, 416)])[0][2]
    assert probs[0, 2] == probs[1, 2] > 0 and probs[1, 0] > probs[0, 0]
    got = postprocess(raws, spec, [(416, 416)])[0]
    assert sorted(zip(got.box_ids.tolist(), got.class_ids.tolist())) == [(1, 0), (1, 2)]
    ref = ref_detect([r[0] for r in raws], spec, 416, 416)
    assert_same(as_tuples(got), ref)
    wrong = ref_detect([r[0] for r in raws], spec, 416, 416, qsort=index_tie_sort)
    assert sorted(t[0] for t in wrong) == [0, 2] and wrong != ref     # A kept in class 2 there


def tie_heads(spec, rng, obj_levels=(1.0, 2.5), cls_levels=(0.3, 1.0, 2.0), p_on=0.6):
    """Random boxes whose objectness and class logits take a few values only: obj * class
    products repeat exactly, so float32 score ties are everywhere, within and across classes."""
    out = []
    for hs in spec.heads:
        shape = (1, hs.num_anchors, 5 + hs.classes) + tuple(hs.grid)
        t = rng.normal(0, 0.7, size=shape).astype(F)
        t[:, :, 4] = rng.choice(obj_levels, size=t[:, :, 4].shape)
        cls = rng.choice(cls_levels, size=t[:, :, 5:].shape)
        t[:, :, 5:] = np.where(rng.random(cls.shape) < p_on, cls, -30.0)
        out.append(t.reshape(1, hs.channels, *hs.grid).astype(F))
    return out


_TIES_REF: dict = {}                                     # (kind, grids) -> the transcription's pairs, both sorts


# darkconv's three ways to order ties: the NumPy NMS's per-pair rule and rank table, the compiled NMS's sort
@pytest.mark.parametrize("tie_rule", ["per-pair", "rank-table", "compiled"])
@pytest.mark.parametrize("kind", ["default", "greedynms", "diounms"])
@pytest.mark.parametrize("grids", [((4, 6), (8, 12)), ((6, 9), (12, 18))])   # dense / sparse pair search
def test_many_score_ties_vs_do_nms_sort_with_glibc_qsort(kind, grids, tie_rule, monkeypatch):
    import darkconv.postprocess as pp

    monkeypatch.setattr(pp, "_TIE_RANKS_MIN", 0 if tie_rule == "rank-table" else 10 ** 9)
    monkeypatch.setattr(pp, "_C", compiled_kernel("_cnms") if tie_rule == "compiled" else None)
    rng = np.random.default_rng(len(kind) + 10 * grids[0][0])
    spec = yolo_spec(classes=4, grids=grids, nms_kind=kind, beta=0.8)
    raws = tie_heads(spec, rng)
    size = (500, 375)
    probs = decode(raws, spec, [size])[0][2]
    pos = probs[probs > 0]
    assert pos.size - np.unique(pos).size > 100                          # ties, many
    got = postprocess(raws, spec, [size])[0]
    key = (kind, grids)                                  # the same data for every tie rule: transcribe it once
    if key not in _TIES_REF:
        _TIES_REF[key] = (ref_detect([r[0] for r in raws], spec, *size),
                          ref_detect([r[0] for r in raws], spec, *size, qsort=index_tie_sort))
    ref, wrong = _TIES_REF[key]
    assert_same(as_tuples(got), ref)
    # the same pairs in Darknet's listing order (Detections.rank)
    order = np.argsort(got.rank)
    assert [(int(got.class_ids[i]), float(got.scores[i])) for i in order] == [r[:2] for r in ref]
    # the data tells the rules apart: ties by candidate index keep other pairs
    assert sorted(wrong) != sorted(ref)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs the C library's qsort to be glibc's")
def test_glibc_msort_transcription_is_the_real_glibc_qsort():
    """The transcription's sort against libc's qsort itself (ctypes), on 88-byte elements like
    Darknet's ``detection`` (glibc sorts those indirectly), with ties everywhere."""
    import ctypes

    class Det(ctypes.Structure):
        _fields_ = [("index", ctypes.c_int), ("rest", ctypes.c_char * 84)]

    assert ctypes.sizeof(Det) == 88
    libc = ctypes.CDLL(None)
    cmp_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Det), ctypes.POINTER(Det))
    libc.qsort.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, cmp_t]
    libc.qsort.restype = None
    rng = np.random.default_rng(4)
    for n in (2, 7, 12, 50, 333, 2000):                     # alloca (< 1024 bytes) and malloc
        dets = [{"index": i, "prob": [F(v) for v in rng.choice([0.0, 0.3, 0.5], size=3)],
                 "sort_class": 0, "objectness": F(1)} for i in range(n)]
        order = list(range(n))
        for k in range(3):
            for d in dets:
                d["sort_class"] = k
            arr = (Det * n)(*[Det(i) for i in order])
            libc.qsort(arr, n, ctypes.sizeof(Det),
                       cmp_t(lambda a, b: nms_comparator_v3(dets[a[0].index], dets[b[0].index])))
            mine = [d["index"] for d in glibc_msort([dets[i] for i in order], nms_comparator_v3)]
            order = [arr[i].index for i in range(n)]
            assert order == mine, (n, k)


def test_batch_matches_single_images():
    rng = np.random.default_rng(12)
    spec = yolo_spec(new_coords=0, scale=1.1)
    raws = random_heads(spec, rng, n=3, obj_bias=-0.5)
    sizes = [(640, 480), (300, 500), (448, 320)]
    batch = postprocess(raws, spec, sizes, letterbox=True)
    assert len(batch) == 3
    for i, size in enumerate(sizes):
        single = postprocess([r[i:i + 1] for r in raws], spec, [size], letterbox=True)[0]
        for f in ("boxes", "scores", "class_ids", "objectness", "box_ids"):
            np.testing.assert_array_equal(getattr(batch[i], f), getattr(single, f))
        assert_same(as_tuples(batch[i]), ref_detect([r[i] for r in raws], spec, *size, letter=True))


def test_options_nms_off_max_det_clip_and_xyxy():
    rng = np.random.default_rng(5)
    spec = yolo_spec()
    raws = random_heads(spec, rng, obj_bias=0.5)
    full = postprocess(raws, spec, [(500, 375)])[0]
    off = postprocess(raws, spec, [(500, 375)], nms=0)[0]
    assert_same(as_tuples(off), ref_detect([r[0] for r in raws], spec, 500, 375, nms=0))
    assert len(off) > len(full)
    top = postprocess(raws, spec, [(500, 375)], max_det=5)[0]
    assert len(top) == 5
    assert np.all(np.sort(top.scores) == np.sort(full.scores)[-5:])
    clipped = postprocess(raws, spec, [(500, 375)], clip=True)[0]
    xy = clipped.xyxy(500, 375)
    assert xy.min() >= -1e-4 and xy[:, 0::2].max() <= 500 + 1e-3 and xy[:, 1::2].max() <= 375 + 1e-3
    assert full.boxes[:, 2].max() > 1 or (full.xyxy(500, 375)[:, :2] < 0).any()   # Darknet does not clip
    xyxy = full.xyxy(500, 375)
    np.testing.assert_allclose((xyxy[:, 0] + xyxy[:, 2]) / 2, full.boxes[:, 0] * 500, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(xyxy[:, 3] - xyxy[:, 1], full.boxes[:, 3] * 375, rtol=1e-5, atol=1e-3)
    assert len(Detections.empty()) == 0


def test_no_candidates_and_input_validation():
    spec = yolo_spec()
    raws = [np.full((2, hs.channels, *hs.grid), -20.0, F) for hs in spec.heads]
    res = postprocess(raws, spec, [(10, 10), (20, 20)])
    assert [len(r) for r in res] == [0, 0] and res[0].boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="channels"):
        postprocess([raws[0][:, :-1], raws[1]], spec, [(10, 10), (20, 20)])
    with pytest.raises(ValueError, match="image sizes"):
        postprocess(raws, spec, [(10, 10)])
    with pytest.raises(ValueError, match="head tensors"):
        postprocess(raws[:1], spec, [(10, 10), (20, 20)])
    with pytest.raises(ValueError, match="nms_kind"):
        postprocess(raws, spec, [(10, 10), (20, 20)], nms_kind="soft")


def test_sparse_pair_search_equals_all_pairs_on_degenerate_boxes():
    """The pruned pair search must find exactly the pairs an all-pairs test finds."""
    from darkconv.postprocess import _overlap_pairs

    rng = np.random.default_rng(0)
    same = np.tile(np.array([[0.5, 0.5, 0.2, 0.3]], F), (200, 1))           # identical boxes
    tiny = np.concatenate([rng.random((200, 2)), rng.random((200, 2)) * 1e-6], 1).astype(F)
    tiny[100:, :2] = tiny[:100, :2] + F(1e-7)                              # sub-ulp sizes
    wild = rng.random((300, 4)).astype(F)
    wild[:40, 2:] *= 50                                                    # huge
    wild[40:45] = [[3e7, 3e7, 5e7, 5e7]] * 5                               # far outside
    wild[45:47] = np.nan
    wild[47:49, 2] = np.inf
    boxes = np.concatenate([same, tiny, wild, rng.random((100, 4)).astype(F) * F([1, 1, .3, .3])])
    assert boxes.dtype == F
    iu, iv = np.triu_indices(len(boxes), 1)
    for thr, exp in ((0.45, None), (0.3, 0.6), (0.05, None), (0.999, None)):
        with np.errstate(all="ignore"):
            u, v = _overlap_pairs(boxes, F(thr), exp)
            o = box_iou(boxes[iu], boxes[iv]) if exp is None else box_diou(boxes[iu], boxes[iv], exp)
        m = o > F(thr)
        assert len(set(zip(u.tolist(), v.tolist()))) == len(u)              # no duplicates
        assert set(zip(u.tolist(), v.tolist())) == set(zip(iu[m].tolist(), iv[m].tolist()))


def _random_nms_case(rng, trial):
    """Candidates for nms_keep with what makes NMS hard: exact score ties within and across classes, identical
    and nested boxes, degenerate and non-finite boxes, several classes per box."""
    k, c = int(rng.integers(0, 70)), int(rng.integers(1, 7))
    spread = (1.0, 0.3, 0.1)[trial % 3]                                 # crowded: most pairs overlap
    boxes = np.concatenate([0.5 + (rng.random((k, 2)) - 0.5) * spread, rng.random((k, 2)) * 0.5], 1).astype(F)
    if trial % 5 == 0:
        boxes = (np.round(boxes * 8) / 8).astype(F)                     # identical boxes
    if trial % 11 == 0 and k > 6:
        boxes[0, 2:] = 0                                                 # zero size
        boxes[1] = np.nan
        boxes[2, 2] = np.inf
        boxes[3, :2] = 3e7                                               # far outside
    if trial % 2:
        probs = rng.choice(np.array([0, 0, 0.3, 0.5, 0.7, 0.9], F), size=(k, c))
    else:
        probs = (rng.random((k, c)) * (rng.random((k, c)) < 0.5)).astype(F)
    return boxes, probs


def test_compiled_nms_equals_numpy_nms(monkeypatch):
    """darkconv._cnms against the NumPy NMS (itself checked against the do_nms_sort transcription above) on
    thousands of random cases, every nms_kind: the same (box, class) pairs kept."""
    import darkconv.postprocess as pp

    c_nms = compiled_kernel("_cnms")
    rng = np.random.default_rng(2024)
    kept = suppressed = 0
    for trial in range(1500):
        boxes, probs = _random_nms_case(rng, trial)
        kind = ("default", "greedynms", "diounms", "cornersnms")[trial % 4]
        thr = (0.45, 0.6, 0.3, 0.05)[trial % 3]
        with np.errstate(all="ignore"):
            monkeypatch.setattr(pp, "_C", c_nms)
            got = pp.nms_keep(boxes, probs, thr, kind, 0.8)
            monkeypatch.setattr(pp, "_C", None)
            want = pp.nms_keep(boxes, probs, thr, kind, 0.8)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (trial, kind, thr)
        kept += want[0].size
        suppressed += int(np.count_nonzero(probs)) - want[0].size
    assert kept > 10000 and suppressed > 10000                           # NMS did work both ways


def test_compiled_nms_is_used_for_small_inputs_only(monkeypatch):
    """Up to _C_NMS_MAX_WORK (sum over classes of candidates squared) the compiled NMS runs, above it the NumPy
    one (whose pair search is sub-quadratic); both give the same pairs."""
    import darkconv.postprocess as pp

    c_nms = compiled_kernel("_cnms")
    calls = []

    class Counting:
        def nms_keep(self, *a):
            calls.append(a[2])
            return c_nms.nms_keep(*a)

    monkeypatch.setattr(pp, "_C", Counting())
    rng = np.random.default_rng(5)
    boxes, probs = _random_nms_case(rng, 1)
    small = pp.nms_keep(boxes, probs, 0.45)
    assert calls == [boxes.shape[0]]
    monkeypatch.setattr(pp, "_C_NMS_MAX_WORK", int((np.count_nonzero(probs > 0, axis=0) ** 2).sum()) - 1)
    large = pp.nms_keep(boxes, probs, 0.45)
    assert calls == [boxes.shape[0]]                                     # not called again
    assert all(np.array_equal(a, b) for a, b in zip(small, large))
    assert pp.nms_keep(boxes, probs, 0)[0].size == np.count_nonzero(probs)   # nms off: nothing suppressed


def test_compiled_nms_checks_its_arguments():
    """The compiled NMS refuses buffers that do not match the sizes it is given (never reads or writes out of
    bounds)."""
    c = compiled_kernel("_cnms")
    boxes, probs, keep = np.zeros((3, 4), F), np.zeros((3, 2), F), np.zeros((3, 2), np.uint8)
    c.nms_keep(boxes, probs, 3, 2, 0.45, False, 0.0, keep)
    with pytest.raises(ValueError, match="boxes must hold"):
        c.nms_keep(boxes, probs, 4, 2, 0.45, False, 0.0, keep)
    with pytest.raises(ValueError, match="probs must hold"):
        c.nms_keep(boxes, probs, 3, 3, 0.45, False, 0.0, keep)
    with pytest.raises(ValueError, match="keep must hold"):
        c.nms_keep(boxes, probs, 3, 2, 0.45, False, 0.0, keep[:2])
    with pytest.raises(ValueError, match="negative"):
        c.nms_keep(boxes, probs, -1, 2, 0.45, False, 0.0, keep)
    with pytest.raises(ValueError, match="probs must hold"):             # a product that would overflow
        c.nms_keep(boxes, probs, 3, 2 ** 62, 0.45, False, 0.0, keep)
    with pytest.raises((ValueError, TypeError, BufferError)):
        c.nms_keep(np.zeros((3, 8), F)[:, ::2], probs, 3, 2, 0.45, False, 0.0, keep)   # not contiguous


def test_compiled_pair_ranks_equal_darknet_rank():
    """The compiled listing order (kept pairs in (box, class) order, as nms_keep returns them) is darknet_rank's
    (checked against Darknet's sorts above), on random cases full of exact score ties; unsorted input is refused."""
    import darkconv.postprocess as pp

    c = compiled_kernel("_cnms")
    rng = np.random.default_rng(77)
    ties = 0
    for trial in range(600):
        boxes, probs = _random_nms_case(rng, trial)
        bi, ci = pp.nms_keep(boxes, probs, (0.45, 0.6, 0.3)[trial % 3])
        got = np.empty(bi.size, np.int64)
        c.pair_ranks(probs, probs.shape[0], probs.shape[1], bi.astype(np.int64), ci.astype(np.int64), bi.size, got)
        np.testing.assert_array_equal(got, pp.darknet_rank(bi, ci, probs), err_msg=str(trial))
        kept = probs[np.unique(bi)]
        ties += kept.shape[0] - np.unique(kept, axis=0).shape[0] if kept.size else 0
    assert ties > 100                                                    # boxes whose whole rows tie: index order
    probs = np.ones((3, 2), F)
    rank = np.empty(2, np.int64)
    with pytest.raises(ValueError, match="sorted"):
        c.pair_ranks(probs, 3, 2, np.array([1, 0]), np.array([0, 0]), 2, rank)
    with pytest.raises(ValueError, match="index probs"):
        c.pair_ranks(probs, 3, 2, np.array([0, 3]), np.array([0, 0]), 2, rank)
    with pytest.raises(ValueError, match="int64"):
        c.pair_ranks(probs, 3, 2, np.array([0, 1]), np.array([0, 0]), 3, rank)
