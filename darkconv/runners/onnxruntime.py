"""ONNX Runtime backend for darkconv's ONNX files (CPU; CUDA/TensorRT execution providers when present)."""
from __future__ import annotations

import os
import sys

import numpy as np

from ..errors import BackendUnavailable, DarkconvError
from .base import Runner, outputs_by_name


_WARNED: set[str] = set()


def int8_warning(path) -> str | None:
    """The saturation warning for an INT8 model whose recipe is known to saturate on this CPU, else None."""
    from ..cpu import cpu_info
    from ..int8_recipes import saturation_warning
    from ..onnx_meta import read_metadata

    try:
        meta = read_metadata(path)
    except Exception:  # noqa: BLE001 - read_spec already reported unreadable files
        return None
    if not meta.get("darkconv.precision", "").startswith("int8"):
        return None
    return saturation_warning(meta, cpu_info())


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, onnx_path, *, threads: int | None = None, lanes: int = 1, providers: list[str] | None = None,
                 session_config: dict | None = None):
        """``threads``: CPU threads for inference in all [default: every core]. ``lanes``: how many ``infer``
        calls may run at once, from different threads (:attr:`concurrency`), on one session whose intra-op
        thread count is ``threads // lanes`` (a call runs on its own thread plus that session's pool, which
        concurrent calls share: lanes of one thread each use exactly ``lanes`` threads). On a CPU, two
        single-threaded calls at once run as many images per second as one call on two threads, and lose less
        when other work (decoding, resizing) shares the cores, which is what a stream of files needs; one lane
        on all threads gives the lowest latency."""
        self.path = str(onnx_path)
        self.threads, self.providers = threads, providers
        self.lanes = int(lanes)
        if self.lanes < 1:
            raise DarkconvError(f"lanes must be >= 1, not {lanes}")
        self.session_config = dict(session_config or {})  # SessionOptions config entries, e.g. spinning off
        from ..onnx_meta import read_spec

        self.spec = read_spec(self.path)
        self.warning = int8_warning(self.path)
        if self.warning and self.path not in _WARNED:  # once per model file and process, one line
            _WARNED.add(self.path)
            print(f"darkconv: warning: {self.path}: {self.warning}", file=sys.stderr)

    def activate(self):
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from None
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = max(1, int(self.threads or os.cpu_count() or 1) // self.lanes)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for k, v in self.session_config.items():
            so.add_session_config_entry(k, str(v))
        available = ort.get_available_providers()
        # GPU providers when this onnxruntime build has them (onnxruntime-gpu), CPU otherwise
        providers = self.providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                   "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(self.path, so, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.output_names = outputs_by_name(self.spec, [o.name for o in self.session.get_outputs()], where=self.path,
                                            hint="re-export it with `darkconv convert`")

    @property
    def concurrency(self) -> int:
        return self.lanes

    def deactivate(self):
        self.session = None

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(batch, np.float32)
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise DarkconvError(f"this ONNX has a fixed batch of {self.fixed_batch}, got {x.shape[0]} images: use "
                                f"--batch {self.fixed_batch} or convert with --batch dynamic", file=self.path)
        return self.session.run(self.output_names, {self.input_name: x})

    def describe(self) -> str:
        prov = self.session.get_providers()[0] if getattr(self, "session", None) else "?"
        return f"onnxruntime ({prov}" + (f", {self.lanes} lanes)" if self.lanes > 1 else ")")
