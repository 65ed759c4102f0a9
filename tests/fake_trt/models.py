"""Tiny ONNX models with darkconv's I/O contract (input ``images`` [N,3,H,W], outputs ``head_<layer>``).

Each head is one strided Conv (kernel = stride = input/grid), seeded weights: cheap on ONNX Runtime,
and every output element depends on the input, so a wrong buffer or a stale copy changes numbers.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx(spec, *, fp16: bool = False, qdq: dict | None = None, dynamic: bool = True, seed: int = 0,
              reverse_outputs: bool = True) -> onnx.ModelProto:
    """``qdq``: None, or Q/DQ settings for the input activation and the conv weights:
    {"act_zp": 0, "zp_type": INT8, "act_channels": False, "bias_int32": False, "weight_axis": 0}."""
    rng = np.random.default_rng(seed)
    c, h, w = spec.channels, spec.height, spec.width
    batch = "N" if dynamic else 1
    ft = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    npf = np.float16 if fp16 else np.float32
    nodes, inits, outputs = [], [], []
    x = "images"
    if qdq is not None:
        q = dict({"act_zp": 0, "zp_type": TensorProto.INT8, "act_channels": False, "bias_int32": False}, **qdq)
        scale = np.full((c,), 0.02, np.float32) if q["act_channels"] else np.array(0.02, np.float32)
        zp_np = np.uint8 if q["zp_type"] == TensorProto.UINT8 else np.int8
        zp = np.full(scale.shape, q["act_zp"], zp_np)
        inits += [numpy_helper.from_array(scale, "in_scale"), numpy_helper.from_array(zp, "in_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["images", "in_scale", "in_zp"], ["images_q"], name="in_q",
                                   axis=1),
                  helper.make_node("DequantizeLinear", ["images_q", "in_scale", "in_zp"], ["images_dq"], name="in_dq",
                                   axis=1)]
        x = "images_dq"
    for hd in spec.heads:
        gh, gw = hd.grid
        kh, kw = h // gh, w // gw
        wt = (rng.standard_normal((hd.channels, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(npf)
        b = rng.standard_normal(hd.channels).astype(npf)
        wname, bname = f"w{hd.layer}", f"b{hd.layer}"
        conv_in = [x, wname, bname]
        if qdq is not None:
            ws = (np.abs(wt.astype(np.float32)).reshape(hd.channels, -1).max(1) / 127).astype(np.float32)
            wq = np.clip(np.round(wt / ws[:, None, None, None]), -127, 127).astype(np.int8)
            inits += [numpy_helper.from_array(wq, wname + "_q"), numpy_helper.from_array(ws, wname + "_s"),
                      numpy_helper.from_array(np.zeros_like(ws, np.int8), wname + "_zp")]
            nodes.append(helper.make_node("DequantizeLinear", [wname + "_q", wname + "_s", wname + "_zp"], [wname],
                                          name=f"{wname}_dq", axis=0))
            if q["bias_int32"]:
                bq = np.round(b / (0.02 * ws)).astype(np.int32)
                inits += [numpy_helper.from_array(bq, bname + "_q"),
                          numpy_helper.from_array((0.02 * ws).astype(np.float32), bname + "_s"),
                          numpy_helper.from_array(np.zeros_like(bq), bname + "_zp")]
                nodes.append(helper.make_node("DequantizeLinear", [bname + "_q", bname + "_s", bname + "_zp"],
                                              [bname], name=f"{bname}_dq", axis=0))
            else:
                inits.append(numpy_helper.from_array(b, bname))
        else:
            inits += [numpy_helper.from_array(wt, wname), numpy_helper.from_array(b, bname)]
        out = f"head_{hd.layer}"
        nodes.append(helper.make_node("Conv", conv_in, [out], name=f"conv{hd.layer}", kernel_shape=[kh, kw],
                                      strides=[kh, kw]))
        outputs.append(helper.make_tensor_value_info(out, ft, [batch, hd.channels, gh, gw]))
    if reverse_outputs:
        outputs.reverse()  # the engine lists outputs in another order than spec.heads: map by name
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", ft, [batch, c, h, w])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model
