"""TensorRT export and runner.

TensorRT cannot be installed on the project's machines, so most of this file
drives the real code against a fake ``tensorrt`` module and a fake cuda-python
runtime (host memory standing in for device memory) that record every call:
that proves the builder and runner follow the TensorRT 10.x/11.x API. The tests
at the end build and run real engines and skip where TensorRT or a GPU is absent.
"""
from __future__ import annotations

import ctypes
import enum
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from darkconv.darknet.spec import HeadSpec, ModelSpec
from darkconv.errors import BackendUnavailable, DarkconvError, ExportError, ModelMismatch
from darkconv.export.tensorrt import (build_engine, check_sidecar, gpu_info, make_sidecar, read_sidecar,
                                      sidecar_path, trt_available, write_sidecar)
from darkconv.runners.tensorrt import TensorRTRunner

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
CC = "9.0"
TRT_VERSION = "10.13.3.9"
SHA_A, SHA_B = "a" * 64, "b" * 64


def small_spec() -> ModelSpec:
    heads = (HeadSpec("yolo", 16, 2, ((10, 14), (23, 27), (37, 58)), (3, 4, 5), (1, 2)),
             HeadSpec("yolo", 23, 2, ((10, 14), (23, 27), (37, 58)), (0, 1, 2), (2, 4)))
    return ModelSpec(64, 32, 3, False, heads, ("cat", "dog"), {})


# -- fake cuda-python ---------------------------------------------------------------------
class FakeCudart(types.ModuleType):
    """cuda.bindings.runtime on host memory: every call returns (err, *values) like the real one."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, count=1, count_err=0):
        super().__init__("cuda.bindings.runtime")
        self.count, self.count_err = count, count_err
        self.device_mem: dict[int, object] = {}
        self.host_mem: dict[int, object] = {}
        self.streams: set[int] = set()
        self.calls: list[tuple] = []
        self.fail_malloc = False

    def _ok(self, *values):
        return (self.cudaError_t.cudaSuccess, *values)

    def cudaGetErrorString(self, err):
        return self._ok(f"fake error {int(err)}".encode())

    def cudaGetDeviceCount(self):
        return (self.cudaError_t(self.count_err), self.count if self.count_err == 0 else 0)

    def cudaGetDeviceProperties(self, dev):
        return self._ok(types.SimpleNamespace(name=GPU.encode() + b"\x00\x00", major=9, minor=0))

    def cudaStreamCreate(self):
        s = 1000 + len(self.streams) + 1
        self.streams.add(s)
        self.calls.append(("cudaStreamCreate", s))
        return self._ok(s)

    def cudaStreamDestroy(self, s):
        self.streams.discard(int(s))
        return self._ok()

    def cudaStreamSynchronize(self, s):
        self.calls.append(("cudaStreamSynchronize", int(s)))
        return self._ok()

    def _alloc(self, table, n):
        if self.fail_malloc:
            return (self.cudaError_t.cudaErrorMemoryAllocation, 0)
        buf = ctypes.create_string_buffer(int(n))
        table[ctypes.addressof(buf)] = buf
        return self._ok(ctypes.addressof(buf))

    def cudaMalloc(self, n):
        self.calls.append(("cudaMalloc", n))
        return self._alloc(self.device_mem, n)

    def cudaMallocHost(self, n):
        self.calls.append(("cudaMallocHost", n))
        return self._alloc(self.host_mem, n)

    def cudaFree(self, p):
        self.device_mem.pop(int(p))
        return self._ok()

    def cudaFreeHost(self, p):
        self.host_mem.pop(int(p))
        return self._ok()

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        table_dst, table_src = ((self.device_mem, self.host_mem) if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice
                                else (self.host_mem, self.device_mem))
        assert any(a <= dst and dst + n <= a + len(b) for a, b in table_dst.items()), "dst out of bounds"
        assert any(a <= src and src + n <= a + len(b) for a, b in table_src.items()), "src out of bounds"
        assert int(stream) in self.streams
        ctypes.memmove(dst, src, n)
        self.calls.append(("cudaMemcpyAsync", int(kind), n))
        return self._ok()


def install_cudart(monkeypatch, cudart: FakeCudart | None):
    if cudart is None:  # simulate: cuda-python not installed
        for m in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
            monkeypatch.setitem(sys.modules, m, None)
        return
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)


# -- fake tensorrt ----------------------------------------------------------------------------
class FakeTensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class FakeError:
    def __init__(self, node, op, desc):
        self._n, self._op, self._d = node, op, desc

    def node_name(self):
        return self._n

    def node_operator(self):
        return self._op

    def desc(self):
        return self._d


def make_fake_trt(*, strongly_typed=True, parse_errors=(), build_ok=True, input_shape=(-1, 3, 32, 64),
                  cache_ok=True, version=TRT_VERSION):
    """A minimal ``tensorrt`` module recording builder calls in ``trt.log``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    log: list[tuple] = []
    trt.log = log

    class Logger:
        WARNING, INFO, ERROR = 2, 3, 1

        def __init__(self, level=2):
            log.append(("Logger", level))

    class NetworkDefinitionCreationFlag:
        pass

    if strongly_typed:
        NetworkDefinitionCreationFlag.STRONGLY_TYPED = 2

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = [FakeError(*e) for e in parse_errors]

        def parse_from_file(self, path):
            log.append(("parse_from_file", path))
            if not self.errors:
                self.network.inputs = [FakeTensor("images", input_shape)]
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            log.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class TimingCache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return self.blob + b"+tuned"

    class Config:
        cache = None

        def set_memory_pool_limit(self, pool, n):
            log.append(("set_memory_pool_limit", pool, n))

        def add_optimization_profile(self, p):
            log.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, blob):
            log.append(("create_timing_cache", bytes(blob)))
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            log.append(("set_timing_cache", cache.blob, ignore_mismatch))
            self.cache = cache
            return cache_ok or cache.blob == b""

        def get_timing_cache(self):
            log.append(("get_timing_cache",))
            return self.cache

    class Builder:
        def __init__(self, logger):
            log.append(("Builder",))

        def create_network(self, flags=0):
            log.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            log.append(("build_serialized_network",))
            return b"ENGINE-BYTES" if build_ok else None

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag, trt.MemoryPoolType = NetworkDefinitionCreationFlag, MemoryPoolType
    add_fake_runtime(trt)
    return trt


def add_fake_runtime(trt):
    """Runtime side: an engine whose heads are head_<layer>[n, c, y, x] = mean(input[n]) * (c + 1) + y - x."""
    log = trt.log

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class DataType(enum.Enum):
        FLOAT = np.float32
        HALF = np.float16

    def nptype(dt):
        return dt.value

    class Engine:
        def __init__(self, spec, profile, io_dtype):
            c, h, w = spec.channels, spec.height, spec.width
            self.spec, self.profile, self.dtype = spec, profile, io_dtype
            # outputs deliberately listed in reverse cfg order: the runner must map by name
            self.tensors = {"images": (-1, c, h, w)}
            for hd in reversed(spec.heads):
                self.tensors[f"head_{hd.layer}"] = (-1, hd.channels, *hd.grid)
            self.names = list(self.tensors)

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "images" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self.dtype

        def get_tensor_shape(self, name):
            return self.tensors[name]

        def get_tensor_profile_shape(self, name, index):
            assert name == "images" and index == 0
            return [(b, *self.tensors["images"][1:]) for b in self.profile]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.batch, self.addr = engine, None, {}

        def set_input_shape(self, name, shape):
            log.append(("set_input_shape", name, tuple(shape)))
            lo, _, hi = self.engine.profile
            if not lo <= shape[0] <= hi:
                return False
            self.batch = shape[0]
            return True

        def get_tensor_shape(self, name):
            return (self.batch, *self.engine.tensors[name][1:])

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def _array(self, name):
            shape = self.get_tensor_shape(name)
            n = int(np.prod(shape)) * np.dtype(self.engine.dtype.value).itemsize
            raw = (ctypes.c_byte * n).from_address(self.addr[name])
            return np.frombuffer(raw, dtype=self.engine.dtype.value).reshape(shape)

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            log.append(("execute_async_v3", stream_handle))
            x = self._array("images").astype(np.float32)
            mean = x.reshape(x.shape[0], -1).mean(axis=1)
            for name in self.engine.names[1:]:
                out = self._array(name)
                _, c, h, w = out.shape
                val = (mean[:, None, None, None] * (np.arange(c)[None, :, None, None] + 1)
                       + np.arange(h)[None, None, :, None] - np.arange(w)[None, None, None, :])
                out[...] = val
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            log.append(("deserialize_cuda_engine", bytes(data)))
            return trt.engine_factory(data)

    trt.TensorIOMode, trt.DataType, trt.nptype, trt.Runtime = TensorIOMode, DataType, nptype, Runtime
    trt.Engine = Engine
    trt.engine_factory = lambda data: Engine(small_spec(), (1, 2, 4), DataType.FLOAT)


def expected_heads(spec, x):
    mean = x.reshape(x.shape[0], -1).mean(axis=1)
    outs = []
    for hd in spec.heads:
        c, (h, w) = hd.channels, hd.grid
        outs.append(mean[:, None, None, None] * (np.arange(c)[None, :, None, None] + 1)
                    + np.arange(h)[None, None, :, None] - np.arange(w)[None, None, None, :])
    return outs


@pytest.fixture
def fake(monkeypatch):
    """Install fake tensorrt + cuda-python; returns a function to swap the tensorrt flavour."""
    cudart = FakeCudart()
    install_cudart(monkeypatch, cudart)

    def use(**kw):
        trt = make_fake_trt(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt, cudart
    return use


@pytest.fixture
def onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_bytes(b"not really onnx")
    return p


# -- import hygiene / absence ---------------------------------------------------------------
def test_modules_import_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    install_cudart(monkeypatch, None)
    for name in ("darkconv.export.tensorrt", "darkconv.runners.tensorrt"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        importlib.import_module(name)
    from darkconv.runners import runner_class
    assert runner_class("trt").__name__ == "TensorRTRunner"


def test_trt_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert trt_available() is None
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version="11.4.0.106"))
    assert trt_available() == "11.4.0.106"


def test_build_engine_without_tensorrt(monkeypatch, tmp_path, onnx_file):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    with pytest.raises(BackendUnavailable, match=r"pip install 'darkconv\[trt\]'"):
        build_engine(onnx_file, engine, small_spec(), "fp32", timing_cache=str(tmp_path / "t.cache"), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_runner_without_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable, match=r"pip install 'darkconv\[trt\]'") as e:
        TensorRTRunner(tmp_path / "m.engine").activate()
    assert e.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_runner_without_cuda_python(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    install_cudart(monkeypatch, None)
    with pytest.raises(BackendUnavailable, match=r"cuda-python.*pip install 'darkconv\[trt\]'"):
        TensorRTRunner(tmp_path / "m.engine").activate()


def test_no_gpu_is_backend_unavailable(monkeypatch, tmp_path, onnx_file):
    """cuda-python present but no driver (what this machine reports), or no device at all."""
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    install_cudart(monkeypatch, FakeCudart(count_err=35))
    with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver"):
        build_engine(onnx_file, tmp_path / "m.engine", small_spec(), "fp32", log=None)
    install_cudart(monkeypatch, FakeCudart(count=0))
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        gpu_info()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_gpu_info_without_cuda_python_falls_back_to_torch(monkeypatch):
    install_cudart(monkeypatch, None)
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        name, cc = gpu_info()
        assert name and "." in cc
    else:
        with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
            gpu_info()


def test_gpu_info_with_fake_cudart(monkeypatch):
    install_cudart(monkeypatch, FakeCudart())
    assert gpu_info() == (GPU, CC)


def test_check_cuda():
    from darkconv.export.tensorrt import _check_cuda
    ok, oom = FakeCudart.cudaError_t.cudaSuccess, FakeCudart.cudaError_t.cudaErrorMemoryAllocation
    assert _check_cuda((ok,)) is None
    assert _check_cuda((ok, 5)) == 5
    assert _check_cuda((ok, 1, 2)) == (1, 2)
    with pytest.raises(DarkconvError, match=r"cudaMalloc failed with cudaErrorMemoryAllocation \(2\)"):
        _check_cuda((oom, 0), "cudaMalloc")


# -- source guard -----------------------------------------------------------------------------
REMOVED_APIS = ("EXPLICIT_BATCH", "int8_calibrator", "IInt8EntropyCalibrator", "BuilderFlag.FP16",
                "BuilderFlag.INT8", "execute_async_v2", "get_binding_shape", "num_bindings", "pycuda")


@pytest.mark.parametrize("module", ["darkconv/export/tensorrt.py", "darkconv/runners/tensorrt.py"])
def test_no_removed_tensorrt_apis(module):
    text = (ROOT / module).read_text()
    used = [api for api in REMOVED_APIS if api in text]
    assert not used, f"{module} mentions APIs removed from TensorRT 10/11: {used}"
    for api in ("execute_async_v3", "set_tensor_address", "set_input_shape") if "runners" in module else \
            ("parse_from_file", "set_memory_pool_limit", "build_serialized_network", "STRONGLY_TYPED"):
        assert api in text


# -- sidecar ------------------------------------------------------------------------------------
def sample_sidecar(**kw):
    args = dict(precision="fp16", batch=(1, 2, 8), trt_version=TRT_VERSION, gpu=GPU, cc=CC,
                cfg_sha256=SHA_A, weights_sha256=SHA_B, onnx_sha256="c" * 64)
    args.update(kw)
    return make_sidecar(small_spec(), **args)


def test_sidecar_round_trip(tmp_path):
    sc = sample_sidecar()
    assert sc["input"] == {"name": "images", "shape": [3, 32, 64], "batch": [1, 2, 8]}
    assert sc["tensorrt"] == TRT_VERSION and sc["gpu"] == GPU and sc["compute_capability"] == CC
    assert sc["precision"] == "fp16" and sc["darkconv"]
    assert (sc["cfg_sha256"], sc["weights_sha256"], sc["onnx_sha256"]) == (SHA_A, SHA_B, "c" * 64)
    engine = tmp_path / "m.engine"
    assert sidecar_path(engine) == tmp_path / "m.engine.json"
    write_sidecar(sidecar_path(engine), sc)
    back = read_sidecar(engine)
    assert back == json.loads(json.dumps(sc))
    assert ModelSpec.from_dict(back["spec"]) == small_spec()
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine.json"]  # no temp file left
    check_sidecar(back, trt_version=TRT_VERSION, gpu=GPU, cc=CC, cfg_sha256=SHA_A, weights_sha256=SHA_B,
                  spec=small_spec())


def test_sidecar_missing_and_corrupt(tmp_path):
    engine = tmp_path / "m.engine"
    with pytest.raises(ModelMismatch, match=r"no sidecar m\.engine\.json.*darkconv convert --engine"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ModelMismatch, match="not valid JSON"):
        read_sidecar(engine)


@pytest.mark.parametrize("kw,field,engine_val,current", [
    ({"trt_version": "10.13.4.1"}, "tensorrt", TRT_VERSION, "10.13.4.1"),
    ({"trt_version": "11.4.0.106"}, "tensorrt", TRT_VERSION, "11.4.0.106"),
    ({"gpu": "NVIDIA A100-SXM4-80GB"}, "gpu", GPU, "NVIDIA A100-SXM4-80GB"),
    ({"cc": "8.0"}, "compute_capability", CC, "8.0"),
    ({"cfg_sha256": "d" * 64}, "cfg_sha256", "aaaaaaaaaaaa", "dddddddddddd"),
    ({"weights_sha256": "e" * 64}, "weights_sha256", "bbbbbbbbbbbb", "eeeeeeeeeeee"),
])
def test_check_sidecar_refuses(kw, field, engine_val, current):
    args = dict(trt_version=TRT_VERSION, gpu=GPU, cc=CC, cfg_sha256=SHA_A, weights_sha256=SHA_B)
    args.update(kw)
    with pytest.raises(ModelMismatch) as e:
        check_sidecar(sample_sidecar(), engine_path="m.engine", **args)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("m.engine: ")
    assert f"{field} is {engine_val}" in msg and current in msg
    assert "rebuild with darkconv convert --engine" in msg


def test_check_sidecar_accepts_same_patch_other_build_and_unknown_hashes():
    sc = sample_sidecar()
    check_sidecar(sc, trt_version="10.13.3.99", gpu=GPU, cc=CC)  # build number is not part of compatibility
    with pytest.raises(ModelMismatch, match="cfg_sha256 is none recorded"):
        check_sidecar(sample_sidecar(cfg_sha256=None), trt_version=TRT_VERSION, gpu=GPU, cc=CC, cfg_sha256=SHA_A)


def test_check_sidecar_refuses_other_model_spec():
    spec = small_spec()
    other = ModelSpec(96, 32, 3, False, spec.heads, (), {})
    with pytest.raises(ModelMismatch, match=r"input shape is 3x32x64 .* 3x32x96"):
        check_sidecar(sample_sidecar(), trt_version=TRT_VERSION, gpu=GPU, cc=CC, spec=other)
    with pytest.raises(ModelMismatch, match="heads"):
        check_sidecar(sample_sidecar(), trt_version=TRT_VERSION, gpu=GPU, cc=CC,
                      spec=ModelSpec(64, 32, 3, False, spec.heads[:1], (), {}))


# -- builder against the fake tensorrt -------------------------------------------------------------
def test_build_strongly_typed_profile_workspace_cache(fake, tmp_path, onnx_file):
    trt, _ = fake(strongly_typed=True)
    engine, cache = tmp_path / "out" / "m.engine", tmp_path / "t.cache"
    cache.write_bytes(b"OLD")
    cfg, weights = tmp_path / "m.cfg", tmp_path / "m.weights"
    cfg.write_text("[net]\n")
    weights.write_bytes(b"\0" * 20)
    msgs = []
    sc = build_engine(onnx_file, engine, small_spec(), "FP16", batch=(1, 2, 8), workspace_gb=1.5,
                      timing_cache=str(cache), source={"cfg": str(cfg), "weights_sha256": SHA_B}, log=msgs.append)
    log = trt.log
    assert ("create_network", 1 << 2) in log
    assert ("parse_from_file", str(onnx_file)) in log
    assert ("set_shape", "images", (1, 3, 32, 64), (2, 3, 32, 64), (8, 3, 32, 64)) in log
    assert ("add_optimization_profile",) in log
    assert ("set_memory_pool_limit", "WORKSPACE", int(1.5 * (1 << 30))) in log
    assert ("create_timing_cache", b"OLD") in log and ("set_timing_cache", b"OLD", False) in log
    names = [c[0] for c in log]
    assert names.index("set_timing_cache") < names.index("build_serialized_network") < names.index("get_timing_cache")
    assert cache.read_bytes() == b"OLD+tuned"
    assert engine.read_bytes() == b"ENGINE-BYTES"
    side = json.loads(sidecar_path(engine).read_text())
    assert side == sc
    assert sc["precision"] == "fp16" and sc["tensorrt"] == TRT_VERSION
    assert sc["gpu"] == GPU and sc["compute_capability"] == CC
    assert sc["input"] == {"name": "images", "shape": [3, 32, 64], "batch": [1, 2, 8]}
    from darkconv.io import sha256_file as sha256
    assert sc["cfg_sha256"] == sha256(cfg) and sc["weights_sha256"] == SHA_B
    assert sc["onnx_sha256"] == sha256(onnx_file)
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.engine.json"]  # atomic: no temps
    assert any("building TensorRT" in m for m in msgs)


def test_build_without_strongly_typed_flag_passes_no_flag(fake, tmp_path, onnx_file):
    trt, _ = fake(strongly_typed=False)
    build_engine(onnx_file, tmp_path / "m.engine", small_spec(), "fp32", log=None)
    assert ("create_network", 0) in trt.log
    assert not any(c[0] == "create_timing_cache" for c in trt.log)  # no cache asked for


def test_build_new_timing_cache_and_mismatched_cache(fake, tmp_path, onnx_file):
    trt, _ = fake()
    cache = tmp_path / "new.cache"
    build_engine(onnx_file, tmp_path / "a.engine", small_spec(), "fp32", timing_cache=str(cache), log=None)
    assert ("create_timing_cache", b"") in trt.log
    assert cache.read_bytes() == b"+tuned"
    trt, _ = fake(cache_ok=False)
    cache.write_bytes(b"FROM-ANOTHER-GPU")
    msgs = []
    build_engine(onnx_file, tmp_path / "b.engine", small_spec(), "fp32", timing_cache=str(cache), log=msgs.append)
    assert ("set_timing_cache", b"FROM-ANOTHER-GPU", False) in trt.log and ("set_timing_cache", b"", False) in trt.log
    assert any("fresh" in m for m in msgs)


def test_build_parser_errors_all_surfaced(fake, tmp_path, onnx_file):
    fake(parse_errors=[("/pad", "Pad", "mode reflect is unsupported"),
                       ("/up/Resize", "Resize", "coordinate_transformation_mode half_pixel_symmetric")])
    engine = tmp_path / "m.engine"
    with pytest.raises(ExportError) as e:
        build_engine(onnx_file, engine, small_spec(), "fp32", log=None)
    msg = str(e.value)
    assert "2 error(s)" in msg and str(onnx_file) in msg
    assert "/pad Pad] mode reflect is unsupported" in msg
    assert "/up/Resize Resize] coordinate_transformation_mode half_pixel_symmetric" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_failure_writes_nothing(fake, tmp_path, onnx_file):
    trt, _ = fake(build_ok=False)
    engine, cache = tmp_path / "m.engine", tmp_path / "t.cache"
    with pytest.raises(ExportError, match="failed to build"):
        build_engine(onnx_file, engine, small_spec(), "fp32", timing_cache=str(cache), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_build_rejects_bad_arguments(fake, tmp_path, onnx_file):
    fake()
    engine = tmp_path / "m.engine"
    with pytest.raises(ExportError, match="precision"):
        build_engine(onnx_file, engine, small_spec(), "int4", log=None)
    with pytest.raises(ExportError, match="min <= opt <= max"):
        build_engine(onnx_file, engine, small_spec(), "fp32", batch=(4, 2, 8), log=None)
    with pytest.raises(ExportError, match="not found"):
        build_engine(tmp_path / "missing.onnx", engine, small_spec(), "fp32", log=None)
    fake(input_shape=(1, 3, 32, 64))
    with pytest.raises(ExportError, match="fixed batch of 1"):
        build_engine(onnx_file, engine, small_spec(), "fp32", batch=(1, 2, 4), log=None)
    build_engine(onnx_file, engine, small_spec(), "fp32", batch=1, log=None)  # fixed batch 1 is fine
    engine.unlink()
    sidecar_path(engine).unlink()
    fake(input_shape=(-1, 3, 64, 64))
    with pytest.raises(ModelMismatch, match=r"\[-1, 3, 64, 64\].*\[N, 3, 32, 64\]"):
        build_engine(onnx_file, engine, small_spec(), "fp32", log=None)
    assert not engine.exists() and not sidecar_path(engine).exists()


# -- runner against the fake tensorrt + fake cudart -------------------------------------------------
def built_engine(fake, tmp_path, onnx_file, **kw):
    trt, cudart = fake(**kw)
    engine = tmp_path / "m.engine"
    build_engine(onnx_file, engine, small_spec(), "fp32", batch=(1, 2, 4),
                 source={"cfg_sha256": SHA_A, "weights_sha256": SHA_B}, log=None)
    return engine, trt, cudart


def test_runner_infer_with_fakes(fake, tmp_path, onnx_file):
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_file)
    rng = np.random.default_rng(0)
    with TensorRTRunner(engine, cfg_sha256=SHA_A, weights_sha256=SHA_B) as r:
        assert r.spec == small_spec()  # from the sidecar
        assert r.batch_range == (1, 4)
        # buffers: one device + one pinned host buffer per tensor, sized for batch 4, allocated once
        sizes = sorted(n for c, n in cudart.calls if c == "cudaMalloc")
        assert sizes == sorted(4 * 4 * v for v in (3 * 32 * 64, 21 * 1 * 2, 21 * 2 * 4))
        assert len(cudart.host_mem) == 3 and len(cudart.streams) == 1
        for n in (1, 3, 4, 2):
            x = rng.random((n, 3, 32, 64), dtype=np.float32)
            heads = r.infer(x)
            assert [h.shape for h in heads] == [(n, 21, 1, 2), (n, 21, 2, 4)]  # spec.heads order
            for got, want in zip(heads, expected_heads(r.spec, x)):
                assert got.dtype == np.float32
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        kept = heads[0].copy()
        r.infer(rng.random((2, 3, 32, 64), dtype=np.float32) + 5)
        np.testing.assert_array_equal(heads[0], kept)  # results are copies, not views of the buffers
        assert sum(c == "cudaMalloc" for c, *_ in cudart.calls) == 3  # reused, not reallocated
        with pytest.raises(DarkconvError, match=r"batch of 5 is outside this engine's batch range 1\.\.4"):
            r.infer(np.zeros((5, 3, 32, 64), np.float32))
        with pytest.raises(ModelMismatch, match=r"\[1, 3, 64, 64\]"):
            r.infer(np.zeros((1, 3, 64, 64), np.float32))
        assert "tensorrt 10.13.3.9 fp32" in r.describe()
    execs = [c for c in trt.log if c[0] == "execute_async_v3"]
    assert execs and all(isinstance(c[1], int) for c in execs)
    assert ("set_input_shape", "images", (4, 3, 32, 64)) in trt.log
    assert ("deserialize_cuda_engine", b"ENGINE-BYTES") in trt.log
    # deactivate freed everything
    assert cudart.device_mem == {} and cudart.host_mem == {} and cudart.streams == set()


def test_runner_half_precision_io(fake, tmp_path, onnx_file):
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_file)
    trt.engine_factory = lambda data: trt.Engine(small_spec(), (1, 1, 2), trt.DataType.HALF)
    del trt.nptype  # also covers bindings without trt.nptype (dtype looked up by name)
    x = np.full((2, 3, 32, 64), 0.5, np.float32)
    with TensorRTRunner(engine) as r:
        heads = r.infer(x)
    assert all(h.dtype == np.float32 for h in heads)
    np.testing.assert_allclose(heads[1], expected_heads(small_spec(), x)[1], rtol=1e-3)


def test_runner_refuses_mismatches(fake, tmp_path, onnx_file, monkeypatch):
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_file)
    with pytest.raises(ModelMismatch, match="weights_sha256"):
        TensorRTRunner(engine, weights_sha256="f" * 64).activate()
    with pytest.raises(ModelMismatch, match="input shape"):
        TensorRTRunner(engine, spec=ModelSpec(96, 32, 3, False, small_spec().heads)).activate()
    monkeypatch.setattr(trt, "__version__", "10.14.0.1")
    with pytest.raises(ModelMismatch, match=r"tensorrt is 10\.13\.3\.9 in the engine but this machine has 10\.14"):
        TensorRTRunner(engine).activate()
    monkeypatch.setattr(trt, "__version__", TRT_VERSION)
    engine.write_bytes(b"ANOTHER-ENGINE")
    with pytest.raises(ModelMismatch, match="not the one its sidecar describes"):
        TensorRTRunner(engine).activate()
    sidecar_path(engine).unlink()
    with pytest.raises(ModelMismatch, match="no sidecar"):
        TensorRTRunner(engine).activate()
    assert not any(c[0] == "deserialize_cuda_engine" for c in trt.log)  # refused before loading


def test_runner_missing_head_output_and_cleanup_on_failure(fake, tmp_path, onnx_file):
    engine, trt, cudart = built_engine(fake, tmp_path, onnx_file)
    other = ModelSpec(64, 32, 3, False, (HeadSpec("yolo", 30, 2, ((1, 1),) * 3, (), (1, 2)),))
    trt.engine_factory = lambda data: trt.Engine(other, (1, 1, 4), trt.DataType.FLOAT)
    with pytest.raises(ModelMismatch, match=r"missing \['head_16', 'head_23'\]"):
        TensorRTRunner(engine).activate()
    trt.engine_factory = lambda data: trt.Engine(small_spec(), (1, 1, 4), trt.DataType.FLOAT)
    cudart.fail_malloc = True
    r = TensorRTRunner(engine)
    with pytest.raises(DarkconvError, match="cudaMalloc.*cudaErrorMemoryAllocation"):
        r.activate()
    assert cudart.device_mem == {} and cudart.host_mem == {} and cudart.streams == set()
    with pytest.raises(DarkconvError, match="before activate"):
        r.infer(np.zeros((1, 3, 32, 64), np.float32))


# -- real TensorRT (skipped here) ------------------------------------------------------------------
def _real_gpu() -> str | None:
    try:
        return "%s (sm %s)" % gpu_info()
    except BackendUnavailable:
        return None
    except Exception:  # noqa: BLE001
        return None


_TRT = trt_available()
needs_trt = pytest.mark.skipif(_TRT is None, reason="TensorRT not installed")
needs_gpu = pytest.mark.skipif(_TRT is not None and _real_gpu() is None, reason="no CUDA GPU")
CFG = ROOT / "cfg" / "yolov3-tiny.cfg"


@pytest.fixture(scope="module")
def real_model():
    import darkconv
    return darkconv.load(CFG, width=160, height=128).randomize(0)


def _ort_heads(onnx_path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})


def _rel_err(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max() / (np.abs(b).max() + 1e-6))


@needs_trt
@needs_gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-2), ("fp16", 3e-2)])
def test_real_engine_matches_onnxruntime(real_model, tmp_path, precision, tol):
    from darkconv.export.onnx import export_onnx
    onnx_path = export_onnx(real_model, tmp_path / f"m-{precision}.onnx", precision=precision, batch="dynamic")
    engine, cache = tmp_path / f"m-{precision}.engine", tmp_path / "timing.cache"
    spec = real_model.spec
    sc = build_engine(onnx_path, engine, spec, precision, batch=(1, 2, 4), workspace_gb=1.0,
                      timing_cache=str(cache), source={"cfg": str(CFG)}, log=print)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
    assert read_sidecar(engine) == sc and sc["tensorrt"] == _TRT
    rng = np.random.default_rng(0)
    with TensorRTRunner(engine, spec=spec, cfg_sha256=sc["cfg_sha256"]) as r:
        for n in (1, 3, 4):
            x = rng.random((n, 3, spec.height, spec.width), dtype=np.float32)
            got = r.infer(x)
            want = _ort_heads(onnx_path, x)
            assert [g.shape for g in got] == [w.shape for w in want]
            assert [g.shape[1:] for g in got] == [(h.channels, *h.grid) for h in spec.heads]
            for g, w in zip(got, want):
                assert g.dtype == np.float32
                assert _rel_err(g, w) < tol
        with pytest.raises(DarkconvError, match="outside this engine's batch range"):
            r.infer(np.zeros((5, 3, spec.height, spec.width), np.float32))


@needs_trt
@needs_gpu
def test_real_engine_refused_after_trt_version_change(real_model, tmp_path):
    from darkconv.export.onnx import export_onnx
    onnx_path = export_onnx(real_model, tmp_path / "m.onnx", batch="dynamic")
    engine = tmp_path / "m.engine"
    sc = build_engine(onnx_path, engine, real_model.spec, "fp32", log=print)
    write_sidecar(sidecar_path(engine), {**sc, "tensorrt": "9.0.0.1"})
    with pytest.raises(ModelMismatch, match="tensorrt is 9.0.0.1"):
        TensorRTRunner(engine).activate()
