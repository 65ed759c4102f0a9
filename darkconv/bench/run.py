"""Preparing a model for a benchmark (through :func:`darkconv.pipeline.open_runner`) and running one."""
from __future__ import annotations

import datetime as _dt
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DarkconvError
from ..io import sha256_file
from ..pipeline import DATA
from .machine import environment
from .stats import MIN_ITERS, STAGES, latency_stats, parse_batches, split_stats
from .timing import concurrent_loop, time_loop

SCHEMA = "darkconv.bench/1"


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


def sample_images(paths=None) -> list[Path]:
    """Image files of ``paths`` (files, directories, .txt lists), or darkconv's bundled samples."""
    from ..preprocess import list_images

    files = [p for p in list_images(list(paths) if paths else [DATA]) if Path(p).is_file()]
    if not files:
        raise DarkconvError(f"no images found in {', '.join(map(str, paths or [DATA]))}")
    return files


def prepare(model, weights=None, backend: str | None = None, *, precision: str | None = None,
            width: int | None = None, height: int | None = None, threads: int | None = None,
            calib=None, max_batch: int = 1, log=None, url=None, device: str | None = None,
            cuda_graphs: bool = False) -> Prepared:
    """Open ``model`` (cfg [+ weights], .onnx, engine or served name) for ``backend`` with
    :func:`darkconv.pipeline.open_runner`, timing each step.

    What bench adds to opening: a cfg without weights gets deterministic random weights (speed
    only); INT8 of a cfg is calibrated on ``calib`` (default: darkconv's bundled sample images,
    said in the notes); a cfg on TensorRT is built into a temporary engine for batches
    1..max_batch; an .onnx / engine whose precision differs from ``precision`` runs its own
    (noted). Temporary exports live in ``Prepared.workdir`` until :meth:`Prepared.cleanup`.
    """
    from ..pipeline import model_kind, open_runner, resolve_backend

    log = log or (lambda *_a, **_k: None)
    backend = resolve_backend(model, backend, url)
    if backend == "tensorrt":
        from ..export.tensorrt import require_tensorrt
        require_tensorrt()  # the same error as `convert --engine`, before any work
    kind = "served" if backend == "triton" else model_kind(model)
    if kind != "served":
        if not Path(model).is_file():
            raise DarkconvError("no such file", file=str(model))
        if weights is not None and kind != "cfg":
            raise DarkconvError(f"a weights file goes with a .cfg, not with an {kind}", file=str(weights))
        if weights is not None and not Path(weights).is_file():
            raise DarkconvError("no such file", file=str(weights))
    notes: list[str] = []
    calib_files = None
    if kind == "cfg" and precision == "int8" and backend in ("onnxruntime", "tensorrt"):
        calib_files = [str(p) for p in sample_images(calib)]
    workdir = tempfile.TemporaryDirectory(prefix="darkconv-bench-") if kind == "cfg" else None
    report: dict = {}
    try:
        runner = open_runner(model, weights, backend, threads=threads, width=width, height=height,
                             precision=(precision or "fp32") if kind == "cfg" else "fp32", calib=calib_files,
                             workdir=workdir.name if workdir else None, log=log, url=url,
                             random_weights=True, engine_batch=max_batch, report=report, device=device,
                             cuda_graphs=cuda_graphs)
    except BaseException:
        if workdir is not None:
            workdir.cleanup()
        raise
    actual = report.get("precision", "fp32")
    if kind == "served":
        info = {"path": str(model), "kind": "served", "served_name": runner.model, "url": url, "sha256": None,
                "weights": None, "weights_sha256": None, "random_weights": False}
        notes.append(f"served by Triton at {url}: latency includes the request round trip")
        if precision and precision != actual:
            notes.append(f"the served model is {actual}: --precision {precision} ignored")
    else:
        info = {"path": str(model), "kind": kind, "sha256": sha256_file(model),
                "weights": str(weights) if weights else None, "weights_sha256": sha256_file(weights),
                "random_weights": kind == "cfg" and weights is None}
        if kind != "cfg" and precision and precision != actual:
            notes.append(f"the {kind} is {actual}: --precision {precision} ignored (convert again for another "
                         "precision)")
    notes += report["notes"]
    if "int8" in report:
        q = report["int8"]
        src = "the --e2e images" if calib else "darkconv's bundled sample images"
        notes.append(f"INT8: {q['scheme']}, calibrated ({q['method']}) on {len(calib_files)} image(s) from {src}")
    load = {k: report[k] for k in ("model_load_s", "export_s", "engine_build_s") if k in report}
    prep = Prepared(runner, backend, actual, precision, info, load, notes, workdir)
    _describe_spec(info, getattr(runner, "spec", None))  # an engine's spec may come only with activate()
    return prep


def _describe_spec(info: dict, spec) -> None:
    if spec is not None:
        info.update(input=[spec.width, spec.height], classes=spec.classes, heads=len(spec.heads),
                    letter_box=bool(spec.letter_box))


def fixed_input(spec, batch: int, images: list[np.ndarray]) -> np.ndarray:
    """The preprocessed ``images`` cycled to ``batch``: the fixed input of the latency loop."""
    from ..preprocess import preprocess

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
    from ..pipeline import Timings, detect_arrays
    from ..preprocess import load_image, load_images

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
