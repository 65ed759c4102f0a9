"""darkconv.coco: Darknet's `detector valid` JSON (print_cocos), ids, and COCO metrics against pycocotools."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from darkconv import coco as cocolib
from darkconv.datasets import COCO_IDS
from darkconv.pipeline import DATA
from darkconv.postprocess import Detections

F32 = np.float32


def print_cocos(image_path, dets, w, h):
    """Loop transcription of print_cocos (src/detector.c) on Darknet-style dets: a list of (relative bbox, probs)
    in Darknet's listing order, after correct_yolo_boxes(relative=0) scaled them to pixels."""
    image_id = int(cocolib.basecfg(image_path))            # atoi(basecfg(path))
    lines = []
    for (rx, ry, rw, rh), prob in dets:
        # correct_yolo_boxes, relative = 0: b.x *= w; b.w *= w; b.y *= h; b.h *= h (float *= int)
        x, bw = F32(F32(rx) * F32(w)), F32(F32(rw) * F32(w))
        y, bh = F32(F32(ry) * F32(h)), F32(F32(rh) * F32(h))
        xmin = F32(float(x) - float(bw) / 2.)
        xmax = F32(float(x) + float(bw) / 2.)
        ymin = F32(float(y) - float(bh) / 2.)
        ymax = F32(float(y) + float(bh) / 2.)
        if xmin < 0:
            xmin = F32(0)
        if ymin < 0:
            ymin = F32(0)
        if xmax > w:
            xmax = F32(w)
        if ymax > h:
            ymax = F32(h)
        bx, by, bw2, bh2 = xmin, ymin, F32(xmax - xmin), F32(ymax - ymin)
        for j, p in enumerate(prob):
            if p > 0:
                lines.append('{"image_id":%d, "category_id":%d, "bbox":[%f, %f, %f, %f], "score":%f},\n'
                             % (image_id, COCO_IDS[j], bx, by, bw2, bh2, p))
    return lines


def _darknet_dets(rng, n, classes):
    out = []
    for _ in range(n):
        box = rng.uniform([-.1, -.1, .01, .01], [1.1, 1.1, .9, .9]).astype(F32)
        prob = np.where(rng.random(classes) < 0.15, rng.random(classes), 0).astype(F32)
        out.append((box, prob))
    return out


def _as_detections(dets, rng):
    """The same pairs as darkconv's Detections: flat pairs in a shuffled array order, ``rank`` = Darknet's order."""
    rows = [(i, j, box, p[j]) for i, (box, p) in enumerate(dets) for j in range(len(p)) if p[j] > 0]
    perm = rng.permutation(len(rows))                       # array position k holds Darknet's pair perm[k]
    rows_s = [rows[k] for k in perm]
    return Detections(boxes=np.array([r[2] for r in rows_s], F32).reshape(-1, 4),
                      scores=np.array([r[3] for r in rows_s], F32), class_ids=np.array([r[1] for r in rows_s], np.int64),
                      objectness=np.ones(len(rows_s), F32), box_ids=np.array([r[0] for r in rows_s], np.int64),
                      rank=perm.astype(np.int64))


def test_detector_valid_matches_print_cocos_field_by_field():
    rng = np.random.default_rng(3)
    names = (DATA / "coco.names").read_text().splitlines()
    cats = cocolib.category_ids(names)
    assert cats == list(COCO_IDS)
    rows = []
    want = []
    for path, (w, h) in [("/data/val2017/000000397133.jpg", (640, 427)), ("x/000000000139.png", (773, 512))]:
        dets = _darknet_dets(rng, 40, 80)
        want += print_cocos(path, dets, w, h)
        ids, how = cocolib.image_ids([path])
        rows += cocolib.detector_valid_entries(_as_detections(dets, rng), (w, h), ids[0], cats)
    text = cocolib.format_detector_valid(rows)
    # Darknet: "[\n" + lines, then fseek(-2) over the last ",\n" and "\n]\n"
    darknet = "[\n" + "".join(want)[:-2] + "\n]\n"
    assert text == darknet
    parsed = json.loads(text)
    assert len(parsed) == len(want) > 50
    assert all(set(e) == {"image_id", "category_id", "bbox", "score"} for e in parsed)
    assert {e["image_id"] for e in parsed} == {397133, 139}
    assert any(e["bbox"][0] == 0 for e in parsed) and all(e["bbox"][0] + e["bbox"][2] <= 773 + 1e-3 for e in parsed)
    assert cocolib.format_detector_valid([]) == "[\n]\n" and json.loads("[\n]\n") == []


def test_image_and_category_ids():
    assert cocolib.basecfg("/a/b.c/000000000139.jpg") == "000000000139"
    assert cocolib.basecfg("C:\\x\\12.tar.gz") == "12"
    assert cocolib.image_ids(["a/000000000139.jpg", "b/42.png"]) == ([139, 42], "file names")
    assert cocolib.image_ids(["a/1.jpg", "b/dog.jpg"]) == ([1, 2], "list order (1..N)")
    assert cocolib.image_ids(["a/01.jpg", "b/1.jpg"]) == ([1, 2], "list order (1..N)")       # not distinct
    assert cocolib.image_ids(["a/1.jpg", "b/2.jpg"], [7, 9]) == ([7, 9], "annotations")
    assert cocolib.category_ids(["a", "b", "c"]) == [0, 1, 2]
    assert cocolib.category_ids(["a", "b", "c"], {5: 1, 9: 0}) == [9, 5, None]


def _pycocotools(gt: dict, results_file) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = json.loads(json.dumps(gt))
        g.createIndex()
        d = g.loadRes(str(results_file))
        e = COCOeval(g, d, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_coco_metrics_equal_pycocotools_on_the_same_file(tmp_path):
    """faster-coco-eval (what darkconv uses) against pycocotools on one detector-valid file: ties, crowd regions,
    several categories, all three area ranges, images without objects or without detections."""
    rng = np.random.default_rng(11)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(1, 13)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 7)]
    anns, rows = [], []
    for im in images[:10]:
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.choice([12, 50, 200]) * rng.uniform(0.7, 1.3, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            c = int(rng.choice([1, 3, 7]))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.1)})
            if rng.random() < 0.8:
                j = rng.normal(0, 0.08 * min(w, h), 4)
                rows.append((im["id"], c, x + j[0], y + j[1], w + j[2], h + j[3], round(float(rng.random()), 2)))
        for _ in range(3):                                   # false positives, with tied scores
            rows.append((im["id"], int(rng.choice([1, 3, 7])), *rng.uniform(0, 300, 2), *rng.uniform(5, 150, 2), 0.5))
    gt = {"images": images, "annotations": anns, "categories": cats}
    f = tmp_path / "coco_results.json"
    f.write_text(cocolib.format_detector_valid(rows))
    results = json.loads(f.read_text())
    assert cocolib.rows_as_results(rows) == results          # the values the file holds, without the text
    gt_before, results_before = json.dumps(gt), json.dumps(results)
    ours = cocolib.coco_metrics(gt, results)
    assert cocolib.coco_metrics(gt, results) == ours         # the caller's dicts are left as they were
    assert json.dumps(gt) == gt_before and json.dumps(results) == results_before
    assert ours["library"] == "faster-coco-eval"
    ref = _pycocotools(gt, f)
    got = np.array([ours["stats"][n] if ours["stats"][n] is not None else -1 for n in cocolib.STAT_NAMES])
    assert (ref > 0).sum() >= 10
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    via_pycocotools = cocolib.coco_metrics(gt, results, use="pycocotools")
    assert json.dumps(gt) == gt_before and json.dumps(results) == results_before
    np.testing.assert_allclose([via_pycocotools["stats"][n] or 0 for n in cocolib.STAT_NAMES], np.maximum(ref, 0),
                               atol=1e-12)


def test_coco_metrics_without_detections():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500,
                           "iscrowd": 0}]}
    for use in ("faster-coco-eval", "pycocotools"):
        s = cocolib.coco_metrics(gt, [], use=use)["stats"]
        assert s["AP"] == 0 and s["AP_medium"] == 0 and s["AP_small"] is None and s["AP_large"] is None, use
