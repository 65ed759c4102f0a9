"""Open any model artifact on a backend, and run images through pre → runner → post.

MODEL may be a Darknet cfg (+ weights), a darkconv ``.onnx``, or a TensorRT engine
(``.plan``/``.engine`` with its sidecar). Every path ends in the one shared
postprocessor, whatever the backend.
"""
from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .darknet.spec import ModelSpec
from .errors import DarkconvError
from .postprocess import Detections, postprocess, postprocess_settings
from .preprocess import preprocess_batch, preprocess_into
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


def resolve_backend(model, backend: str | None = None, url=None) -> str:
    """The canonical backend a job runs ``model`` on: ``backend`` if given, else triton when a server ``url`` is
    given, else the model's own (:func:`default_backend`)."""
    return canonical(backend or ("triton" if url else default_backend(model)))


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
    from .tensorrt_support import read_sidecar
    return str(read_sidecar(model).get("precision", "fp32"))


def open_runner(model, weights=None, backend: str | None = None, *, threads: int | None = None,
                width: int | None = None, height: int | None = None, precision: str = "fp32",
                calib=None, workdir: str | None = None, log=None, url=None,
                random_weights: bool = False, engine_batch: int | None = None, report: dict | None = None,
                device: str | None = None, cuda_graphs: bool = False, lanes: int = 1):
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
    * ``device`` (torch backend only): cpu, cuda or cuda:N [default: cuda when PyTorch sees a GPU];
      ``cuda_graphs``: torch on CUDA replays one recorded CUDA graph per input shape.
    * ``lanes`` (onnxruntime only): inference calls that may run at once, on one session of ``threads // lanes``
      intra-op threads (:func:`default_lanes` for a stream of files; 1 = lowest latency).
    * ``report``: a dict that gets what opening took and means: ``model_load_s``, ``export_s``,
      ``engine_build_s`` (seconds, for the steps that ran), ``precision`` (what runs), ``int8``
      (recipe, calibration method and image count) and ``notes`` (lines worth telling the user).
    """
    rep = report if report is not None else {}
    rep.setdefault("notes", [])
    backend = resolve_backend(model, backend, url)
    if (device is not None or cuda_graphs) and backend != "torch":
        raise DarkconvError(f"--device and CUDA graphs apply to the torch backend, not {backend}")
    lanes = 1 if lanes is None else int(lanes)
    if lanes < 1:
        raise DarkconvError(f"--lanes must be >= 1, not {lanes}")
    if lanes > 1 and backend != "onnxruntime":
        raise DarkconvError(f"--lanes applies to the onnxruntime backend, not {backend} (drop --lanes)")
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
        return _open_artifact(model, kind, backend, threads, width, height, rep, lanes)
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
    if backend == "torch":
        from .runners.torch import resolve_device
        device = resolve_device(device)  # before loading: a missing GPU fails fast, in one line
        if cuda_graphs and device == "cpu":
            raise DarkconvError("CUDA graphs need --device cuda")
    if backend == "tensorrt" and not engine_batch:
        raise DarkconvError("the tensorrt backend runs engines: build one with "
                            "`darkconv convert MODEL.cfg MODEL.weights --engine MODEL.plan`")
    if backend == "tensorrt":
        from .tensorrt_support import require_tensorrt
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
        if precision == "fp16" and device == "cpu":
            rep["precision"] = "fp32"
            rep["notes"].append("torch on CPU runs FP32 (no fast FP16 kernels on CPU): --precision fp16 ignored")
        return runner_class("torch")(model, weights, threads=threads, precision=precision, model=m, device=device,
                                     cuda_graphs=cuda_graphs)
    return _open_exported(m, model, weights, backend, precision, threads, calib, workdir, log, engine_batch, rep, lanes)


def default_lanes(backend: str, *, live: bool = False, threads: int | None = None, batches: int | None = None) -> int:
    """Inference lanes for a job: on onnxruntime, with at most 4 CPU threads for inference, one single-threaded
    lane per thread for a stream of files or video frames (throughput: two single-threaded calls lose less to
    decoding on the same cores than one call on two threads, see benchmarks/bench_e2e.py); 1 for live sources
    (latency), for more threads (the calls would share one session's thread pool, and the spare cores decode
    anyway), for every other backend, and never more than the job's ``batches``."""
    import os

    n = int(threads or os.cpu_count() or 1)
    if live or canonical(backend) != "onnxruntime" or n > 4:
        return 1
    return max(1, min(n, batches if batches is not None else n))


def _open_exported(m, cfg, weights, backend, precision, threads, calib, workdir, log, engine_batch, rep, lanes=1):
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
            runner = runner_class("onnxruntime")(out, threads=threads, lanes=lanes)
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


def _open_artifact(model, kind, backend, threads, width, height, rep, lanes=1):
    """An .onnx on onnxruntime or an engine on tensorrt, as it is."""
    if kind == "onnx" and backend != "onnxruntime":
        raise DarkconvError(f"an .onnx runs on onnxruntime, not {backend} (for TensorRT, build an engine "
                            "with darkconv convert --engine)")
    if kind == "engine" and backend != "tensorrt":
        raise DarkconvError(f"a TensorRT engine runs on the tensorrt backend, not {backend}")
    t0 = time.perf_counter()
    runner = (runner_class(backend)(model, threads=threads, lanes=lanes) if kind == "onnx"
              else runner_class("tensorrt")(model))
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
    inference: float = 0.0          # summed over calls (with lanes, calls overlap: per-call latency)
    postprocess: float = 0.0
    images: int = 0
    inference_busy: float = 0.0     # wall time during which at least one inference call ran


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


# --------------------------------------------------------------------------- streaming
def batch_limits(runner) -> tuple[int, int | None]:
    """``(smallest, largest)`` batch an activated ``runner`` accepts (largest None = any).

    A fixed-batch ONNX (``convert --batch 4``) accepts exactly its batch (``runner.fixed_batch``, read
    from the session's input shape); an engine its profile's range (``runner.batch_range()``); a served
    model at most its ``max_batch_size`` (``runner.max_batch``, 0 = no limit).
    """
    fixed = getattr(runner, "fixed_batch", None)
    if isinstance(fixed, int) and fixed > 0:
        return fixed, fixed
    rng = getattr(runner, "batch_range", None)
    if callable(rng):
        lo, hi = rng()
        return max(1, int(lo)), int(hi)
    top = getattr(runner, "max_batch", None)
    if isinstance(top, int) and top > 0:
        return 1, top
    return 1, None


class _Done:
    """An already finished inference job (one lane: inference runs in the inference thread itself)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Failure:
    """A stage's exception travelling down the queues in order (re-raised to the consumer)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def _put(q, item, stop) -> bool:
    """Block until ``item`` is queued or ``stop`` is set (False then): no thread waits forever on a full queue."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _wait_until_at_most(q, n: int, stop) -> None:
    """Block until ``q`` (a :class:`queue.Queue`) holds at most ``n`` items, or ``stop`` is set."""
    with q.not_full:  # the Queue's condition on its own mutex, notified at every get; q.queue is its deque
        while len(q.queue) > n and not stop.is_set():
            q.not_full.wait(0.05)


def _get(q, stop):
    while not stop.is_set():
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            continue
    return _DONE


def stream_runs(runners, frames, posts, *, batch: int = 1, letterbox=None, agnostic=False, max_det=None,
                queue_size: int = 8, workers: int | None = None, timings: Timings | None = None,
                pad_batch=None, on_batch=None):
    """The engine behind :func:`stream_detect`, for several runners and postprocessing settings at once.

    Every runner sees the same preprocessed batch; ``posts[r]`` lists the ``(thresh, nms)`` settings applied
    to runner ``r``'s heads. Yields ``(frame, result)`` in input order, ``result`` being
    ``out[r][s]`` = the :class:`Detections` of runner ``r`` under setting ``s``, or the exception that
    stopped this frame (its preprocessing failed, or an :class:`InferenceError` in its batch).

    Threads: a feeder pulls frames (so a decoding iterator runs ahead) and hands them to ``workers``
    preprocessing threads, writing straight into the batch array (once the queue is full it is refilled in
    bursts from half full, except for a live source); inference runs up to ``lanes`` batches at
    once, ``lanes`` being the smallest ``runner.concurrency`` (1: one batch at a time, in one thread); one
    thread postprocesses, in input order. Queues hold at most ``queue_size`` frames per stage, so an endless source and a slow
    consumer cost bounded memory. Closing the generator (or an exception, or Ctrl-C) stops and joins every
    thread before it returns.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .errors import InferenceError

    runners = list(runners)
    spec = runners[0].spec
    size = (spec.width, spec.height)
    for r in runners[1:]:
        if (r.spec.width, r.spec.height) != size:
            raise DarkconvError(f"{r.describe()} takes {r.spec.width}x{r.spec.height} input, "
                                f"{runners[0].describe()} {size[0]}x{size[1]}: they cannot share images")
    lb = spec.letter_box if letterbox is None else bool(letterbox)
    batch = int(batch)
    if batch < 1:
        raise DarkconvError(f"batch must be >= 1, not {batch}")
    pads = []
    for r in runners:
        lo, hi = batch_limits(r)
        if pad_batch is False or pad_batch == 0:
            lo = 1
        elif pad_batch not in (None, True):
            lo = int(pad_batch)
        if hi is not None and batch > hi:
            raise DarkconvError(f"{r.describe()} takes at most {hi} image(s) per batch, got --batch {batch}: "
                                f"use --batch {hi}" + (" (the last batch is padded)" if lo == hi else ""))
        pads.append(max(lo, 1))
    n_workers = max(1, int(workers if workers is not None else default_workers()))
    per_stage = max(1, int(queue_size) // batch)
    q_pre: queue.Queue = queue.Queue(per_stage)    # batches being preprocessed / ready, in order
    lanes = min(max(1, int(getattr(r, "concurrency", 1) or 1)) for r in runners)  # batches in inference at once
    q_post: queue.Queue = queue.Queue(max(per_stage, lanes + 1))  # batches in inference / waiting for postprocessing
    q_out: queue.Queue = queue.Queue(per_stage)    # finished batches waiting for the consumer
    spare: queue.SimpleQueue = queue.SimpleQueue()  # batch arrays back from inference, reused (no fresh pages)
    stop = threading.Event()
    lock = threading.Lock()
    t = timings

    def add(field_name, dt, images=0):
        if t is not None:
            with lock:
                setattr(t, field_name, getattr(t, field_name) + dt)
                t.images += images

    in_flight = [0, 0.0]  # inference calls running, and since when at least one has

    def busy(step):
        with lock:
            now = time.perf_counter()
            if step > 0 and in_flight[0] == 0:
                in_flight[1] = now
            in_flight[0] += step
            if in_flight[0] == 0 and t is not None:
                t.inference_busy += now - in_flight[1]

    def prep(x, i, frame):
        t0 = time.perf_counter()
        try:
            im = frame.image                     # a lazy frame decodes its file here, in parallel with inference
            t1 = time.perf_counter()
            add("decode", t1 - t0)
            preprocess_into(im, size, lb, x[i])
            add("preprocess", time.perf_counter() - t1)
        except (DarkconvError, ValueError) as e:  # this frame's image is not an image: its result is the error
            return e
        return (int(im.shape[1]), int(im.shape[0]))

    # files and videos: once the queue is full, refill it when half of it is left, so the preprocessing worker
    # decodes a few frames per wake-up instead of preempting inference once per frame (its caches with it: 3-4 %
    # more images/s on 2 cores). A live source refills as soon as there is room: its newest frame is wanted.
    burst = not getattr(frames, "live", False)
    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="darkconv-stream-pre")
    lane_pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="darkconv-stream-infer") if lanes > 1 else None

    def feeder():
        it = iter(frames)
        chunk = []
        x = None
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(it)
                except StopIteration:
                    break
                add("decode", time.perf_counter() - t0)
                if x is None:
                    try:
                        x = spare.get_nowait()
                    except queue.Empty:
                        x = np.empty((batch, 3, size[1], size[0]), np.float32)
                chunk.append((frame, pool.submit(prep, x, len(chunk), frame)))
                if len(chunk) == batch:
                    if not _put(q_pre, (x, chunk), stop):
                        return
                    chunk, x = [], None
                    if burst and q_pre.full():
                        _wait_until_at_most(q_pre, per_stage // 2, stop)
            if chunk:
                _put(q_pre, (x, chunk), stop)
            _put(q_pre, _DONE, stop)
        except BaseException as e:  # noqa: BLE001 - the source's own error reaches the consumer, in order
            if chunk:
                _put(q_pre, (x, chunk), stop)
            _put(q_pre, _Failure(e), stop)

    def infer_batch(item):
        x, chunk = item
        prepped = [f.result() for _, f in chunk]
        good = [k for k, p in enumerate(prepped) if not isinstance(p, BaseException)]
        heads_all, failed = [], None
        if good:
            xb = x[:len(chunk)] if len(good) == len(chunk) else x[good]
            n = len(good)
            busy(+1)
            t0 = time.perf_counter()
            try:
                for r, pad in zip(runners, pads):
                    xr = xb
                    if n < pad:  # a fixed-batch model: pad with copies of the last image, drop later
                        xr = np.concatenate([xb, np.repeat(xb[-1:], pad - n, axis=0)])
                    heads_all.append([h[:n] for h in r.infer(xr)])
            except InferenceError as e:
                failed = e
            finally:
                busy(-1)
            add("inference", time.perf_counter() - t0, n)
        spare.put(x)
        return chunk, prepped, good, heads_all, failed

    def inferer():
        while True:
            item = _get(q_pre, stop)
            if item is _DONE or isinstance(item, _Failure):
                _put(q_post, item, stop)
                return
            try:  # up to `lanes` batches in inference at once; q_post keeps them in input order
                job = lane_pool.submit(infer_batch, item) if lane_pool is not None else _Done(infer_batch(item))
            except BaseException as e:  # noqa: BLE001
                _put(q_post, _Failure(e), stop)
                return
            if not _put(q_post, job, stop):
                return

    def poster():
        while True:
            item = _get(q_post, stop)
            if item is _DONE or isinstance(item, _Failure):
                _put(q_out, item, stop)
                return
            try:
                chunk, prepped, good, heads_all, failed = item.result()
                t0 = time.perf_counter()
                results = list(prepped)
                if good and failed is None:
                    sizes = [prepped[k] for k in good]
                    # per runner, per image: one Detections per setting (the heads decoded once)
                    per_run = [postprocess_settings(heads, r.spec, sizes, p, letterbox=lb, agnostic=agnostic,
                                                    max_det=max_det) for r, heads, p in zip(runners, heads_all, posts)]
                    for j, k in enumerate(good):
                        results[k] = [run[j] for run in per_run]
                elif failed is not None:
                    for k in good:
                        results[k] = failed
                add("postprocess", time.perf_counter() - t0)
                out = [(frame, res) for (frame, _), res in zip(chunk, results)]
            except BaseException as e:  # noqa: BLE001
                _put(q_out, _Failure(e), stop)
                return
            if not _put(q_out, out, stop):
                return

    threads = [threading.Thread(target=fn, name=f"darkconv-stream-{fn.__name__}", daemon=True)
               for fn in (feeder, inferer, poster)]
    return _consume(threads, q_out, stop, [pool, lane_pool], on_batch, frames)


def _consume(threads, q_out, stop, pools, on_batch, frames=None):
    for th in threads:
        th.start()
    try:
        while True:
            item = q_out.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            if on_batch:
                on_batch(len(item))
            yield from item
    finally:
        stop.set()
        source_stop = getattr(frames, "stop", None)  # a live source blocked in its read wakes up too (sources.Source)
        if callable(source_stop):
            source_stop()
        for th in threads:
            th.join()
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Preprocessing threads: one per core beyond the first, at least one."""
    import os

    return max(1, min(4, (os.cpu_count() or 1) - 1))


def stream_detect(runner, frames, *, batch: int = 1, thresh: float = 0.25, nms: float = 0.45, letterbox=None,
                  agnostic: bool = False, max_det=None, queue_size: int = 8, workers: int | None = None,
                  timings: Timings | None = None, pad_batch=None):
    """Detections for a stream of frames (anything with ``.image``, HxWx3 uint8 RGB, e.g.
    :class:`darkconv.sources.Frame`), as ``(frame, Detections | Exception)`` in input order.

    Decoding (the iterator), preprocessing (``workers`` threads), inference and postprocessing overlap,
    with at most ``queue_size`` frames waiting per stage. A model with a fixed batch (an ONNX from
    ``convert --batch 4``, an engine's smallest profile batch) gets its last partial batch padded with copies
    of the last image; the padded results are dropped (``pad_batch``: None = as the model needs, an int =
    pad every batch to that size, False = never). A frame whose image cannot be preprocessed, or whose batch
    raised :class:`~darkconv.errors.InferenceError`, gets the exception instead of detections; the stream goes
    on. Any other error stops the stream and is raised. Closing the generator stops and joins its threads.
    """
    runs = stream_runs([runner], frames, [[(thresh, nms)]], batch=batch, letterbox=letterbox, agnostic=agnostic,
                       max_det=max_det, queue_size=queue_size, workers=workers, timings=timings, pad_batch=pad_batch)
    return _first_run(runs)


def _first_run(runs):
    try:
        for frame, res in runs:
            yield frame, (res if isinstance(res, BaseException) else res[0][0])
    finally:
        runs.close()
