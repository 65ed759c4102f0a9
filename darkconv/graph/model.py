"""DarknetModel: the cfg's layers in order, returning the raw tensor fed to each head.

Mirrors ``forward_network`` (src/network.c): each layer reads the previous
output, or the layers its cfg names (route/shortcut/sam/scale_channels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..darknet.cfg import Cfg, parse_cfg
from ..darknet.keys import check_keys
from ..darknet.shapes import model_spec
from ..darknet.spec import ModelSpec
from ..darknet.weights import WeightsReader, WeightsWriter
from ..errors import CfgError
from . import layers as _layers  # noqa: F401  (registers the builders)
from . import memory
from .layers import BN_EPS, Convolutional
from .registry import BUILDERS, BuildContext, Built


def plan_network(cfg: Cfg, input_shape) -> tuple[list[Built], list]:
    """Run every layer's builder (options, checks, shapes, parameter counts), allocating nothing big.

    Returns one :class:`Built` per layer section and the head specs, in cfg order.
    """
    ctx = BuildContext(cfg.net, 0, [], tuple(input_shape))
    plan, heads = [], []
    for s in cfg.layers:
        ctx.index = s.index
        builder = BUILDERS.get(s.type)
        if builder is None:
            raise s.error(f"[{s.name}] is recognised but not supported by darkconv")
        for key in ("dontload", "dontloadscales"):  # load_weights_upto would skip (part of) this layer
            if s.int(key, 0):
                raise s.error(f"{key}={s.str(key)} is not supported by darkconv: Darknet would leave "
                              "these parameters at their random initialization", key)
        built = builder(s, ctx)
        plan.append(built)
        ctx.shapes.append(built.shape)
        if built.head is not None:
            heads.append(built.head)
    if not heads:
        raise CfgError("the cfg has no [yolo] or [region] layer: darkconv needs a detector", file=cfg.path)
    return plan, heads


def free_schedule(inputs: list[tuple[int, ...]], keep: list[int]) -> list[list[int]]:
    """For each layer, the outputs no later layer reads (forward drops them): one pass, linear in
    the number of layers. Outputs in ``keep`` (the head inputs) are never dropped."""
    last_use = {}
    for i, ins in enumerate(inputs):
        for j in ins:
            last_use[j] = i
    for j in keep:
        last_use[j] = len(inputs)
    free = [[] for _ in inputs]
    for j in range(len(inputs)):
        u = last_use.get(j, j)  # an output nobody reads is dropped at once
        if u < len(inputs):
            free[u].append(j)
    return free


class DarknetModel(nn.Module):
    """Darknet network as a torch module; ``forward(x) -> list`` of raw head tensors in cfg order."""

    def __init__(self, cfg: Cfg, width: int | None = None, height: int | None = None, *,
                 strict: bool | None = None, limits: memory.MemoryLimits | None = None, init: bool = True):
        """Check the cfg's keys (unknown ones warn, or fail with ``strict``), plan every layer, check the
        memory it needs against ``limits`` (default: from the environment), then build the modules.
        ``init=False`` leaves parameters uninitialised, for a caller that loads .weights next."""
        super().__init__()
        net = cfg.net
        w = width or net.int("width", 0)
        h = height or net.int("height", 0)
        c = net.int("channels", 0)
        if w <= 0 or h <= 0 or c <= 0:
            raise net.error("[net] needs positive width, height and channels")
        check_keys(cfg, strict)
        self.cfg_path = cfg.path
        self.sections = cfg.layers
        plan, heads = plan_network(cfg, (c, h, w))
        self.memory = memory.check(cfg, plan, (c, h, w), limits)  # before any allocation
        self.layers = nn.ModuleList([b.make(init) for b in plan])
        self.inputs = [b.inputs if b.inputs is not None else (s.index - 1,) for s, b in zip(cfg.layers, plan)]
        self.shapes = [b.shape for b in plan]
        self.spec = model_spec(cfg, w, h, source={"cfg": str(cfg.path), "darkconv": __version__})
        if self.spec.heads != tuple(heads):  # pragma: no cover - the builders take their heads from model_spec's code
            raise RuntimeError(f"darkconv bug: the torch-free spec's heads differ from the graph's in {cfg.path}")
        self.head_layers = [hd.layer for hd in heads]
        # which outputs to drop after each layer (frees memory on big models)
        self._free_after = free_schedule(self.inputs, [hl - 1 for hl in self.head_layers])
        self.eval().requires_grad_(False)  # an inference module: outputs convert to numpy directly

    # -- inference -------------------------------------------------------------
    def forward(self, x):
        outs: dict[int, torch.Tensor] = {-1: x}
        for i, layer in enumerate(self.layers):
            outs[i] = layer(*[outs[j] for j in self.inputs[i]])
            for j in self._free_after[i]:
                outs.pop(j, None)
        return [outs[h - 1] for h in self.head_layers]

    # -- parameters in .weights order ----------------------------------------------
    def darknet_tensors(self):
        for i, (s, m) in enumerate(zip(self.sections, self.layers)):
            for name, t in m.darknet_tensors():
                yield i, s, name, t

    def count_floats(self) -> int:
        return sum(t.numel() for *_, t in self.darknet_tensors())

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> "DarknetModel":
        """Fill every parameter from a Darknet .weights file (all of them: a model built with
        ``init=False`` has no other values)."""
        filled = {id(t) for *_, t in self.darknet_tensors()}
        missing = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if id(t) not in filled]
        if missing:  # pragma: no cover - a module that lists fewer tensors than it holds
            raise RuntimeError(f"darkconv bug: tensors not in the .weights order: {missing[:3]}")
        reader = WeightsReader(path)
        for i, s, name, t in self.darknet_tensors():
            flipped = name == "weights" and getattr(self.layers[i], "flipped", False)
            conn_t = name == "weights" and s.type == "connected" and reader.header.transpose_connected
            arr = reader.take(t.numel(), i, s.type, name)
            if flipped or conn_t:  # stored as (in, out): transpose to (out, in)
                arr = arr.reshape(-1, t.shape[0]).T
            t.copy_(torch.from_numpy(np.ascontiguousarray(arr)).view(t.shape))  # buffer is writable
        reader.finish()
        self.spec = ModelSpec(self.spec.width, self.spec.height, self.spec.channels, self.spec.letter_box,
                              self.spec.heads, self.spec.names, {**self.spec.source, "weights": str(path)})
        return self

    def save_weights(self, path: str | Path) -> None:
        """Write this model's parameters as a Darknet .weights file (header v0.2, atomically)."""
        w = WeightsWriter()
        for _, _, _, t in self.darknet_tensors():
            w.add(t.detach().cpu().numpy())
        w.write(path)

    @torch.no_grad()
    def randomize(self, seed: int = 0) -> "DarknetModel":
        """Deterministic random parameters that keep activations in a useful range (for tests)."""
        g = torch.Generator().manual_seed(seed)
        for i, s, name, t in self.darknet_tensors():
            u = lambda lo, hi: torch.rand(t.shape, generator=g) * (hi - lo) + lo  # noqa: E731
            if name == "weights" and s.type in ("convolutional", "connected"):
                fan_in = t[0].numel()
                t.copy_(u(-1, 1) * (3.0 / fan_in) ** 0.5 * 1.4)
            elif name == "rolling_variance":
                t.copy_(u(0.5, 1.5))
            elif name == "scales":
                t.copy_(u(0.7, 1.3))
            elif name in ("rolling_mean", "biases"):
                t.copy_(u(-0.1, 0.1))
            else:  # shortcut weights
                t.copy_(u(0.5, 1.5))
        return self

    @torch.no_grad()
    def normalize_activations(self, x: torch.Tensor, seed: int = 0) -> "DarknetModel":
        """Data-dependent init (LSUV-like) after :meth:`randomize`: set each conv's BN statistics
        (or scale its weights when it has no BN) from a forward pass on ``x``, so that every conv
        output has unit-ish spread and head tensors land where sigmoid/exp are informative."""
        g = torch.Generator().manual_seed(seed)
        outs = {-1: x}
        for i, layer in enumerate(self.layers):
            args = [outs[j] for j in self.inputs[i]]
            if isinstance(layer, Convolutional):
                c = layer.conv
                y = torch.nn.functional.conv2d(args[0], c.weight, None, c.stride, c.padding, c.dilation, c.groups)
                mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3)) + 1e-3
                if layer.bn:
                    jitter = torch.rand(mean.shape, generator=g) * 0.2 + 0.9
                    layer.rolling_mean.copy_(mean)
                    layer.rolling_variance.copy_((std * jitter) ** 2 - BN_EPS)
                else:
                    c.weight.div_(std.view(-1, 1, 1, 1))
                    c.bias.copy_(c.bias - mean / std)
            outs[i] = layer(*args)
        return self

    @torch.no_grad()
    def fuse(self) -> "DarknetModel":
        """Fold BatchNorm into the preceding convolutions (for export)."""
        for m in self.layers:
            if hasattr(m, "fuse"):
                m.fuse()
        return self


def build_model(cfg_path: str | Path, width: int | None = None, height: int | None = None,
                text: str | None = None, *, strict: bool | None = None, init: bool = True) -> DarknetModel:
    return DarknetModel(parse_cfg(cfg_path, text), width, height, strict=strict, init=init)
