"""darkconv.metrics against a loop transcription of AlexeyAB's ``validate_detector_map`` (src/detector.c),
hand-computed cases, and ``Detections.rank`` against a literal ``do_nms_sort`` (src/box.c).

``ref_validate_map`` follows the C statement by statement: per-image detection list in Darknet's
order, matching loop, the TP-at-thresh ``found`` scan, ``qsort`` with ``detections_comparator``
(glibc's qsort is a stable merge sort: Python's sort is stable too), the quadratic
``pr[class][rank]`` table, AUC / n-point AP, and mAP over all classes.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from test_postprocess import random_heads, ref_box_iou, ref_box_diou, ref_get_yolo_detections, yolo_spec

from darkconv.metrics import MAP_THRESH, Truth, agreement, darknet_map, truths_from_detections
from darkconv.postprocess import Detections, postprocess

F = np.float32


# ============================================================================ reference
def ref_validate_map(images, classes, iou_thresh=0.5, map_points=0, thresh_calc_avg_iou=0.25):
    """images: list of (dets, truths); dets = [(bbox(x,y,w,h), prob, class_id)] in Darknet's listing
    order, truths = [(id, x, y, w, h)]. Returns the figures validate_detector_map prints."""
    iou_thresh, thresh_calc_avg_iou = F(iou_thresh), F(thresh_calc_avg_iou)
    avg_iou = F(0)
    tp_for_thresh = fp_for_thresh = 0
    detections = []
    unique_truth_count = 0
    truth_classes_count = [0] * classes
    tp_pc, fp_pc = [0] * classes, [0] * classes
    for image_index, (dets, truth) in enumerate(images):
        for t in truth:
            truth_classes_count[t[0]] += 1
        checkpoint = len(detections)
        for bbox, prob, class_id in dets:
            prob = F(prob)
            if not prob > 0:
                continue
            det = {"b": tuple(F(v) for v in bbox), "p": prob, "image_index": image_index, "class_id": class_id,
                   "truth_flag": 0, "unique_truth_index": -1}
            detections.append(det)
            truth_index, max_iou = -1, F(0)
            for j, t in enumerate(truth):
                tb = tuple(F(v) for v in t[1:])
                current_iou = ref_box_iou(det["b"], tb)
                if current_iou > iou_thresh and class_id == t[0]:
                    if current_iou > max_iou:
                        max_iou = current_iou
                        truth_index = unique_truth_count + j
            if truth_index > -1:
                det["truth_flag"] = 1
                det["unique_truth_index"] = truth_index
            if prob > thresh_calc_avg_iou:
                found = 0
                for z in range(checkpoint, len(detections) - 1):
                    if detections[z]["unique_truth_index"] == truth_index:
                        found = 1
                        break
                if truth_index > -1 and found == 0:
                    avg_iou = F(avg_iou + max_iou)
                    tp_for_thresh += 1
                    tp_pc[class_id] += 1
                else:
                    fp_for_thresh += 1
                    fp_pc[class_id] += 1
        unique_truth_count += len(truth)
    if tp_for_thresh + fp_for_thresh > 0:
        avg_iou = F(avg_iou / F(tp_for_thresh + fp_for_thresh))

    def comparator(a, b):
        diff = F(a["p"] - b["p"])
        return 1 if diff < 0 else (-1 if diff > 0 else 0)

    detections.sort(key=functools.cmp_to_key(comparator))
    n = len(detections)
    pr = [[{"tp": 0, "fp": 0, "precision": 0.0, "recall": 0.0} for _ in range(n)] for _ in range(classes)]
    truth_flags = [0] * unique_truth_count
    for rank in range(n):
        if rank > 0:
            for c in range(classes):
                pr[c][rank]["tp"] = pr[c][rank - 1]["tp"]
                pr[c][rank]["fp"] = pr[c][rank - 1]["fp"]
        d = detections[rank]
        if d["truth_flag"] == 1:
            if truth_flags[d["unique_truth_index"]] == 0:
                truth_flags[d["unique_truth_index"]] = 1
                pr[d["class_id"]][rank]["tp"] += 1
            else:
                pr[d["class_id"]][rank]["fp"] += 1
        else:
            pr[d["class_id"]][rank]["fp"] += 1
        for i in range(classes):
            tp, fp = pr[i][rank]["tp"], pr[i][rank]["fp"]
            fn = truth_classes_count[i] - tp
            pr[i][rank]["precision"] = tp / (tp + fp) if tp + fp > 0 else 0.0
            pr[i][rank]["recall"] = tp / (tp + fn) if tp + fn > 0 else 0.0
    aps = []
    mean_ap = 0.0
    for i in range(classes):
        avg_precision = 0.0
        if n == 0:
            pass  # Darknet reads pr[i][-1]: undefined; darkconv gives 0
        elif map_points == 0:
            last_recall = pr[i][n - 1]["recall"]
            last_precision = pr[i][n - 1]["precision"]
            for rank in range(n - 2, -1, -1):
                delta_recall = last_recall - pr[i][rank]["recall"]
                last_recall = pr[i][rank]["recall"]
                if pr[i][rank]["precision"] > last_precision:
                    last_precision = pr[i][rank]["precision"]
                avg_precision += delta_recall * last_precision
            avg_precision += (last_recall - 0) * last_precision
        else:
            for point in range(map_points):
                cur_recall = point * 1.0 / (map_points - 1)
                cur_precision = 0.0
                for rank in range(n):
                    if pr[i][rank]["recall"] >= cur_recall and pr[i][rank]["precision"] > cur_precision:
                        cur_precision = pr[i][rank]["precision"]
                avg_precision += cur_precision
            avg_precision = avg_precision / map_points
        aps.append(avg_precision)
        mean_ap += avg_precision
    with np.errstate(divide="ignore", invalid="ignore"):
        cur_precision = F(tp_for_thresh) / (F(tp_for_thresh) + F(fp_for_thresh))
        cur_recall = F(tp_for_thresh) / (F(tp_for_thresh) + F(unique_truth_count - tp_for_thresh))
        f1 = F(2) * cur_precision * cur_recall / (cur_precision + cur_recall)
    return {"aps": aps, "map": mean_ap / classes, "tp_pc": tp_pc, "fp_pc": fp_pc, "tp": tp_for_thresh,
            "fp": fp_for_thresh, "fn": unique_truth_count - tp_for_thresh, "avg_iou": float(avg_iou),
            "precision": float(cur_precision), "recall": float(cur_recall), "f1": float(f1), "detections": n}


# ============================================================================ helpers
def make_dets(entries) -> Detections:
    """Detections from [(x, y, w, h, prob, class)] in Darknet's listing order (rank None = this order)."""
    a = np.asarray(entries, np.float64).reshape(-1, 6)
    n = len(a)
    return Detections(boxes=a[:, :4].astype(F), scores=a[:, 4].astype(F), class_ids=a[:, 5].astype(np.int64),
                      objectness=a[:, 4].astype(F), box_ids=np.arange(n))


def make_truth(rows) -> Truth:
    a = np.asarray(rows, np.float64).reshape(-1, 5)
    return Truth(a[:, 1:].astype(F), a[:, 0].astype(np.int64))


def as_ref(dets: list[Detections], truths: list[Truth]):
    imgs = []
    for d, t in zip(dets, truths):
        order = np.argsort(d.rank, kind="stable") if d.rank is not None else np.arange(len(d))
        imgs.append(([(tuple(d.boxes[i]), d.scores[i], int(d.class_ids[i])) for i in order],
                     [(int(c), *b) for c, b in zip(t.class_ids, t.boxes)]))
    return imgs


def assert_equal_to_ref(dets, truths, classes, **kw):
    got = darknet_map(truths, dets, classes, iou_thresh=kw.get("iou_thresh", 0.5), points=kw.get("map_points", 0),
                      thresh=kw.get("thresh_calc_avg_iou", 0.25))
    ref = ref_validate_map(as_ref(dets, truths), classes, **kw)
    assert [c.ap for c in got.classes] == ref["aps"]                 # bit-identical doubles
    assert got.map == ref["map"]
    assert [c.tp for c in got.classes] == ref["tp_pc"] and [c.fp for c in got.classes] == ref["fp_pc"]
    assert (got.tp, got.fp, got.fn, got.detections) == (ref["tp"], ref["fp"], ref["fn"], ref["detections"])
    for k in ("avg_iou", "precision", "recall", "f1"):
        assert np.isclose(getattr(got, k), ref[k], rtol=0, atol=0, equal_nan=True), k
    return got


def synthetic(rng, images=12, classes=5, ties=False, absent=(3,), empty_every=4):
    """Truths around random boxes; detections near them (duplicates, misses, wrong classes, noise)."""
    dets, truths = [], []
    for im in range(images):
        rows = []
        if im % empty_every != empty_every - 1:                      # some images without labels
            for _ in range(rng.integers(0, 6)):
                c = int(rng.choice([k for k in range(classes) if k not in absent]))
                rows.append((c, *rng.uniform(0.2, 0.8, 2), *rng.uniform(0.05, 0.3, 2)))
        entries = []
        for r in rows:
            for _ in range(rng.integers(0, 4)):                      # 0..3 detections per truth: dups, misses
                jit = rng.normal(0, 0.02, 4)
                c = r[0] if rng.random() < 0.85 else int(rng.integers(0, classes))
                entries.append((r[1] + jit[0], r[2] + jit[1], abs(r[3] + jit[2]) + 1e-3, abs(r[4] + jit[3]) + 1e-3,
                                0, c))
        for _ in range(rng.integers(0, 5)):                          # background false positives
            entries.append((*rng.uniform(0, 1, 2), *rng.uniform(0.02, 0.2, 2), 0, int(rng.integers(0, classes))))
        probs = rng.choice([0.9, 0.6, 0.3, 0.26, 0.1], len(entries)) if ties else rng.uniform(0.006, 1, len(entries))
        entries = [e[:4] + (p, e[5]) for e, p in zip(entries, probs)]
        rng.shuffle(entries)
        dets.append(make_dets(entries))
        truths.append(make_truth(rows))
    return dets, truths


# ============================================================================ vs the transcription
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("points", [0, 11, 101])
def test_random_datasets_equal_transcription(seed, points):
    rng = np.random.default_rng(seed)
    dets, truths = synthetic(rng, ties=seed % 2 == 1)
    got = assert_equal_to_ref(dets, truths, 5, map_points=points)
    assert got.classes[3].truths == 0 and got.classes[3].ap == 0.0   # a class without truths counts 0
    assert 0 < got.map < 1 and got.map_gt > got.map


@pytest.mark.parametrize("iou,thresh", [(0.75, 0.25), (0.3, 0.5), (0.5, 0.0)])
def test_other_thresholds_equal_transcription(iou, thresh):
    dets, truths = synthetic(np.random.default_rng(11), images=8)
    assert_equal_to_ref(dets, truths, 5, iou_thresh=iou, thresh_calc_avg_iou=thresh)


def test_real_postprocessor_order_equals_transcription():
    """Detections straight from the postprocessor (with their Darknet rank) against labels."""
    rng = np.random.default_rng(3)
    spec = yolo_spec(classes=4)
    dets, truths = [], []
    for _ in range(4):
        raws = random_heads(spec, rng, obj_bias=-1.0)
        d = postprocess(raws, spec, [(500, 375)], thresh=MAP_THRESH)[0]
        keep = rng.random(len(d)) < 0.3                              # truths: some detections, jittered
        t = Truth(d.boxes[keep] + rng.normal(0, 0.01, (int(keep.sum()), 4)).astype(F), d.class_ids[keep])
        dets.append(d)
        truths.append(t)
    assert sum(len(d) for d in dets) > 100
    assert_equal_to_ref(dets, truths, 4)


# ============================================================================ hand-computed cases
def test_hand_computed_auc_and_points():
    # one class, 2 truths; ranked: TP 0.9, FP 0.8, TP 0.7 -> P = 1, .5, .667; R = .5, .5, 1
    truths = [make_truth([(0, .2, .2, .1, .1), (0, .7, .7, .1, .1)])]
    dets = [make_dets([(.2, .2, .1, .1, .9, 0), (.45, .45, .1, .1, .8, 0), (.7, .7, .1, .1, .7, 0)])]
    r = darknet_map(truths, dets, 1)
    assert r.classes[0].ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    r11 = darknet_map(truths, dets, 1, points=11)                    # recall 0..0.5: 1, 0.6..1: 2/3
    assert r11.classes[0].ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    assert (r.tp, r.fp, r.fn) == (2, 1, 0) and r.precision == pytest.approx(2 / 3) and r.recall == 1.0
    assert r.avg_iou == pytest.approx(2 / 3)                         # IoU 1 for both TPs over TP+FP = 3


def test_all_hit_all_miss_and_empty():
    truths = [make_truth([(0, .3, .3, .2, .2), (2, .6, .6, .2, .3)]), Truth.empty()]
    hit = [make_dets([(.3, .3, .2, .2, .8, 0), (.6, .6, .2, .3, .7, 2)]), make_dets([])]
    r = darknet_map(truths, hit, 4)
    assert [c.ap for c in r.classes] == [1.0, 0.0, 1.0, 0.0]
    assert r.map == 0.5 and r.map_gt == 1.0                          # Darknet divides by all 4 classes
    miss = [make_dets([(.9, .9, .05, .05, .8, 0)]), make_dets([(.3, .3, .2, .2, .9, 1)])]
    r = darknet_map(truths, miss, 4)
    assert r.map == 0.0 and r.tp == 0 and r.fp == 2 and r.fn == 2
    r = darknet_map(truths, [make_dets([]), make_dets([])], 4)
    assert r.map == 0.0 and r.detections == 0 and np.isnan(r.precision)
    assert "-nan" in r.darknet_report()


def test_duplicate_is_fp_in_ranking_and_at_thresh():
    truths = [make_truth([(0, .5, .5, .2, .2)])]
    dets = [make_dets([(.5, .5, .2, .2, .9, 0), (.51, .5, .2, .2, .8, 0)])]
    r = darknet_map(truths, dets, 1)
    assert (r.tp, r.fp) == (1, 1) and r.classes[0].ap == 1.0         # the dup comes after recall 1


def test_found_scan_uses_darknet_listing_order_not_score():
    """Darknet's TP-at-thresh check looks for an *earlier listed* detection of the same truth, at any
    prob: a low-prob duplicate listed first turns the confident one into an FP at thresh."""
    truths = [make_truth([(0, .5, .5, .2, .2)])]
    dets = [make_dets([(.5, .5, .2, .2, .01, 0), (.51, .5, .2, .2, .9, 0)])]
    r = darknet_map(truths, dets, 1)
    assert (r.tp, r.fp) == (0, 1)
    assert r.classes[0].ap == 1.0                                    # the ranking is by prob: 0.9 is the TP
    swapped = [make_dets([(.51, .5, .2, .2, .9, 0), (.5, .5, .2, .2, .01, 0)])]
    assert (darknet_map(truths, swapped, 1).tp, darknet_map(truths, swapped, 1).fp) == (1, 0)


def test_best_truth_taken_means_fp_even_if_another_truth_fits():
    # two truths of the same class; both detections' best truth is A (B is second best for the second)
    truths = [make_truth([(0, .50, .5, .2, .2), (0, .56, .5, .2, .2)])]
    dets = [make_dets([(.5, .5, .2, .2, .9, 0), (.52, .5, .2, .2, .8, 0)])]
    r = darknet_map(truths, dets, 1)
    assert r.classes[0].ap == pytest.approx(0.5) and r.fp == 1


def test_ties_keep_image_then_listing_order():
    truths = [make_truth([(0, .5, .5, .2, .2)]), make_truth([(0, .5, .5, .2, .2)])]
    dets = [make_dets([(.9, .9, .05, .05, .5, 0)]), make_dets([(.5, .5, .2, .2, .5, 0)])]
    # equal scores: image 0's FP is ranked first -> P = 0, .5 at R = 0, .5
    assert darknet_map(truths, dets, 1).classes[0].ap == pytest.approx(0.25)
    dets = [make_dets([(.5, .5, .2, .2, .5, 0)]), make_dets([(.9, .9, .05, .05, .5, 0)])]
    truths = [make_truth([(0, .5, .5, .2, .2)]), make_truth([(0, .5, .5, .2, .2)])]
    assert darknet_map(truths, dets, 1).classes[0].ap == pytest.approx(0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="class id 5"):
        darknet_map([make_truth([(5, .5, .5, .1, .1)])], [make_dets([])], 3)
    with pytest.raises(ValueError, match="2 truth sets for 1 images"):
        darknet_map([Truth.empty(), Truth.empty()], [make_dets([])], 3)
    with pytest.raises(ValueError, match="points"):
        darknet_map([Truth.empty()], [make_dets([])], 3, points=1)


def test_report_format_is_darknets():
    truths = [make_truth([(0, .2, .2, .1, .1), (0, .7, .7, .1, .1)])]
    dets = [make_dets([(.2, .2, .1, .1, .9, 0), (.45, .45, .1, .1, .8, 0), (.7, .7, .1, .1, .7, 0)])]
    text = darknet_map(truths, dets, 2, names=["cat", "dog"]).darknet_report()
    assert "class_id = 0, name = cat, ap = 83.33%   \t (TP = 2, FP = 1) " in text
    assert "class_id = 1, name = dog, ap = 0.00%   \t (TP = 0, FP = 0) " in text
    assert " for conf_thresh = 0.25, precision = 0.67, recall = 1.00, F1-score = 0.80 " in text
    assert " for conf_thresh = 0.25, TP = 2, FP = 1, FN = 0, average IoU = 66.67 % " in text
    assert " IoU threshold = 50 %, used Area-Under-Curve for each unique Recall " in text
    assert " mean average precision (mAP@0.50) = 0.416667, or 41.67 % " in text


# ============================================================================ agreement
def test_agreement_identical_runs_is_one_and_a_lost_object_costs():
    rng = np.random.default_rng(5)
    spec = yolo_spec(classes=4)
    runs = [postprocess(random_heads(spec, rng, obj_bias=-1.0), spec, [(500, 375)], thresh=MAP_THRESH)[0]
            for _ in range(3)]
    same = agreement(runs, runs, 4)
    # 1 up to the double rounding of Darknet's telescoping AUC sum (it prints 100.00 %)
    assert same.map_gt == pytest.approx(1.0, abs=1e-12) and same.tp == sum(int((d.scores > 0.25).sum()) for d in runs) and same.fp == 0
    # drop the best detection of image 0 from the test run: one reference object is never found
    d = runs[0]
    drop = np.argmax(d.scores)
    keep = np.arange(len(d)) != drop
    worse = Detections(d.boxes[keep], d.scores[keep], d.class_ids[keep], d.objectness[keep], d.box_ids[keep],
                       d.rank[keep])
    r = agreement(runs, [worse] + runs[1:], 4)
    assert r.map_gt < 1.0 and r.fn == 1
    assert len(truths_from_detections(runs)[0]) == int((d.scores > 0.25).sum())


# ============================================================================ Detections.rank
def ref_do_nms_sort_listing(dets, classes, thresh, overlap_fn):
    """do_nms_sort / diounms_sort literally: the array itself is re-sorted (stable) per class, then the
    (box, class) pairs with prob > 0 are listed in array order."""
    k = len(dets) - 1
    i = 0
    while i <= k:                                                    # objectness == 0 to the end (swap)
        if dets[i]["objectness"] == 0:
            dets[i], dets[k] = dets[k], dets[i]
            k -= 1
            i -= 1
        i += 1
    total = k + 1
    thresh = F(thresh)
    for c in range(classes):
        head = sorted(dets[:total], key=functools.cmp_to_key(
            lambda a, b: 1 if F(a["prob"][c] - b["prob"][c]) < 0 else (-1 if F(a["prob"][c] - b["prob"][c]) > 0
                                                                       else 0)))
        dets[:total] = head
        for i in range(total):
            if dets[i]["prob"][c] == 0:
                continue
            for j in range(i + 1, total):
                if overlap_fn(dets[i]["bbox"], dets[j]["bbox"]) > thresh:
                    dets[j]["prob"][c] = F(0)
    return [(c, float(p), *map(float, d["bbox"])) for d in dets for c, p in enumerate(d["prob"]) if p > 0]


@pytest.mark.parametrize("kind", ["default", "greedynms"])
def test_rank_is_darknets_listing_order(kind):
    rng = np.random.default_rng(7 if kind == "default" else 8)
    spec = yolo_spec(classes=3, nms_kind=kind)
    raws = random_heads(spec, rng, obj_bias=-0.5)
    got = postprocess(raws, spec, [(500, 375)], thresh=MAP_THRESH)[0]
    dets = []
    for raw, head in zip(raws, spec.heads):
        dets += ref_get_yolo_detections(raw[0], head, 500, 375, spec.width, spec.height, MAP_THRESH, False)
    ref = ref_do_nms_sort_listing(dets, 3, 0.45, ref_box_iou if kind == "default" else ref_box_diou)
    order = np.argsort(got.rank)
    mine = [(int(got.class_ids[i]), float(got.scores[i]), *map(float, got.boxes[i])) for i in order]
    assert len(mine) == len(ref) > 50
    assert [m[0] for m in mine] == [r[0] for r in ref]
    np.testing.assert_allclose(np.array(mine)[:, 1:], np.array(ref)[:, 1:], atol=1e-5, rtol=0)
    assert not np.array_equal(order, np.arange(len(order)))          # the order really differs from candidate order


def test_equal_iou_goes_to_the_first_truth():
    """A detection exactly between two truths (equal float32 IoU 1/3) takes the first; a second detection
    right on the second truth is then a TP too (had the first taken the second truth, it would be an FP)."""
    truths = [make_truth([(0, .375, .5, .25, .25), (0, .625, .5, .25, .25)])]
    dets = [make_dets([(.5, .5, .25, .25, .9, 0), (.625, .5, .25, .25, .8, 0)])]
    r = darknet_map(truths, dets, 1, iou_thresh=0.3)
    assert (r.tp, r.fp) == (2, 0) and r.classes[0].ap == 1.0
