"""TensorRT backend: a serialized engine built by :func:`darkconv.export.tensorrt.build_engine`.

TensorRT 10.x/11.x runtime API only: I/O tensors by name (``num_io_tensors``,
``get_tensor_name``/``mode``/``dtype``/``shape``), ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3`` on one CUDA stream. Memory is
handled with cuda-python (``cuda.bindings.runtime``): device buffers sized for
the profile's largest batch and pinned host buffers, allocated once in
:meth:`activate` and reused by every :meth:`infer`.

The engine's sidecar (``<engine>.json``) is checked before the engine is
deserialized: an engine built by another TensorRT version, on another GPU or
for another cfg/weights is refused with a message that says to rebuild.
"""
from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np

from ..darknet.spec import INPUT_NAME, ModelSpec
from ..errors import DarkconvError, ModelMismatch
from ..tensorrt_support import (
    REBUILD_HINT,
    _check_cuda,
    _import_cudart,
    _import_tensorrt,
    check_sidecar,
    gpu_info,
    read_sidecar,
)
from .base import Runner, outputs_by_name

__all__ = ["TensorRTRunner", "_check_cuda", "gpu_info"]


def _volume(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_NP_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
             "BOOL": np.bool_, "UINT8": np.uint8}


def _nptype(trt, dt) -> np.dtype:
    """numpy dtype of a TensorRT DataType (``trt.nptype`` where the bindings still have it)."""
    if hasattr(trt, "nptype"):
        return np.dtype(trt.nptype(dt))
    name = getattr(dt, "name", str(dt)).rsplit(".", 1)[-1]
    if name not in _NP_TYPES:
        raise DarkconvError(f"TensorRT tensor type {name} has no numpy equivalent")
    return np.dtype(_NP_TYPES[name])


class _Buffer:
    """One I/O tensor: a device buffer and a pinned host buffer of ``capacity`` elements."""

    __slots__ = ("capacity", "device", "dtype", "host", "host_ptr", "is_input", "name")

    def __init__(self, name: str, is_input: bool, dtype: np.dtype):
        self.name, self.is_input, self.dtype = name, is_input, np.dtype(dtype)
        self.capacity = 0
        self.device = None   # device pointer (int)
        self.host_ptr = None  # pinned host pointer (int)
        self.host = None     # numpy view of the pinned memory

    def allocate(self, cudart, capacity: int) -> None:
        self.capacity = int(capacity)
        nbytes = max(1, self.capacity * self.dtype.itemsize)
        self.device = int(_check_cuda(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {self.name}"))
        self.host_ptr = int(_check_cuda(cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes}) for {self.name}"))
        raw = (ctypes.c_byte * nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype, count=self.capacity)

    def free(self, cudart) -> None:
        self.host = None
        if self.device is not None:
            cudart.cudaFree(self.device)
            self.device = None
        if self.host_ptr is not None:
            cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = None


class TensorRTRunner(Runner):
    """``with TensorRTRunner("yolov3-tiny.engine") as r: heads = r.infer(batch)``.

    ``spec`` defaults to the one stored in the sidecar; ``cfg_sha256`` /
    ``weights_sha256`` (when given) must match the ones the engine was built from.
    """

    name = "tensorrt"

    def __init__(self, engine_path, spec: ModelSpec | None = None, cfg_sha256: str | None = None,
                 weights_sha256: str | None = None):
        self.engine_path = Path(engine_path)
        self._given_spec = spec
        if spec is not None:
            self.spec = spec
        self.cfg_sha256, self.weights_sha256 = cfg_sha256, weights_sha256
        self.sidecar: dict | None = None
        self._trt = self._cudart = None
        self._logger = self._runtime = self._engine = self._context = self._stream = None
        self._buffers: dict[str, _Buffer] = {}
        self._outputs: list[str] = []   # output tensor names in spec.heads order
        self._batch_range = (1, 1)
        self._gpu = ""

    # -- lifecycle -------------------------------------------------------------------------
    def activate(self) -> None:
        if self._context is not None:
            return
        trt = _import_tensorrt()
        cudart = _import_cudart()
        sidecar = read_sidecar(self.engine_path)
        gpu, cc = gpu_info()
        check_sidecar(sidecar, trt_version=trt.__version__, gpu=gpu, cc=cc, cfg_sha256=self.cfg_sha256,
                      weights_sha256=self.weights_sha256, spec=self._given_spec, engine_path=self.engine_path)
        self.sidecar, self._gpu = sidecar, gpu
        if self._given_spec is None:
            self.spec = ModelSpec.from_dict(sidecar["spec"])
        self._trt, self._cudart = trt, cudart
        try:
            self._load(trt, cudart)
        except BaseException:
            self.deactivate()
            raise

    def _load(self, trt, cudart) -> None:
        where = str(self.engine_path)
        data = self.engine_path.read_bytes()
        want = (self.sidecar or {}).get("engine_sha256")
        if want:
            if hashlib.sha256(data).hexdigest() != want:
                raise ModelMismatch(f"the engine file is not the one its sidecar describes; {REBUILD_HINT}", file=where)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise ModelMismatch(f"TensorRT {trt.__version__} could not deserialize the engine; {REBUILD_HINT}",
                                file=where)
        engine = self._engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise DarkconvError("TensorRT could not create an execution context (out of GPU memory?)", file=where)

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [INPUT_NAME]:
            raise ModelMismatch(f"the engine's inputs are {inputs}, expected [{INPUT_NAME!r}]; {REBUILD_HINT}",
                                file=where)
        self._outputs = outputs_by_name(self.spec, [n for n in names if n not in inputs], where=where,
                                        hint=REBUILD_HINT)

        # batch range of the (single) optimization profile
        in_shape = tuple(int(d) for d in engine.get_tensor_shape(INPUT_NAME))
        if in_shape[0] == -1:
            lo, _opt, hi = engine.get_tensor_profile_shape(INPUT_NAME, 0)
            self._batch_range = (int(lo[0]), int(hi[0]))
        else:
            self._batch_range = (in_shape[0], in_shape[0])
        chw = (self.spec.channels, self.spec.height, self.spec.width)
        if tuple(in_shape[1:]) != chw:
            raise ModelMismatch(f"the engine's input is {list(in_shape)} but the model expects [N, "
                                f"{', '.join(map(str, chw))}]; {REBUILD_HINT}", file=where)

        # size every buffer for the largest batch, once
        self._stream = _check_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        max_shape = (self._batch_range[1], *chw)
        if not self._context.set_input_shape(INPUT_NAME, max_shape):
            raise DarkconvError(f"TensorRT refused input shape {list(max_shape)}", file=where)
        for n in names:
            dtype = _nptype(trt, engine.get_tensor_dtype(n))
            shape = tuple(int(d) for d in self._context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise DarkconvError(f"cannot size output {n!r}: shape {list(shape)} depends on data", file=where)
            buf = _Buffer(n, n in inputs, dtype)
            self._buffers[n] = buf
            buf.allocate(cudart, _volume(shape))

    def deactivate(self) -> None:
        cudart = self._cudart
        if cudart is not None:
            if self._stream is not None:
                cudart.cudaStreamSynchronize(self._stream)  # nothing may still be using the buffers
            for buf in self._buffers.values():
                buf.free(cudart)
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._stream = None
        # context before engine before runtime
        self._context = None
        self._engine = None
        self._runtime = self._logger = None

    # -- inference ---------------------------------------------------------------------------
    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch size the engine's profile accepts."""
        return self._batch_range

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._context is None:
            raise DarkconvError("TensorRTRunner.infer called before activate() (use it as a context manager)")
        cudart, ctx = self._cudart, self._context
        batch = np.asarray(batch)
        chw = (self.spec.channels, self.spec.height, self.spec.width)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != chw:
            raise ModelMismatch(f"input batch has shape {list(batch.shape)} but the engine expects "
                                f"[N, {', '.join(map(str, chw))}]", file=str(self.engine_path))
        n = batch.shape[0]
        lo, hi = self._batch_range
        if not lo <= n <= hi:
            raise DarkconvError(f"batch of {n} is outside this engine's batch range {lo}..{hi}; "
                                f"split the batch or rebuild the engine with a larger --batch",
                                file=str(self.engine_path))
        inp = self._buffers[INPUT_NAME]
        x = np.ascontiguousarray(batch, dtype=inp.dtype)
        if not ctx.set_input_shape(INPUT_NAME, x.shape):
            raise DarkconvError(f"TensorRT refused input shape {list(x.shape)}", file=str(self.engine_path))
        inp.host[:x.size] = x.ravel()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check_cuda(cudart.cudaMemcpyAsync(inp.device, inp.host_ptr, x.nbytes, h2d, self._stream),
                    "cudaMemcpyAsync (input)")
        for name, buf in self._buffers.items():
            if not ctx.set_tensor_address(name, buf.device):
                raise DarkconvError(f"TensorRT refused the address of tensor {name!r}", file=str(self.engine_path))
        if not ctx.execute_async_v3(int(self._stream)):
            raise DarkconvError("TensorRT failed to enqueue inference (see the TensorRT log)",
                                file=str(self.engine_path))
        shapes = {}
        for name in self._outputs:
            buf = self._buffers[name]
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            count = _volume(shape)
            if count > buf.capacity:
                raise DarkconvError(f"output {name!r} of shape {list(shape)} exceeds its buffer",
                                    file=str(self.engine_path))
            shapes[name] = shape
            _check_cuda(cudart.cudaMemcpyAsync(buf.host_ptr, buf.device, count * buf.dtype.itemsize, d2h,
                                               self._stream), f"cudaMemcpyAsync ({name})")
        _check_cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return [self._buffers[name].host[:_volume(shapes[name])].reshape(shapes[name]).astype(np.float32, copy=True)
                for name in self._outputs]

    def describe(self) -> str:
        if self.sidecar is None:
            return f"tensorrt ({self.engine_path.name})"
        s = self.sidecar
        return (f"tensorrt {s.get('tensorrt')} {s.get('precision')} on {self._gpu or s.get('gpu')} "
                f"(batch {self._batch_range[0]}..{self._batch_range[1]})")
