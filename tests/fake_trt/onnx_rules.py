"""What TensorRT's ONNX parser refuses, as far as a darkconv YOLO graph can contain it.

Independent of darkconv's own checks (export/quantize.py): written from NVIDIA's documentation,
so a test that feeds darkconv's output through the fake parser compares two implementations.

Q/DQ rules (TensorRT operator reference, "Quantize" and "Dequantize",
https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html and .../Dequantize.html;
"Working with Quantized Types": TensorRT quantization is symmetric):
- the scale must be a build-time constant (initializer / Constant), a scalar (per-tensor) or a 1-D
  tensor (per-channel); a zero_point, if given, has the scale's shape and only zero values;
- QuantizeLinear outputs int8 / float8 / int4 (no uint8), so the zero point type must be one of those;
- DequantizeLinear takes int8 / float8 / int4 (an INT32 bias DequantizeLinear is not importable);
- activations are quantized per-tensor; per-channel scales only on constant weights
  ("Quantization Workflows": INT8 activations per-tensor, weights per-tensor or per-channel).
Other ops: Resize coordinate modes ``half_pixel_symmetric`` and ``tf_crop_and_resize`` are not
supported (TensorRT's onnx-tensorrt operator support matrix; shared/tensorrt-notes.md).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

Q_OUT_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}


def _constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    c = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    c[n.output[0]] = numpy_helper.to_array(a.t)
    return c


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    t = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


def parser_errors(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node name, op type, message) for each node TensorRT's parser would refuse."""
    g = model.graph
    consts, types_ = _constants(g), _types(model)
    errs = []
    for n in g.node:
        def bad(msg):
            errs.append((n.name, n.op_type, msg))

        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale_name = n.input[1]
            if scale_name not in consts:
                bad(f"scale {scale_name!r} is not a build-time constant")
                continue
            scale = consts[scale_name]
            if scale.ndim > 1:
                bad(f"scale must be a scalar or 1-D, got shape {list(scale.shape)}")
            zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
            if zp_name is not None:
                if zp_name not in consts:
                    bad(f"zero point {zp_name!r} is not a build-time constant")
                    continue
                zp = consts[zp_name]
                if zp.shape != scale.shape:
                    bad(f"zero point shape {list(zp.shape)} differs from scale shape {list(scale.shape)}")
                if np.any(zp.astype(np.float64) != 0):
                    bad("zero point must be 0 (TensorRT quantization is symmetric)")
                zp_type = types_.get(zp_name)
                if n.op_type == "QuantizeLinear" and zp_type not in Q_OUT_TYPES:
                    bad(f"QuantizeLinear output type {TensorProto.DataType.Name(zp_type)} is not supported "
                        f"(int8/float8/int4 only)")
            x_type = types_.get(n.input[0])
            if n.op_type == "DequantizeLinear" and x_type not in Q_OUT_TYPES:
                name = TensorProto.DataType.Name(x_type) if x_type else "unknown"
                bad(f"DequantizeLinear input type {name} is not supported (int8/float8/int4 only)")
            is_weight = n.input[0] in consts or (n.op_type == "DequantizeLinear" and _from_const_q(g, n, consts))
            if scale.ndim == 1 and scale.size > 1 and not is_weight:
                bad("per-channel scale on an activation: activations are quantized per-tensor")
        elif n.op_type == "Resize":
            for a in n.attribute:
                if a.name == "coordinate_transformation_mode" and a.s.decode() in ("half_pixel_symmetric",
                                                                                    "tf_crop_and_resize"):
                    bad(f"coordinate_transformation_mode {a.s.decode()} is unsupported")
    return errs


def _from_const_q(g, dq, consts) -> bool:
    """A DequantizeLinear fed (directly) by a QuantizeLinear of a constant: a weight pair."""
    for n in g.node:
        if n.op_type == "QuantizeLinear" and dq.input[0] in n.output:
            return n.input[0] in consts
    return False
