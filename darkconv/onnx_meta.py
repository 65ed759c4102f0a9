"""What darkconv stores in an ONNX file, read back: its ``metadata_props`` and the model spec.

:func:`darkconv.export.onnx.set_metadata` writes them; runners, ``export triton`` and the INT8
warning read them here (so that nothing that only reads an ONNX imports the exporter).
"""
from __future__ import annotations

import functools
import os

import onnx

from .darknet.spec import SPEC_KEY, ModelSpec, spec_from_json
from .errors import ExportError


def load_proto(path) -> onnx.ModelProto:
    """The ONNX graph of ``path`` without external data; a one-line :class:`ExportError` if unreadable."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise ExportError(f"cannot read: {e.strerror}", file=str(path)) from None
    except Exception:
        raise ExportError("not a valid ONNX file (corrupt, truncated, or another format)", file=str(path)) from None


def _summary(proto: onnx.ModelProto) -> tuple[dict[str, str], tuple[tuple[str, tuple[int, ...]], ...]]:
    """What darkconv reads from a graph: its ``metadata_props`` and its outputs' (name, dims) (0: symbolic)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    outputs = tuple((o.name, tuple(d.dim_value for d in o.type.tensor_type.shape.dim)) for o in proto.graph.output)
    return meta, outputs


@functools.lru_cache(maxsize=16)
def _file_summary(path: str, stamp: tuple[int, int, int]):
    return _summary(load_proto(path))


def _summary_of(proto_or_path):
    """:func:`_summary` of a graph, or of a file, parsed once per version of the file (a model is opened by
    several parts of darkconv: each would otherwise parse every weight again)."""
    if isinstance(proto_or_path, onnx.ModelProto):
        return _summary(proto_or_path)
    path = os.fspath(proto_or_path)
    try:
        st = os.stat(path)
    except OSError:
        return _summary(load_proto(path))                 # load_proto's one-line error
    return _file_summary(os.path.abspath(path), (st.st_ino, st.st_size, st.st_mtime_ns))


def read_metadata(proto_or_path) -> dict[str, str]:
    """``metadata_props`` as a dict."""
    return dict(_summary_of(proto_or_path)[0])


def onnx_precision(path) -> str:
    """fp32, fp16 or int8: what a darkconv ONNX computes in (its ``darkconv.precision`` metadata)."""
    p = read_metadata(path).get("darkconv.precision", "fp32")
    return "int8" if p.startswith("int8") else p


def read_spec(proto_or_path) -> ModelSpec:
    """The ModelSpec stored in an ONNX file by darkconv (ModelMismatch-style error if absent)."""
    meta, outputs = _summary_of(proto_or_path)
    where = None if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    if SPEC_KEY not in meta:
        raise ExportError("this ONNX has no darkconv metadata: export it with `darkconv convert`", file=where)
    spec = spec_from_json(meta[SPEC_KEY], where)
    if len(outputs) != len(spec.heads):
        raise ExportError(f"the {SPEC_KEY} metadata describes {len(spec.heads)} heads but the graph has "
                          f"{len(outputs)} outputs: re-export it with `darkconv convert`", file=where)
    by_name = dict(outputs)
    missing = [h.name for h in spec.heads if h.name not in by_name]
    if missing:
        raise ExportError(f"the graph's outputs are {list(by_name)} but the {SPEC_KEY} metadata needs "
                          f"{spec.head_names} (missing {missing}): re-export it with `darkconv convert`", file=where)
    for h in spec.heads:  # static dims must agree with the spec (0 = symbolic); outputs matched by name
        dims = list(by_name[h.name])
        want = [0, h.channels, *h.grid]
        if len(dims) == 4 and any(d and w and d != w for d, w in zip(dims, want)):
            raise ExportError(f"output {h.name} is {dims[1:]} but the {SPEC_KEY} metadata says "
                              f"{want[1:]} (channels, grid): re-export it with `darkconv convert`", file=where)
    return spec


