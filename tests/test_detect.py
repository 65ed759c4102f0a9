"""``darkconv detect`` on the real yolov3-tiny: the same detections on every backend, Darknet's JSON,
annotated images, unreadable images, and ONNX files that carry their own spec."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from darkconv.cli import main
from darkconv.detect import run_detect
from darkconv.pipeline import DATA, open_runner, resolve_names

DOG, PERSON = DATA / "dog.jpg", DATA / "person.jpg"

#: what the real COCO yolov3-tiny finds (thresh 0.25, nms 0.45, no letterbox), measured with darkconv's
#: torch, ONNX Runtime and OpenCV-DNN backends (identical to 1e-4). Per box: {class: score}.
#: dog.jpg: one box is labelled car + truck and another truck + car (Darknet's multi-label output).
#: person.jpg: yolov3-tiny calls the horse a sheep and finds the dog twice.
EXPECTED = {
    "dog.jpg": [{"car": 0.711, "truck": 0.413}, {"bicycle": 0.376}, {"dog": 0.809}, {"truck": 0.617, "car": 0.396}],
    "person.jpg": [{"person": 0.979}, {"sheep": 0.828}, {"dog": 0.891}, {"dog": 0.812}],
}


def boxes_of(result, names) -> list[dict]:
    """Per box (in box_id order): {class name: score}."""
    d = result.detections
    out = {}
    for b, c, s in zip(d.box_ids.tolist(), d.class_ids.tolist(), d.scores.tolist()):
        out.setdefault(b, {})[names[c]] = s
    return [out[b] for b in sorted(out)]


def assert_same_boxes(got: list[dict], want: list[dict], tol: float):
    """Same boxes (as sets of labels) with scores within ``tol``, whatever the order."""
    key = lambda b: (sorted(b), -max(b.values()))  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [sorted(b) for b in got] == [sorted(b) for b in want], (got, want)
    for g, w in zip(got, want):
        assert all(abs(g[k] - w[k]) <= tol for k in g), (got, want)


@pytest.fixture(scope="module")
def backend_results(default_model, default_onnx):
    """dog.jpg + person.jpg through torch (cfg), ONNX Runtime (the exported .onnx) and OpenCV DNN (cfg)."""
    out = {}
    for backend, model, weights in [("torch", default_model.cfg, default_model.weights),
                                    ("onnxruntime", default_onnx, None),
                                    ("opencv", default_model.cfg, default_model.weights)]:
        with open_runner(model, weights, backend, threads=2) as runner:
            names = resolve_names(runner.spec)
            results, timings = run_detect(runner, [DOG, PERSON], names, echo=lambda *a: None)
        assert timings.images == 2 and [r.error for r in results] == [None, None]
        out[backend] = (results, names)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "opencv"])
def test_known_detections(backend_results, backend):
    results, names = backend_results[backend]
    for r in results:
        assert_same_boxes(boxes_of(r, names), EXPECTED[r.path.name], 0.002)


@pytest.mark.slow
def test_backends_agree_exactly(backend_results):
    ref, _ = backend_results["torch"]
    for backend in ("onnxruntime", "opencv"):
        res, _ = backend_results[backend]
        for a, b in zip(ref, res):
            da, db = a.detections, b.detections
            # same (box, class) pairs in the same order: Darknet's candidate order survives every backend
            assert np.array_equal(da.class_ids, db.class_ids) and np.array_equal(da.box_ids, db.box_ids)
            assert np.abs(da.scores - db.scores).max() <= 1e-4
            assert np.abs(da.boxes - db.boxes).max() <= 1e-4


def test_multilabel_boxes_share_box_id(backend_results):
    results, names = backend_results["onnxruntime"]
    d = results[0].detections  # dog.jpg
    labels = {}
    for b, c in zip(d.box_ids.tolist(), d.class_ids.tolist()):
        labels.setdefault(b, []).append(names[c])
    multi = [sorted(v) for v in labels.values() if len(v) > 1]
    assert multi == [["car", "truck"], ["car", "truck"]]
    assert len(d) == 6 and len(labels) == 4


def test_json_is_darknets_out_format(tmp_path, default_onnx):
    out = tmp_path / "result.json"
    with open_runner(default_onnx, threads=2) as runner:
        names = resolve_names(runner.spec)
        results, _ = run_detect(runner, [DOG, PERSON], names, json_path=out, echo=lambda *a: None)
    frames = json.loads(out.read_text())
    assert [f["frame_id"] for f in frames] == [1, 2]
    assert [f["filename"] for f in frames] == [str(DOG), str(PERSON)]
    for frame, r in zip(frames, results):
        assert set(frame) == {"frame_id", "filename", "objects"}
        d = r.detections
        assert len(frame["objects"]) == len(d) > 0
        for obj, box, score, cls in zip(frame["objects"], d.boxes, d.scores, d.class_ids):
            assert set(obj) == {"class_id", "name", "relative_coordinates", "confidence"}
            assert obj["class_id"] == int(cls) and obj["name"] == names[int(cls)]
            rc = obj["relative_coordinates"]
            assert list(rc) == ["center_x", "center_y", "width", "height"]
            assert [rc[k] for k in rc] == pytest.approx(box.tolist(), abs=1e-7)
            assert obj["confidence"] == pytest.approx(float(score), abs=1e-7)
            assert 0 < rc["width"] <= 1.5 and 0 < rc["center_x"] < 1
    assert {o["name"] for o in frames[0]["objects"]} == {"bicycle", "dog", "car", "truck"}


@pytest.mark.slow
def test_cli_onnx_needs_no_cfg_writes_images_and_json(tmp_path, default_onnx):
    """detect on an .onnx alone (copied where no cfg is): names and decode come from its metadata."""
    model = tmp_path / "alone.onnx"
    shutil.copy(default_onnx, model)
    out_dir, js = tmp_path / "pred", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["detect", str(model), str(DOG), str(PERSON), "--out", str(out_dir),
                                  "--json", str(js), "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert "dog.jpg (768x576): 4 boxes" in r.output and "person.jpg (640x424): 4 boxes" in r.output
    assert "on onnxruntime" in r.output
    assert sorted(p.name for p in out_dir.iterdir()) == ["dog.jpg", "person.jpg"]
    for name, src in [("dog.jpg", DOG), ("person.jpg", PERSON)]:
        drawn, orig = cv2.imread(str(out_dir / name)), cv2.imread(str(src))
        assert drawn.shape == orig.shape
        changed = np.abs(drawn.astype(int) - orig.astype(int)).max(axis=2) > 60  # boxes and labels
        assert 0.005 < changed.mean() < 0.3
    assert [len(f["objects"]) for f in json.loads(js.read_text())] == [6, 4]


@pytest.mark.slow
def test_cli_corrupt_image_is_reported_others_processed(tmp_path, default_onnx):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(DOG, d / "a_dog.jpg")
    (d / "x.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    shutil.copy(PERSON, d / "z_person.jpg")
    js = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(d), "--json", str(js), "--threads", "2"])
    assert r.exit_code == 2
    assert f"{d / 'x.jpg'}: ERROR cannot decode the image" in r.output
    assert "a_dog.jpg (768x576): 4 boxes" in r.output and "z_person.jpg (640x424): 4 boxes" in r.output
    assert "darkconv: error: 1 of 3 image(s) could not be read" in r.stderr
    frames = json.loads(js.read_text())
    assert [(f["frame_id"], f["filename"].rsplit("/", 1)[-1]) for f in frames] == [(1, "a_dog.jpg"),
                                                                                  (3, "z_person.jpg")]


def test_cli_detect_errors(tmp_path, default_onnx):
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "nope.onnx"), str(DOG)])
    assert r.exit_code == 1 and "darkconv: error:" in r.stderr and "no such file" in r.stderr
    r = CliRunner().invoke(main, ["detect", str(default_onnx)])
    assert r.exit_code == 2 and "missing IMAGE_OR_DIR" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(empty)])
    assert r.exit_code == 2 and "no images found" in r.stderr
    r = CliRunner().invoke(main, ["detect", str(default_onnx), str(DOG), "--backend", "torch"])
    assert r.exit_code == 1 and "an .onnx runs on onnxruntime" in r.stderr


def test_cli_onnx_without_metadata(tmp_path, default_onnx):
    import onnx

    p = onnx.load(str(default_onnx))
    del p.metadata_props[:]
    onnx.save(p, tmp_path / "foreign.onnx")
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "foreign.onnx"), str(DOG)])
    assert r.exit_code == 1
    assert r.stderr.strip().count("\n") == 0 and "has no darkconv metadata" in r.stderr


def test_annotated_images_keep_their_format_and_same_names_do_not_overwrite(tmp_path, default_onnx):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.mkdir(), b.mkdir(), c.mkdir()
    shutil.copy(DOG, a / "img.jpg")
    cv2.imwrite(str(b / "img.png"), cv2.imread(str(PERSON)))
    shutil.copy(PERSON, c / "img.jpg")
    out = tmp_path / "pred"
    with open_runner(default_onnx, threads=2) as runner:
        run_detect(runner, [a / "img.jpg", b / "img.png", c / "img.jpg"], resolve_names(runner.spec), out_dir=out,
                   echo=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["img-1.jpg", "img.jpg", "img.png"]
    assert (out / "img.png").read_bytes()[:4] == b"\x89PNG"  # a PNG stays a PNG (lossless)
    assert (out / "img.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert cv2.imread(str(out / "img.jpg")).shape[:2] == (576, 768)
    assert cv2.imread(str(out / "img.png")).shape[:2] == (424, 640)
    assert cv2.imread(str(out / "img-1.jpg")).shape[:2] == (424, 640)


@pytest.mark.slow
def test_cli_cfg_on_onnxruntime_cleans_its_temporary_onnx(tmp_path, default_model, monkeypatch):
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    r = CliRunner().invoke(main, ["detect", str(default_model.cfg), str(default_model.weights), str(DOG),
                                  "--backend", "ort", "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert "dog.jpg (768x576): 4 boxes" in r.output
    assert "1 image(s) on onnxruntime (CPUExecutionProvider)" in r.output  # described while active; one image: 1 lane
    assert listing_after_gc(tmp) == []


def listing_after_gc(d):
    import gc

    gc.collect()
    return sorted(p.name for p in d.iterdir())


def test_opencv_runner_can_be_activated_twice(default_model):
    from darkconv.runners import runner_class

    x = np.random.default_rng(0).random((1, 3, 416, 416), dtype=np.float32)
    r = runner_class("opencv")(default_model.cfg, default_model.weights, threads=2)
    with r:
        first = r.infer(x)
    with r:  # the torch copy used for the BN-eps fix is freed after activation: it must be reloaded
        second = r.infer(x)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_json_write_failure_is_one_error_and_leaves_nothing(tmp_path):
    """A full disk while the JSON streams (ENOSPC on write/close) is a darkconv error naming the file, and the
    temporary file is removed: no half-written JSON."""
    from darkconv.detect import JsonStream
    from darkconv.errors import DarkconvError

    js = JsonStream(tmp_path / "o.json")
    js.add({"frame_id": 1, "objects": []})
    real = js._file

    class Full:
        def write(self, *a):
            raise OSError(28, "No space left on device")

        def close(self):
            raise OSError(28, "No space left on device")

    js._file = Full()
    with pytest.raises(DarkconvError, match=r"o\.json: cannot write the JSON: No space left on device"):
        js.finish()
    real.close()
    assert list(tmp_path.iterdir()) == []


def test_a_frame_that_fails_before_inference_is_a_read_failure():
    """Only an InferenceError is the backend's; a frame the pipeline could not prepare (wrong dtype/shape via the
    API, an unreadable file) failed at reading."""
    from types import SimpleNamespace

    from darkconv.detect import _result
    from darkconv.errors import InferenceError

    frame = SimpleNamespace(index=0, name="f", path=None, image=np.zeros((4, 4), np.float32))
    assert _result(frame, ValueError("expected HxWx3 uint8")).failed_stage == "read"
    good = SimpleNamespace(index=0, name="f", path=None, image=np.zeros((4, 6, 3), np.uint8))
    r = _result(good, InferenceError("server gone"))
    assert r.failed_stage == "inference" and r.size == (6, 4)
