"""What darkconv stores in an ONNX file, read back: its ``metadata_props`` and the model spec.

:func:`darkconv.export.onnx.set_metadata` writes them; runners, ``export triton`` and the INT8
warning read them here (so that nothing that only reads an ONNX imports the exporter).
"""
from __future__ import annotations

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


def read_metadata(proto_or_path) -> dict[str, str]:
    """``metadata_props`` as a dict."""
    proto = proto_or_path if isinstance(proto_or_path, onnx.ModelProto) else load_proto(proto_or_path)
    return {p.key: p.value for p in proto.metadata_props}


def onnx_precision(path) -> str:
    """fp32, fp16 or int8: what a darkconv ONNX computes in (its ``darkconv.precision`` metadata)."""
    p = read_metadata(path).get("darkconv.precision", "fp32")
    return "int8" if p.startswith("int8") else p


def read_spec(proto_or_path) -> ModelSpec:
    """The ModelSpec stored in an ONNX file by darkconv (ModelMismatch-style error if absent)."""
    proto = proto_or_path if isinstance(proto_or_path, onnx.ModelProto) else load_proto(proto_or_path)
    meta = read_metadata(proto)
    where = None if isinstance(proto_or_path, onnx.ModelProto) else str(proto_or_path)
    if SPEC_KEY not in meta:
        raise ExportError("this ONNX has no darkconv metadata: export it with `darkconv convert`", file=where)
    spec = spec_from_json(meta[SPEC_KEY], where)
    outputs = list(proto.graph.output)
    if len(outputs) != len(spec.heads):
        raise ExportError(f"the {SPEC_KEY} metadata describes {len(spec.heads)} heads but the graph has "
                          f"{len(outputs)} outputs: re-export it with `darkconv convert`", file=where)
    by_name = {o.name: o for o in outputs}
    missing = [h.name for h in spec.heads if h.name not in by_name]
    if missing:
        raise ExportError(f"the graph's outputs are {list(by_name)} but the {SPEC_KEY} metadata needs "
                          f"{spec.head_names} (missing {missing}): re-export it with `darkconv convert`", file=where)
    for h in spec.heads:  # static dims must agree with the spec (0 = symbolic); outputs matched by name
        out = by_name[h.name]
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        want = [0, h.channels, *h.grid]
        if len(dims) == 4 and any(d and w and d != w for d, w in zip(dims, want)):
            raise ExportError(f"output {out.name} is {dims[1:]} but the {SPEC_KEY} metadata says "
                              f"{want[1:]} (channels, grid): re-export it with `darkconv convert`", file=where)
    return spec


