"""``darkconv eval``: Darknet's ``detector map`` on labelled images, COCO metrics, and agreement between runs.

Three kinds of DATA (:func:`darkconv.datasets.load_dataset`): a Darknet ``.data`` (or a folder / list
whose images have YOLO label files where Darknet looks for them), a COCO annotations JSON with its
image folder, or unlabelled images with a reference run (``ref``) whose detections above
``ref_thresh`` are the truths ("agreement").

Per image, every runner sees the same preprocessed batch (Darknet's resize / letterbox), and the one
shared postprocessor produces

* the ``detector map`` detections: thresh 0.005, NMS 0.45, the cfg's NMS kind (:mod:`darkconv.metrics`);
* the ``detector valid`` detections for COCO metrics and ``--coco-json``: thresh 0.001, NMS 0.6
  (:mod:`darkconv.coco`).

An image that cannot be read stops the run with its name: a figure over a silently smaller set would
mislead.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import coco as cocolib
from . import metrics
from .datasets import DatasetError, load_dataset
from .errors import DarkconvError
from .postprocess import Detections

__all__ = ["EvalResult", "evaluate", "parse_ref", "detect_dataset"]

SCHEMA = "darkconv.eval/1"


@dataclass
class EvalResult:
    """Everything ``darkconv eval`` measured. ``map`` is Darknet's ``detector map`` (labels, or the
    reference's detections in agreement mode, where ``map.map_gt`` is the agreement figure)."""

    mode: str                                   # "labels" | "agreement"
    map: metrics.MapResult
    coco: dict | None
    dataset: dict
    model: dict
    settings: dict
    timings: dict
    environment: dict
    reference: dict | None = None
    notes: list[str] = field(default_factory=list)
    names: tuple[str, ...] = ()
    detections: list[Detections] = field(default_factory=list, repr=False)        # map detections per image
    reference_detections: list[Detections] | None = field(default=None, repr=False)
    paths: list[Path] = field(default_factory=list, repr=False)

    @property
    def figure(self) -> float:
        """The headline number: Darknet's mAP (labels) or the agreement mAP (mean over the reference's classes)."""
        return self.map.map_gt if self.mode == "agreement" else self.map.map

    def as_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        return clean({"schema": SCHEMA, "mode": self.mode, "figure": self.figure, "darknet_map": self.map.as_dict(),
                      "coco": self.coco, "dataset": self.dataset, "model": self.model, "reference": self.reference,
                      "settings": self.settings, "timings": self.timings, "environment": self.environment,
                      "notes": self.notes})


# --------------------------------------------------------------------------- the detection loop
def detect_dataset(runners, paths: Sequence, posts: Sequence[Sequence[tuple[float, float]]], *, batch: int = 1,
                   letterbox=None, timings: dict | None = None, on_batch=None, check_size=None, workers=None):
    """Run ``paths`` through every runner with :func:`darkconv.pipeline.stream_runs`: files are decoded and
    preprocessed in worker threads while the previous batch is inferred, and postprocessed in another.

    ``posts[r]``: the (thresh, nms) settings the postprocessor applies to runner ``r``'s heads.
    Returns ``(sizes, out)`` with ``out[r][s]`` = one :class:`Detections` per image. ``check_size(i,
    (w, h))`` may raise for an image whose size is not what the labels say. An unreadable image (or a
    failed batch) stops the run with its error.
    """
    from .pipeline import Timings, stream_runs
    from .sources import ImageFileFrame

    t = timings if timings is not None else {}
    tm = Timings()
    frames = (ImageFileFrame(i, p) for i, p in enumerate(paths))
    out = [[[] for _ in p] for p in posts]
    sizes: list[tuple[int, int]] = []
    runs = stream_runs(runners, frames, posts, batch=batch, letterbox=letterbox, timings=tm, workers=workers,
                       on_batch=on_batch)
    try:
        for frame, res in runs:
            if isinstance(res, BaseException):
                raise res
            wh = (frame.image.shape[1], frame.image.shape[0])
            if check_size:
                check_size(len(sizes), wh)
            sizes.append(wh)
            for r, per_post in enumerate(res):
                for s, det in enumerate(per_post):
                    out[r][s].append(det)
            frame._image = None                  # the pixels are not needed any more
    finally:
        runs.close()
        for k in ("decode", "preprocess", "inference", "postprocess", "inference_busy"):
            t[k] = t.get(k, 0.0) + getattr(tm, k)
    return sizes, out


# --------------------------------------------------------------------------- helpers
def parse_ref(ref) -> tuple[str, str]:
    """``"torch"`` / ``"onnxruntime:fp16"`` / ``("ort", "int8")`` -> (backend, precision)."""
    from .runners import canonical

    if isinstance(ref, (tuple, list)):
        backend, precision = ref
    else:
        backend, _, precision = str(ref).partition(":")
    precision = (precision or "fp32").lower()
    if precision not in ("fp32", "fp16", "int8"):
        raise DarkconvError(f"--ref {ref}: the precision must be fp32, fp16 or int8")
    return canonical(backend), precision


def _open(model, weights, backend, precision, *, threads, width, height, calib, workdir, log, url=None, lanes=1):
    """A runner for ``model`` on ``backend`` at ``precision`` (through ``pipeline.open_runner``) and what runs."""
    from .pipeline import artifact_precision, model_kind, open_runner, resolve_backend

    backend = resolve_backend(model, backend, url)
    if backend == "triton":                     # a served model runs whatever precision it was exported in
        return (open_runner(model, weights, backend, width=width, height=height, log=log, url=url), backend,
                precision or "as served")
    kind = model_kind(model)
    if kind == "cfg":
        precision = precision or "fp32"
        if backend in ("torch", "opencv") and precision != "fp32":
            raise DarkconvError(f"the {backend} backend runs FP32 only: for {precision} use --backend onnxruntime "
                                "(or a converted .onnx / engine)")
        if precision == "int8" and not calib:
            raise DarkconvError("INT8 of a cfg needs calibration images: --calib DIR (images like the ones you "
                                "evaluate on; calibrating on the evaluation images themselves flatters INT8)")
    else:
        if width or height:
            raise DarkconvError(f"an {kind} has a fixed input size: --size only applies to a cfg", file=str(model))
        actual = artifact_precision(model)
        if precision and precision != actual:
            raise DarkconvError(f"this {kind} is {actual}, not {precision}: convert again for another precision",
                                file=str(model))
        precision = actual
    runner = open_runner(model, weights, backend, threads=threads, width=width, height=height,
                         precision=precision, calib=calib, workdir=workdir, log=log, lanes=lanes)
    return runner, backend, precision


def _lanes(lanes, backends, threads, batches) -> int:
    """Inference lanes for the runs under way: ``lanes`` if given (every backend must take it), else
    :func:`darkconv.pipeline.default_lanes` when every run is on onnxruntime, else 1."""
    from .pipeline import default_lanes

    others = sorted({b for b in backends if b != "onnxruntime"})
    if lanes is None:
        return 1 if others else default_lanes("onnxruntime", threads=threads, batches=batches)
    if int(lanes) > 1 and others:
        raise DarkconvError(f"--lanes {lanes}: {' and '.join(others)} take(s) one inference call at a time, and "
                            "every run of an eval shares its batches: drop --lanes")
    return int(lanes)


def _model_info(model, weights, backend, precision, runner) -> dict:
    from .io import sha256_file
    from .pipeline import model_kind

    spec = runner.spec
    kind = model_kind(model)
    return {"path": str(model), "kind": "served" if backend == "triton" else kind,
            "sha256": sha256_file(model),
            "weights": str(weights) if weights else None, "weights_sha256": sha256_file(weights),
            "backend": backend, "precision": precision, "runs_on": runner.describe(),
            "input": [spec.width, spec.height], "classes": spec.classes, "letter_box": bool(spec.letter_box),
            "nms_kind": spec.nms_kind}


# --------------------------------------------------------------------------- the job
def evaluate(model, weights=None, data=None, *, images=None, backend: str | None = None,
             precision: str | None = None, calib=None, ref=None, ref_thresh: float = 0.25,
             iou_thresh: float = 0.5, points: int = 0, thresh: float = 0.25, letterbox: bool | None = None,
             names=None, batch: int = 1, threads: int | None = None, size: tuple[int, int] | None = None,
             ref_model=None, ref_weights=None, url=None, coco: bool = True, coco_json=None, limit: int | None = None,
             lanes: int | None = None, progress=None, log=None) -> EvalResult:
    """Evaluate ``model`` (cfg + weights, .onnx or engine) on ``data``.

    ``data``: a Darknet ``.data``, a COCO annotations ``.json`` (with ``images`` = its image folder),
    or image folders / files / ``.txt`` lists; with ``ref`` (``"torch"``, ``"onnxruntime:fp16"``...)
    the reference's detections with score > ``ref_thresh`` are the truths instead of any labels; the
    reference runs ``model`` too, or ``ref_model`` (+ ``ref_weights``), e.g. the cfg behind an engine.
    ``backend``/``precision``/``calib`` choose the run under test (INT8 of a cfg is calibrated on
    ``calib``; ``url``: the model served by Triton at ``HOST:PORT[,...]``). ``iou_thresh``, ``points`` (0 = area under the curve, 11, 101) and ``thresh`` are
    ``detector map``'s ``-iou_thresh``, ``-points`` and ``-thresh``; ``letterbox`` None = the cfg's.
    ``coco``: also compute COCO metrics; ``coco_json``: write the ``detector valid`` detections there.
    ``lanes``: onnxruntime inference calls at once (None: :func:`darkconv.pipeline.default_lanes` when every run
    is on onnxruntime, else 1).
    ``progress``: a tqdm-like factory (``progress(total=N)``); ``log``: a print-like callable.
    """
    import tempfile

    from .bench import environment
    from .pipeline import resolve_names

    log = log or (lambda *_a, **_k: None)
    if points not in (0, 11, 101) and not (isinstance(points, int) and points >= 2):
        raise DarkconvError(f"points must be 0 (area under the curve), 11 or 101, not {points}")
    if batch < 1:
        raise DarkconvError(f"batch must be >= 1, not {batch}")
    if data is None:
        raise DarkconvError("no DATA: give a .data file, a COCO annotations JSON (with --images) or images with --ref")
    t_start = time.perf_counter()
    agreement = ref is not None
    ds = load_dataset(data, images=images, labels=not agreement)
    if limit is not None:
        ds = ds.limit(int(limit))
    if not agreement and ds.kind == "images":
        raise DatasetError(f"{ds.source}: no labels found (no YOLO .txt where Darknet looks for them): pass a .data "
                           "file, a COCO annotations JSON with --images, or --ref BACKEND to measure agreement "
                           "with a reference run")
    width, height = size if size else (None, None)
    notes = list(ds.notes)
    from .pipeline import resolve_backend

    backend = resolve_backend(model, backend, url)
    if agreement:
        rb, rp = parse_ref(ref)
        rm, rw = (ref_model, ref_weights) if ref_model is not None else (model, weights)
    n_lanes = _lanes(lanes, [backend] + ([rb] if agreement else []), threads, -(-len(ds.images) // batch))
    with tempfile.TemporaryDirectory(prefix="darkconv-eval-") as workdir:
        t0 = time.perf_counter()
        runner, backend, precision = _open(model, weights, backend, precision, threads=threads, width=width,
                                           height=height, calib=calib, workdir=workdir, log=log, url=url,
                                           lanes=n_lanes)
        runners = [runner]
        ref_info = None
        if agreement:
            ref_runner, rb, rp = _open(rm, rw, rb, rp, threads=threads, width=width, height=height,
                                       calib=calib, workdir=workdir, log=log, lanes=n_lanes)
            runners.append(ref_runner)
        active = []
        try:
            for r in runners:
                r.activate()
                active.append(r)
            t_load = time.perf_counter() - t0
            spec = runner.spec
            classes = spec.classes
            class_names = tuple(resolve_names(spec, names))
            if ds.names is not None and names is None and len(ds.names) == classes:
                class_names = tuple(ds.names)
            if not (agreement and ds.kind == "coco"):     # agreement: the annotations' categories are not used
                ds.bind(classes, class_names)
            if agreement:
                rs = runners[1].spec
                if rs.classes != classes:
                    raise DarkconvError(f"the reference has {rs.classes} classes, the model {classes}")
                ref_info = {"backend": rb, "precision": rp, "runs_on": runners[1].describe(),
                            "ref_thresh": float(ref_thresh), "model": str(rm), "weights": str(rw) if rw else None}
            paths = [im.path for im in ds.images]
            want_coco = coco or coco_json is not None
            map_post = (metrics.MAP_THRESH, metrics.MAP_NMS)
            # detector valid's setting: for the COCO file, and for COCO metrics except in agreement (they use the map
            # setting there), so an agreement eval without --coco-json does not postprocess every image twice
            want_valid = coco_json is not None or (coco and not agreement)
            posts = [[map_post] + ([(cocolib.VALID_THRESH, cocolib.VALID_NMS)] if want_valid else [])]
            if agreement:
                posts.append([map_post])
            timings: dict = {}
            bar = progress(total=len(paths)) if progress else None

            def check_size(i, wh):
                want = ds.images[i].size
                if want is not None and tuple(want) != tuple(wh):
                    raise DatasetError(f"{ds.images[i].path} is {wh[0]}x{wh[1]} but the annotations say "
                                       f"{want[0]}x{want[1]}", file=ds.source)

            t1 = time.perf_counter()
            try:
                sizes, out = detect_dataset(runners, paths, posts, batch=batch, letterbox=letterbox, timings=timings,
                                            on_batch=bar.update if bar else None, check_size=check_size)
            finally:
                if bar:
                    bar.close()
            t_detect = time.perf_counter() - t1
            model_info = _model_info(model, weights, backend, precision, runner)
            runs_letterbox = spec.letter_box if letterbox is None else bool(letterbox)
        finally:
            for r in active:
                r.deactivate()

    with _gc_paused():  # the metrics make tens of thousands of small dicts and lists, no cycles
        t2 = time.perf_counter()
        dets = out[0][0]
        ref_dets = out[1][0] if agreement else None
        if agreement:
            truths = metrics.truths_from_detections(ref_dets, ref_thresh)
            result_map = metrics.agreement(ref_dets, dets, classes, ref_thresh=ref_thresh, iou_thresh=iou_thresh,
                                           points=points, names=class_names, thresh=thresh)
        else:
            truths = ds.truths()
            result_map = metrics.darknet_map(truths, dets, classes, iou_thresh=iou_thresh, points=points,
                                             thresh=thresh, names=class_names)
        t_map = time.perf_counter() - t2

        coco_out = None
        t3 = time.perf_counter()
        if want_coco:
            use_annotations = ds.kind == "coco" and not agreement
            cat_ids = cocolib.category_ids(class_names, ds.category_map if use_annotations else None)
            ids, ids_from = cocolib.image_ids(paths, [im.image_id for im in ds.images] if ds.kind == "coco" else None)

            def entries(per_image):
                return [row for d, sz, iid in zip(per_image, sizes, ids)
                        for row in cocolib.detector_valid_entries(d, sz, iid, cat_ids)]

            if coco_json is not None:
                cocolib.write_results(coco_json, entries(out[0][1]))
            if coco:
                gt = (cocolib.subset_ground_truth(ds.coco, ids) if use_annotations
                      else cocolib.ground_truth(truths, sizes, ids, cat_ids, class_names))
                # agreement: the same detections as the reference's (map setting): identical runs give 1.0
                rows = entries(dets if agreement else out[0][1])
                coco_out = cocolib.coco_metrics(gt, cocolib.rows_as_results(rows), copy=use_annotations)
                coco_out["detections_from"] = ({"thresh": metrics.MAP_THRESH, "nms": metrics.MAP_NMS} if agreement
                                               else {"thresh": cocolib.VALID_THRESH, "nms": cocolib.VALID_NMS})
                names_of = {c["id"]: c["name"] for c in gt["categories"]}
                for c in coco_out["per_category"]:
                    c["name"] = names_of.get(c["category_id"])
                coco_out["image_ids"] = ids_from
                coco_out["category_ids"] = ("annotations" if use_annotations else
                                            "Darknet's coco_ids table" if cocolib.is_coco_names(class_names)
                                            else "class index")
        t_coco = time.perf_counter() - t3

    n = len(paths)
    wall = time.perf_counter() - t_start
    timings.update(load_s=t_load, detect_s=t_detect, map_s=t_map, coco_s=t_coco, total_s=wall,
                   images_per_s=n / t_detect if t_detect > 0 else None,
                   inference_images_per_s=(n * len(runners) / timings["inference_busy"]
                                           if timings.get("inference_busy") else None))
    summary = ds.summary()
    if agreement:
        summary["reference_objects"] = int(sum(len(t) for t in truths))
    settings = {"iou_thresh": float(iou_thresh), "points": int(points), "thresh": float(thresh),
                "map_detections": {"thresh": metrics.MAP_THRESH, "nms": metrics.MAP_NMS, "nms_kind": spec.nms_kind},
                "coco_detections": ({"thresh": cocolib.VALID_THRESH, "nms": cocolib.VALID_NMS} if want_coco else None),
                "letterbox": bool(runs_letterbox), "batch": int(batch), "threads": threads, "lanes": n_lanes,
                "calib": [str(c) for c in calib] if isinstance(calib, (list, tuple)) else calib}
    if ds.kind == "darknet" and ds.missing_labels:
        notes.append(f"{ds.missing_labels} of {n} image(s) have no label file: counted as images without objects")
    return EvalResult("agreement" if agreement else "labels", result_map, coco_out, summary, model_info, settings,
                      timings, environment(threads), ref_info, notes, class_names, dets, ref_dets, paths)


# --------------------------------------------------------------------------- report (text, JSON, plot)
@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off for a bounded burst of allocations without cycles (reference counting
    frees them): each full collection would walk every live object, 0.1 s of eval's COCO metrics on 200 images."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.2f} %"


def format_coco(result: EvalResult) -> str:
    """The COCO figures as a small table (None = no object of that size)."""
    c = result.coco
    if not c:
        return ""
    s = c["stats"]
    rows = [("AP @[.5:.95]", s["AP"]), ("AP @.50", s["AP50"]), ("AP @.75", s["AP75"]),
            ("AP small / medium / large", (s["AP_small"], s["AP_medium"], s["AP_large"])),
            ("AR @1 / @10 / @100", (s["AR_1"], s["AR_10"], s["AR_100"])),
            ("AR small / medium / large", (s["AR_small"], s["AR_medium"], s["AR_large"]))]
    src = c["detections_from"]
    how = ("the detections of `detector map`, like the reference's" if result.mode == "agreement"
           else "`detector valid`")
    lines = [f"COCO metrics ({c['library']} {c['version']}; {c['detections']} detections as {how}: "
             f"thresh {src['thresh']}, NMS {src['nms']}; image ids from {c['image_ids']}, "
             f"category ids from {c['category_ids']})"]
    for label, v in rows:
        val = " / ".join(_pct(x) for x in v) if isinstance(v, tuple) else _pct(v)
        lines.append(f"  {label:<27} {val}")
    return "\n".join(lines)


def format_summary(result: EvalResult) -> str:
    d, m, mp, t = result.dataset, result.model, result.map, result.timings
    with_gt = [c for c in mp.classes if c.truths > 0]
    what = f"{d['images']} image(s)"
    if d["kind"] == "darknet":
        what += f" ({d['labelled']} labelled, {d['missing_labels']} without a label file), {d['objects']} object(s)"
    elif d["kind"] == "coco":
        what += f", {d['objects']} object(s) (COCO annotations)"
    lines = [f"{what} from {d['source']}",
             f"model {Path(m['path']).name} on {m['runs_on']}, input {m['input'][0]}x{m['input'][1]}, "
             f"letterbox {'on' if result.settings['letterbox'] else 'off'}, NMS {m['nms_kind']}"]
    if result.mode == "agreement":
        r = result.reference
        lines.append(f"agreement mAP@{mp.iou_thresh:.2f} = {_pct(mp.map_gt)} against {r['runs_on']} ({r['precision']}): "
                     f"its {d['reference_objects']} detection(s) with score > {r['ref_thresh']:g} are the truths; "
                     f"mean over the {len(with_gt)} class(es) it found (1.0 = every reference object found, ranked "
                     "before any extra detection)")
    else:
        lines.append(f"Darknet mAP@{mp.iou_thresh:.2f} = {_pct(mp.map)} (mean over all {len(mp.classes)} classes, "
                     f"as `detector map` prints it); over the {len(with_gt)} class(es) with objects: {_pct(mp.map_gt)}")
    if result.coco:
        s = result.coco["stats"]
        lines.append(f"COCO AP@[.5:.95] = {_pct(s['AP'])}, AP50 = {_pct(s['AP50'])}")
    n = max(d["images"], 1)
    per = ", ".join(f"{k} {t.get(key, 0.0) / n * 1e3:.1f} ms" for k, key in
                    (("decode", "decode"), ("preprocess", "preprocess"), ("inference", "inference_busy"),
                     ("postprocess", "postprocess")))
    ips = t.get("images_per_s")
    lines.append(f"{ips:.1f} images/s ({per} per image; decode and preprocessing overlap inference)" if ips
                 else f"per image: {per}")
    lines += [f"note: {x}" for x in result.notes]
    return "\n".join(lines)


def write_json(result: EvalResult, path) -> Path:
    import json

    from .io import atomic_write

    path = Path(path)
    atomic_write(path, [(json.dumps(result.as_dict(), indent=1) + "\n").encode()])
    return path


def plot(result: EvalResult, path) -> Path:
    """Per-class PR curves (classes with truths) and a per-class AP bar chart in one PNG (atomic write)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    mp = result.map
    with_gt = sorted((c for c in mp.classes if c.truths > 0), key=lambda c: (-c.ap, c.class_id))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    cmap = plt.get_cmap("tab20")
    for k, c in enumerate(with_gt):
        if c.recall.size:
            r = np.concatenate([[0.0], c.recall])
            p = np.concatenate([[c.precision[0]], c.precision])
            ax1.step(r, p, where="post", color=cmap(k % 20), label=f"{c.name} (AP {c.ap * 100:.1f})")
        else:
            ax1.plot([], [], color=cmap(k % 20), label=f"{c.name} (no detection)")
    ax1.set_xlim(0, 1.02)
    ax1.set_ylim(0, 1.05)
    ax1.set_xlabel("recall")
    ax1.set_ylabel("precision")
    ax1.set_title(f"PR curves (IoU > {mp.iou_thresh:g})")
    if with_gt:
        ax1.legend(fontsize=7, loc="lower left", ncol=1 + len(with_gt) // 15)
    if with_gt:
        ax2.barh([c.name for c in with_gt][::-1], [c.ap * 100 for c in with_gt][::-1],
                 color=[cmap(k % 20) for k in range(len(with_gt))][::-1])
        for y, c in enumerate(with_gt[::-1]):
            ax2.text(c.ap * 100 + 1, y, f"{c.ap * 100:.1f} ({c.truths})", va="center", fontsize=7)
    ax2.set_xlim(0, 112)
    ax2.set_xlabel("AP (%), objects in brackets")
    label = "agreement" if result.mode == "agreement" else "Darknet"
    figure = mp.map_gt if result.mode == "agreement" else mp.map
    ax2.set_title(f"per-class AP; {label} mAP@{mp.iou_thresh:.2f} = {figure * 100:.2f} %"
                  + ("" if result.mode == "agreement" else f" ({len(mp.classes)} classes)"))
    m = result.model
    fig.suptitle(f"{Path(m['path']).name} on {m['runs_on']}, {result.dataset['images']} image(s) "
                 f"from {Path(result.dataset['source'].split(',')[0]).name}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write(path, [buf.getvalue()])
    return path
