"""Export a DarknetModel to ONNX: fused BN, dynamic batch, raw head outputs, self-describing metadata.

The graph uses only ops on TensorRT's ONNX-parser list (Conv, LeakyRelu, Sigmoid, Mish,
MaxPool, Resize nearest, Slice, Concat, Add, Mul, ...). The model spec (anchors, masks,
classes, scale_x_y, new_coords, NMS kind, letter_box, input size, class names,
source hashes) goes into ``metadata_props`` under ``darkconv.spec``.
"""
from __future__ import annotations

import copy
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import __version__
from ..darknet.spec import ModelSpec
from ..io import atomic_write
from ..errors import ExportError

INPUT_NAME = "images"
SPEC_KEY = "darkconv.spec"
DEFAULT_OPSET = 18
PROTOBUF_LIMIT = 2**31 - 2**24  # bytes of inline weights an ONNX protobuf can hold (with room for the graph)


def head_names(spec: ModelSpec) -> list[str]:
    """Stable output names: ``head_<darknet layer index>``, in cfg order (:attr:`HeadSpec.name`)."""
    return spec.head_names


def to_onnx_model(model, *, batch: str | int = "dynamic", opset: int = DEFAULT_OPSET,
                  spec: ModelSpec | None = None) -> onnx.ModelProto:
    """Trace ``model`` (a DarknetModel; BN is folded on a copy) into a clean FP32 ONNX model."""
    import torch

    spec = spec or model.spec
    size = model.count_floats() * 4
    if size > PROTOBUF_LIMIT:  # torch.onnx.export would fail deep inside with a multi-line message
        raise ExportError(f"the model's weights need {size / 1e9:.2f} GB, above the 2 GB an ONNX file can hold "
                          "inline (protobuf's limit): darkconv does not write external-data ONNX files")
    m = copy.deepcopy(model).float().eval().fuse()
    n = 1 if batch == "dynamic" else int(batch)
    x = torch.zeros(n, spec.channels, spec.height, spec.width)
    buf = io.BytesIO()
    outputs = head_names(spec)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # TorchScript exporter: ~2x faster than dynamo here and, since every layer uses static
            # sizes (no x.shape arithmetic), just as clean: Conv, LeakyRelu, MaxPool, Slice, Concat, ...
            torch.onnx.export(m, (x,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=outputs, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
                              if batch == "dynamic" else None)
        except Exception as e:  # pragma: no cover - exporter internals
            raise ExportError(f"torch.onnx.export failed: {e}") from e
    proto = onnx.load_from_string(buf.getvalue())
    clean_graph(proto)
    set_metadata(proto, spec)
    return proto


def clean_graph(proto: onnx.ModelProto) -> None:
    """Constant nodes -> initializers, Identity nodes removed; keeps the graph minimal for TensorRT."""
    g = proto.graph
    rename: dict[str, str] = {}
    keep = []
    inits = {i.name for i in g.initializer}
    graph_outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            inits.add(t.name)
            continue
        if node.op_type == "Identity" and node.output[0] not in graph_outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            continue
        keep.append(node)
    for node in keep:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    del g.value_info[:]
    used = {i for node in g.node for i in node.input}
    alive = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(alive)


def set_metadata(proto: onnx.ModelProto, spec: ModelSpec) -> None:
    props = {
        SPEC_KEY: spec.to_json(),
        "darkconv.version": __version__,
        "darkconv.input": f"{INPUT_NAME} float32 (N,{spec.channels},{spec.height},{spec.width}) RGB [0,1] "
                          f"{'letterboxed' if spec.letter_box else 'stretched'} (Darknet resize)",
        "darkconv.outputs": json.dumps({n: {"kind": h.kind, "anchors": h.anchors, "classes": h.classes}
                                        for n, h in zip(head_names(spec), spec.heads)}),
    }
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    proto.producer_name, proto.producer_version = "darkconv", __version__
    proto.doc_string = "Darknet model exported by darkconv; raw head tensors, decode with darkconv.postprocess"


def read_spec(proto_or_path) -> ModelSpec:
    """The ModelSpec stored in an ONNX file by darkconv (ModelMismatch-style error if absent)."""
    if isinstance(proto_or_path, onnx.ModelProto):
        proto = proto_or_path
    else:
        try:
            proto = onnx.load(str(proto_or_path), load_external_data=False)
        except OSError as e:
            raise ExportError(f"cannot read: {e.strerror}", file=str(proto_or_path)) from None
        except Exception:
            raise ExportError("not a valid ONNX file (corrupt, truncated, or another format)",
                              file=str(proto_or_path)) from None
    meta = {p.key: p.value for p in proto.metadata_props}
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


def spec_from_json(text: str, where: str | None = None) -> ModelSpec:
    """A ModelSpec from its stored JSON, checked so that the postprocessor can use it as it is: a
    damaged or hand-edited spec is a one-line :class:`ExportError`, never a KeyError or IndexError later."""
    def bad(why: str) -> ExportError:
        return ExportError(f"the {SPEC_KEY} metadata is invalid ({why}): re-export it with `darkconv convert`",
                           file=where)

    try:
        raw = json.loads(text)
    except ValueError as e:
        raise bad(f"not JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise bad(f"a JSON {type(raw).__name__}, not an object")
    try:
        spec = ModelSpec.from_dict(raw)
    except KeyError as e:
        raise bad(f"missing {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise bad(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if not (spec.width >= 1 and spec.height >= 1 and spec.channels >= 1):
        raise bad(f"input {spec.width}x{spec.height}x{spec.channels}")
    if not spec.heads:
        raise bad("no heads")
    from ..darknet.spec import NMS_KINDS

    for k, h in enumerate(spec.heads):
        ok = (h.kind in ("yolo", "region") and isinstance(h.classes, int) and h.classes >= 1 and h.anchors
              and all(len(a) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in a)
                      for a in h.anchors)
              and len(h.grid) == 2 and all(isinstance(g, int) and g >= 1 for g in h.grid)
              and h.nms_kind in NMS_KINDS and isinstance(h.scale_x_y, (int, float)) and math.isfinite(h.scale_x_y)
              and isinstance(h.beta_nms, (int, float)) and math.isfinite(h.beta_nms))
        if not ok:
            raise bad(f"head {k} ({h.kind}, classes={h.classes!r}, {len(h.anchors)} anchors, grid {h.grid!r})")
    return spec


# -- FP16 -------------------------------------------------------------------------------
def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and activations, FP32 inputs/outputs kept (Cast at both ends)."""
    p = copy.deepcopy(proto)
    g = p.graph
    # tensors that must stay FP32 / integer: Resize roi & scales
    keep32 = set()
    for node in g.node:
        if node.op_type == "Resize":
            keep32.update(node.input[1:3])
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep32:
            arr = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    inp = g.input[0].name
    cast_in = helper.make_node("Cast", [inp], [inp + "_fp16"], to=TensorProto.FLOAT16, name="cast_input_fp16")
    for node in g.node:
        for k, name in enumerate(node.input):
            if name == inp:
                node.input[k] = inp + "_fp16"
    casts_out = []
    for out in g.output:
        for node in g.node:
            for k, name in enumerate(node.output):
                if name == out.name:
                    node.output[k] = out.name + "_fp16"
        casts_out.append(helper.make_node("Cast", [out.name + "_fp16"], [out.name], to=TensorProto.FLOAT,
                                          name=f"cast_{out.name}_fp32"))
    nodes = [cast_in] + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    p.metadata_props.append(onnx.StringStringEntryProto(key="darkconv.precision", value="fp16"))
    return p


def save(proto: onnx.ModelProto, path: str | Path) -> Path:
    """Check the model, then write it atomically (weights inline)."""
    path = Path(path)
    try:
        onnx.checker.check_model(proto)  # the test suite runs full_check (strict shape inference)
    except Exception as e:
        raise ExportError(f"the exported ONNX fails onnx.checker: {e}") from e
    atomic_write(path, [proto.SerializeToString()])
    return path


def export_onnx(model, path: str | Path, *, precision: str = "fp32", batch: str | int = "dynamic",
                opset: int = DEFAULT_OPSET, names=None, spec: ModelSpec | None = None,
                calib_images=None, calib_method: str | None = None, int8_target: str = "tensorrt",
                int8_recipe: str | None = None, progress=None) -> Path:
    """Export ``model`` to ``path`` in the given precision ('fp32', 'fp16', 'int8').

    INT8 needs ``calib_images`` (paths or HxWx3 uint8 RGB arrays); the recipe is ``int8_recipe`` or the
    one export/quantize.py chooses for ``int8_target`` on this CPU (held-out checks: darkconv.int8).
    """
    spec = spec or model.spec
    if names:
        spec = spec.with_names(names)
    proto = to_onnx_model(model, batch=batch, opset=opset, spec=spec)
    if precision == "fp32":
        return save(proto, path)
    if precision == "fp16":
        return save(to_fp16(proto), path)
    if precision == "int8":
        from .quantize import quantize_int8
        return quantize_int8(proto, path, spec, calib_images, method=calib_method, target=int8_target,
                             recipe_name=int8_recipe, progress=progress)
    raise ExportError(f"unknown precision {precision!r}: choose fp32, fp16 or int8")
