"""ONNX -> TensorRT engine, with a JSON sidecar that says what the engine belongs to.

Targets TensorRT 10.x and 11.x (see shared/tensorrt-notes.md): the network is
created strongly typed where the flag still exists (10.x; it is the only mode in
11), so precision is decided by the ONNX that is fed in (FP32 export, FP16
export, or INT8 Q/DQ export): there are no builder precision flags and no
calibrators here. The batch axis gets one optimization profile (min/opt/max).

TensorRT engines are not portable across TensorRT versions or GPU
architectures, so every engine is written with ``<engine>.json`` beside it
(TensorRT version, GPU name, compute capability, precision, input shape, the
model spec and the sha256 of cfg / weights / ONNX) and
:class:`darkconv.runners.tensorrt.TensorRTRunner` refuses an engine whose
sidecar does not match the machine or the model at hand.

Nothing heavy is imported at module level: ``tensorrt`` and ``cuda-python`` are
imported inside the functions that need them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..darknet.spec import INPUT_NAME, ModelSpec
from ..errors import BackendUnavailable, ExportError, ModelMismatch
from ..io import atomic_write, sha256_file
from ..tensorrt_support import (  # noqa: F401 - shared with runners/tensorrt.py; re-exported for callers
    INSTALL_HINT,
    PRECISIONS,
    REBUILD_HINT,
    SIDECAR_SUFFIX,
    CudaError,
    _check_cuda,
    _err_name,
    _import_cudart,
    _import_tensorrt,
    _norm_batch,
    _short,
    _source_shas,
    _trt_triplet,
    check_sidecar,
    gpu_info,
    make_sidecar,
    read_sidecar,
    refuse_non_tensorrt_int8,
    require_tensorrt,
    sidecar_path,
    trt_available,
    write_sidecar,
)


def _parser_errors(parser) -> list[str]:
    errs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        try:
            where = []
            if hasattr(e, "node_name") and e.node_name():
                where.append(str(e.node_name()))
            if hasattr(e, "node_operator") and e.node_operator():
                where.append(str(e.node_operator()))
            msg = str(e.desc()) if hasattr(e, "desc") else str(e)
            errs.append(f"[{' '.join(where)}] {msg}" if where else msg)
        except Exception:  # noqa: BLE001 - fall back to the binding's own formatting
            errs.append(str(e))
    return errs


def _network_input(network, onnx_path):
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for t in inputs:
        if t.name == INPUT_NAME:
            return t
    raise ExportError(f"the ONNX has no input named {INPUT_NAME!r} (inputs: {[t.name for t in inputs]}); "
                      f"export it with darkconv", file=str(onnx_path))


def build_engine(onnx_path, engine_path, spec: ModelSpec, precision: str, batch=(1, 1, 1),
                 workspace_gb: float = 4.0, timing_cache: str | None = None, source: dict | None = None,
                 log=print) -> dict:
    """Build a TensorRT engine from ``onnx_path`` and write it (plus ``<engine>.json``) atomically.

    ``precision`` is recorded, not applied: the network is strongly typed, so the
    ONNX's own dtypes decide it (feed the FP16 export or the INT8 Q/DQ export).
    ``batch`` is (min, opt, max) of the one optimization profile (an int n means (n, n, n)).
    ``source`` may give ``cfg_sha256``/``weights_sha256`` or ``cfg``/``weights`` paths to hash
    (default: the paths in ``spec.source``). ``log=None`` is silent. Returns the sidecar.
    """
    if log is None:
        log = lambda *_a, **_k: None
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    b = _norm_batch(batch)
    if Path(onnx_path).is_file():  # before TensorRT is even imported: a U8S8 model never reaches the builder
        refuse_non_tensorrt_int8(onnx_path)
    trt = _import_tensorrt()
    gpu, cc = gpu_info()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ExportError("ONNX file not found", file=str(onnx_path))

    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:
        raise BackendUnavailable(f"TensorRT could not create a builder ({e}); is the GPU usable?") from e
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # 10.x: needed; 11.x: the only mode, flag ignored
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = _parser_errors(parser) or ["(the parser reported no details)"]
        raise ExportError(f"TensorRT's ONNX parser rejected the model ({len(errs)} error(s)): " + " | ".join(errs),
                          file=str(onnx_path))

    inp = _network_input(network, onnx_path)
    dims = tuple(int(d) for d in inp.shape)
    chw = (spec.channels, spec.height, spec.width)
    if len(dims) != 4 or any(d not in (-1, want) for d, want in zip(dims[1:], chw)):
        raise ModelMismatch(f"the ONNX input {INPUT_NAME!r} is {list(dims)} but the model spec expects "
                            f"[N, {chw[0]}, {chw[1]}, {chw[2]}]", file=str(onnx_path))
    if dims[0] != -1 and b != (dims[0],) * 3:
        raise ExportError(f"the ONNX has a fixed batch of {dims[0]} but batch {list(b)} was asked for; "
                          f"export the ONNX with a dynamic batch", file=str(onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (b[0], *chw), (b[1], *chw), (b[2], *chw))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"timing cache {cache_path} was made by another TensorRT/GPU; starting a fresh one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        elif blob:
            log(f"timing cache: loaded {cache_path} ({len(blob)} bytes)")

    log(f"building TensorRT {trt.__version__} engine ({precision}, batch {b[0]}/{b[1]}/{b[2]}, "
        f"{chw[2]}x{chw[1]}) on {gpu} (sm {cc}); this can take minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)", file=str(onnx_path))
    data = bytes(memoryview(serialized))
    if not data:
        raise ExportError("TensorRT returned an empty engine", file=str(onnx_path))

    if cache_path is not None:
        atomic_write(cache_path, [bytes(memoryview(config.get_timing_cache().serialize()))])

    cfg_sha, weights_sha = _source_shas(spec, source)
    sidecar = make_sidecar(spec, precision=precision, batch=b, trt_version=trt.__version__, gpu=gpu, cc=cc,
                           cfg_sha256=cfg_sha, weights_sha256=weights_sha, onnx_sha256=sha256_file(onnx_path),
                           engine_sha256=hashlib.sha256(data).hexdigest())
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_path(engine_path)
    atomic_write(engine_path, [data])
    try:
        write_sidecar(side, sidecar)
    except BaseException:
        engine_path.unlink(missing_ok=True)  # an engine without its sidecar would be refused anyway
        raise
    log(f"wrote {engine_path} ({len(data) / 1e6:.1f} MB) and {side.name}")
    return sidecar
