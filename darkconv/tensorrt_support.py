"""What the TensorRT engine builder and the TensorRT runner share: lazy imports of ``tensorrt`` and
cuda-python, CUDA error checks, the GPU description, and the engine's JSON sidecar (what an engine belongs to:
TensorRT version, GPU, compute capability, precision, batch range, spec, source hashes).

One home for both sides, so that the runner does not import the exporter (``export/tensorrt.py`` builds,
``runners/tensorrt.py`` runs). Nothing heavy is imported at module level.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .darknet.spec import INPUT_NAME, ModelSpec
from .errors import BackendUnavailable, DarkconvError, ExportError, ModelMismatch
from .io import atomic_write, sha256_file

INSTALL_HINT = "pip install 'darkconv[trt]' (needs an NVIDIA GPU and driver)"
REBUILD_HINT = "rebuild with darkconv convert --engine"
PRECISIONS = ("fp32", "fp16", "int8")
SIDECAR_SUFFIX = ".json"


class CudaError(DarkconvError):
    """A CUDA runtime call failed (out of memory, bad launch, ...)."""


# -- lazy imports ---------------------------------------------------------------------
def _import_tensorrt():
    """``import tensorrt`` or raise BackendUnavailable with the install hint."""
    try:
        import tensorrt as trt
    except ImportError as e:  # also catches a broken install (missing libnvinfer)
        raise BackendUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from e
    return trt


def _import_cudart(required: bool = True):
    """cuda-python's runtime module: ``cuda.bindings.runtime`` (cuda-python >= 12.6),
    else ``cuda.cudart`` (older cuda-python). None when absent and not ``required``."""
    try:
        from cuda.bindings import runtime as cudart
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.6
        return cudart
    except ImportError as e:
        if not required:
            return None
        raise BackendUnavailable(f"cuda-python is not installed: {INSTALL_HINT}") from e


def trt_available() -> str | None:
    """The installed TensorRT version, or None when ``import tensorrt`` fails."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(getattr(trt, "__version__", "unknown"))


def require_tensorrt() -> tuple[str, str, str]:
    """(TensorRT version, GPU name, compute capability), or BackendUnavailable saying what is missing.

    The CLI calls this before any work, so a missing TensorRT/GPU leaves nothing half-written.
    """
    trt = _import_tensorrt()
    name, cc = gpu_info()
    return str(getattr(trt, "__version__", "unknown")), name, cc


def refuse_non_tensorrt_int8(onnx_path) -> None:
    """An INT8 ONNX made for ONNX Runtime (U8 activations, non-zero zero points, INT32 bias) must never
    reach TensorRT's builder: ExportError naming the file and the fix."""
    import onnx

    from .export.quantize import tensorrt_refusal

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX at all: TensorRT's parser will say so
        return
    if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        return
    why = tensorrt_refusal(proto)
    if why:
        raise ExportError(why, file=str(onnx_path))


# -- CUDA helpers (shared with the runner) ---------------------------------------------
def _err_name(err) -> str:
    return getattr(err, "name", None) or str(err)


def _check_cuda(result, what: str = "CUDA call"):
    """Unpack a cuda-python result ``(err, *values)`` (or a bare error code).

    Raises :class:`CudaError` naming the call and CUDA's own description when the
    code is not success (0); returns None, the single value, or the tuple of values.
    """
    if isinstance(result, tuple):
        err, values = (result[0], result[1:]) if result else (0, ())
    else:
        err, values = result, ()
    if int(err) != 0:
        desc = ""
        cudart = _import_cudart(required=False)
        if cudart is not None:
            try:
                e2, text = cudart.cudaGetErrorString(err)
                if int(e2) == 0 and text:
                    desc = ": " + (text.decode() if isinstance(text, bytes) else str(text))
            except Exception:  # noqa: BLE001 - the description is best effort
                pass
        raise CudaError(f"{what} failed with {_err_name(err)} ({int(err)}){desc}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device ``device``.

    Uses cuda-python when installed, else torch.cuda; raises BackendUnavailable
    naming what is missing (package, driver or device).
    """
    cudart = _import_cudart(required=False)
    if cudart is not None:
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0:
            raise BackendUnavailable(
                f"no usable CUDA device: cudaGetDeviceCount returned {_err_name(err)} "
                f"(is the NVIDIA driver installed and new enough?); {INSTALL_HINT}")
        if count <= device:
            raise BackendUnavailable(f"no CUDA GPU found (device count {count}); TensorRT needs an NVIDIA GPU")
        prop = _check_cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name
        name = name.decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)
        return name.split("\x00", 1)[0].strip(), f"{prop.major}.{prop.minor}"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.device_count() > device:
        major, minor = torch.cuda.get_device_capability(device)
        return torch.cuda.get_device_name(device), f"{major}.{minor}"
    if torch is None:
        raise BackendUnavailable(f"cannot query the GPU: neither cuda-python nor torch is installed; {INSTALL_HINT}")
    raise BackendUnavailable(f"no CUDA GPU found (cuda-python is not installed and torch sees no CUDA device); "
                             f"{INSTALL_HINT}")


# -- sidecar --------------------------------------------------------------------------
def sidecar_path(engine_path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _norm_batch(batch) -> tuple[int, int, int]:
    if isinstance(batch, int):
        batch = (batch, batch, batch)
    try:
        b = tuple(int(x) for x in batch)
    except (TypeError, ValueError):
        raise ExportError(f"batch must be an int or (min, opt, max), got {batch!r}") from None
    if len(b) != 3 or not (1 <= b[0] <= b[1] <= b[2]):
        raise ExportError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch!r}")
    return b  # type: ignore[return-value]


def make_sidecar(spec: ModelSpec, *, precision: str, batch=(1, 1, 1), trt_version: str, gpu: str, cc: str,
                 cfg_sha256: str | None = None, weights_sha256: str | None = None,
                 onnx_sha256: str | None = None, engine_sha256: str | None = None) -> dict:
    """The metadata written beside an engine (pure: no I/O; JSON types only)."""
    b = _norm_batch(batch)
    d = {
        "darkconv": __version__,
        "tensorrt": str(trt_version),
        "gpu": str(gpu),
        "compute_capability": str(cc),
        "precision": str(precision),
        "input": {"name": INPUT_NAME, "shape": [spec.channels, spec.height, spec.width], "batch": list(b)},
        "spec": spec.to_dict(),
        "cfg_sha256": cfg_sha256,
        "weights_sha256": weights_sha256,
        "onnx_sha256": onnx_sha256,
    }
    if engine_sha256 is not None:
        d["engine_sha256"] = engine_sha256
    return json.loads(json.dumps(d))  # JSON-normalised (tuples -> lists): equal to what read_sidecar returns


def write_sidecar(path, sidecar: dict) -> None:
    """Write ``sidecar`` as JSON to ``path`` atomically (temp file + rename)."""
    text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
    atomic_write(path, [text.encode()])


def read_sidecar(engine_path) -> dict:
    """Read ``<engine>.json``; ModelMismatch when it is missing or unreadable."""
    p = sidecar_path(engine_path)
    if not p.is_file():
        raise ModelMismatch(f"no sidecar {p.name} beside the engine, so darkconv cannot tell which model, "
                            f"TensorRT version and GPU it was built for; {REBUILD_HINT}", file=str(engine_path))
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelMismatch(f"sidecar {p.name} is not valid JSON ({e}); {REBUILD_HINT}", file=str(engine_path)) from e
    if not isinstance(d, dict) or "tensorrt" not in d or "spec" not in d:
        raise ModelMismatch(f"sidecar {p.name} is not a darkconv engine sidecar; {REBUILD_HINT}",
                            file=str(engine_path))
    return d


def _trt_triplet(v) -> tuple[str, ...]:
    """'10.13.3.9' -> ('10', '13', '3'): engines are tied to major.minor.patch."""
    return tuple(str(v).split("+")[0].split(".")[:3])


def _short(v) -> str:
    s = "none recorded" if v is None else str(v)
    return s[:12] + "…" if len(s) == 64 and all(c in "0123456789abcdef" for c in s) else s


def check_sidecar(sidecar: dict, *, trt_version: str, gpu: str, cc: str, cfg_sha256: str | None = None,
                  weights_sha256: str | None = None, spec: ModelSpec | None = None,
                  engine_path=None) -> None:
    """Refuse (ModelMismatch, one line) an engine built for another TensorRT, GPU or model.

    TensorRT version is compared on major.minor.patch, the GPU on name and compute
    capability; cfg/weights sha256 only when the caller passes them; ``spec`` (when
    given) must have the engine's input size and heads.
    """
    def refuse(field, engine_val, current_val, what="this machine has"):
        raise ModelMismatch(f"engine does not match: {field} is {_short(engine_val)} in the engine but "
                            f"{what} {_short(current_val)}; TensorRT engines are tied to the TensorRT version, "
                            f"GPU and model they were built with: {REBUILD_HINT}",
                            file=str(engine_path) if engine_path else None)

    if _trt_triplet(sidecar.get("tensorrt")) != _trt_triplet(trt_version):
        refuse("tensorrt", sidecar.get("tensorrt"), trt_version)
    if str(sidecar.get("compute_capability")) != str(cc):
        refuse("compute_capability", sidecar.get("compute_capability"), cc)
    if str(sidecar.get("gpu")) != str(gpu):
        refuse("gpu", sidecar.get("gpu"), gpu)
    if cfg_sha256 is not None and sidecar.get("cfg_sha256") != cfg_sha256:
        refuse("cfg_sha256", sidecar.get("cfg_sha256"), cfg_sha256, "the given cfg has")
    if weights_sha256 is not None and sidecar.get("weights_sha256") != weights_sha256:
        refuse("weights_sha256", sidecar.get("weights_sha256"), weights_sha256, "the given weights have")
    if spec is not None:
        eng = ModelSpec.from_dict(sidecar["spec"])
        if (eng.channels, eng.height, eng.width) != (spec.channels, spec.height, spec.width):
            refuse("input shape", f"{eng.channels}x{eng.height}x{eng.width}",
                   f"{spec.channels}x{spec.height}x{spec.width}", "the model has")
        if [(h.layer, h.channels) for h in eng.heads] != [(h.layer, h.channels) for h in spec.heads]:
            refuse("heads", [h.layer for h in eng.heads], [h.layer for h in spec.heads], "the model has")


# -- build ----------------------------------------------------------------------------
def _source_shas(spec: ModelSpec, source: dict | None) -> tuple[str | None, str | None]:
    """cfg/weights sha256 from ``source`` (``cfg_sha256``/``weights_sha256``, or ``cfg``/``weights``
    paths to hash), falling back to the paths recorded in ``spec.source``."""
    out = []
    for key in ("cfg", "weights"):
        val = None
        for src in (source or {}, spec.source or {}):
            if src.get(f"{key}_sha256"):
                val = str(src[f"{key}_sha256"])
            elif src.get(key):
                val = sha256_file(src[key])
            if val:
                break
        out.append(val)
    return out[0], out[1]
