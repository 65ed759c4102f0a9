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
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import __version__
from ..darknet.spec import INPUT_NAME, SPEC_KEY, ModelSpec
from ..io import atomic_write
from ..errors import ExportError

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
