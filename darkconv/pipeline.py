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
RANDOM_WEIGHTS = "random weights (speed only)"  # the note of open_runner(random_weights=True)


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


def artifact_precision(model) -> str:
    """What an .onnx or engine runs: fp32, fp16 or int8 (from its metadata / sidecar)."""
    if model_kind(model) == "onnx":
        from .onnx_meta import onnx_precision
        return onnx_precision(model)
    from .export.tensorrt import read_sidecar
    return str(read_sidecar(model).get("precision", "fp32"))


def open_runner(model, weights=None, backend: str | None = None, *, threads: int | None = None,
                width: int | None = None, height: int | None = None, precision: str = "fp32",
                calib=None, workdir: str | None = None, log=None, url=None,
                random_weights: bool = False, engine_batch: int | None = None, report: dict | None = None):
    """A (not yet activated) runner for ``model`` on ``backend``: the one way darkconv opens a model.

    ``backend="triton"`` (implied by ``url``): ``model`` names the served model (a cfg/onnx stands
    for its stem, a repository folder for its one darkconv network) on the Triton server(s) at
    ``url`` (``HOST:PORT[,HOST:PORT...]``).

    A cfg on onnxruntime is exported to a temporary ONNX first (in ``workdir``), so that
    the same cfg + weights can be compared across backends; INT8 is calibrated on ``calib``
    (required: callers choose the images) with the recipe chosen for this CPU
    (``export.quantize.choose_recipe``). An .onnx / engine runs as it is: ``width``/``height``
    other than its own input size are refused.

    Options for jobs that need more than opening an artifact (``darkconv bench``):

    * ``random_weights``: a cfg without weights gets deterministic random weights (speed only).
    * ``engine_batch=N``: a cfg on tensorrt is exported and built into a temporary engine (in
      ``workdir``) for batches 1..N; without it a cfg on tensorrt is refused with the convert command.
    * ``report``: a dict that gets what opening took and means: ``model_load_s``, ``export_s``,
      ``engine_build_s`` (seconds, for the steps that ran), ``precision`` (what runs), ``int8``
      (recipe, calibration method and image count) and ``notes`` (lines worth telling the user).
    """
    rep = report if report is not None else {}
    rep.setdefault("notes", [])
    backend = canonical(backend or ("triton" if url else default_backend(model)))
    if backend == "triton":
        from .runners.triton import served_name

        if width or height:
            raise DarkconvError("a served model has a fixed input size; drop --size")
        t0 = time.perf_counter()
        runner = runner_class("triton")(served_name(model), url)
        rep["model_load_s"] = time.perf_counter() - t0
        rep["precision"] = runner.spec.source.get("precision", "fp32")
        return runner
    if url:
        raise DarkconvError(f"--url is for --backend triton, not {backend}")
    kind = model_kind(model)
    if kind != "cfg":
        return _open_artifact(model, kind, backend, threads, width, height, rep)
    precision = precision or "fp32"
    rep["precision"] = precision
    if backend == "opencv":
        if weights is None:
            raise DarkconvError("the opencv backend reads the .weights file itself: give one (or use torch / "
                                "onnxruntime for a random-weights speed run)")
        if width or height:
            raise DarkconvError("the opencv backend runs the cfg's own input size; drop --size")
        if precision != "fp32":
            rep["notes"].append(f"OpenCV DNN runs FP32: --precision {precision} ignored")
            rep["precision"] = "fp32"
        t0 = time.perf_counter()
        runner = runner_class("opencv")(model, weights, threads=threads)
        rep["model_load_s"] = time.perf_counter() - t0
        return runner
    if backend == "torch" and precision == "int8":
        raise DarkconvError("the torch backend has no INT8: run the Q/DQ ONNX with --backend onnxruntime "
                            "(or a TensorRT engine)")
    if backend == "tensorrt" and not engine_batch:
        raise DarkconvError("the tensorrt backend runs engines: build one with "
                            "`darkconv convert MODEL.cfg MODEL.weights --engine MODEL.plan`")
    if backend == "tensorrt":
        from .export.tensorrt import require_tensorrt
        require_tensorrt()  # the same error as `convert --engine`, before any work
    if precision == "int8" and not calib:
        raise DarkconvError("INT8 needs calibration images: run `darkconv convert CFG WEIGHTS --precision "
                            "int8 --calib DIR` and pass the resulting .onnx")
    import darkconv
    from .graph import model as _graph  # noqa: F401  (import torch before the clock starts)

    t0 = time.perf_counter()
    m = darkconv.load(model, weights, width=width, height=height)
    rep["model_load_s"] = time.perf_counter() - t0
    if weights is None and random_weights:
        m.randomize(0)
        rep["notes"].append(RANDOM_WEIGHTS)
        if log:
            log(f"{model}: no weights given: {RANDOM_WEIGHTS}")
    if backend == "torch":
        import torch

        if precision == "fp16" and not torch.cuda.is_available():
            rep["precision"] = "fp32"
            rep["notes"].append("torch on CPU runs FP32 (no fast FP16 kernels on CPU): --precision fp16 ignored")
        return runner_class("torch")(model, weights, threads=threads, precision=precision, model=m)
    return _open_exported(m, model, weights, backend, precision, threads, calib, workdir, log, engine_batch, rep)


def _open_exported(m, cfg, weights, backend, precision, threads, calib, workdir, log, engine_batch, rep):
    """The ONNX export of the loaded cfg ``m`` on onnxruntime, or its engine on tensorrt (temporary files)."""
    from .export.onnx import export_onnx

    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="darkconv-")
    target = "onnxruntime" if backend == "onnxruntime" else "tensorrt"
    out = Path(workdir) / f"{Path(cfg).stem}-{precision}.onnx"
    try:
        if log:
            log(f"exporting {cfg} to {out} ({precision}"
                + (f", calibrating on {len(calib)} image(s)" if precision == "int8" and hasattr(calib, "__len__")
                   else "") + f") for {backend}")
        t0 = time.perf_counter()
        export_onnx(m, out, precision=precision, calib_images=calib, int8_target=target)
        rep["export_s"] = time.perf_counter() - t0
        if precision == "int8":
            import inspect

            from .export.quantize import choose_recipe

            method = inspect.signature(export_onnx).parameters["calib_method"].default
            scheme = (f"Q/DQ recipe {choose_recipe(target)[0].name} (int8_target={target}, chosen for this CPU)"
                      if target == "onnxruntime" else "symmetric S8S8 Q/DQ (int8_target=tensorrt)")
            rep["int8"] = {"scheme": scheme, "method": method,
                           "images": len(calib) if hasattr(calib, "__len__") else None}
        if backend == "onnxruntime":
            if precision == "fp16":
                rep["notes"].append("FP16 on ONNX Runtime's CPU provider: few FP16 kernels, usually slower than FP32")
            runner = runner_class("onnxruntime")(out, threads=threads)
        else:
            from .export.tensorrt import build_engine
            from .io import sha256_file

            engine = Path(workdir) / f"{Path(cfg).stem}-{precision}.plan"
            t0 = time.perf_counter()
            build_engine(out, engine, m.spec, precision, batch=(1, engine_batch, engine_batch),
                         source={"cfg_sha256": sha256_file(cfg), "weights_sha256": sha256_file(weights)}, log=log)
            rep["engine_build_s"] = time.perf_counter() - t0
            runner = runner_class("tensorrt")(engine)
    except BaseException:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    if own_dir:  # the temporary files live as long as their runner (or until exit)
        weakref.finalize(runner, shutil.rmtree, workdir, True)
    return runner


def _open_artifact(model, kind, backend, threads, width, height, rep):
    """An .onnx on onnxruntime or an engine on tensorrt, as it is."""
    if kind == "onnx" and backend != "onnxruntime":
        raise DarkconvError(f"an .onnx runs on onnxruntime, not {backend} (for TensorRT, build an engine "
                            "with darkconv convert --engine)")
    if kind == "engine" and backend != "tensorrt":
        raise DarkconvError(f"a TensorRT engine runs on the tensorrt backend, not {backend}")
    t0 = time.perf_counter()
    runner = runner_class(backend)(model, threads=threads) if kind == "onnx" else runner_class("tensorrt")(model)
    rep["model_load_s"] = time.perf_counter() - t0
    rep["precision"] = artifact_precision(model)
    spec = getattr(runner, "spec", None)  # an engine's spec may come only with activate()
    if spec is not None and ((width and width != spec.width) or (height and height != spec.height)):
        raise DarkconvError(f"this {kind} takes {spec.width}x{spec.height} input: --size only applies to a cfg "
                            "(convert again with --size)", file=str(model))
    return runner


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
