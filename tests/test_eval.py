"""``darkconv eval`` end to end on the real yolov3-tiny and the hand-labelled sample images."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import darkconv
from darkconv.cli import main
from darkconv.pipeline import DATA

from test_datasets import _layout, coco_from_labels
from test_eval_coco import _pycocotools

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = DATA / "samples.data"


@pytest.fixture(scope="module")
def samples_result(default_model):
    return darkconv.evaluate(default_model.cfg, default_model.weights, SAMPLES)


def _truth_counts(result) -> dict:
    return {c.name: c.truths for c in result.map.classes if c.truths}


@pytest.mark.slow
def test_map_on_the_labelled_samples(samples_result):
    r = samples_result
    assert r.mode == "labels" and r.dataset["images"] == 5 and r.dataset["objects"] == 15
    assert r.dataset["missing_labels"] == 0 and r.notes                     # the paths-resolved-against note
    assert _truth_counts(r) == {"person": 1, "bicycle": 1, "motorbike": 1, "truck": 1, "bird": 1, "dog": 2,
                                "horse": 6, "zebra": 1, "giraffe": 1}
    aps = {c.name: c.ap for c in r.map.classes}
    for name in ("person", "bird", "zebra", "giraffe"):                     # one clear object each: found first
        assert aps[name] == 1.0, name
    assert aps["motorbike"] == 0.0                                          # the occluded one: never found
    assert r.map.map == pytest.approx(sum(aps.values()) / 80, abs=1e-12)    # Darknet: over all 80 classes
    assert r.map.map_gt == pytest.approx(sum(c.ap for c in r.map.classes if c.truths) / 9)
    assert 0.6 < r.map.map_gt < 0.95
    # the lines Darknet's detector map prints
    lines = r.map.darknet_report().splitlines()
    assert sum(bool(re.fullmatch(r"class_id = \d+, name = [^,]+, ap = \d+\.\d\d%   \t \(TP = \d+, FP = \d+\) ", x))
               for x in lines) == 80
    assert any(re.fullmatch(r" for conf_thresh = 0\.25, precision = \d\.\d\d, recall = \d\.\d\d, F1-score = \d\.\d\d ",
                            x) for x in lines)
    assert lines[-1] == f" mean average precision (mAP@0.50) = {r.map.map:f}, or {r.map.map * 100:.2f} % "
    assert r.coco["library"] == "faster-coco-eval" and 0.2 < r.coco["stats"]["AP"] < r.coco["stats"]["AP50"]
    d = r.as_dict()
    json.dumps(d)
    assert d["model"]["sha256"] and d["model"]["weights_sha256"] and d["environment"]["cpu_model"]
    assert d["environment"]["versions"]["numpy"] == np.__version__


@pytest.mark.slow
def test_layouts_missing_label_and_batching(default_model, samples_result, tmp_path, monkeypatch):
    """VOC (JPEGImages -> labels), COCO (images/val2017 -> labels/val2017) and beside-the-image label files in
    one list, one label file removed, batch 2 (the prefetching loop over an odd count)."""
    lines = _layout(tmp_path)
    (tmp_path / "valid.txt").write_text("".join(line + "\n" for line in lines))
    (tmp_path / "obj.data").write_text("classes = 80\nvalid = valid.txt\nnames = coco.names\n")
    gone = tmp_path / "coco" / "labels" / "val2017" / "eagle.txt"
    gone.unlink()
    monkeypatch.chdir(tmp_path)
    r = darkconv.evaluate(default_model.cfg, default_model.weights, "obj.data", batch=2, coco=False)
    assert r.dataset["missing_labels"] == 1 and r.dataset["objects"] == 14 and r.coco is None
    assert any("1 of 5 image(s) have no label file" in n for n in r.notes)
    counts = _truth_counts(samples_result)
    counts.pop("bird")
    assert _truth_counts(r) == counts
    for a, b in zip(r.detections, samples_result.detections):               # same detections as batch 1
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
    bird = next(c for c in r.map.classes if c.name == "bird")
    assert bird.truths == 0 and bird.ap == 0.0 and bird.fp >= 1              # the eagle is now a false positive


@pytest.mark.slow
def test_coco_annotations_path_and_pycocotools(default_model, samples_result, tmp_path):
    ann = tmp_path / "instances_samples.json"
    ann.write_text(json.dumps(coco_from_labels(DATA)))
    out = tmp_path / "coco_results.json"
    r = darkconv.evaluate(default_model.cfg, default_model.weights, ann, images=DATA, coco_json=out)
    assert r.dataset["kind"] == "coco" and r.dataset["objects"] == 15
    # the same truths as the YOLO labels: the same Darknet figures
    assert [(c.ap, c.tp, c.fp, c.truths) for c in r.map.classes] == \
        [(c.ap, c.tp, c.fp, c.truths) for c in samples_result.map.classes]
    entries = json.loads(out.read_text())
    assert {e["image_id"] for e in entries} <= {1001, 1002, 1003, 1004, 1005}
    assert r.coco["image_ids"] == "annotations" and r.coco["category_ids"] == "annotations"
    ref = _pycocotools(json.loads(ann.read_text()), out)
    got = [r.coco["stats"][n] if r.coco["stats"][n] is not None else -1 for n in
           ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR_1", "AR_10", "AR_100", "AR_small",
            "AR_medium", "AR_large")]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # and the .data run (ground truth built from the YOLO labels) gives the same COCO figures
    for k, v in samples_result.coco["stats"].items():
        assert (v is None and r.coco["stats"][k] is None) or v == pytest.approx(r.coco["stats"][k], abs=1e-6), k


@pytest.mark.slow
def test_agreement_torch_vs_onnxruntime_fp32(default_model, tmp_path):
    for p in DATA.glob("*.jpg"):
        shutil.copy(p, tmp_path / p.name)                                   # unlabelled copies
    with pytest.raises(darkconv.errors.DarkconvError, match="no labels found"):
        darkconv.evaluate(default_model.cfg, default_model.weights, [tmp_path])
    r = darkconv.evaluate(default_model.cfg, default_model.weights, [tmp_path], backend="onnxruntime", ref="torch")
    assert r.mode == "agreement" and r.reference["backend"] == "torch" and r.model["backend"] == "onnxruntime"
    assert r.dataset["reference_objects"] == 21
    assert r.figure == 1.0 and r.map.fn == 0 and r.map.fp == 0 and r.map.tp == 21
    assert r.coco["stats"]["AP"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.slow
def test_agreement_of_an_onnx_with_its_cfg(default_model, default_onnx):
    """A converted .onnx against torch running the cfg it came from (--ref-model), on the .data's images."""
    r = darkconv.evaluate(default_onnx, None, SAMPLES, ref="torch", ref_model=default_model.cfg,
                          ref_weights=default_model.weights, coco=False)
    assert r.model["kind"] == "onnx" and r.reference["model"] == str(default_model.cfg)
    assert r.figure == 1.0 and r.map.tp == 21 and r.dataset["kind"] == "images"


@pytest.mark.slow
def test_lanes_give_the_same_figures(default_model, default_onnx):
    """Several batches in inference at once (lanes) change the speed, never a detection or a figure."""
    from darkconv.pipeline import default_lanes

    one = darkconv.evaluate(default_onnx, None, SAMPLES, lanes=1, coco=False)
    three = darkconv.evaluate(default_onnx, None, SAMPLES, lanes=3, batch=2, coco=False)
    assert one.settings["lanes"] == 1 and three.settings["lanes"] == 3 and "3 lanes" in three.model["runs_on"]
    for a, b in zip(one.detections, three.detections):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert one.map.as_dict() == three.map.as_dict()
    auto = darkconv.evaluate(default_onnx, None, SAMPLES, threads=2, coco=False, limit=2)
    assert auto.settings["lanes"] == default_lanes("onnxruntime", threads=2) == 2
    assert darkconv.evaluate(default_onnx, None, SAMPLES, threads=2, coco=False, limit=1).settings["lanes"] == 1
    assert auto.timings["inference_busy"] > 0 and auto.timings["inference_images_per_s"] == pytest.approx(
        2 / auto.timings["inference_busy"])
    mixed = darkconv.evaluate(default_onnx, None, SAMPLES, ref="torch", ref_model=default_model.cfg,
                              ref_weights=default_model.weights, coco=False, limit=1)
    assert mixed.settings["lanes"] == 1                                     # torch takes one call at a time
    with pytest.raises(darkconv.errors.DarkconvError, match="torch take.s. one inference call at a time"):
        darkconv.evaluate(default_onnx, None, SAMPLES, ref="torch", ref_model=default_model.cfg,
                          ref_weights=default_model.weights, lanes=2)


@pytest.mark.slow
def test_cli_demo_writes_json_plot_and_coco_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    j, png, cj = tmp_path / "eval.json", tmp_path / "eval.png", tmp_path / "coco.json"
    p = subprocess.run([sys.executable, "-m", "darkconv", "eval", "--demo", "--json", j, "--plot", png,
                        "--coco-json", cj, "--points", "101"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "class_id = 22, name = zebra, ap = 100.00%   \t (TP = 1, FP = 0) " in out
    assert " IoU threshold = 50 %, used 101 Recall-points " in out
    assert "COCO metrics (faster-coco-eval" in out and "Darknet mAP@0.50 = " in out
    d = json.loads(j.read_text())
    assert d["schema"] == "darkconv.eval/1" and d["settings"]["points"] == 101
    assert d["darknet_map"]["truths"] == 15 and len(d["darknet_map"]["classes"]) == 80
    from darkconv.io import sha256_file as sha256
    assert d["model"]["weights_sha256"] == sha256(Path(d["model"]["weights"]))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(cj.read_text()) and cj.read_text().startswith("[\n{\"image_id\":")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_bad_inputs_are_one_line_and_write_nothing(default_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.jpg").write_bytes((DATA / "dog.jpg").read_bytes())
    (tmp_path / "img.txt").write_text("16 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2\n")
    (tmp_path / "list.txt").write_text("img.jpg\n")
    (tmp_path / "bad.data").write_text("valid=list.txt\nnames=" + str(DATA / "coco.names") + "\n")
    (tmp_path / "not-coco.json").write_text('[{"image_id": 1}]')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (tmp_path / "broken.txt").write_text("16 0.5 0.5 0.2 0.2\n")
    cases = [
        (["bad.data"], "img.txt:2: expected 5 values"),
        (["not-coco.json", "--images", "."], "not-coco.json: not a COCO annotations file"),
        (["empty.txt"], "no images found"),
        (["img.jpg", "--plot", "p.jpg"], "the plot is a PNG"),
        (["broken.jpg"], "broken.jpg: cannot decode the image"),
    ]
    for data, why in cases:
        r = _invoke("eval", default_model.cfg, default_model.weights, *data, "--json", "out.json")
        assert r.exit_code != 0, r.output
        err = r.stderr.strip()
        assert err.startswith("darkconv: error: ") and "\n" not in err and why in err, err
        assert not (tmp_path / "out.json").exists()
    r = _invoke("eval", default_model.cfg, default_model.weights, "img.jpg", "--ref", "torch:int8")
    assert r.exit_code != 0 and "the torch backend runs FP32 only" in r.stderr


@pytest.mark.slow
def test_letterbox_override_reaches_pre_and_postprocessing(default_model, default_torch_model):
    """--letterbox on a cfg without letter_box: the eval loop letterboxes the input and corrects the boxes back,
    like preprocess + model + postprocess called by hand."""
    import torch

    from darkconv.postprocess import postprocess
    from darkconv.preprocess import load_image, preprocess

    r = darkconv.evaluate(default_model.cfg, default_model.weights, SAMPLES, letterbox=True, limit=2, coco=False)
    assert r.settings["letterbox"] is True and len(r.detections) == 2
    spec = default_torch_model.spec
    for path, got in zip(r.paths, r.detections):
        im = load_image(path)
        x = preprocess(im, (spec.width, spec.height), True)[None]
        heads = [h.numpy() for h in default_torch_model(torch.from_numpy(x))]
        want = postprocess(heads, spec, [(im.shape[1], im.shape[0])], thresh=0.005, nms=0.45, letterbox=True)[0]
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.class_ids, want.class_ids)


def test_gc_paused_restores_the_collector():
    """The metrics run with the cyclic collector off; afterwards it is as the caller had it, even after an error."""
    import gc

    from darkconv.eval import _gc_paused

    assert gc.isenabled()
    with _gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with _gc_paused():
            raise KeyError("x")
    assert gc.isenabled()
    gc.disable()
    try:
        with _gc_paused():
            pass
        assert not gc.isenabled()                      # the caller's choice kept
    finally:
        gc.enable()
