"""``darkconv parity``: the same inputs through several backends, compared head by head and box by box.

The first backend is the reference. Tolerances depend on the precision of the
backend under test; a detection that appears or disappears is only counted as a
failure when its score is clearly above the threshold (``thresh + dscore``), since
a score sitting on the threshold may legitimately flip with rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .compare import DetectionDiff, compare_detections, head_errors
from .errors import DarkconvError
from .postprocess import postprocess
from .preprocess import load_image, preprocess_batch

#: precision -> (max relative head error, max |Δscore| of matched detections).
#: FP32: float reassociation only (measured ~1e-6 rel. on yolov3-tiny). FP16: 11-bit mantissa through
#: ~20 convs (measured 2.4e-3 rel., |Δscore| 0.002). INT8: per-tensor activation scales; head errors are
#: not meaningful; on yolov3-tiny calibrated (percentile) on the 5 sample images scores moved by at most
#: 0.082 (TensorRT target) / 0.079 (onnxruntime target), minmax calibration 0.19.
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 0.03), "int8": (None, 0.15)}


@dataclass
class BackendResult:
    name: str
    precision: str
    head_err: list = field(default_factory=list)  # per head (abs, rel)
    diff: DetectionDiff = field(default_factory=DetectionDiff)
    detections: int = 0
    ok: bool = True
    reasons: list = field(default_factory=list)


@dataclass
class ParityReport:
    reference: str
    images: int
    results: list[BackendResult]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def table(self) -> str:
        rows = [("backend", "prec", "max|Δhead|", "rel", "dets", "matched", "lost", "new", "max|Δscore|",
                 "min IoU", "verdict")]
        for r in self.results:
            a = max((e[0] for e in r.head_err), default=0.0)
            rel = max((e[1] for e in r.head_err), default=0.0)
            d = r.diff.as_dict()
            rows.append((r.name, r.precision, f"{a:.2e}", f"{rel:.2e}", str(r.detections), str(d["matched"]),
                         str(d["lost"]), str(d["new"]), f"{d['max_dscore']:.4f}",
                         "-" if d["min_iou"] is None else f"{d['min_iou']:.4f}",
                         "reference" if r.name == self.reference and r is self.results[0] else
                         ("ok" if r.ok else "FAIL: " + "; ".join(r.reasons))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def load_images(paths) -> tuple[list[np.ndarray], list[str]]:
    from .detect import expand_inputs

    files = expand_inputs(paths)
    if not files:
        raise DarkconvError(f"no images found in {', '.join(map(str, paths))}")
    return [load_image(p) for p in files], [str(p) for p in files]


def compare_runs(ref_heads, ref_dets, heads, dets, name, precision, *, thresh, tol_head=None, tol_score=None):
    th, ts = TOLERANCES.get(precision, TOLERANCES["fp32"])
    th = th if tol_head is None else tol_head
    ts = ts if tol_score is None else tol_score
    r = BackendResult(name, precision)
    r.head_err = head_errors(ref_heads, heads)
    for a, b in zip(ref_dets, dets):
        r.diff.add(compare_detections(a, b))
        r.detections += len(b)
    rel = max((e[1] for e in r.head_err), default=0.0)
    if th is not None and rel > th:
        r.reasons.append(f"head rel. error {rel:.2e} > {th:.0e}")
    if r.diff.max_dscore > ts:
        r.reasons.append(f"score change {r.diff.max_dscore:.4f} > {ts}")
    firm = [s for _, s in r.diff.lost_items + r.diff.new_items if s > thresh + ts]
    if firm:
        r.reasons.append(f"{len(firm)} detection(s) lost/new with score up to {max(firm):.2f}")
    r.ok = not r.reasons
    return r


def run_parity(runners: list, images: list[np.ndarray], *, precisions: list[str], thresh=0.25, nms=0.45,
               letterbox=None, tol_head=None, tol_score=None, batch: int = 1, log=None) -> ParityReport:
    """Run ``images`` through each (activated) runner; compare with the first."""
    spec = runners[0].spec
    lb = spec.letter_box if letterbox is None else letterbox
    sizes = [(im.shape[1], im.shape[0]) for im in images]
    x = preprocess_batch(images, (spec.width, spec.height), lb)
    outs = []
    for r in runners:
        if log:
            log(f"running {r.describe()} on {len(images)} image(s)")
        heads = [np.concatenate(parts, 0) for parts in
                 zip(*[r.infer(x[i:i + batch]) for i in range(0, len(x), batch)])]
        dets = postprocess(heads, r.spec, sizes, thresh=thresh, nms=nms, letterbox=lb)
        outs.append((heads, dets))
    results = []
    order = ("fp32", "fp16", "int8")
    for r, p, (heads, dets) in zip(runners, precisions, outs):
        looser = max(precisions[0], p, key=order.index)  # judge by the less exact of reference and backend
        res = compare_runs(outs[0][0], outs[0][1], heads, dets, r.name, looser, thresh=thresh,
                           tol_head=tol_head, tol_score=tol_score)
        res.precision = p
        results.append(res)
    return ParityReport(runners[0].name, len(images), results)


def int8_report(model, int8_onnx, spec, calib, *, thresh=0.25, nms=0.45, progress=None) -> str:
    """How INT8 detections differ from FP32 (the torch model) on the calibration images."""
    from .preprocess import list_images
    from .runners import runner_class

    files = list_images(calib)
    it = progress(files) if progress else files
    total = DetectionDiff()
    n = 0
    torch_runner = runner_class("torch")(None, model=model)
    with torch_runner as ref, runner_class("onnxruntime")(int8_onnx) as q:
        for f in it:
            try:
                im = load_image(f)
            except DarkconvError:
                continue
            x = preprocess_batch([im], (spec.width, spec.height), spec.letter_box)
            size = [(im.shape[1], im.shape[0])]
            a = postprocess(ref.infer(x), spec, size, thresh=thresh, nms=nms)[0]
            b = postprocess(q.infer(x), spec, size, thresh=thresh, nms=nms)[0]
            total.add(compare_detections(a, b))
            n += 1
    d = total.as_dict()
    return (f"INT8 vs FP32 on {n} calibration image(s): {d['matched']} matched, {d['lost']} lost, {d['new']} new, "
            f"mean |Δscore| {d['mean_dscore']:.4f}, max |Δscore| {d['max_dscore']:.4f}")
