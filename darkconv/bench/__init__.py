"""``darkconv bench``: latency and throughput of one model on one backend.

One module per concern: :mod:`.stats` (figures from per-call times), :mod:`.timing` (the loops),
:mod:`.machine` (the environment a result was measured in), :mod:`.run` (preparing a model through
:func:`darkconv.pipeline.open_runner`, and the run itself), :mod:`.report` (text, JSON) and
:mod:`.plot` (PNG). The names below are the package's API.

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

from .machine import cpu_features, cpu_model, environment, gpu_name, tensorrt_version  # noqa: F401
from .plot import plot  # noqa: F401
from .report import format_report, write_json  # noqa: F401
from ..pipeline import RANDOM_WEIGHTS  # noqa: F401
from .run import SCHEMA, Prepared, fixed_input, prepare, run_bench, sample_images, threads_used  # noqa: F401
from .stats import MIN_ITERS, STAGES, STAT_KEYS, latency_stats, parse_batches, split_stats  # noqa: F401
from .timing import concurrent_loop, time_loop  # noqa: F401
