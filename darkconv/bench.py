"""``darkconv bench``: latency and throughput of one model on one backend.

What is timed, and how:

* **Load** once, apart from inference: reading the cfg + .weights (or the ``.onnx`` /
  engine), the ONNX export (and INT8 calibration, or engine build) a cfg needs for
  onnxruntime / TensorRT, and the runner's ``activate()`` (session creation).
* **Inference** per batch size: ``warmup`` untimed calls, then ``iters`` timed calls
  (or as many as fit in ``seconds``, at least 3) of ``runner.infer`` on one fixed input:
  darkconv's bundled sample images (or the ``e2e`` images) preprocessed once and repeated
  to the batch size. Each call is timed with ``time.perf_counter``; the statistics
  (mean, p50, p90, p99, min, max, std, images/s) come from the per-call list.
* **End to end** (``e2e`` images): each timed iteration runs the ``darkconv detect`` path
  on ``batch`` images: read + decode the file (``load_image``), Darknet preprocessing,
  inference, postprocessing (decode + NMS), split per stage and reported per image, with
  the ratio of the end-to-end time to a raw inference call on the fixed input made in the
  same iteration (so both sides see the same machine load).

A KeyboardInterrupt while measuring stops the run and keeps every figure measured so far
(``result["interrupted"]`` is then true). Results are plain JSON-ready dicts
(:data:`SCHEMA`), with the environment needed to compare them later.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .darknet.weights import atomic_write
from .errors import DarkconvError, ExportError
from .pipeline import DATA

SCHEMA = "darkconv.bench/1"
STAGES = ("decode", "preprocess", "inference", "postprocess")
STAT_KEYS = ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "std_ms", "per_image_ms",
             "throughput_ips")
MIN_ITERS = 3
RANDOM_WEIGHTS = "random weights (speed only)"


# -- statistics ----------------------------------------------------------------------------
def latency_stats(samples, batch: int = 1) -> dict:
    """Per-call latencies (seconds) -> ms statistics, per-image latency and images/s.

    Percentiles are numpy's (linear interpolation). An empty list gives ``iters`` 0 and
    None for every figure.
    """
    a = np.asarray(list(samples), np.float64) * 1e3
    out: dict = {"iters": int(a.size), "batch": int(batch)}
    if a.size == 0:
        return {**out, **{k: None for k in STAT_KEYS}}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    mean = float(a.mean())
    out.update(mean_ms=mean, p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), min_ms=float(a.min()),
               max_ms=float(a.max()), std_ms=float(a.std()), per_image_ms=mean / batch,
               throughput_ips=batch * 1e3 / mean if mean > 0 else None)
    return out


def parse_batches(text) -> list[int]:
    """'1,4,8' -> [1, 4, 8] (positive, duplicates dropped, order kept)."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    out: list[int] = []
    for it in items:
        if it in ("", None):
            continue
        try:
            n = int(it)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r}: expected batch sizes like 1,4,8") from None
        if n <= 0:
            raise ValueError(f"{text!r}: batch sizes must be positive")
        if n not in out:
            out.append(n)
    if not out:
        raise ValueError(f"{text!r}: no batch size given")
    return out


def time_loop(step, *, warmup: int = 1, iters: int | None = None, seconds: float | None = None,
              min_iters: int = MIN_ITERS, progress=None, desc: str = ""):
    """Call ``step()`` ``warmup`` times untimed, then time it ``iters`` times, or until
    ``seconds`` have been spent (at least ``min_iters`` calls).

    Returns ``(samples, splits, interrupted)``: per-call seconds, the dicts ``step``
    returned (stage splits, when it returns any) and whether a KeyboardInterrupt cut
    the loop short (what was measured until then is kept).
    """
    if iters is None and seconds is None:
        iters = 10
    samples: list[float] = []
    splits: list[dict] = []
    interrupted = False
    bar = progress(total=(warmup + iters) if iters is not None else None, desc=f"{desc} warmup") \
        if progress else None
    try:
        for _ in range(warmup):
            step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_description(desc)
        start = time.perf_counter()
        while True:
            n = len(samples)
            if iters is not None and n >= iters:
                break
            if iters is None and n >= min_iters and time.perf_counter() - start >= seconds:
                break
            t0 = time.perf_counter()
            split = step()
            samples.append(time.perf_counter() - t0)
            if isinstance(split, dict):
                splits.append(split)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
    return samples, splits, interrupted


def concurrent_loop(step, concurrency: int, *, iters: int | None = None, seconds: float | None = None,
                    min_iters: int = MIN_ITERS) -> tuple[list[float], float]:
    """``concurrency`` threads calling ``step()`` in closed loops (a request in flight per thread), ``iters``
    calls in all, or until ``seconds`` have passed (at least ``min_iters`` per thread). Returns the per-call
    seconds and the wall time, for throughput = calls / wall."""
    import threading

    samples: list[float] = []
    lock = threading.Lock()
    state = {"left": iters if iters is not None else None, "error": None}
    start = time.perf_counter()

    def worker():
        n = 0
        while state["error"] is None:
            with lock:
                if state["left"] is not None:
                    if state["left"] <= 0:
                        return
                    state["left"] -= 1
            if state["left"] is None and n >= min_iters and time.perf_counter() - start >= seconds:
                return
            t0 = time.perf_counter()
            try:
                step()
            except Exception as e:  # noqa: BLE001 - stop every thread, report in the row
                state["error"] = e
                return
            with lock:
                samples.append(time.perf_counter() - t0)
            n += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["error"] is not None:
        raise state["error"]
    return samples, time.perf_counter() - start


def split_stats(splits: list[dict], batch: int, raw_per_image_ms: float | None = None) -> dict:
    """Stage splits of the end-to-end loop -> mean ms per image per stage, total, ratio to raw inference.

    When the splits carry ``raw`` (seconds of a bare ``infer`` call made in the same iteration),
    the ratio uses those, so that a change in the machine's load between two loops cannot skew
    it; otherwise ``raw_per_image_ms``.
    """
    n = len(splits)
    out: dict = {"iters": n, "batch": int(batch), "images": n * int(batch)}
    if n == 0:
        return {**out, **{f"{s}_ms": None for s in STAGES}, "total_ms": None, "throughput_ips": None,
                "raw_inference_ms": raw_per_image_ms, "e2e_over_inference": None}
    if all("raw" in d for d in splits):
        raw_per_image_ms = float(np.mean([d["raw"] for d in splits])) * 1e3 / batch
    out["raw_inference_ms"] = raw_per_image_ms
    for s in STAGES:
        out[f"{s}_ms"] = float(np.mean([d.get(s, 0.0) for d in splits])) * 1e3 / batch
    total = sum(out[f"{s}_ms"] for s in STAGES)
    out["total_ms"] = total
    out["throughput_ips"] = 1e3 / total if total > 0 else None
    out["e2e_over_inference"] = total / raw_per_image_ms if raw_per_image_ms else None
    return out


# -- environment ---------------------------------------------------------------------------
def _dist_version(*names) -> str | None:
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8", "amx_bf16", "neon", "asimd")


def cpu_features() -> list[str]:
    """The SIMD features that decide FP32 / FP16 / INT8 speed (x86: /proc/cpuinfo flags)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in CPU_FEATURES if f in have]
    except OSError:
        pass
    return []


def gpu_name() -> str | None:
    """The first NVIDIA GPU (nvidia-smi, else torch.cuda when torch is loaded), or None."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
            if out.returncode == 0 and names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001 - best effort
            pass
    return None


def tensorrt_version() -> str | None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    from .export.tensorrt import trt_available
    return trt_available()


def environment(threads: int | None = None) -> dict:
    """Machine and software: what a result needs to be compared with another one."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "cpu_features": cpu_features(),
        "threads": threads,
        "load_avg_1_5_15": load,
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "darkconv": __version__,
            "numpy": np.__version__,
            "torch": _dist_version("torch"),
            "onnx": _dist_version("onnx"),
            "onnxruntime": _dist_version("onnxruntime", "onnxruntime-gpu"),
            "opencv": _dist_version("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
            "tensorrt": tensorrt_version(),
        },
    }


def sha256_file(path) -> str | None:
    if path is None:
        return None
    from .zoo import sha256
    return sha256(Path(path))


# -- preparing a model on a backend --------------------------------------------------------
@dataclass
class Prepared:
    """A runner ready to activate, with what it took to get there."""

    runner: object
    backend: str
    precision: str                # what runs
    requested_precision: str | None
    model: dict                   # path, kind, sha256, weights, weights_sha256, random_weights, input, ...
    load: dict                    # seconds: model_load_s, export_s, engine_build_s (session_create_s later)
    notes: list[str] = field(default_factory=list)
    workdir: object = None        # TemporaryDirectory holding exported files

    def cleanup(self) -> None:
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None


def _onnx_precision(path) -> str:
    import onnx

    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:
        raise ExportError("not a valid ONNX file (corrupt, truncated, or another format)", file=str(path)) from None
    p = meta.get("darkconv.precision", "fp32")
    return "int8" if p.startswith("int8") else p


def sample_images(paths=None) -> list[Path]:
    """Image files of ``paths`` (files, directories, .txt lists), or darkconv's bundled samples."""
    from .preprocess import list_images

    files = [p for p in list_images(list(paths) if paths else [DATA]) if Path(p).is_file()]
    if not files:
        raise DarkconvError(f"no images found in {', '.join(map(str, paths or [DATA]))}")
    return files


def prepare(model, weights=None, backend: str | None = None, *, precision: str | None = None,
            width: int | None = None, height: int | None = None, threads: int | None = None,
            calib=None, max_batch: int = 1, log=None, url=None, device: str | None = None,
            cuda_graphs: bool = False) -> Prepared:
    """Load ``model`` (cfg [+ weights], .onnx or engine) for ``backend``, timing each step.

    A cfg without weights gets deterministic random weights (speed only). A cfg on
    onnxruntime is exported at ``precision`` to a temporary directory; INT8 is calibrated
    on ``calib`` (default: the bundled images) as U8S8 Q/DQ (``int8_target="onnxruntime"``).
    A cfg on TensorRT is exported and built into a temporary engine for batches 1..max_batch.
    """
    from .pipeline import default_backend, model_kind
    from .runners import canonical

    log = log or (lambda *_a, **_k: None)
    backend = canonical(backend or ("triton" if url else default_backend(model)))
    if backend == "triton":
        return _prepare_served(model, url, precision, width, height)
    if backend == "tensorrt":
        from .export.tensorrt import require_tensorrt
        require_tensorrt()  # the same error as `convert --engine`, before any work
    kind = model_kind(model)
    if not Path(model).is_file():
        raise DarkconvError("no such file", file=str(model))
    if weights is not None and kind != "cfg":
        raise DarkconvError(f"a weights file goes with a .cfg, not with an {kind}", file=str(weights))
    if weights is not None and not Path(weights).is_file():
        raise DarkconvError("no such file", file=str(weights))
    info = {"path": str(model), "kind": kind, "sha256": sha256_file(model),
            "weights": str(weights) if weights else None, "weights_sha256": sha256_file(weights),
            "random_weights": kind == "cfg" and weights is None}
    load: dict = {}
    notes: list[str] = []
    prep = Prepared(None, backend, "fp32", precision, info, load, notes)
    try:
        if kind == "cfg":
            _prepare_cfg(prep, model, weights, width, height, threads, calib, max_batch, log, device, cuda_graphs)
        else:
            _prepare_artifact(prep, model, kind, width, height, threads)
    except BaseException:
        prep.cleanup()
        raise
    _describe_spec(info, getattr(prep.runner, "spec", None))  # an engine's spec comes with activate()
    return prep


def _prepare_served(model, url, precision, width, height) -> Prepared:
    """A model on Triton server(s): nothing is loaded here; the figures include the network round trip."""
    from .pipeline import open_runner

    t0 = time.perf_counter()
    runner = open_runner(model, None, "triton", url=url, width=width, height=height)
    load = {"model_load_s": time.perf_counter() - t0}
    served = runner.spec.source.get("precision", "fp32")
    info = {"path": str(model), "kind": "served", "served_name": runner.model, "url": url, "sha256": None,
            "weights": None, "weights_sha256": None, "random_weights": False}
    notes = [f"served by Triton at {url}: latency includes the request round trip"]
    if precision and precision != served:
        notes.append(f"the served model is {served}: --precision {precision} ignored")
    prep = Prepared(runner, "triton", served, precision, info, load, notes)
    _describe_spec(info, runner.spec)
    return prep


def _describe_spec(info: dict, spec) -> None:
    if spec is not None:
        info.update(input=[spec.width, spec.height], classes=spec.classes, heads=len(spec.heads),
                    letter_box=bool(spec.letter_box))


def _prepare_cfg(prep: Prepared, cfg, weights, width, height, threads, calib, max_batch, log,
                 device=None, cuda_graphs=False) -> None:
    import darkconv
    from .runners import runner_class

    backend, precision, notes = prep.backend, prep.requested_precision or "fp32", prep.notes
    if backend == "opencv":
        if weights is None:
            raise DarkconvError("the opencv backend reads the .weights file itself: give one (or use torch / "
                                "onnxruntime for a random-weights speed run)")
        if width or height:
            raise DarkconvError("the opencv backend runs the cfg's own input size; drop --size")
        if precision != "fp32":
            notes.append(f"OpenCV DNN runs FP32: --precision {precision} ignored")
        t0 = time.perf_counter()
        prep.runner = runner_class("opencv")(cfg, weights, threads=threads)
        prep.load["model_load_s"] = time.perf_counter() - t0
        return
    from .graph import model as _graph  # noqa: F401  (import torch before the clock starts)

    t0 = time.perf_counter()
    model = darkconv.load(cfg, weights, width=width, height=height)
    prep.load["model_load_s"] = time.perf_counter() - t0
    if weights is None:
        model.randomize(0)
        notes.append(RANDOM_WEIGHTS)
        log(f"{cfg}: no weights given: {RANDOM_WEIGHTS}")
    if backend == "torch":
        import torch

        run = precision
        if precision == "int8":
            raise DarkconvError("the torch backend has no INT8: bench the Q/DQ ONNX with --backend onnxruntime "
                                "(or a TensorRT engine)")
        from .runners.torch import resolve_device
        on = resolve_device(device, torch)
        if precision == "fp16" and on == "cpu":
            run = "fp32"
            notes.append("torch on CPU runs FP32 (no fast FP16 kernels on CPU): --precision fp16 ignored")
        prep.precision = run
        prep.runner = runner_class("torch")(None, model=model, threads=threads, precision=run, device=on,
                                            cuda_graphs=cuda_graphs)
        return
    workdir = prep.workdir = tempfile.TemporaryDirectory(prefix="darkconv-bench-")
    from .export.onnx import export_onnx

    onnx_path = Path(workdir.name) / f"{Path(cfg).stem}-{precision}.onnx"
    calib_files = None
    if precision == "int8":
        calib_files = [str(p) for p in sample_images(calib)]
    target = "onnxruntime" if backend == "onnxruntime" else "tensorrt"
    log(f"exporting {cfg} to ONNX ({precision}{', calibrating on %d image(s)' % len(calib_files) if calib_files else ''})")
    t0 = time.perf_counter()
    export_onnx(model, onnx_path, precision=precision, calib_images=calib_files, int8_target=target)
    prep.load["export_s"] = time.perf_counter() - t0
    prep.precision = precision
    if precision == "int8":
        import inspect

        method = inspect.signature(export_onnx).parameters["calib_method"].default
        src = "the --e2e images" if calib else "darkconv's bundled sample images"
        from .export.quantize import choose_recipe
        scheme = (f"Q/DQ recipe {choose_recipe(target)[0].name} (int8_target={target}, chosen for this CPU)"
                  if target == "onnxruntime" else "symmetric S8S8 Q/DQ (int8_target=tensorrt)")
        notes.append(f"INT8: {scheme}, calibrated ({method}) on {len(calib_files)} image(s) from {src}")
    if backend == "onnxruntime":
        if precision == "fp16":
            notes.append("FP16 on ONNX Runtime's CPU provider: few FP16 kernels, usually slower than FP32")
        prep.runner = runner_class("onnxruntime")(onnx_path, threads=threads)
        return
    # tensorrt: a temporary engine for this machine, batches 1..max_batch
    from .export.tensorrt import build_engine

    engine = Path(workdir.name) / f"{Path(cfg).stem}-{precision}.plan"
    t0 = time.perf_counter()
    build_engine(onnx_path, engine, model.spec, precision, batch=(1, max_batch, max_batch),
                 source={"cfg_sha256": prep.model["sha256"], "weights_sha256": prep.model["weights_sha256"]},
                 log=log)
    prep.load["engine_build_s"] = time.perf_counter() - t0
    prep.runner = runner_class("tensorrt")(engine)


def _prepare_artifact(prep: Prepared, model, kind, width, height, threads) -> None:
    from .pipeline import open_runner

    backend, notes = prep.backend, prep.notes
    t0 = time.perf_counter()
    runner = open_runner(model, None, backend, threads=threads)
    prep.load["model_load_s"] = time.perf_counter() - t0
    if kind == "onnx":
        actual = _onnx_precision(model)
    else:
        from .export.tensorrt import read_sidecar
        actual = str(read_sidecar(model).get("precision", "fp32"))
    prep.precision = actual
    req = prep.requested_precision
    if req and req != actual:
        notes.append(f"the {kind} is {actual}: --precision {req} ignored (convert again for another precision)")
    spec = runner.spec
    if (width and width != spec.width) or (height and height != spec.height):
        raise DarkconvError(f"this {kind} takes {spec.width}x{spec.height} input: --size only applies to a cfg "
                            "(convert again with --size)", file=str(model))
    prep.runner = runner


# -- running -------------------------------------------------------------------------------
def fixed_input(spec, batch: int, images: list[np.ndarray]) -> np.ndarray:
    """The preprocessed ``images`` cycled to ``batch``: the fixed input of the latency loop."""
    from .preprocess import preprocess

    size = (spec.width, spec.height)
    one = [preprocess(im, size, spec.letter_box) for im in images[:batch]]
    return np.stack([one[i % len(one)] for i in range(batch)])


def threads_used(runner) -> int | None:
    name = getattr(runner, "name", "")
    if name == "torch":
        import torch
        return torch.get_num_threads()
    if name == "onnxruntime":
        return int(runner.threads or os.cpu_count() or 1)
    if name == "opencv":
        import cv2
        return cv2.getNumThreads()
    return getattr(runner, "threads", None)


def run_bench(prep: Prepared, batches, *, warmup: int = 3, iters: int | None = None,
              seconds: float | None = None, e2e=None, thresh: float = 0.25, nms: float = 0.45,
              progress=None, log=None, settings: dict | None = None, concurrency=None) -> dict:
    """Activate ``prep.runner`` (timed), then time each batch size; returns the result dict.

    ``concurrency`` (e.g. [1, 4, 8]): also run that many requests in flight at once per batch size
    (threads in closed loops; meaningful for a runner that takes concurrent calls, such as triton);
    rows get ``concurrency`` [{concurrency, p50/p99 ms, throughput_ips}].

    ``e2e``: image paths/directories for the end-to-end split (None: inference only).
    Errors on one batch size (e.g. an ONNX exported for a fixed batch) are recorded in that
    row and the next size is tried; a KeyboardInterrupt keeps what was measured.
    """
    from .pipeline import Timings, detect_arrays
    from .preprocess import load_image, load_images

    log = log or (lambda *_a, **_k: None)
    batches = parse_batches(batches)
    if iters is None and seconds is None:
        seconds = 3.0
    e2e_files = sample_images(e2e) if e2e else None
    fixed_files = e2e_files or sample_images()
    result: dict = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": prep.model,
        "backend": {"name": prep.backend, "describe": None, "precision": prep.precision,
                    "requested_precision": prep.requested_precision, "threads": None},
        "settings": {"batches": batches, "warmup": warmup, "iters": iters, "seconds": seconds,
                     "min_iters": MIN_ITERS, "input": f"{len(fixed_files[:max(batches)])} preprocessed image(s) "
                     "cycled to the batch size", "e2e_images": [str(p) for p in e2e_files] if e2e_files else None,
                     "thresh": thresh, "nms": nms, **(settings or {})},
        "load": dict(prep.load),
        "results": [],
        "notes": list(prep.notes),
        "interrupted": False,
        "environment": None,
    }
    runner = prep.runner
    t0 = time.perf_counter()
    try:
        runner.activate()
    except KeyboardInterrupt:
        result["interrupted"] = True
        result["environment"] = environment()
        return result
    result["load"]["session_create_s"] = time.perf_counter() - t0
    try:
        spec = runner.spec
        _describe_spec(result["model"], spec)
        result["backend"]["describe"] = runner.describe()
        result["backend"]["threads"] = threads_used(runner)
        imgs = [load_image(p) for p in fixed_files[:max(batches)]]
        for b in batches:
            row: dict = {"batch": b, "error": None, "latency": None, "e2e": None}
            result["results"].append(row)
            try:
                x = fixed_input(spec, b, imgs)
                samples, _, stop = time_loop(lambda: runner.infer(x), warmup=warmup, iters=iters, seconds=seconds,
                                             progress=progress, desc=f"batch {b}")
                row["latency"] = latency_stats(samples, b)
                if concurrency and not stop:
                    row["concurrency"] = []
                    for c in concurrency:
                        lat, wall = concurrent_loop(lambda: runner.infer(x), c, iters=iters, seconds=seconds)
                        st = latency_stats(lat, b)
                        st.update(concurrency=c, throughput_ips=len(lat) * b / wall if wall > 0 else None)
                        row["concurrency"].append(st)
                if e2e_files and not stop:
                    state = {"k": 0}

                    def step(b=b, x=x):
                        k = state["k"]
                        state["k"] += 1
                        paths = [e2e_files[(k * b + i) % len(e2e_files)] for i in range(b)]
                        t0 = time.perf_counter()
                        runner.infer(x)  # raw inference in the same iteration: the ratio's denominator
                        t = Timings()
                        t1 = time.perf_counter()
                        ims = load_images(paths)  # as detect: a batch is decoded in parallel
                        bad = next((im for im in ims if isinstance(im, DarkconvError)), None)
                        if bad is not None:
                            raise bad
                        t.decode = time.perf_counter() - t1
                        detect_arrays(runner, ims, thresh=thresh, nms=nms, timings=t)
                        return {"raw": t1 - t0, **{s: getattr(t, s) for s in STAGES}}

                    _, splits, stop = time_loop(step, warmup=min(warmup, 1), iters=iters, seconds=seconds,
                                                progress=progress, desc=f"batch {b} end-to-end")
                    row["e2e"] = split_stats(splits, b, row["latency"]["per_image_ms"])
            except Exception as e:  # noqa: BLE001 - one batch size failing must not lose the others
                row["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0]
                log(f"batch {b}: {row['error']}")
                continue
            if stop:
                result["interrupted"] = True
                break
    finally:
        runner.deactivate()
        result["environment"] = environment(result["backend"]["threads"])
    return result


# -- output --------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The human-readable table(s) of a result."""
    m, b, env, load = result["model"], result["backend"], result.get("environment") or {}, result["load"]
    name = Path(m["path"]).name + (f" + {Path(m['weights']).name}" if m.get("weights") else "")
    if m.get("random_weights"):
        name += f" [{RANDOM_WEIGHTS}]"
    size = f"{m['input'][0]}x{m['input'][1]}" if m.get("input") else "?"
    out = [f"model    {name}, input {size}",
           f"backend  {b.get('describe') or b['name']}, {b['precision']}, {b.get('threads') or '?'} thread(s)",
           f"machine  {env.get('cpu_model', '?')}, {env.get('cpu_cores', '?')} cores"
           + (f", GPU {env['gpu']}" if env.get("gpu") else "")
           + (f", load avg {env['load_avg_1_5_15'][0]}" if env.get("load_avg_1_5_15") else "")]
    parts = [f"{label} {load[k]:.3f} s" for k, label in (("model_load_s", "model load"), ("export_s", "ONNX export"),
             ("engine_build_s", "engine build"), ("session_create_s", "session creation")) if load.get(k) is not None]
    out.append("load     " + (", ".join(parts) if parts else "-"))
    rows = [["batch", "iters", "mean ms", "p50 ms", "p90 ms", "p99 ms", "min ms", "ms/img", "img/s"]]
    errors = []
    for r in result["results"]:
        lat = r.get("latency") or {}
        if r.get("error") and not lat:
            errors.append(f"batch {r['batch']}: {r['error']}")
            rows.append([str(r["batch"]), "0"] + ["error"] + ["-"] * 6)
            continue
        rows.append([str(r["batch"]), str(lat.get("iters", 0))] +
                    [_f(lat.get(k)) for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "per_image_ms")] +
                    [_f(lat.get("throughput_ips"), "{:.1f}")])
        if r.get("error"):
            errors.append(f"batch {r['batch']}: {r['error']}")
    out += ["", "inference (warmup excluded)", _table(rows)]
    conc = [(r["batch"], c) for r in result["results"] for c in (r.get("concurrency") or [])]
    if conc:
        rows = [["batch", "in flight", "calls", "p50 ms", "p99 ms", "img/s"]]
        rows += [[str(b), str(c["concurrency"]), str(c["iters"]), _f(c["p50_ms"]), _f(c["p99_ms"]),
                  _f(c["throughput_ips"], "{:.1f}")] for b, c in conc]
        out += ["", "concurrent requests (closed loops; img/s = images / wall time)", _table(rows)]
    e2e_rows = [r for r in result["results"] if r.get("e2e")]
    if e2e_rows:
        rows = [["batch", "iters", "decode", "preprocess", "inference", "postprocess", "total ms/img", "img/s",
                 "raw ms/img", "e2e/raw"]]
        for r in e2e_rows:
            e = r["e2e"]
            rows.append([str(r["batch"]), str(e["iters"])] + [_f(e[f"{s}_ms"]) for s in STAGES] +
                        [_f(e["total_ms"]), _f(e["throughput_ips"], "{:.1f}"), _f(e.get("raw_inference_ms")),
                         _f(e["e2e_over_inference"], "{:.2f}x")])
        out += ["", "end to end, ms per image (decode = file read + JPEG decode; raw = a bare inference call "
                "timed in the same iteration)", _table(rows)]
    for e in errors:
        out.append(f"error: {e}")
    for n in result.get("notes", []):
        out.append(f"note: {n}")
    if result.get("interrupted"):
        out.append("interrupted: the figures above are what was measured before Ctrl-C")
    return "\n".join(out)


def write_json(result: dict, path) -> Path:

    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, [(json.dumps(result, indent=2) + "\n").encode()])
    return path


def plot(result: dict, path) -> Path:
    """Latency vs batch size, and the end-to-end split per image (when measured), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r.get("latency") and r["latency"]["iters"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if rows:
        bs = [r["batch"] for r in rows]
        lat = [r["latency"] for r in rows]
        ax1.plot(bs, [x["mean_ms"] for x in lat], "o-", label="mean")
        ax1.plot(bs, [x["p50_ms"] for x in lat], "s--", label="p50")
        ax1.plot(bs, [x["p99_ms"] for x in lat], "^:", label="p99")
        ax1.plot(bs, [x["min_ms"] for x in lat], "v:", label="min")
        ax1.set_xticks(bs)
        ax1b = ax1.twinx()
        ax1b.plot(bs, [x["per_image_ms"] for x in lat], "o-", color="grey", alpha=0.6, label="ms / image")
        ax1b.set_ylabel("ms per image (grey)", color="grey")
        ax1b.set_ylim(bottom=0)
        ax1.set_ylim(bottom=0)
        ax1.legend(loc="lower right", fontsize=8)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("latency per batch (ms)")
    ax1.set_title("inference latency vs batch")
    e2e = [r for r in result["results"] if r.get("e2e") and r["e2e"]["iters"]]
    if e2e:
        labels = [str(r["batch"]) for r in e2e]
        bottom = np.zeros(len(e2e))
        for s in STAGES:
            v = np.array([r["e2e"][f"{s}_ms"] for r in e2e])
            ax2.bar(labels, v, bottom=bottom, label=s)
            bottom += v
        ax2.set_xlabel("batch size")
        ax2.set_ylabel("ms per image")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no end-to-end run\n(darkconv bench --e2e IMAGES)", ha="center", va="center",
                 transform=ax2.transAxes)
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("end-to-end split per image")
    m, b, env = result["model"], result["backend"], result.get("environment") or {}
    title = (f"{Path(m['path']).name}{' (random weights)' if m.get('random_weights') else ''} on "
             f"{b['name']} {b['precision']}, {b.get('threads') or '?'} threads, {env.get('cpu_model', '')}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, [buf.getvalue()])
    return path
