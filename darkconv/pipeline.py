"""Open any model artifact on a backend, and run images through pre → runner → post.

MODEL may be a Darknet cfg (+ weights), a darkconv ``.onnx``, or a TensorRT engine
(``.plan``/``.engine`` with its sidecar). Every path ends in the one shared
postprocessor, whatever the backend.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .darknet.spec import ModelSpec
from .errors import DarkconvError
from .postprocess import Detections, postprocess
from .preprocess import preprocess_batch
from .runners import canonical, runner_class

DATA = Path(__file__).parent / "data"
ENGINE_EXTS = (".plan", ".engine", ".trt")


def model_kind(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_EXTS:
        return "engine"
    return "cfg"


def default_backend(model) -> str:
    return {"onnx": "onnxruntime", "engine": "tensorrt", "cfg": "torch"}[model_kind(model)]


def read_names(path) -> tuple[str, ...]:
    p = Path(path)
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise DarkconvError(f"cannot read class names: {e.strerror}", file=str(p)) from None
    if not names:
        raise DarkconvError("the names file is empty", file=str(p))
    return tuple(names)


def resolve_names(spec: ModelSpec, names_path=None) -> tuple[str, ...]:
    """Class names: --names, else the artifact's own, else COCO's for 80 classes, else numbers."""
    if names_path:
        names = read_names(names_path)
        if len(names) != spec.classes:
            raise DarkconvError(f"{len(names)} names for a model with classes={spec.classes}",
                                file=str(names_path))
        return names
    if spec.names and len(spec.names) == spec.classes:
        return spec.names
    if spec.classes == 80:
        return read_names(DATA / "coco.names")
    return tuple(str(i) for i in range(spec.classes))


def open_runner(model, weights=None, backend: str | None = None, *, threads: int | None = None,
                width: int | None = None, height: int | None = None, precision: str = "fp32",
                calib=None, workdir: str | None = None, log=None, url=None, device: str | None = None):
    """A (not yet activated) runner for ``model`` on ``backend``.

    ``backend="triton"`` (implied by ``url``): ``model`` names the served model (a cfg/onnx stands
    for its stem, a repository folder for its one darkconv network) on the Triton server(s) at
    ``url`` (``HOST:PORT[,HOST:PORT...]``).

    ``device`` (torch backend only): cpu, cuda or cuda:N (default: cuda when PyTorch sees a GPU).

    A cfg on onnxruntime is exported to a temporary ONNX first (in ``workdir``), so that
    the same cfg + weights can be compared across backends; INT8 is calibrated on ``calib``
    with the recipe chosen for this CPU (``export.quantize.choose_recipe``).
    """
    backend = canonical(backend or ("triton" if url else default_backend(model)))
    if device is not None and backend != "torch":
        raise DarkconvError(f"--device applies to the torch backend, not {backend}")
    if backend == "triton":
        from .runners.triton import served_name

        if width or height:
            raise DarkconvError("a served model has a fixed input size; drop --size")
        return runner_class("triton")(served_name(model), url)
    if url:
        raise DarkconvError(f"--url is for --backend triton, not {backend}")
    kind = model_kind(model)
    if kind == "cfg":
        if backend == "torch":
            return runner_class("torch")(model, weights, width=width, height=height, threads=threads,
                                         device=device)
        if backend == "opencv":
            if weights is None:
                raise DarkconvError("the opencv backend needs the .weights file")
            if width or height:
                raise DarkconvError("the opencv backend runs the cfg's own input size; drop --size")
            return runner_class("opencv")(model, weights, threads=threads)
        if backend == "onnxruntime":
            if precision == "int8" and not calib:
                raise DarkconvError("INT8 needs calibration images: run `darkconv convert CFG WEIGHTS --precision "
                                    "int8 --calib DIR` and pass the resulting .onnx")
            import darkconv
            from .export.onnx import export_onnx

            m = darkconv.load(model, weights, width=width, height=height)
            own_dir = workdir is None
            workdir = workdir or tempfile.mkdtemp(prefix="darkconv-")
            out = Path(workdir) / f"{Path(model).stem}-{precision}.onnx"
            if log:
                log(f"exporting {model} to {out} ({precision}) for onnxruntime")
            try:
                export_onnx(m, out, precision=precision, calib_images=calib, int8_target="onnxruntime")
                runner = runner_class("onnxruntime")(out, threads=threads)
            except BaseException:
                if own_dir:
                    shutil.rmtree(workdir, ignore_errors=True)
                raise
            if own_dir:  # the temporary ONNX lives as long as its runner (or until exit)
                weakref.finalize(runner, shutil.rmtree, workdir, True)
            return runner
        if backend == "tensorrt":
            raise DarkconvError("the tensorrt backend runs engines: build one with "
                                "`darkconv convert MODEL.cfg MODEL.weights --engine MODEL.plan`")
    if kind == "onnx":
        if backend != "onnxruntime":
            raise DarkconvError(f"an .onnx runs on onnxruntime, not {backend} (for TensorRT, build an engine "
                                "with darkconv convert --engine)")
        return runner_class("onnxruntime")(model, threads=threads)
    if backend != "tensorrt":
        raise DarkconvError(f"a TensorRT engine runs on the tensorrt backend, not {backend}")
    return runner_class("tensorrt")(model)


@dataclass
class Timings:
    """Seconds per stage, accumulated over images."""

    decode: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    images: int = 0


def detect_arrays(runner, images: list[np.ndarray], *, thresh=0.25, nms=0.45, letterbox=None,
                  agnostic=False, max_det=None, timings: Timings | None = None) -> list[Detections]:
    """Detections for a list of HxWx3 uint8 RGB images, batched through ``runner``."""
    spec = runner.spec
    lb = spec.letter_box if letterbox is None else letterbox
    t0 = time.perf_counter()
    batch = preprocess_batch(images, (spec.width, spec.height), lb)
    t1 = time.perf_counter()
    heads = runner.infer(batch)
    t2 = time.perf_counter()
    dets = postprocess(heads, spec, [(im.shape[1], im.shape[0]) for im in images], thresh=thresh, nms=nms,
                       letterbox=lb, agnostic=agnostic, max_det=max_det)
    t3 = time.perf_counter()
    if timings is not None:
        timings.preprocess += t1 - t0
        timings.inference += t2 - t1
        timings.postprocess += t3 - t2
        timings.images += len(images)
    return dets
