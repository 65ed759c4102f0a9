"""darkconv.parity / darkconv.compare: backends agree on the real model; disagreements are caught and named."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from darkconv.cli import main
from darkconv.compare import DetectionDiff, compare_detections, head_errors, iou_matrix
from darkconv.parity import TOLERANCES, compare_runs, run_parity
from darkconv.pipeline import open_runner
from darkconv.postprocess import Detections
from darkconv.runners import runner_class


def dets(*rows) -> Detections:
    """Detections from (cx, cy, w, h, score, class_id[, box_id]) rows."""
    if not rows:
        return Detections.empty()
    a = np.array([r[:6] for r in rows], np.float64)
    box_ids = [r[6] if len(r) > 6 else i for i, r in enumerate(rows)]
    return Detections(boxes=a[:, :4].astype(np.float32), scores=a[:, 4].astype(np.float32),
                      class_ids=a[:, 5].astype(np.int64), objectness=a[:, 4].astype(np.float32),
                      box_ids=np.array(box_ids, np.int64))


# ------------------------------------------------------------------------- compare_detections
def test_identical_detections_all_match():
    a = dets((0.5, 0.5, 0.2, 0.2, 0.9, 1), (0.2, 0.2, 0.1, 0.1, 0.4, 3))
    d = compare_detections(a, a)
    assert (d.matched, d.lost, d.new, d.max_dscore) == (2, 0, 0, 0.0) and d.min_iou == pytest.approx(1.0)
    assert d.as_dict()["mean_dscore"] == 0.0


def test_matched_lost_new_and_score_change():
    ref = dets((0.5, 0.5, 0.2, 0.2, 0.9, 1), (0.2, 0.2, 0.1, 0.1, 0.4, 3))
    other = dets((0.51, 0.5, 0.2, 0.2, 0.8, 1), (0.8, 0.8, 0.1, 0.1, 0.3, 5))
    d = compare_detections(ref, other)
    assert (d.matched, d.lost, d.new) == (1, 1, 1)
    assert d.max_dscore == pytest.approx(0.1, abs=1e-6)
    assert d.lost_items == [(3, pytest.approx(0.4))] and d.new_items == [(5, pytest.approx(0.3))]
    assert d.min_iou == pytest.approx(0.19 * 0.2 / (0.08 - 0.19 * 0.2), rel=1e-5)


def test_classes_are_matched_separately_multilabel():
    # one box with two labels (car + truck, same box_id), the other side has car only, and a truck
    # elsewhere: the truck must not be matched across classes or to the far box
    ref = dets((0.5, 0.5, 0.3, 0.2, 0.7, 2, 0), (0.5, 0.5, 0.3, 0.2, 0.4, 7, 0))
    other = dets((0.5, 0.5, 0.3, 0.2, 0.68, 2, 0), (0.1, 0.1, 0.1, 0.1, 0.4, 7, 1))
    d = compare_detections(ref, other)
    assert (d.matched, d.lost, d.new) == (1, 1, 1)
    assert d.lost_items == [(7, pytest.approx(0.4))] and d.new_items == [(7, pytest.approx(0.4))]
    # a class change on the same box is one lost + one new, never a match
    d = compare_detections(dets((0.5, 0.5, 0.2, 0.2, 0.9, 16)), dets((0.5, 0.5, 0.2, 0.2, 0.9, 18)))
    assert (d.matched, d.lost, d.new) == (0, 1, 1)


def test_iou_threshold():
    ref = dets((0.5, 0.5, 0.2, 0.2, 0.9, 0))
    shifted = dets((0.58, 0.5, 0.2, 0.2, 0.9, 0))  # IoU = 0.12 / 0.28 = 0.4286
    assert iou_matrix(ref.boxes, shifted.boxes)[0, 0] == pytest.approx(0.12 / 0.28, rel=1e-5)
    d = compare_detections(ref, shifted)  # default 0.5
    assert (d.matched, d.lost, d.new) == (0, 1, 1)
    d = compare_detections(ref, shifted, iou_thr=0.4)
    assert (d.matched, d.lost, d.new) == (1, 0, 0) and d.min_iou == pytest.approx(0.4286, abs=1e-4)


def test_greedy_by_score_and_one_to_one():
    # two reference boxes overlap the single other box: the higher-scored one gets it
    ref = dets((0.5, 0.5, 0.2, 0.2, 0.6, 0), (0.52, 0.5, 0.2, 0.2, 0.9, 0))
    other = dets((0.52, 0.5, 0.2, 0.2, 0.88, 0))
    d = compare_detections(ref, other)
    assert (d.matched, d.lost, d.new) == (1, 1, 0)
    assert d.max_dscore == pytest.approx(0.02, abs=1e-6) and d.lost_items == [(0, pytest.approx(0.6))]


def test_empty_sides_and_aggregation():
    a = dets((0.5, 0.5, 0.2, 0.2, 0.9, 1))
    empty = Detections.empty()
    assert compare_detections(empty, empty).as_dict() == {"matched": 0, "lost": 0, "new": 0, "max_dscore": 0.0,
                                                          "mean_dscore": 0.0, "min_iou": None}
    total = DetectionDiff()
    total.add(compare_detections(a, empty)).add(compare_detections(empty, a)).add(compare_detections(a, a))
    assert (total.matched, total.lost, total.new) == (1, 1, 1)


def test_head_errors():
    a = [np.array([[1.0, -4.0]]), np.zeros((1, 2))]
    b = [np.array([[1.0, -3.0]]), np.zeros((1, 2))]
    assert head_errors(a, b) == [(1.0, 0.25), (0.0, 0.0)]
    with pytest.raises(ValueError, match="head shapes differ"):
        head_errors(a, [np.zeros((1, 3)), np.zeros((1, 2))])


def test_compare_runs_firm_and_borderline_changes():
    """A detection flipping at the threshold is tolerated; one clearly above it is a failure."""
    heads = [np.ones((1, 2))]
    ref = [dets((0.5, 0.5, 0.2, 0.2, 0.9, 1))]
    borderline = [dets((0.5, 0.5, 0.2, 0.2, 0.9, 1), (0.2, 0.2, 0.1, 0.1, 0.2505, 4))]  # within thresh + 1e-3
    firm = [dets((0.5, 0.5, 0.2, 0.2, 0.9, 1), (0.2, 0.2, 0.1, 0.1, 0.6, 4))]
    assert compare_runs(heads, ref, heads, borderline, "x", "fp32", thresh=0.25).ok
    r = compare_runs(heads, ref, heads, firm, "x", "fp32", thresh=0.25)
    assert not r.ok and r.reasons == ["1 detection(s) lost/new with score up to 0.60"]
    r = compare_runs(heads, ref, [np.full((1, 2), 1.01)], ref, "x", "fp32", thresh=0.25)
    assert not r.ok and r.reasons == ["head rel. error 1.00e-02 > 1e-04"]
    assert compare_runs(heads, ref, [np.full((1, 2), 1.01)], ref, "x", "fp16", thresh=0.25).ok


# --------------------------------------------------------------------------- on the real model
class PerturbedRunner:
    """Wraps a runner and changes its heads: ``fn(k, head) -> head``."""

    def __init__(self, inner, fn, name="perturbed"):
        self.inner, self.fn, self.name, self.spec = inner, fn, name, inner.spec

    def activate(self):
        self.inner.activate()

    def deactivate(self):
        self.inner.deactivate()

    def describe(self):
        return f"{self.name} ({self.inner.describe()})"

    def infer(self, batch):
        return [self.fn(k, h.copy()) for k, h in enumerate(self.inner.infer(batch))]


@pytest.fixture(scope="module")
def runners(default_model, default_torch_model, default_onnx):
    rs = {"torch": runner_class("torch")(None, model=default_torch_model),
          "onnxruntime": runner_class("onnxruntime")(default_onnx, threads=2),
          "opencv": open_runner(default_model.cfg, default_model.weights, "opencv", threads=2)}
    for r in rs.values():
        r.activate()
    yield rs
    for r in rs.values():
        r.deactivate()


@pytest.mark.slow
def test_parity_torch_onnxruntime_opencv(runners, sample_images):
    rs = [runners["torch"], runners["onnxruntime"], runners["opencv"]]
    report = run_parity(rs, sample_images[1], precisions=["fp32"] * 3, batch=2)
    assert report.ok, report.table()
    assert report.reference == "torch" and report.images == 5
    ref, ort_res, cv_res = report.results
    assert ref.detections == 21 and ref.head_err == [(0.0, 0.0), (0.0, 0.0)]
    for r in (ort_res, cv_res):
        assert r.ok and r.reasons == []
        assert (r.diff.matched, r.diff.lost, r.diff.new, r.detections) == (21, 0, 0, 21)
        assert max(e[1] for e in r.head_err) <= TOLERANCES["fp32"][0]
        assert r.diff.max_dscore <= 1e-4 and r.diff.min_iou >= 0.9999
    table = report.table()
    assert "reference" in table and table.count(" ok") == 2 and "FAIL" not in table


def test_parity_catches_noise_on_one_head(runners, sample_images):
    rng = np.random.default_rng(0)

    def noisy(k, h):  # 1 % of the head's range on head_23 only
        return h + (rng.standard_normal(h.shape).astype(np.float32) * 0.01 * np.abs(h).max() if k == 1 else 0)

    bad = PerturbedRunner(runners["onnxruntime"], noisy)
    report = run_parity([runners["torch"], bad], sample_images[1][:2], precisions=["fp32", "fp32"])
    assert not report.ok
    res = report.results[1]
    assert res.head_err[0][1] <= 1e-4 and res.head_err[1][1] > 1e-2
    assert any(r.startswith("head rel. error") for r in res.reasons)
    assert "FAIL: head rel. error" in report.table()


def test_parity_catches_lost_detections(runners, sample_images):
    """Objectness of head_16 (13x13, the large objects) pushed to -20: its detections disappear. With INT8
    rules (no head check, |Δscore| 0.25, agreement >= 0.97) the verdict must come from the agreement alone."""
    def kill_objectness(k, h):
        if k == 0:
            h[:, 4::85] = -20.0
        return h

    bad = PerturbedRunner(runners["onnxruntime"], kill_objectness)
    dog_person = [sample_images[1][0], sample_images[1][4]]
    report = run_parity([runners["torch"], bad], dog_person, precisions=["fp32", "int8"])
    res = report.results[1]
    assert not report.ok and res.diff.lost >= 3 and res.diff.new == 0 and res.diff.matched >= 1
    assert len(res.reasons) == 1 and res.reasons[0].startswith("agreement ") and res.agreement < 0.97
    assert "agreement" in report.table() and f"{res.agreement:.4f}" in report.table()
    assert res.diff.max_dscore <= 0.2  # what remains matches


def test_parity_catches_score_shift(runners, sample_images):
    def shift(k, h):
        h[:, 4::85] += 2.0  # every objectness logit up by 2: scores move by up to ~0.4
        return h

    report = run_parity([runners["torch"], PerturbedRunner(runners["onnxruntime"], shift)], sample_images[1][:1],
                        precisions=["fp32", "int8"])
    res = report.results[1]
    assert not report.ok and any(r.startswith("score change") for r in res.reasons)


# ----------------------------------------------------------------------------------- the CLI
@pytest.mark.slow
def test_cli_parity_exit_codes(default_model, tmp_path, sample_images):
    dog = str(sample_images[0][0])
    args = ["parity", str(default_model.cfg), str(default_model.weights), "--images", dog, "--threads", "2"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "1 image(s), reference torch" in r.output and "onnxruntime" in r.output and "FAIL" not in r.output
    r = CliRunner().invoke(main, args + ["--tol-head", "0"])
    assert r.exit_code == 1
    assert "FAIL: head rel. error" in r.output
    assert "darkconv: error: backends disagree beyond tolerance" in r.stderr


@pytest.mark.slow
def test_cli_parity_int8_readme_command(default_model):
    """The README's command, on the bundled images: INT8 calibrated on the zoo photos (held out), judged by
    agreement. Measured here (AMD EPYC, AVX2, no VNNI, recipe u8s8-rr): agreement 1.0, max |Δscore| 0.171."""
    r = CliRunner().invoke(main, ["parity", str(default_model.cfg), str(default_model.weights), "--backends",
                                  "torch,onnxruntime,opencv", "--precision", "int8", "--threads", "2"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("onnxruntime"))
    assert " int8 " in line and line.rstrip().endswith("ok") and "1.0000" in line


def test_cli_parity_int8_never_calibrates_on_judged_images(default_model, sample_images):
    r = CliRunner().invoke(main, ["parity", str(default_model.cfg), str(default_model.weights), "--precision",
                                  "int8", "--images", str(sample_images[0][0]), "--calib", str(sample_images[0][0])])
    assert r.exit_code == 1 and "calibrates on other images than it judges" in r.output


def test_cli_parity_needs_two_backends(default_model):
    r = CliRunner().invoke(main, ["parity", str(default_model.cfg), str(default_model.weights),
                                  "--backends", "torch"])
    assert r.exit_code == 2 and "give at least two backends" in r.output
