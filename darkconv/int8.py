"""INT8 that keeps Darknet's accuracy: held-out acceptance, layer sensitivity, automatic mixed precision.

* **Held-out acceptance**: the INT8 model is judged on images *not* used for calibration (``--check``,
  or every third image of ``--calib`` by name, :func:`split_images`). The figure is detection
  *agreement* with the FP32 model: FP32 detections with score > 0.25 are the truths, INT8 detections at
  Darknet's map threshold 0.005 are scored with Darknet's ``detector map`` math (AP@0.5, mean over the
  classes that have truths) — :func:`agreement`, the same matching as ``darkconv eval``'s agreement mode.
* **Sensitivity** (:func:`sensitivity`): for every conv, the head error and the agreement when only
  that conv is quantized and when only it is left float, with its share of the model's FLOPs. It runs
  on the torch model with fake quantization from the *same* calibration table (no recalibration, no
  graph rebuild per probe), on the check images, reusing the unchanged prefix of the network: probing
  conv k only re-runs layers k..end (FP32 prefix for "only k quantized", all-INT8 prefix for "only k
  float").
* **Mixed precision** (:func:`mixed_precision`): leaves the most sensitive convs float (FP32 on CPU, FP16
  islands for TensorRT) until held-out agreement reaches the budget, with the fewest convs: sizes
  1, 2, 4, ... are tried on the real ONNX Runtime model, then bisected.

Formatting (tables, report files) lives in ``darkconv/int8_report.py``.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import DarkconvError
from .export import quantize as qz
from .postprocess import Detections, postprocess
from .preprocess import load_image, preprocess_batch

MAP_THRESH = 0.005      # Darknet's `detector map` detection threshold
TRUTH_THRESH = 0.25     # FP32 detections above this are the truths
CHECK_EVERY = 3         # automatic split: every third image (sorted by name) is held out


class Int8Error(DarkconvError):
    """INT8 conversion cannot be judged or did not meet its budget."""


# -- held-out split -------------------------------------------------------------------------------
def split_images(files: list, every: int = CHECK_EVERY) -> tuple[list, list]:
    """Deterministic split of one image list: sorted by file name, positions every-1, 2*every-1, ...
    are held out for checking, the rest calibrate. Needs at least 2 images."""
    files = sorted(files, key=lambda p: (Path(p).name, str(p)))
    if len(files) < 2:
        raise Int8Error(f"{len(files)} calibration image(s): a held-out check needs at least 2 (or pass --check DIR)")
    check = [f for i, f in enumerate(files) if i % every == every - 1] or files[-1:]
    calib = [f for f in files if f not in check]
    return calib, check


# -- agreement -------------------------------------------------------------------------------------
def agreement(reference: list[Detections], test: list[Detections], classes: int) -> float | None:
    """Darknet ``detector map`` agreement of ``test`` (at 0.005) with ``reference``'s detections > 0.25.

    Mean AP@0.5 over the classes that have truths (``MapResult.map_gt``, :func:`darkconv.metrics.agreement`);
    None when the reference has no detection above 0.25 on these images (nothing to agree with).
    """
    from .metrics import agreement as map_agreement

    if count_truths(reference) == 0:
        return None
    return float(map_agreement(reference, test, classes, ref_thresh=TRUTH_THRESH).map_gt)


def count_truths(reference: list[Detections]) -> int:
    return int(sum((r.scores > TRUTH_THRESH).sum() for r in reference))


# -- running candidates on ONNX Runtime --------------------------------------------------------------
class Evaluator:
    """The check images, preprocessed once, and the FP32 reference; scores Q/DQ candidates on ONNX Runtime."""

    def __init__(self, spec, images: list[np.ndarray], names: list[str], fp32: onnx.ModelProto, threads=None):
        self.spec, self.names, self.threads = spec, names, threads
        self.sizes = [(im.shape[1], im.shape[0]) for im in images]
        self.x = preprocess_batch(images, (spec.width, spec.height), spec.letter_box)
        self.ref_heads = self.heads(fp32)
        self.reference = self.detections(self.ref_heads)
        self.truths = count_truths(self.reference)

    def session(self, proto: onnx.ModelProto):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(self.threads or os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])

    def heads(self, proto: onnx.ModelProto) -> list[np.ndarray]:
        s = self.session(proto)
        outs = [s.run(None, {"images": self.x[i:i + 1]}) for i in range(len(self.x))]
        return [np.concatenate(parts, 0) for parts in zip(*outs)]

    def detections(self, heads) -> list[Detections]:
        return postprocess(heads, self.spec, self.sizes, thresh=MAP_THRESH)

    def score(self, heads) -> tuple[float | None, float]:
        """(agreement, mean relative head error) of candidate heads against FP32."""
        return agreement(self.reference, self.detections(heads), self.spec.classes), head_error(self.ref_heads, heads)


def head_error(ref, other) -> float:
    """Mean over heads of ||other - ref|| / ||ref|| (relative L2)."""
    return float(np.mean([np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12) for a, b in zip(ref, other)]))


def latency(protos: dict[str, onnx.ModelProto], x: np.ndarray, threads=None, rounds: int = 3, iters: int = 5) -> dict:
    """Median ms per batch-1 call of each model, timed in interleaved rounds (one run, one machine)."""
    import onnxruntime as ort

    sessions, slowest = {}, 0.0
    for k, p in protos.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sessions[k] = ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        sessions[k].run(None, {"images": x})
        slowest = max(slowest, time.perf_counter() - t0)
    iters = max(1, min(iters, int(0.5 / max(slowest, 1e-3))))  # big models: fewer calls, same rounds
    samples: dict[str, list] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                s.run(None, {"images": x})
                samples[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1e3) for k, v in samples.items()}


# -- sensitivity (torch, fake quantization from the calibration table) ------------------------------------
@dataclass
class LayerSensitivity:
    layer: int                       # Darknet layer index
    flops_share: float               # of all conv FLOPs
    head_err_only: float | None      # only this conv quantized (mode "only")
    agreement_only: float | None
    head_err_float: float | None = None    # everything quantized except this conv (mode "float")
    agreement_float: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def conv_flops(model) -> dict[int, float]:
    """Multiply-adds x 2 of every [convolutional] layer at the model's input size."""
    out = {}
    for i, m in enumerate(model.layers):
        conv = getattr(m, "conv", None)
        if conv is None or type(m).__name__ != "Convolutional":
            continue
        cout, cin_g, kh, kw = conv.weight.shape
        _, h, w = model.shapes[i]
        out[i] = 2.0 * cout * h * w * cin_g * kh * kw
    return out


def _fq_act(x, lo: float, hi: float, kind: str):
    """Fake-quantize an activation like ONNX Runtime's QDQ: u8/s8 asymmetric or s8 symmetric (sym)."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if kind == "sym":
        a = max(abs(lo), abs(hi))
        if a == 0:
            return x
        s = a / 127.0
        return torch.clamp(torch.round(x / s), -127, 127) * s
    if hi == lo:
        return x
    s = (hi - lo) / 255.0
    qmin, qmax = (0, 255) if kind == "u8" else (-128, 127)
    zp = round(qmin - lo / s)
    return (torch.clamp(torch.round(x / s) + zp, qmin, qmax) - zp) * s


def _fq_weight(w, qmax: int, per_channel: bool):
    import torch

    a = w.abs().amax(dim=(1, 2, 3), keepdim=True) if per_channel else w.abs().max()
    s = torch.where(a > 0, a / qmax, torch.ones_like(a))
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


class FakeQuantModel:
    """A fused copy of the torch model whose conv layers can be fake-quantized one by one."""

    def __init__(self, model, proto: onnx.ModelProto, calib: qz.Calibration, recipe: qz.Recipe):
        import copy

        self.m = copy.deepcopy(model).float().eval().fuse()
        ranges = calib.ranges()
        self.kind = "sym" if recipe.symmetric_activations else recipe.activations
        self.between = recipe.placement == "between"
        qmax = 64 if recipe.reduce_range else 127
        heads = set(qz.head_nodes(proto))
        self.q: dict[int, tuple] = {}
        for n in proto.graph.node:
            i = qz.layer_of(n.name)
            if n.op_type != "Conv" or i is None or (n.name in heads and recipe.target != "tensorrt"):
                continue
            if n.input[0] not in ranges:
                continue
            conv = self.m.layers[i].conv
            self.q[i] = (ranges[n.input[0]], ranges.get(n.output[0]), _fq_weight(conv.weight, qmax, recipe.per_channel))
        self.layers = sorted(self.q)

    def _conv(self, i, x):
        import torch.nn.functional as F

        layer = self.m.layers[i]
        (lo, hi), out_range, wq = self.q[i]
        c = layer.conv
        y = F.conv2d(_fq_act(x, lo, hi, self.kind), wq, c.bias, c.stride, c.padding, c.dilation, c.groups)
        if self.between and out_range is not None:
            y = _fq_act(y, *out_range, self.kind)
        y = layer.act(y)
        if layer.blur is not None:
            kernel, stride, pad = layer.blur
            y = F.conv2d(y, kernel.to(y.dtype), None, stride, pad, 1, y.shape[1])
        return y

    def run(self, x, quantized: set, start: int = 0, prefix: dict | None = None, keep: bool = False):
        """Heads (and, with ``keep``, every layer's output) with the convs in ``quantized`` fake-quantized;
        layers before ``start`` are taken from ``prefix`` (the outputs of an earlier run)."""
        import torch

        outs = dict(prefix) if prefix else {}
        outs[-1] = x
        with torch.no_grad():
            for i in range(start, len(self.m.layers)):
                args = [outs[j] for j in self.m.inputs[i]]
                outs[i] = self._conv(i, args[0]) if i in quantized else self.m.layers[i](*args)
        heads = [outs[h - 1].numpy() for h in self.m.head_layers]
        return (heads, outs) if keep else (heads, None)


def sensitivity(model, proto: onnx.ModelProto, calib: qz.Calibration, recipe: qz.Recipe, ev: Evaluator,
                modes=("only",), progress=None) -> list[LayerSensitivity]:
    """Per conv: FLOPs share, head error and agreement when only it is quantized (mode ``only``) and/or when
    only it is left float (mode ``float``), sorted most sensitive first (by the ``only`` head error, else by
    how much leaving it float lowers the error).

    Cost: each probe re-runs the network from that conv on (the prefix is reused), so a mode costs about
    half a forward pass per conv on the check images.
    """
    import torch

    fq = FakeQuantModel(model, proto, calib, recipe)
    x = torch.from_numpy(ev.x)
    flops = conv_flops(fq.m)
    total = sum(flops.values()) or 1.0
    every = set(fq.layers)
    ref_outs = fq.run(x, set(), keep=True)[1] if "only" in modes else None
    q_outs = fq.run(x, every, keep=True)[1] if "float" in modes else None
    rows = []
    it = progress(fq.layers) if progress else fq.layers
    for i in it:
        row = LayerSensitivity(i, flops.get(i, 0.0) / total, None, None)
        if "only" in modes:
            row.agreement_only, row.head_err_only = ev.score(fq.run(x, {i}, start=i, prefix=ref_outs)[0])
        if "float" in modes:
            row.agreement_float, row.head_err_float = ev.score(fq.run(x, every - {i}, start=i, prefix=q_outs)[0])
        rows.append(row)
    del ref_outs, q_outs
    if "only" in modes:
        rows.sort(key=lambda r: (-r.head_err_only, r.flops_share))
    else:
        rows.sort(key=lambda r: (r.head_err_float, r.flops_share))
    return rows


# -- the conversion job ---------------------------------------------------------------------------------
@dataclass
class Int8Outcome:
    recipe: qz.Recipe
    reason: str
    calib: qz.Calibration
    check_names: list[str]
    truths: int
    agreement_all: float | None          # every conv INT8
    head_err_all: float
    agreement: float | None               # the written model
    float_layers: list[int] = field(default_factory=list)
    budget: float | None = None
    latency_ms: dict = field(default_factory=dict)
    sensitivity: list[LayerSensitivity] | None = None
    sensitivity_s: float | None = None
    tries: list[tuple[int, float | None]] = field(default_factory=list)   # (float convs, agreement)

    @property
    def met(self) -> bool | None:
        if self.budget is None:
            return None
        return self.agreement is not None and self.agreement >= self.budget

    def record(self) -> dict:
        """What goes into the ONNX metadata (``darkconv.int8``) besides recipe and calibration."""
        return {"check": {"images": len(self.check_names), "names": self.check_names, "truths": self.truths,
                          "agreement": self.agreement, "agreement_all_int8": self.agreement_all,
                          "metric": "Darknet detector map AP@0.5 of INT8 (thresh 0.005) vs FP32 detections > 0.25, "
                                    "mean over classes with truths"},
                "budget": self.budget, "reason": self.reason, "latency_ms": self.latency_ms}


def mixed_precision(fp32_path, recipe, calib, ranking: list[int], ev: Evaluator, budget: float, workdir,
                    log=None) -> tuple[list[int], onnx.ModelProto, float | None, list]:
    """Fewest of the top-ranked convs left float so that agreement >= budget (1, 2, 4, ... then bisect)."""
    tries: list = []
    built: dict[int, tuple] = {}

    def attempt(k):
        if k not in built:
            q = qz.build_qdq(fp32_path, recipe, calib, float_layers=ranking[:k], workdir=workdir)
            a, _ = ev.score(ev.heads(q))
            built[k] = (q, a)
            tries.append((k, a))
            if log:
                log(f"  {k} conv(s) float ({', '.join(map(str, ranking[:k]))}): agreement {fmt_agreement(a)}")
        return built[k]

    lo, hi = 0, None
    k = 1
    while k <= len(ranking):
        _, a = attempt(k)
        if a is not None and a >= budget:
            hi = k
            break
        lo = k
        k = min(2 * k, len(ranking)) if k < len(ranking) else len(ranking) + 1
    if hi is None:
        k = max(built)
        return ranking[:k], built[k][0], built[k][1], tries
    while hi - lo > 1:
        mid = (lo + hi) // 2
        _, a = attempt(mid)
        if a is not None and a >= budget:
            hi = mid
        else:
            lo = mid
    return ranking[:hi], built[hi][0], built[hi][1], tries


def fmt_agreement(a: float | None) -> str:
    return "n/a (no FP32 detections > 0.25)" if a is None else f"{a:.4f}"


def convert_int8(model, fp32: onnx.ModelProto, spec, calib_files: list, check_files: list, *,
                 method: str | None = None, target: str = "onnxruntime", recipe_name: str | None = None,
                 budget: float | None = None, want_sensitivity: bool = False, modes=("only",), threads=None,
                 timing: bool = True,
                 progress=None, log=None) -> tuple[onnx.ModelProto, Int8Outcome]:
    """Calibrate on ``calib_files``, judge on ``check_files``, apply the budget; returns (Q/DQ proto, outcome).

    Writes nothing: the caller writes the returned proto (atomically) when it accepts the outcome.
    """
    if recipe_name:
        r, reason = qz.recipe(recipe_name), f"asked for (--int8-recipe {recipe_name})"
        if r.target != target:
            raise Int8Error(f"recipe {r.name} is for {r.target}, not --int8-target {target}")
    else:
        r, reason = qz.choose_recipe(target)
    method = method or qz.default_method(r.target)
    images = [load_image(f) for f in check_files]
    names = [Path(f).name for f in check_files]
    with tempfile.TemporaryDirectory(prefix="darkconv-int8-") as tmp:
        fp32_path = os.path.join(tmp, "fp32.onnx")
        onnx.save(fp32, fp32_path)
        calib = qz.calibrate(fp32_path, spec, list(calib_files), method=method, symmetric=r.symmetric_activations,
                             workdir=tmp, progress=progress)
        ev = Evaluator(spec, images, names, fp32, threads)
        if budget is not None and ev.truths == 0:
            raise Int8Error(f"the FP32 model detects nothing above {TRUTH_THRESH} on the {len(names)} check image(s) "
                            f"({', '.join(names[:4])}{'...' if len(names) > 4 else ''}): agreement cannot be judged; "
                            "pass --check DIR with images where it detects objects")
        q_all = qz.build_qdq(fp32_path, r, calib, workdir=tmp)
        a_all, e_all = ev.score(ev.heads(q_all))
        out = Int8Outcome(r, reason, calib, names, ev.truths, a_all, e_all, a_all, budget=budget)
        q = q_all
        if want_sensitivity or (budget is not None and (a_all is None or a_all < budget)):
            t0 = time.perf_counter()
            out.sensitivity = sensitivity(model, fp32, calib, r, ev, modes=modes, progress=progress)
            out.sensitivity_s = time.perf_counter() - t0
        if budget is not None and a_all is not None and a_all < budget:
            if log:
                log(f"held-out agreement {a_all:.4f} < budget {budget}: leaving the most sensitive convs "
                    f"{'FP16' if r.target == 'tensorrt' else 'float'}")
            ranking = [s.layer for s in out.sensitivity]
            out.float_layers, q, out.agreement, out.tries = mixed_precision(
                fp32_path, r, calib, ranking, ev, budget, tmp, log)
        if timing:
            protos = {"fp32": fp32, "int8_all": q_all}
            if out.float_layers:
                protos["int8_mixed"] = q
            out.latency_ms = latency(protos, ev.x[:1], threads)
    qz.finish(q, fp32, r, calib, out.float_layers, out.record())
    return q, out
