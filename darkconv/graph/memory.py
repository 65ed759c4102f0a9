"""How much memory a cfg's network needs, computed from shapes before anything is allocated.

Darknet (``make_network``/``parse_network_cfg``) allocates, per image, every layer's output,
the largest im2col workspace of its convolutions, and every parameter. darkconv computes the
same from the builders' shapes and parameter counts, and refuses a cfg above a limit with one
line naming the layer, instead of a multi-GB allocation attempt, an overflow or a swap storm.

Limits (GB = 10^9 bytes, float32): ``DARKCONV_MAX_WEIGHTS_GB`` (default 4: the largest
Darknet YOLO, yolov4-p6, holds 0.5 GB) and ``DARKCONV_MAX_ACTIVATIONS_GB`` (default 16, at
batch 1: yolov4-p6 at 1280x1280 needs 3.9 GB). ``inf`` disables a limit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..errors import CfgError, DarkconvError

FLOAT_BYTES = 4
WEIGHTS_ENV, ACTIVATIONS_ENV = "DARKCONV_MAX_WEIGHTS_GB", "DARKCONV_MAX_ACTIVATIONS_GB"
DEFAULT_WEIGHTS_GB, DEFAULT_ACTIVATIONS_GB = 4.0, 16.0
#: layers whose output is their input (Darknet shares the buffer; torch returns the same tensor)
ALIAS_TYPES = frozenset({"dropout", "empty", "silence", "yolo", "region"})


def _env_gb(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise DarkconvError(f"{name}={text!r} must be a positive number of GB (or inf for no limit)")
    return value


@dataclass(frozen=True)
class MemoryLimits:
    """Bytes a network may need: parameters, and activations (layer outputs + workspace) at batch 1."""

    weights: float = DEFAULT_WEIGHTS_GB * 1e9
    activations: float = DEFAULT_ACTIVATIONS_GB * 1e9

    @classmethod
    def from_env(cls) -> "MemoryLimits":
        return cls(_env_gb(WEIGHTS_ENV, DEFAULT_WEIGHTS_GB) * 1e9,
                   _env_gb(ACTIVATIONS_ENV, DEFAULT_ACTIVATIONS_GB) * 1e9)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes (float32, batch 1) of a planned network."""

    weights: int
    outputs: int      # the input plus every layer output that is a new buffer
    workspace: int    # the largest working buffer (im2col, padded input)
    layer_weights: tuple[int, ...]
    layer_outputs: tuple[int, ...]

    @property
    def activations(self) -> int:
        return self.outputs + self.workspace


def _numel(shape) -> int:
    return math.prod(shape)


def estimate(sections, plan, input_shape) -> MemoryEstimate:
    """Memory of ``plan`` (one Built per section), from shapes and parameter counts only."""
    layer_weights = tuple(b.params * FLOAT_BYTES for b in plan)
    layer_outputs = tuple(0 if s.type in ALIAS_TYPES else _numel(b.shape) * FLOAT_BYTES
                          for s, b in zip(sections, plan))
    workspace = max((b.workspace for b in plan), default=0) * FLOAT_BYTES
    return MemoryEstimate(sum(layer_weights), _numel(input_shape) * FLOAT_BYTES + sum(layer_outputs), workspace,
                          layer_weights, layer_outputs)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:,.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{int(n)} bytes"


def _limit(n: float) -> str:
    return "no limit" if math.isinf(n) else fmt_bytes(n)


def _sizing_keys(section, keys) -> tuple[str, str | None]:
    """``"filters=... size=... "`` for the given keys present, and the one with the largest value
    (the likely culprit, whose line the error points at)."""
    present = [k for k in keys if section.has(k)]
    if not present:
        return "", None
    culprit = max(present, key=lambda k: abs(section.int(k, 0)))
    return " ".join(f"{k}={section.str(k)}" for k in present) + " ", culprit


def check(cfg, plan, input_shape, limits: MemoryLimits | None = None) -> MemoryEstimate:
    """The estimate, or a one-line :class:`CfgError` naming the first layer (in cfg order) that exceeds
    a limit on its own, else the whole network's total."""
    limits = limits or MemoryLimits.from_env()
    sections = cfg.layers
    est = estimate(sections, plan, input_shape)
    raise_w = f"set {WEIGHTS_ENV} (now {_limit(limits.weights)}) to raise the limit"
    raise_a = f"set {ACTIVATIONS_ENV} (now {_limit(limits.activations)}) to raise the limit"
    c, h, w = input_shape
    at_input = f"for the {w}x{h} network input at batch 1 (float32)"
    fix_a = f"check this layer, use a smaller width/height (or --size), or {raise_a}"
    if _numel(input_shape) * FLOAT_BYTES > limits.activations:
        raise cfg.net.error(f"the {w}x{h}x{c} network input alone needs {fmt_bytes(_numel(input_shape) * FLOAT_BYTES)}"
                            f" at batch 1 (float32): use a smaller width/height (or --size), or {raise_a}",
                            "width" if cfg.net.has("width") else None)
    for i, (s, b) in enumerate(zip(sections, plan)):
        if est.layer_weights[i] > limits.weights:
            keys = b.key if isinstance(b.key, tuple) else (b.key,) if b.key else ()
            shown, culprit = _sizing_keys(s, keys)
            raise s.error(f"{shown}needs {fmt_bytes(est.layer_weights[i])} of weights ({b.params:,} floats): "
                          f"check {culprit + '= here' if culprit else 'this layer'}, or {raise_w}", culprit)
        if est.layer_outputs[i] > limits.activations:
            raise s.error(f"its output ({' x '.join(map(str, b.shape))}) needs {fmt_bytes(est.layer_outputs[i])} "
                          f"{at_input}: {fix_a}")
        if b.workspace * FLOAT_BYTES > limits.activations:
            shown, culprit = _sizing_keys(s, ("size", "filters", "padding"))
            what = "im2col workspace (Darknet's get_workspace_size32)" if s.type == "convolutional" else \
                "padded copy of its input"
            raise s.error(f"{shown}needs a {fmt_bytes(b.workspace * FLOAT_BYTES)} {what} {at_input}: {fix_a}",
                          culprit)
    if est.weights > limits.weights:
        i = max(range(len(plan)), key=lambda k: est.layer_weights[k])
        raise CfgError(f"the network needs {fmt_bytes(est.weights)} of weights in total (largest: layer {i} "
                       f"[{sections[i].type}], {fmt_bytes(est.layer_weights[i])}): {raise_w}", file=cfg.path)
    if est.activations > limits.activations:
        i = max(range(len(plan)), key=lambda k: est.layer_outputs[k])
        net = cfg.net
        raise net.error(f"at the {w}x{h} network input the layer outputs need {fmt_bytes(est.activations)} at "
                        f"batch 1 (float32; largest: layer {i} [{sections[i].type}] "
                        f"{' x '.join(map(str, plan[i].shape))}, {fmt_bytes(est.layer_outputs[i])}): use a smaller "
                        f"width/height (or --size), or {raise_a}", "width" if net.has("width") else None)
    return est
