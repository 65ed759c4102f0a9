"""A strict stand-in for the ``tensorrt`` Python module of one real release (10.0.1, 10.13.3.9, 11.4.0.106).

Names and enums come from the real bindings (tests/data/trt_symbols.json): the module has only the
top-level names the real one has (others raise AttributeError, as ``trt.BuilderFlag.FP16`` does on 11),
every fake class checks that each method it defines exists on the real class, and attributes are
settable only where the real class has them (``config.int8_calibrator = ...`` fails on 11).

Contract enforced (what a real TensorRT + CUDA runtime enforces, or stricter so that a bug shows):
- ``create_network(flags)``: an int bit mask of real NetworkDefinitionCreationFlag values; the network
  is strongly typed on 11.x always, on 10.x only with the STRONGLY_TYPED bit (real value: 1 on 10.x,
  0 on 11.x);
- the ONNX parser refuses what TensorRT refuses for Q/DQ (onnx_rules.py), with ParserError objects;
- ``IOptimizationProfile.set_shape``: min <= opt <= max per dimension and the network's static dims
  (otherwise the profile is invalid, ``add_optimization_profile`` returns -1, the build returns None);
  every dynamic input needs a profile;
- the engine computes the ONNX with ONNX Runtime, as a kernel enqueued on the CUDA stream given to
  ``execute_async_v3`` (an ``int`` handle of a live fake stream): it reads its input and writes its
  outputs in fake device memory only when that stream is synchronized;
- ``execute_async_v3`` fails (returns False, logs the error like TensorRT) unless every dynamic input
  shape was set (within the profile) and every I/O tensor has an address; the addresses and shapes
  are captured at enqueue time;
- precision builder flags (FP16/INT8/...; they exist on 10.x only) with a strongly typed network
  make the build fail;
- ``deserialize_cuda_engine`` returns None for bytes built by another (fake) TensorRT version.
"""
from __future__ import annotations

import json
import types

import numpy as np
import onnx

from . import onnx_rules, symbols

MAGIC = b"FAKETRT\0"
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
       "BOOL": np.bool_, "UINT8": np.uint8}
_ONNX_DT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT32: "INT32",
            onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8",
            onnx.TensorProto.BOOL: "BOOL"}


class FakeTensorRT(types.ModuleType):
    """Module object: real top-level names only."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        real = self.__dict__.get("_real_module", ())
        if name in real:
            raise AttributeError(f"fake tensorrt {self.__version__} does not model {name!r} "
                                 f"(the real module has it: extend tests/fake_trt)")
        raise AttributeError(f"module 'tensorrt' has no attribute {name!r}")


def make_tensorrt(version: str, cudart, *, gpu_ok: bool = True):
    """A fresh fake ``tensorrt`` module of ``version`` that runs its kernels on ``cudart`` streams.

    ``trt._fake`` holds what tests inspect: ``log`` (API calls), ``errors`` (what TensorRT would log as
    errors), ``networks``/``engines``/``contexts`` created.
    """
    real = symbols.trt(version)
    classes, major = real["classes"], int(version.split(".")[0])
    trt = FakeTensorRT("tensorrt")
    trt.__version__ = version
    trt._real_module = frozenset(real["module"])
    state = types.SimpleNamespace(log=[], errors=[], networks=[], engines=[], contexts=[], cudart=cudart,
                                  version=version)
    trt._fake = state
    log, errors = state.log, state.errors

    enums = {name: symbols.make_enum(name, members) for name, members in real["enums"].items() if "." not in name}
    for name, e in enums.items():
        setattr(trt, name, e)
    Severity = symbols.make_enum("Severity", real["enums"]["Logger.Severity"])
    DataType, TensorIOMode = enums["DataType"], enums["TensorIOMode"]
    NetFlag, MemoryPoolType = enums["NetworkDefinitionCreationFlag"], enums["MemoryPoolType"]

    def strict(real_name):
        """Class decorator: the class may only define (and instances only set) members of the real class."""
        members = set(classes[real_name])

        def deco(cls):
            extra = {k for k in vars(cls) if not k.startswith("_")} - members
            assert not extra, f"fake {real_name} defines {sorted(extra)}, absent from TensorRT {version}"

            def __setattr__(self, k, v):
                if not k.startswith("_") and k not in members:
                    raise AttributeError(f"'tensorrt.{real_name}' object has no attribute {k!r}")
                object.__setattr__(self, k, v)
            cls.__setattr__ = __setattr__
            cls.__name__ = cls.__qualname__ = real_name
            return cls
        return deco

    def error(msg):
        errors.append(msg)

    @strict("Logger")
    class Logger:
        INTERNAL_ERROR, ERROR, WARNING = Severity.INTERNAL_ERROR, Severity.ERROR, Severity.WARNING
        INFO, VERBOSE = Severity.INFO, Severity.VERBOSE

        def __init__(self, min_severity=Severity.WARNING):
            assert isinstance(min_severity, Severity), f"Logger() takes a Logger.Severity, got {min_severity!r}"
            self._sev = min_severity
    Logger.Severity = Severity

    # -- network + parser ----------------------------------------------------------------------
    @strict("ITensor")
    class ITensor:
        def __init__(self, name, shape, dtype):
            self._name, self._shape, self._dtype = name, tuple(shape), dtype

        name = property(lambda self: self._name)
        shape = property(lambda self: self._shape)
        dtype = property(lambda self: self._dtype)

    @strict("INetworkDefinition")
    class INetworkDefinition:
        def __init__(self, flags):
            self._flags = flags
            self._strongly_typed = major >= 11 or bool(flags >> int(NetFlag.STRONGLY_TYPED) & 1)
            self._inputs, self._outputs, self._onnx = [], [], None

        num_inputs = property(lambda self: len(self._inputs))
        num_outputs = property(lambda self: len(self._outputs))

        def get_input(self, index):
            return self._inputs[index]

        def get_output(self, index):
            return self._outputs[index]

    @strict("ParserError")
    class ParserError:
        def __init__(self, node, op, desc):
            self._n, self._op, self._d = node, op, desc

        def node_name(self):
            return self._n

        def node_operator(self):
            return self._op

        def desc(self):
            return self._d

        def __str__(self):
            return f"In node {self._n} ({self._op}): {self._d}"

    def _dims(vi):
        return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)

    def _dtype(vi):
        return DataType[_ONNX_DT[vi.type.tensor_type.elem_type]]

    @strict("OnnxParser")
    class OnnxParser:
        def __init__(self, network, logger):
            assert isinstance(network, INetworkDefinition) and isinstance(logger, Logger)
            self._net, self._errors = network, []

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index):
            return self._errors[index]

        def parse_from_file(self, model):
            log.append(("parse_from_file", str(model)))
            try:
                model = onnx.load(str(model))
            except Exception as e:  # noqa: BLE001
                self._errors = [ParserError("", "", f"failed to parse ONNX model: {e}")]
                return False
            return self._parse(model)

        def parse(self, model, path=None):
            return self._parse(onnx.load_model_from_string(bytes(model)))

        def _parse(self, model):
            errs = onnx_rules.parser_errors(model)
            if errs:
                self._errors = [ParserError(*e) for e in errs]
                return False
            g = model.graph
            init = {i.name for i in g.initializer}
            self._net._inputs = [ITensor(v.name, _dims(v), _dtype(v)) for v in g.input if v.name not in init]
            self._net._outputs = [ITensor(v.name, _dims(v), _dtype(v)) for v in g.output]
            self._net._onnx = model.SerializeToString()
            return True

    # -- builder ---------------------------------------------------------------------------------
    @strict("IOptimizationProfile")
    class IOptimizationProfile:
        def __init__(self):
            self._shapes, self._valid = {}, True

        def set_shape(self, input, min, opt, max):  # noqa: A002 - the real binding's keyword names
            lo, op, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
            log.append(("set_shape", input, lo, op, hi))
            if not (len(lo) == len(op) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, op, hi)) \
                    or any(a < 0 for a in lo):
                error(f"IOptimizationProfile::setDimensions: {input}: min {list(lo)} <= opt {list(op)} <= max "
                      f"{list(hi)} violated")
                self._valid = False
                return
            self._shapes[input] = (lo, op, hi)

        def get_shape(self, input):  # noqa: A002
            return [list(s) for s in self._shapes[input]]

    @strict("ITimingCache")
    class ITimingCache:
        def __init__(self, blob):
            self._blob = bytes(blob)

        def serialize(self):
            return self._blob

    @strict("IBuilderConfig")
    class IBuilderConfig:
        def __init__(self):
            self._pools, self._profiles, self._cache, self._flags = {}, [], None, set()

        def set_flag(self, flag):
            assert isinstance(flag, enums["BuilderFlag"]), f"set_flag: {flag!r} is not a BuilderFlag"
            log.append(("set_flag", flag.name))
            self._flags.add(flag.name)

        def set_memory_pool_limit(self, pool, pool_size):
            assert isinstance(pool, MemoryPoolType), f"set_memory_pool_limit: {pool!r} is not a MemoryPoolType"
            assert isinstance(pool_size, int) and pool_size >= 0
            log.append(("set_memory_pool_limit", pool.name, pool_size))
            self._pools[pool] = pool_size

        def add_optimization_profile(self, profile):
            assert isinstance(profile, IOptimizationProfile)
            log.append(("add_optimization_profile",))
            if not profile._valid or not profile._shapes:
                return -1
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            blob = bytes(serialized_timing_cache)
            log.append(("create_timing_cache", blob))
            return ITimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            assert isinstance(cache, ITimingCache) and isinstance(ignore_mismatch, bool)
            log.append(("set_timing_cache", cache._blob, ignore_mismatch))
            ok = cache._blob == b"" or cache._blob.startswith(f"TC{version}".encode())
            if ok:
                self._cache = cache
            return ok

        def get_timing_cache(self):
            log.append(("get_timing_cache",))
            return self._cache

    @strict("Builder")
    class Builder:
        def __init__(self, logger):
            assert isinstance(logger, Logger)
            if not gpu_ok:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            log.append(("Builder",))

        def create_network(self, flags=0):
            assert type(flags) is int, f"create_network takes an int bit mask, got {type(flags).__name__}"
            known = 0
            for f in NetFlag:
                known |= 1 << int(f)
            if flags & ~known:
                raise ValueError(f"create_network: unknown flag bits {flags & ~known:#x}")
            log.append(("create_network", flags))
            net = INetworkDefinition(flags)
            state.networks.append(net)
            return net

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            log.append(("build_serialized_network",))
            if network._onnx is None:
                error("network has no layers")
                return None
            dynamic = [t for t in network._inputs if -1 in t.shape]
            if dynamic and not config._profiles:
                error("Network has dynamic or shape inputs, but no optimization profile has been defined.")
                return None
            prof = config._profiles[0] if config._profiles else None
            for t in dynamic:
                if t.name not in prof._shapes:
                    error(f"optimization profile is missing values for input {t.name}")
                    return None
                for s in prof._shapes[t.name]:
                    if len(s) != len(t.shape) or any(d != -1 and d != v for d, v in zip(t.shape, s)):
                        error(f"profile shape {list(s)} of {t.name} does not match the network's {list(t.shape)}")
                        return None
            precision = config._flags & {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}
            if network._strongly_typed and precision:
                # "Use explicit quantization with Strong Typing. Precision-control build flags are not
                # required and should not be specified." (TensorRT docs, Explicit Quantization)
                error(f"precision flags {sorted(precision)} are not allowed with a strongly typed network")
                return None
            desc = {"version": version, "strongly_typed": network._strongly_typed,
                    "profile": {k: [list(x) for x in v] for k, v in (prof._shapes.items() if prof else ())},
                    "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network._inputs],
                    "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network._outputs]}
            if config._cache is not None:
                config._cache._blob = f"TC{version}".encode() if not config._cache._blob else config._cache._blob
            head = json.dumps(desc).encode()
            return MAGIC + len(head).to_bytes(4, "little") + head + network._onnx

    # -- runtime ---------------------------------------------------------------------------------
    @strict("ICudaEngine")
    class ICudaEngine:
        def __init__(self, desc, onnx_bytes):
            import onnxruntime as ort

            self._desc = desc
            self._io = {n: (tuple(s), DataType[d], TensorIOMode.INPUT) for n, s, d in desc["inputs"]}
            self._io.update({n: (tuple(s), DataType[d], TensorIOMode.OUTPUT) for n, s, d in desc["outputs"]})
            self._names = list(self._io)
            self._onnx = onnx.load_model_from_string(onnx_bytes)
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self._sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])

        num_io_tensors = property(lambda self: len(self._names))
        num_optimization_profiles = property(lambda self: 1)

        def get_tensor_name(self, index):
            if not 0 <= index < len(self._names):
                raise IndexError(index)
            return self._names[index]

        def _get(self, name):
            if name not in self._io:
                error(f"ICudaEngine: {name!r} is not an I/O tensor")
                return None
            return self._io[name]

        def get_tensor_mode(self, name):
            t = self._get(name)
            return TensorIOMode.NONE if t is None else t[2]

        def get_tensor_dtype(self, name):
            return self._get(name)[1]

        def get_tensor_shape(self, name):
            return self._get(name)[0]

        def get_tensor_profile_shape(self, name, profile_index):
            assert profile_index == 0 and name in self._desc["profile"], (name, profile_index)
            return [tuple(s) for s in self._desc["profile"][name]]

        def create_execution_context(self, strategy=None):
            ctx = IExecutionContext(self)
            state.contexts.append(ctx)
            return ctx

    @strict("IExecutionContext")
    class IExecutionContext:
        def __init__(self, engine):
            self._engine, self._shapes, self._addr = engine, {}, {}

        def set_input_shape(self, name, shape):
            # the real overloads take a tuple, a list or Dims
            assert isinstance(shape, (tuple, list)), f"set_input_shape: shape must be a tuple/list, got {shape!r}"
            shape = tuple(int(d) for d in shape)
            log.append(("set_input_shape", name, shape))
            e = self._engine
            if name not in e._io or e._io[name][2] != TensorIOMode.INPUT:
                error(f"set_input_shape: {name!r} is not an input")
                return False
            static = e._io[name][0]
            lo, _opt, hi = e._desc["profile"].get(name, (static, static, static))
            if len(shape) != len(static) or any(d != -1 and d != s for d, s in zip(static, shape)) or \
                    not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                error(f"set_input_shape: {list(shape)} is outside the profile [{lo}, {hi}] of {name!r}")
                return False
            self._shapes[name] = shape
            return True

        def _bindings(self):
            """symbol -> value from the input shapes set so far."""
            sym = {}
            for inp in self._engine._onnx.graph.input:
                if inp.name in self._shapes:
                    for d, v in zip(inp.type.tensor_type.shape.dim, self._shapes[inp.name]):
                        if d.dim_param:
                            sym[d.dim_param] = v
            return sym

        def get_tensor_shape(self, name):
            e = self._engine
            if name not in e._io:
                error(f"get_tensor_shape: {name!r} is not an I/O tensor")
                return (-1,)
            if e._io[name][2] == TensorIOMode.INPUT:
                return self._shapes.get(name, e._io[name][0])
            sym = self._bindings()
            vi = next(v for v in e._onnx.graph.output if v.name == name)
            return tuple(d.dim_value if d.HasField("dim_value") else sym.get(d.dim_param, -1)
                         for d in vi.type.tensor_type.shape.dim)

        def set_tensor_address(self, name, memory):
            if name not in self._engine._io:
                error(f"set_tensor_address: {name!r} is not an I/O tensor")
                return False
            assert isinstance(memory, int), f"set_tensor_address takes an int device pointer, got {memory!r}"
            self._addr[name] = memory
            return True

        def get_tensor_address(self, name):
            return self._addr.get(name, 0)

        def execute_async_v3(self, stream_handle):
            if type(stream_handle) is not int:
                raise TypeError(f"execute_async_v3(): incompatible function arguments: stream_handle must be int, "
                                f"got {type(stream_handle).__name__}")
            e = self._engine
            log.append(("execute_async_v3", stream_handle))
            for n, (shape, _dt, mode) in e._io.items():
                if mode == TensorIOMode.INPUT and -1 in shape and n not in self._shapes:
                    error(f"IExecutionContext::enqueueV3: input shape of {n!r} not specified")
                    return False
                if n not in self._addr:
                    error(f"IExecutionContext::enqueueV3: address of tensor {n!r} is not set")
                    return False
            if stream_handle not in cudart.streams:
                error(f"enqueueV3: invalid stream {stream_handle:#x}")
                return False
            addr = dict(self._addr)
            shapes = {n: self.get_tensor_shape(n) for n in e._names}
            types_ = {n: np.dtype(_NP[t[1].name]) for n, t in e._io.items()}

            def kernel():
                feeds = {}
                for n, (_s, _d, mode) in e._io.items():
                    if mode == TensorIOMode.INPUT:
                        dt, shp = types_[n], shapes[n]
                        raw = cudart.device_view(addr[n], int(np.prod(shp)) * dt.itemsize)
                        feeds[n] = np.frombuffer(raw, dtype=dt).reshape(shp).copy()
                outs = e._sess.run(None, feeds)
                for vi, val in zip(e._onnx.graph.output, outs):
                    val = np.ascontiguousarray(val, types_[vi.name])
                    assert val.shape == tuple(shapes[vi.name]), (vi.name, val.shape, shapes[vi.name])
                    cudart.device_view(addr[vi.name], val.nbytes)[:] = val.tobytes()
            cudart._enqueue(stream_handle, kernel, "enqueueV3")
            return True

    @strict("Runtime")
    class Runtime:
        def __init__(self, logger):
            assert isinstance(logger, Logger)

        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            log.append(("deserialize_cuda_engine", len(data)))
            if not data.startswith(MAGIC):
                error("Runtime::deserializeCudaEngine: the engine plan file is corrupted")
                return None
            n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
            desc = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + n])
            if desc["version"] != version:
                error(f"the engine plan file is not compatible with this version of TensorRT, expecting library "
                      f"version {version} got {desc['version']}")
                return None
            eng = ICudaEngine(desc, data[len(MAGIC) + 4 + n:])
            state.engines.append(eng)
            return eng

    def nptype(trt_type):
        return _NP[DataType(trt_type).name]

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.ICudaEngine, trt.IExecutionContext, trt.INetworkDefinition = ICudaEngine, IExecutionContext, INetworkDefinition
    trt.IBuilderConfig, trt.IOptimizationProfile, trt.ITimingCache = IBuilderConfig, IOptimizationProfile, ITimingCache
    trt.ITensor, trt.ParserError, trt.nptype = ITensor, ParserError, nptype
    missing = {k for k in vars(trt) if not k.startswith("_")} - trt._real_module
    assert not missing, f"fake tensorrt defines {sorted(missing)}, absent from TensorRT {version}"
    return trt


def install(monkeypatch, trt) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
