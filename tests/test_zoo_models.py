"""The rest of the Darknet zoo the project ships in cfg/: loads with random weights, static TensorRT-friendly
exports (FP32, FP16, INT8), and the numbers against an independent oracle.

Every model runs at a small input (64x64, 128x128 for the two whose deepest maps would be 1x1 or 2x2) with random,
activation-normalized weights written to a .weights file and loaded back (the file layout is exercised).

* Exports: the op types of each graph against the ops of onnx-tensorrt's operator support matrix
  (onnx/onnx-tensorrt, docs/operators.md) that a Darknet graph needs, and none of the shape-arithmetic ops
  (Shape, Gather, Unsqueeze, ConstantOfShape, ...) that a traced ``x.shape`` leaves behind; Slice, Reshape
  and Resize take their parameters from initializers only (``trt_problems`` of test_export_onnx.py).
* Oracle: OpenCV DNN (``cv2.dnn.readNetFromDarknet``, the same adjustments as test_oracle_opencv.py: BN eps
  folded into the variances, Winograd off) where it can run the cfg. Where it cannot (OpenCV has no
  ``[reorg3d]``, reads no ``dilation`` and no ``share_index``): numpy loops transcribing Darknet's C for the
  layers involved, at the model's own shapes, plus OpenCV on what it does compute.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import darkconv
from darkconv.darknet.cfg import parse_cfg
from darkconv.errors import CfgError
from darkconv.export.onnx import INPUT_NAME, save, to_fp16, to_onnx_model
from darkconv.export.quantize import check_tensorrt_qdq, quantize_int8
from darkconv.graph.layers import Convolutional
from darkconv.graph.model import build_model
from darkconv.parity import load_images
from darkconv.pipeline import DATA
from darkconv.preprocess import preprocess_batch
from test_export_onnx import trt_problems
from test_layers import ConvP, Net, check, conv_cfg, cfg as layer_cfg, np_conv, per_sample, reorg_cpu, \
    write_weights
from test_oracle_opencv import BN_EPS_SHIFT, resized_cfg, run_opencv

ROOT = Path(__file__).resolve().parents[1]
CFG_DIR = ROOT / "cfg"
SIZE = 64
#: larger inputs where 64x64 leaves the deepest maps at 1x1 or 2x2 and the random network turns chaotic
SIZES = {"yolov4-p6": 128, "csresnext50-panet-spp": 128}

#: name -> oracle: "opencv" (OpenCV DNN runs the whole cfg), "transcription" (numpy loops of the layers
#: OpenCV cannot run, OpenCV unusable), "opencv+transcription" (OpenCV for what it computes, loops for the rest)
ZOO = {
    "yolov3-tiny-prn": "opencv",             # shortcuts over fewer channels
    "enet-coco": "opencv",                   # [scale_channels], depthwise groups, [avgpool], [dropout]
    "yolov7": "opencv",                      # swish, new_coords heads
    "yolov4-csp-swish": "opencv",
    "csresnext50-panet-spp": "opencv",       # grouped convs (groups=32)
    "yolov4-p5": "opencv",                   # 4 anchors per head
    "yolov4x-mish": "opencv",
    "yolov4-p6": "opencv",                   # 4 heads of 4 anchors
    "yolov4-sam-mish-csp-reorg-bfm": "transcription",  # [sam], [reorg3d]: OpenCV has no reorg3d
    "resnet152_trident": "opencv+transcription",      # dilation + share_index: OpenCV reads neither
}

#: the ops a Darknet graph may use, each listed as supported in onnx-tensorrt's docs/operators.md
#: (Conv: weights must be initializers; Slice: axes initializer; Q/DQ: zero point 0); Cast only at the
#: FP16 graph's two ends, Q/DQ only in INT8 graphs
TRT_OPS = {"Conv", "LeakyRelu", "Relu", "Sigmoid", "Tanh", "Softplus", "Mish", "Mul", "Add", "Concat", "Slice",
           "MaxPool", "Pad", "Resize", "Reshape", "Transpose", "ReduceMean"}
#: shape arithmetic: supported by the parser, but a static Darknet graph never needs it (it makes the engine
#: compute sizes at run time and blocks constant folding)
DYNAMIC_OPS = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "ConstantOfShape", "Expand", "Range", "Where",
               "Equal", "NonZero", "Tile"}


def sample_batch(size: int) -> torch.Tensor:
    """Four of the bundled sample images at size x size (stretched), (4, 3, size, size)."""
    images, _ = load_images([DATA])
    return torch.from_numpy(preprocess_batch(images[:4], (size, size), False))


class Zoo:
    """One shipped cfg at SIZE x SIZE with random weights, loaded back from the .weights file it wrote."""

    def __init__(self, name: str, tmp: Path):
        self.name, self.cfg, self.tmp = name, CFG_DIR / f"{name}.cfg", tmp
        self.size = SIZES.get(name, SIZE)
        m = darkconv.load(self.cfg, width=self.size, height=self.size)
        m.randomize(3)
        # convs without BN over a 1x1 map (enet-coco's squeeze-excitation) keep their random init: scaled by
        # the tiny spread of 4 images' channel means they would turn the network chaotic
        keep = {i: (l.conv.weight.clone(), l.conv.bias.clone()) for i, l in enumerate(m.layers)
                if isinstance(l, Convolutional) and not l.bn and i > 0 and m.shapes[i - 1][1:] == (1, 1)}
        images = sample_batch(self.size)
        m.normalize_activations(images)  # statistics of 4 real images: deep 2x2 maps stay sane
        with torch.no_grad():
            for i, (w, b) in keep.items():
                m.layers[i].conv.weight.copy_(w)
                m.layers[i].conv.bias.copy_(b)
        self.weights = tmp / f"{name}.weights"
        m.save_weights(self.weights)
        del m
        self.model = darkconv.load(self.cfg, self.weights, width=self.size, height=self.size)
        self.x = images[:1]
        with torch.no_grad():
            self.ref32 = [o.numpy().astype(np.float64) for o in self.model(self.x)]
            self.ref64 = [o.numpy() for o in copy.deepcopy(self.model).double()(self.x.double())]
        # float32 vs float64 of darkconv itself: how much a correct float32 implementation may differ
        self.own = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(self.ref32, self.ref64)]


#: the big ones (50-130 M parameters, 10-30 s each on 2 cores): marked slow, still run by CI and `pytest -q`
SLOW = {"yolov4-csp-swish", "csresnext50-panet-spp", "yolov4-p5", "yolov4x-mish", "yolov4-p6",
        "yolov4-sam-mish-csp-reorg-bfm", "resnet152_trident"}


#: INT8 export (calibration + Q/DQ placement) is the costliest step on the big models; it is checked on the
#: models that bring a distinct op mix to Q/DQ placement ([scale_channels] and depthwise groups, [sam] and
#: [reorg3d], yolov7's concat-heavy ELAN blocks, shortcuts over fewer channels); the other big models repeat
#: conv/route/shortcut/maxpool/upsample patterns these already cover, and their FP32/FP16 graphs are still checked.
INT8_CHECKED = {"yolov3-tiny-prn", "enet-coco", "yolov7", "yolov4-sam-mish-csp-reorg-bfm"}


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO])
def zoo(request, tmp_path_factory):
    """Parametrized per model (pytest runs all tests of one model together, then frees it)."""
    z = Zoo(request.param, tmp_path_factory.mktemp(request.param))
    yield z
    z.weights.unlink(missing_ok=True)


def graph_problems(proto: onnx.ModelProto, precision: str) -> list[str]:
    allowed = TRT_OPS | {"fp32": set(), "fp16": {"Cast"}, "int8": {"QuantizeLinear", "DequantizeLinear"}}[precision]
    problems = trt_problems(proto, allowed)
    ops = [n.op_type for n in proto.graph.node]
    problems += [f"dynamic-shape op {op}" for op in sorted(set(ops) & DYNAMIC_OPS)]
    if precision == "fp16" and ops.count("Cast") != 1 + len(proto.graph.output):
        problems.append(f"{ops.count('Cast')} Casts in the FP16 graph (expected one per input and output)")
    if precision == "int8":
        problems += check_tensorrt_qdq(proto)
    return problems


# --------------------------------------------------------------------------------------- per model
def test_loads_with_random_weights(zoo):
    """The .weights file holds exactly the floats Darknet reads (no share_index layer has any), and the
    heads are alive (not a dead or exploding random network)."""
    m = zoo.model
    assert zoo.weights.stat().st_size == 20 + 4 * darknet_float_count(zoo.cfg, m)
    assert len(zoo.ref32) == len(m.spec.heads) == sum(s.type == "yolo" for s in m.sections)
    yolo = [s for s in parse_cfg(zoo.cfg).layers if s.type == "yolo"]  # masks and classes as the cfg states them
    for r, hd, s in zip(zoo.ref64, m.spec.heads, yolo):
        assert r.shape == (1, len(s.str("mask").split(",")) * (5 + s.int("classes")), *hd.grid)
        assert 0.2 < np.abs(r).max() < 1e3 and r.std() > 0.02


def test_exports_are_static_tensorrt_graphs(zoo, tmp_path):
    """FP32, FP16 and INT8 (TensorRT Q/DQ recipe; INT8 on INT8_CHECKED) exports: TensorRT ops only, no shape arithmetic;
    FP32 on ONNX Runtime equals the torch model to float rounding."""
    m = zoo.model
    proto = to_onnx_model(m)
    assert graph_problems(proto, "fp32") == []
    save(proto, tmp_path / "fp32.onnx")  # onnx.checker
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    out = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {INPUT_NAME: zoo.x.numpy()})
    for o, r, own in zip(out, zoo.ref64, zoo.own):
        assert np.abs(o - r).max() / np.abs(r).max() <= max(1e-4, 4 * own)
    fp16 = to_fp16(proto)
    assert graph_problems(fp16, "fp16") == []
    save(fp16, tmp_path / "fp16.onnx")
    del fp16
    if zoo.name not in INT8_CHECKED:
        return
    calib = [np.random.default_rng(k).integers(0, 256, (zoo.size, zoo.size, 3), dtype=np.uint8) for k in range(2)]
    # export_onnx(precision="int8") = to_onnx_model + quantize_int8: the FP32 graph above is reused (no second trace)
    path = quantize_int8(proto, tmp_path / "int8.onnx", m.spec, calib, target="tensorrt")
    del proto
    q = onnx.load(str(path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    assert graph_problems(q, "int8") == []


def test_matches_oracle(zoo, tmp_path):
    """OpenCV DNN where it runs the cfg, loop transcriptions for the layers it cannot run (ZOO says which)."""
    if "opencv" in ZOO[zoo.name]:
        check_opencv(zoo, tmp_path)
    if "transcription" in ZOO[zoo.name]:
        check_transcriptions(zoo)


def check_opencv(zoo, tmp_path):
    """Raw heads against OpenCV DNN: its error against darkconv's float64 may be at most 4x darkconv's own
    float32 error (or 1e-4 of max|out|). resnet152_trident: OpenCV reads neither dilation nor share_index,
    so it gets a .weights file with the shared arrays repeated and only the undilated branch is compared
    (the dilated convolutions and the sharing are checked by the loops)."""
    m = zoo.model
    cv_cfg = tmp_path / f"{zoo.name}.cfg"
    cv_cfg.write_text(resized_cfg(zoo.cfg.read_text(), zoo.size, zoo.size))
    cv_weights = tmp_path / "opencv.weights"
    write_opencv_weights(m, cv_weights)
    got = run_opencv(cv_cfg, cv_weights, m, zoo.x.numpy())
    cv_weights.unlink()
    heads = range(len(got))
    if zoo.name == "resnet152_trident":
        heads = [k for k, hd in enumerate(m.spec.heads) if branch_dilation(m, hd.layer) == 1]
        assert len(heads) == 1
    for k in heads:
        g, r = got[k], zoo.ref64[k]
        assert g.shape == r.shape
        err = np.abs(g - r).max() / np.abs(r).max()
        assert zoo.own[k] < 5e-3, f"the random network is too chaotic to compare ({zoo.own[k]:.1e})"
        assert err <= max(1e-4, 4 * zoo.own[k]), f"{zoo.name} head {m.spec.heads[k].layer}: OpenCV differs by " \
                                                 f"{err:.2e} of max|out| (darkconv float32: {zoo.own[k]:.2e})"
        print(f"{zoo.name} head {m.spec.heads[k].layer}: OpenCV max abs diff {np.abs(g - r).max():.2e} "
              f"({err:.1e} of max|out|; darkconv float32 {zoo.own[k]:.1e})")


def check_transcriptions(zoo):
    """[sam], [reorg3d] and dilated convolutions, at the model's own shapes with the inputs the model feeds
    them, against numpy loops of forward_sam_layer, reorg_cpu and im2col_cpu_ext + gemm."""
    m = copy.deepcopy(zoo.model).double()
    outs = {-1: zoo.x.double()}
    checked = {}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, (s, layer) in enumerate(zip(m.sections, m.layers)):
            args = [outs[j] for j in m.inputs[i]]
            outs[i] = layer(*args)
            a = [t[0].numpy() for t in args]
            if s.type == "sam":
                check(outs[i][0].numpy(), a[0] * a[1])  # forward_sam_layer, activation linear
            elif s.type == "reorg3d":
                c, h, w = m.shapes[i]
                check(outs[i][0].numpy(), reorg_cpu(a[0], w, h, c, 1, s.int("stride"), 0).reshape(c, h, w))
            elif s.type == "convolutional" and s.int("dilation", 1) > 1 and s.int("size", 1) > 1:
                key = f"conv dilation={s.int('dilation')}{' share_index' if layer.shares else ''}"
                if key in checked:  # the python loop is slow: the first of each kind
                    continue
                filters, y = loop_conv(layer, s, a[0], rng)
                check(outs[i][0].numpy()[filters, :2, :2], y)
                checked[key] = 1
                continue
            else:
                continue
            checked[s.type] = checked.get(s.type, 0) + 1
    want = {"yolov4-sam-mish-csp-reorg-bfm": {"sam": 3, "reorg3d": 6},
            "resnet152_trident": {"conv dilation=3": 1, "conv dilation=2 share_index": 1}}[zoo.name]
    assert checked == want


# --------------------------------------------------------------------------------------- helpers
def darknet_float_count(cfg_path: Path, model) -> int:
    """Floats load_weights_upto reads for this cfg, counted from the cfg text (not from darkconv's modules):
    every [convolutional] without share_index, biases + (BN) 3 x filters + weights; shortcut weights."""
    total = 0
    for s, shape in zip(parse_cfg(cfg_path).layers, model.shapes):
        i = s.index
        c_in = model.shapes[i - 1][0] if i else 3
        if s.type == "convolutional" and not s.has("share_index"):
            n, k, g = s.int("filters"), s.int("size", 1), s.int("groups", 1)
            total += n * (1 + 3 * s.int("batch_normalize", 0)) + n * (c_in // g) * k * k
        elif s.type == "shortcut" and s.str("weights_type", "none") != "none":  # pragma: no cover - none in the zoo
            raise AssertionError("count shortcut weights")
    return total


def write_opencv_weights(model, path: Path) -> None:
    """A .weights file for OpenCV: every conv's arrays (a share_index layer gets a copy of its owner's, since
    OpenCV reads them from the file), BN variances shifted by OpenCV's eps difference."""
    parts = [np.array([0, 2, 5], "<i4").tobytes(), np.zeros(1, "<u8").tobytes()]
    for layer in model.layers:
        src = getattr(layer, "shares", None) or layer
        for name, t in src.darknet_tensors():
            a = t.detach().cpu().numpy().astype("<f4").ravel()
            parts.append((a + np.float32(BN_EPS_SHIFT) if name == "rolling_variance" else a).tobytes())
    path.write_bytes(b"".join(parts))


def branch_dilation(model, head_layer: int) -> int:
    """The dilation of the last size>1 convolution before a head (the trident branch it belongs to)."""
    for i in range(head_layer - 1, -1, -1):
        s = model.sections[i]
        if s.type == "convolutional" and s.int("size", 1) > 1:
            return s.int("dilation", 1)
    raise AssertionError("no 3x3 conv before the head")


def loop_conv(layer, s, x: np.ndarray, rng) -> np.ndarray:
    """forward_convolutional_layer (im2col_cpu_ext + gemm, BN, leaky) for the top-left 2x2 output cells of
    a random subset of 8 filters; the parameters come from the layer (its owner's, for share_index)."""
    src = layer.shares or layer
    pad, dil, k = s.int("size") // 2 if s.int("pad", 0) else s.int("padding", 0), s.int("dilation"), s.int("size")
    filters = np.sort(rng.choice(layer.conv.weight.shape[0], 8, replace=False))
    w = src.conv.weight.detach().numpy()
    c = x.shape[0]
    out = np.zeros((8, 2, 2))
    for fi, f in enumerate(filters):
        for oy in range(2):
            for ox in range(2):
                acc = 0.0
                for ch in range(c):
                    for ky in range(k):
                        for kx in range(k):
                            iy, ix = oy - pad * dil + ky * dil, ox - pad * dil + kx * dil
                            if 0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]:
                                acc += w[f, ch, ky, kx] * x[ch, iy, ix]
                out[fi, oy, ox] = acc
    v = lambda t: t.detach().numpy()[filters][:, None, None]  # noqa: E731
    y = (out - v(src.rolling_mean)) / np.sqrt(v(src.rolling_variance) + 0.00001) * v(src.scales) + v(src.conv.bias)
    assert s.str("activation") == "leaky"
    return filters, np.where(y > 0, y, 0.1 * y)


# --------------------------------------------------------------------------------------- share_index
# parse_convolutional: share_index >= 0 is absolute, < 0 relative; make_convolutional_layer points weights,
# biases, scales, rolling_mean and rolling_variance at the shared layer's arrays; load_weights_upto and
# save_weights skip a layer with share_layer; fuse_conv_batchnorm folds BN once, into the shared arrays.
SHARE_BODY = (conv_cfg(4, 3, "leaky", pad=1, batch_normalize=1)                                  # 0
              + conv_cfg(4, 3, "leaky", pad=1, batch_normalize=1)                                # 1 owner
              + "[route]\nlayers=0\n"                                                            # 2
              + conv_cfg(4, 3, "mish", pad=1, batch_normalize=1, dilation=2, share_index=1)      # 3
              + "[route]\nlayers=0\n"                                                            # 4
              + conv_cfg(4, 3, "linear", pad=1, batch_normalize=1, dilation=3, share_index=-2)   # 5 -> 3 -> 1
              + "[route]\nlayers=1,3,5\n")                                                       # 6


def share_net(tmp_path):
    rng = np.random.default_rng(5)
    p0, p1 = ConvP(rng, 4, 3, 3), ConvP(rng, 4, 4, 3)
    return Net(tmp_path, layer_cfg(3, 9, 9, SHARE_BODY), p0.file() + p1.file()), p0, p1, rng


def test_share_index_transcription(tmp_path):
    """Layers 3 and 5 compute with layer 1's weights, biases and batchnorm, at their own dilation and
    activation; the .weights file holds layers 0, 1 and the head only (Net's loader fails on a size
    mismatch); writing the model back gives the same file; BN folding (export) keeps the numbers."""
    net, p0, p1, rng = share_net(tmp_path)
    x = rng.normal(0, 1, (2, 3, 9, 9))
    outs = net.run(x)
    y0 = per_sample(lambda s: np_conv(s, p0, 3, pad=1, act="leaky"), x)
    check(outs[0], y0)
    check(outs[1], per_sample(lambda s: np_conv(s, p1, 3, pad=1, act="leaky"), y0))
    check(outs[3], per_sample(lambda s: np_conv(s, p1, 3, pad=1, dilation=2, act="mish"), y0))
    check(outs[5], per_sample(lambda s: np_conv(s, p1, 3, pad=1, dilation=3, act="linear"), y0))
    m = net.model
    assert m.count_floats() == sum(a.size for a in p0.file() + p1.file() + net.head)
    assert m.layers[5].shares is m.layers[3].shares is m.layers[1]
    out = tmp_path / "back.weights"
    m.float().save_weights(out)
    assert out.read_bytes() == (tmp_path / "t.weights").read_bytes()
    m.double()
    fused = copy.deepcopy(m).fuse()
    with torch.no_grad():
        a, b = m(torch.from_numpy(x)), fused(torch.from_numpy(x))
    np.testing.assert_allclose(b[0].numpy(), a[0].numpy(), rtol=1e-9, atol=1e-9)
    proto = to_onnx_model(m)  # one initializer per shared array: the two sharers use layer 1's
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 5 and len({n.input[1] for n in convs}) == 3


def test_share_index_file_has_nothing_for_sharers(tmp_path):
    """A .weights file that also holds arrays for the sharing layers is too long for Darknet's reader."""
    rng = np.random.default_rng(5)
    p0, p1 = ConvP(rng, 4, 3, 3), ConvP(rng, 4, 4, 3)
    model = build_model(tmp_path / "t.cfg", text=layer_cfg(3, 9, 9, SHARE_BODY))
    head = [np.zeros(6, np.float32), np.zeros((6, 12), np.float32)]
    write_weights(tmp_path / "long.weights", p0.file() + p1.file() + p1.file() + p1.file() + head)
    with pytest.raises(darkconv.errors.DarkconvError):
        model.load_weights(tmp_path / "long.weights")


@pytest.mark.parametrize("body, match", [
    (conv_cfg(4, 3, pad=1, share_index=0), "only layers 0..-1"),                        # itself / nothing before
    (conv_cfg(4, 3, pad=1) + conv_cfg(4, 3, pad=1, share_index=5), "points to layer 5"),  # a later layer
    (conv_cfg(4, 3, pad=1) + "[maxpool]\nsize=1\nstride=1\n" + conv_cfg(4, 3, pad=1, share_index=1),
     "not a \\[convolutional\\]"),
    (conv_cfg(4, 3, pad=1) + conv_cfg(4, 1, share_index=0), "size 1 vs 3"),
    (conv_cfg(4, 3, pad=1) + conv_cfg(5, 3, pad=1, share_index=0), "channels 4 vs 3"),
    (conv_cfg(4, 3, pad=1, batch_normalize=1) + "[route]\nlayers=-1\n" + conv_cfg(4, 3, pad=1, share_index=0),
     "channels 4 vs 3"),
    (conv_cfg(3, 3, pad=1, batch_normalize=1) + conv_cfg(3, 3, pad=1, share_index=0), "batch_normalize=0 here"),
])
def test_share_index_refuses_what_darknet_cannot_share(tmp_path, body, match):
    with pytest.raises(CfgError, match=match):
        build_model(tmp_path / "t.cfg", text=layer_cfg(3, 6, 6, body))
