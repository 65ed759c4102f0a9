"""INT8 explicit quantization (Q/DQ): recipes, one calibration reused by every variant, Q/DQ graphs.

* **Calibration** (:func:`calibrate`) runs once: images go through exactly the preprocessing used at
  inference (``darkconv.preprocess`` with the model's letter_box), ONNX Runtime's calibrator records the
  range of every float tensor, and the table is kept as ONNX Runtime's calibration cache (JSON). Every
  recipe, every mixed-precision variant and every sensitivity probe is built from that one table
  (``quantize_static(calibration_cache_path=...)``): nothing is calibrated twice.
* **Recipes** (:data:`RECIPES`) say what is quantized and how. The graph outputs (the head convs) are
  never quantized: quantizing the heads caps every confidence at the calibration maximum.
  ``tensorrt`` emits only what TensorRT's ONNX parser accepts (symmetric S8S8, zero points 0, no INT32
  bias DequantizeLinear) with Q/DQ placed after TensorRT's explicit-quantization rules
  (:func:`tensorrt_placement`); the ONNX Runtime recipes quantize activations between layers so that
  ONNX Runtime fuses QLinearConv chains.
* **Which recipe** (:func:`choose_recipe`) depends on the CPU (``darkconv.cpu``): on x86-64 without
  VNNI, ONNX Runtime's U8S8 kernels use VPMADDUBSW, whose 16-bit sums saturate; ``reduce_range``
  (7-bit weights) avoids it ("Quantize ONNX Models", onnxruntime.ai/docs/performance/model-optimizations/
  quantization.html: Data type selection, and the FAQ on reduce_range). With VNNI (VPDPBUSD, 32-bit sums)
  and AMX there is no saturation and 8-bit weights keep the accuracy (measured on an AMX Xeon, with and
  without AMX: benchmarks/results/bench_int8-x86-amx*.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..darknet.spec import ModelSpec
from ..io import atomic_write
from ..errors import ExportError
from ..preprocess import IMAGE_EXTS, list_images  # noqa: F401  (re-exported)

CALIB_METHODS = ("minmax", "entropy", "percentile")
#: the default calibration per target, chosen by held-out agreement on the real yolov3-tiny and yolov4-tiny-10
#: (benchmarks/results/bench_int8.md): for the ONNX Runtime recipe percentile and minmax tie on agreement and
#: percentile has the lower head error; for TensorRT's symmetric recipe minmax kept more (percentile clips
#: the symmetric range of the mostly positive activations); entropy was never better and is ~30x slower
DEFAULT_METHODS = {"onnxruntime": "percentile", "tensorrt": "minmax"}
DEFAULT_METHOD = DEFAULT_METHODS["onnxruntime"]


def default_method(target: str) -> str:
    return DEFAULT_METHODS.get(target, DEFAULT_METHOD)
#: op types whose tensors the ONNX Runtime recipes quantize ("between layers")
BETWEEN_OPS = ("Conv", "LeakyRelu", "MaxPool", "Concat", "Resize", "Slice", "Add", "Mul")
#: op types whose inputs the TensorRT recipe quantizes (TensorRT's Q/DQ placement, see tensorrt_placement)
TENSORRT_OPS = ("Conv", "MaxPool", "Concat", "Add")
CALIB_CHUNK = 8
INT8_KEY = "darkconv.int8"


from ..int8_recipes import (  # noqa: F401 - the recipe table lives there; re-exported for callers
    RECIPE_KEY, Recipe, RECIPES, recipe, CPU_RECIPES, choose_recipe, saturation_warning)


# -- calibration --------------------------------------------------------------------------------
def calibration_batches(images, spec: ModelSpec, progress=None):
    """Preprocessed (1,C,H,W) arrays, exactly as inference prepares them; an unreadable image is an error."""
    from ..preprocess import load_image, preprocess

    items = list_images(images) if not (isinstance(images, list) and images and isinstance(images[0], np.ndarray)) \
        else images
    it = progress(items) if progress else items
    for item in it:
        img = load_image(item) if not isinstance(item, np.ndarray) else item  # ImageError names the file
        yield preprocess(img, (spec.width, spec.height), spec.letter_box)[None]


def image_digest(item) -> str:
    """sha256 (first 16 hex digits) of an image file's bytes, or of an array's pixels."""
    if isinstance(item, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest()[:16]
    return hashlib.sha256(Path(item).read_bytes()).hexdigest()[:16]


@dataclass
class Calibration:
    """Ranges of every float tensor of one FP32 ONNX, as ONNX Runtime's calibration cache."""

    method: str
    symmetric: bool
    cache: Path
    images: list[str] = field(default_factory=list)      # names
    digests: list[str] = field(default_factory=list)     # sha256 prefixes

    def ranges(self) -> dict[str, tuple[float, float]]:
        data = json.loads(self.cache.read_text())
        out = {}
        for k, v in data.get("data", {}).items():
            lo, hi = v.get("lowest"), v.get("highest")
            if lo is not None and hi is not None:
                out[k] = (float(np.asarray(_decode(lo)).ravel()[0]), float(np.asarray(_decode(hi)).ravel()[0]))
        return out

    def as_dict(self) -> dict:
        return {"method": self.method, "symmetric": self.symmetric, "images": len(self.images),
                "names": self.images, "sha256_16": self.digests}


def _decode(v):
    if isinstance(v, dict) and "data" in v:
        return np.asarray(v["data"], np.float32)
    return v


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIB_METHODS:
        raise ExportError(f"unknown calibration method {method!r}: choose {', '.join(CALIB_METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer prints to stdout and warns on the root logger: keep the CLI clean."""
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def calibrate(fp32_path, spec: ModelSpec, images, *, method: str = DEFAULT_METHOD, symmetric: bool = False,
              workdir, progress=None) -> Calibration:
    """Run the calibration images through the FP32 ONNX at ``fp32_path`` once and keep every tensor's range.

    percentile: 99.999 % of a 2048-bin histogram; entropy: KL divergence over 2048 bins to 128 levels
    (TensorRT's entropy calibration); minmax: the extremes. ``symmetric`` ranges for symmetric recipes.
    """
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    cm = _ort_method(method)
    if images is None:
        raise ExportError("INT8 needs calibration images: pass --calib DIR (a few dozen images of your domain)")
    items = list_images(images) if not (isinstance(images, list) and images and isinstance(images[0], np.ndarray)) \
        else list(images)
    if not items:
        raise ExportError(f"no calibration images in {images}")
    batches = list(calibration_batches(items, spec, progress))
    names = [f"array{i}" if isinstance(it, np.ndarray) else Path(it).name for i, it in enumerate(items)]

    class Reader(CalibrationDataReader):
        def __init__(self, chunk):
            self._it = iter(chunk)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"images": x}

    opts = {"symmetric": symmetric}
    if method == "entropy":
        opts.update(num_bins=2048, num_quantized_bins=128)
    cache = Path(workdir) / f"calib-{method}-{'sym' if symmetric else 'asym'}.json"
    try:
        with _quiet():
            cal = create_calibrator(Path(fp32_path), [], augmented_model_path=str(Path(workdir) / "augmented.onnx"),
                                    calibrate_method=cm, extra_options=opts)
            # chunks bound the memory (the calibrators keep every tensor of a chunk); both MinMax and the
            # histogram calibrators merge successive collect_data calls (not max_intermediate_outputs:
            # ORT 1.32's MinMax drops the chunk it clears)
            for k in range(0, len(batches), CALIB_CHUNK):
                cal.collect_data(Reader(batches[k:k + CALIB_CHUNK]))
            save_tensors_data(cal.compute_data(), cache)
            del cal
    except Exception as e:
        raise ExportError(f"INT8 calibration failed: {e}") from e
    return Calibration(method, symmetric, cache, names, [image_digest(it) for it in items])


# -- building Q/DQ graphs ---------------------------------------------------------------------------
def head_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes that produce the graph outputs (the head convs): never quantized."""
    outs = {o.name for o in proto.graph.output}
    return [n.name for n in proto.graph.node if any(o in outs for o in n.output)]


_LAYER = re.compile(r"^/layers\.(\d+)/")


def layer_of(node_name: str) -> int | None:
    """Darknet layer index of an exported node (``/layers.<i>/...``), or None."""
    m = _LAYER.match(node_name)
    return int(m.group(1)) if m else None


def conv_layers(proto: onnx.ModelProto) -> list[int]:
    """Darknet indices of the conv layers in the exported graph, in order (heads included)."""
    return [layer_of(n.name) for n in proto.graph.node if n.op_type == "Conv" and layer_of(n.name) is not None]


def layer_nodes(proto: onnx.ModelProto, layers) -> list[str]:
    want = set(layers)
    return [n.name for n in proto.graph.node if layer_of(n.name) in want]


def quantize_settings(r: Recipe | str, proto: onnx.ModelProto | None = None, float_layers=()) -> dict:
    """``quantize_static`` keyword arguments for a recipe (or a target name, for its default recipe).

    ``float_layers``: Darknet layer indices whose nodes stay float (mixed precision).
    """
    from onnxruntime.quantization import QuantFormat, QuantType

    if isinstance(r, str):
        r = RECIPES["tensorrt"] if r == "tensorrt" else choose_recipe(r)[0] if r == "onnxruntime" else recipe(r)
    exclude = (head_nodes(proto) + layer_nodes(proto, float_layers)) if proto is not None else []
    qt = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    if r.target == "tensorrt":
        ops = ["Conv"] if r.placement == "conv-inputs" else list(TENSORRT_OPS)
        return dict(
            quant_format=QuantFormat.QDQ, per_channel=r.per_channel, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=ops,
            nodes_to_exclude=[n for n in exclude if n not in head_nodes(proto)] if proto is not None else [],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                           "DedicatedQDQPair": True, "OpTypesToExcludeOutputQuantization": ops})
    return dict(
        quant_format=QuantFormat.QDQ, per_channel=r.per_channel, reduce_range=r.reduce_range,
        activation_type=qt[r.activations], weight_type=qt[r.weights], op_types_to_quantize=list(BETWEEN_OPS),
        nodes_to_exclude=exclude, extra_options={"WeightSymmetric": r.weights == "s8"})


def build_qdq(fp32_path, r: Recipe, calib: Calibration, *, float_layers=(), workdir) -> onnx.ModelProto:
    """The Q/DQ model of the FP32 ONNX at ``fp32_path`` for recipe ``r`` from calibration ``calib``.

    TensorRT recipe: the head convs stay float without Q/DQ on their inputs being removed (TensorRT
    runs them in float from the DQ'd input); ``float_layers`` become FP16 islands (Cast in/out).
    """
    from onnxruntime.quantization import quantize_static

    if r.symmetric_activations != calib.symmetric:
        raise ExportError(f"recipe {r.name} needs a {'symmetric' if r.symmetric_activations else 'asymmetric'} "
                          "calibration")
    proto = onnx.load(str(fp32_path))
    settings = quantize_settings(r, proto, float_layers)
    out = os.path.join(workdir, f"q-{r.name}-{os.getpid()}-{len(float_layers)}.onnx")
    try:
        with _quiet():
            quantize_static(str(fp32_path), out, None, calibrate_method=_ort_method(calib.method),
                            calibration_cache_path=str(calib.cache), **settings)
    except Exception as e:
        raise ExportError(f"INT8 quantization failed: {e}") from e
    q = onnx.load(out)
    os.unlink(out)
    if r.target == "tensorrt":
        if r.placement == "tensorrt":
            tensorrt_placement(q, calib.ranges())
        if float_layers:
            fp16_islands(q, float_layers)
    return q


def quantize_int8(proto: onnx.ModelProto, path, spec: ModelSpec, images, *, method: str | None = None,
                  target: str = "tensorrt", recipe_name: str | None = None, float_layers=(), progress=None,
                  extra_meta: dict | None = None) -> Path:
    """Calibrate on ``images`` and write the Q/DQ model of an FP32 darkconv ONNX (proto) to ``path`` atomically.

    The recipe is ``recipe_name``, else :func:`choose_recipe` for ``target`` on this CPU. Held-out checks
    and mixed precision live in :mod:`darkconv.int8` (``darkconv convert`` uses that).
    """
    r = recipe(recipe_name) if recipe_name else choose_recipe(target)[0]
    method = method or default_method(r.target)
    with tempfile.TemporaryDirectory(prefix="darkconv-q-") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        onnx.save(proto, fp32)
        calib = calibrate(fp32, spec, images, method=method, symmetric=r.symmetric_activations, workdir=tmp,
                          progress=progress)
        q = build_qdq(fp32, r, calib, float_layers=float_layers, workdir=tmp)
    finish(q, proto, r, calib, float_layers, extra_meta)
    atomic_write(Path(path), [q.SerializeToString()])
    return Path(path)


def finish(q: onnx.ModelProto, proto: onnx.ModelProto, r: Recipe, calib: Calibration, float_layers=(),
           extra_meta: dict | None = None) -> onnx.ModelProto:
    """Metadata (the FP32 model's + the recipe record) and onnx.checker on a built Q/DQ model."""
    meta = {p.key: p.value for p in proto.metadata_props}
    del q.metadata_props[:]
    record = {"recipe": r.as_dict(), "calibration": calib.as_dict(),
              "float_layers": sorted(int(i) for i in float_layers), **(extra_meta or {})}
    for k, v in {**meta, "darkconv.precision": f"int8-{r.target}", RECIPE_KEY: r.name,
                 "darkconv.calibration": f"{len(calib.images)} images, {calib.method}",
                 INT8_KEY: json.dumps(record)}.items():
        q.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    try:
        onnx.checker.check_model(q)
    except Exception as e:
        raise ExportError(f"the quantized ONNX fails onnx.checker: {e}") from e
    return q


# -- TensorRT placement -------------------------------------------------------------------------------
def _graph_maps(g):
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def tensorrt_placement(q: onnx.ModelProto, ranges: dict) -> None:
    """Adjust a Q/DQ graph (Conv/MaxPool/Concat/Add inputs quantized) to TensorRT's placement rules.

    TensorRT's explicit quantization ("Working with Quantized Types", Q/DQ placement recommendations)
    and NVIDIA ModelOpt's ONNX rules: quantize every input of a weighted op and the inputs of MaxPool
    and Concat so that INT8 flows between convs; for a residual Add, quantize only the residual input
    (the other, a conv's output, is fused into that conv as its epilogue); give every input of a Concat
    one scale (ModelOpt's concat elimination: the concat becomes a copy). ONNX Runtime's quantizer only
    quantizes a MaxPool whose input is already quantized, so a Q/DQ pair (symmetric, from the calibrated
    range ``ranges``) is added in front of every other MaxPool. Zero points stay 0.
    """
    from onnx import helper, numpy_helper

    g = q.graph
    producer, consumers = _graph_maps(g)
    inits = {i.name: i for i in g.initializer}

    def dq_chain(tensor):  # tensor fed by Q -> DQ: (q node, dq node, original tensor)
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        qn = producer.get(dq.input[0])
        if qn is None or qn.op_type != "QuantizeLinear":
            return None
        return qn, dq, qn.input[0]

    def from_conv(tensor) -> bool:  # produced by a Conv, possibly through its pointwise activation ops
        n, seen = producer.get(tensor), 0
        while n is not None and seen < 6:
            if n.op_type == "Conv":
                return True
            if n.op_type not in ("LeakyRelu", "Relu", "Sigmoid", "Tanh", "Softplus", "Mul"):
                return False
            n, seen = producer.get(n.input[0]), seen + 1
        return False

    remove: set[str] = set()
    for node in list(g.node):
        if node.op_type == "Add" and len(node.input) == 2:
            chains = [dq_chain(t) for t in node.input]
            if not all(chains):
                continue
            # Darknet [shortcut] in layer i adds layer i-1 (the conv to fuse) and an earlier layer (the residual)
            i = layer_of(node.name)
            prev = [k for k, c in enumerate(chains) if from_conv(c[2]) and i is not None
                    and layer_of(producer[c[2]].name) == i - 1]
            only_here = [k for k, c in enumerate(chains) if from_conv(c[2]) and len(consumers.get(c[2], [])) == 1]
            fused = prev or only_here
            if len(fused) == 1:
                qn, dq, orig = chains[fused[0]]
                node.input[fused[0]] = orig
                remove.update({qn.name, dq.name})
        elif node.op_type == "Concat":
            chains = [dq_chain(t) for t in node.input]
            if not chains or not all(chains):
                continue
            scales = [inits[c[1].input[1]] for c in chains]
            s = max(float(numpy_helper.to_array(t)) for t in scales)
            name = f"{node.name}_shared_scale"
            g.initializer.append(numpy_helper.from_array(np.array(s, np.float32), name))
            for c in chains:
                for nd in (c[0], c[1]):
                    nd.input[1] = name
    keep = []
    for n in g.node:
        if n.name in remove:
            continue
        x = n.input[0] if n.input else None
        if n.op_type == "MaxPool" and dq_chain(x) is None and x in ranges:
            a = max(abs(ranges[x][0]), abs(ranges[x][1])) or 1.0
            base = f"{n.name}_input"
            g.initializer.extend([numpy_helper.from_array(np.array(a / 127.0, np.float32), f"{base}_scale"),
                                  numpy_helper.from_array(np.array(0, np.int8), f"{base}_zero_point")])
            keep.append(helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero_point"], [f"{base}_q"],
                                         name=f"{base}_QuantizeLinear"))
            keep.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero_point"],
                                         [f"{base}_dq"], name=f"{base}_DequantizeLinear"))
            n.input[0] = f"{base}_dq"
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    alive = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(alive)


def fp16_islands(q: onnx.ModelProto, layers) -> None:
    """Run the convs of ``layers`` in FP16 in a strongly typed graph: Cast in, FP16 weights, Cast out.

    The conv's input (a DequantizeLinear output or a float tensor) is cast to FP16, its weight (a DQ of
    INT8 weights or a float initializer) is replaced by the float weights in FP16, its output is cast back.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = q.graph
    producer, _ = _graph_maps(g)
    inits = {i.name: i for i in g.initializer}
    want = set(layers)
    new_nodes = []
    for node in g.node:
        if node.op_type != "Conv" or layer_of(node.name) not in want:
            new_nodes.append(node)
            continue
        w = node.input[1]
        if w in inits:
            wf = numpy_helper.to_array(inits[w]).astype(np.float32)
        else:  # DQ(int8 weights, scale[, zp]) -> dequantize here
            dq = producer[w]
            qw = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
            sc = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
            wf = qw * (sc.reshape(-1, 1, 1, 1) if sc.ndim else sc)
        x = node.input[0]
        dqx = producer.get(x)
        if dqx is not None and dqx.op_type == "DequantizeLinear" and dqx.input[0] in producer \
                and producer[dqx.input[0]].op_type == "QuantizeLinear":
            x = producer[dqx.input[0]].input[0]  # an FP16 conv takes the float tensor, not its INT8 copy
        base = node.name.strip("/").replace("/", "_")
        g.initializer.append(numpy_helper.from_array(wf.astype(np.float16), f"{base}_w16"))
        ins = [f"{base}_x16", f"{base}_w16"]
        if len(node.input) > 2 and node.input[2]:
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float16)
            g.initializer.append(numpy_helper.from_array(b, f"{base}_b16"))
            ins.append(f"{base}_b16")
        out = node.output[0]
        new_nodes.append(helper.make_node("Cast", [x], [f"{base}_x16"], to=TensorProto.FLOAT16, name=f"{base}_cast16"))
        conv = helper.make_node("Conv", ins, [f"{base}_y16"], name=node.name)
        conv.attribute.extend(node.attribute)
        new_nodes.append(conv)
        new_nodes.append(helper.make_node("Cast", [f"{base}_y16"], [out], to=TensorProto.FLOAT, name=f"{base}_cast32"))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    producer, _ = _graph_maps(g)
    # drop Q/DQ nodes left without consumers, then unused initializers
    changed = True
    while changed:
        changed = False
        keep = []
        for n in g.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not (set(n.output) & used) \
                    and not any(o in {x.name for x in g.output} for o in n.output):
                changed = True
                continue
            keep.append(n)
        del g.node[:]
        g.node.extend(keep)
        used = {i for n in g.node for i in n.input}
    alive = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(alive)


# -- what TensorRT's parser needs -----------------------------------------------------------------------
def check_tensorrt_qdq(proto: onnx.ModelProto) -> list[str]:
    """Problems TensorRT's parser would have with a Q/DQ model (empty list = fine)."""
    from onnx import numpy_helper

    problems = []
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) > 2 and node.input[2] in inits:
                zp = inits[node.input[2]]
                arr = numpy_helper.to_array(zp)
                if zp.data_type != onnx.TensorProto.INT8:
                    problems.append(f"{node.name}: zero point type {onnx.TensorProto.DataType.Name(zp.data_type)}, not INT8")
                if np.any(arr != 0):
                    problems.append(f"{node.name}: non-zero zero point")
            if node.op_type == "DequantizeLinear" and node.input[0] in inits and \
                    inits[node.input[0]].data_type == onnx.TensorProto.INT32:
                problems.append(f"{node.name}: INT32 DequantizeLinear (quantized bias)")
    return problems


def tensorrt_refusal(proto: onnx.ModelProto, path=None) -> str | None:
    """Why this ONNX must not go to TensorRT's builder (an INT8 model of a non-TensorRT recipe), or None."""
    meta = {p.key: p.value for p in proto.metadata_props}
    name = meta.get(RECIPE_KEY)
    r = RECIPES.get(name or "")
    if r is not None and r.target != "tensorrt":
        return (f"INT8 recipe {r.name} is for ONNX Runtime ({r.activations.upper()}{r.weights.upper()}"
                f"{', non-zero zero points' if r.activations == 'u8' else ''}); TensorRT needs "
                "--int8-target tensorrt")
    problems = check_tensorrt_qdq(proto)
    if problems:
        return (f"this Q/DQ model is not TensorRT-compatible ({len(problems)} problem(s), first: {problems[0]}); "
                "convert with --int8-target tensorrt")
    return None
