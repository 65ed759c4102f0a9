"""Builders for every supported cfg section (src/parser.c ``parse_*`` + each ``forward_*_layer``).

Each builder reads its options with Darknet's defaults, validates its inputs,
and returns a torch module and the output shape. Modules whose parameters live
in the .weights file list them, in file order, via ``darknet_tensors()``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..darknet.shapes import SHARE_NONE, region_head, yolo_head
from .activations import Activation, activation
from .registry import BuildContext, Built, register

BN_EPS = 1e-5  # normalize_cpu: (x - mean) / sqrt(var + .00001)


class DarknetModule(nn.Module):
    """A layer module; ``darknet_tensors`` lists (name, tensor) in .weights order."""

    def darknet_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return []


class _NoInitConv2d(nn.Conv2d):
    """nn.Conv2d without the random init (torch.empty parameters): for models whose .weights are loaded next."""

    def reset_parameters(self):
        pass


class _NoInitLinear(nn.Linear):
    """nn.Linear without the random init, like :class:`_NoInitConv2d`."""

    def reset_parameters(self):
        pass


# -- convolutional ---------------------------------------------------------------
class Convolutional(DarknetModule):
    """[convolutional]: conv (+ batchnorm) + bias + activation, optional antialiasing blur.

    Mirrors forward_convolutional_layer: BN uses the rolling statistics with eps 1e-5.
    ``fuse()`` folds BN into the conv (for export); outputs agree to float rounding.

    ``shared=True`` (share_index): the layer owns no parameters; :meth:`share_parameters` gives it those
    of an earlier layer (make_convolutional_layer points weights, biases, scales and rolling statistics at
    the shared layer's arrays), with its own geometry (stride, padding, dilation), activation and blur.
    """

    def __init__(self, c_in, n, size, stride, pad, dilation, groups, bn, act: Activation, blur=None, init=True,
                 shared=False):
        super().__init__()
        self._owner: tuple = ()  # (the Convolutional whose parameters this one uses,): a tuple, not a submodule
        if shared:  # geometry only (meta tensors, nothing allocated); share_parameters() puts the owner's in
            self.conv = nn.Conv2d(c_in, n, size, stride, pad * dilation, dilation, groups, bias=True, device="meta")
            self.bn = False
        else:
            # init=False: uninitialised parameters, for a model whose .weights overwrite every one of them
            self.conv = (nn.Conv2d if init else _NoInitConv2d)(c_in, n, size, stride, pad * dilation, dilation,
                                                                groups, bias=True)
            nn.init.zeros_(self.conv.bias)
            self.bn = bn
        if self.bn:
            self.register_buffer("scales", torch.ones(n))
            self.register_buffer("rolling_mean", torch.zeros(n))
            self.register_buffer("rolling_variance", torch.ones(n))
        self.act = act
        self.blur = blur  # (kernel (n,1,k,k), stride (sy,sx), pad) applied after the activation

    @property
    def shares(self) -> "Convolutional | None":
        """The layer whose parameters this one computes with (share_index), or None."""
        return self._owner[0] if self._owner else None

    def share_parameters(self, owner: "Convolutional") -> None:
        """Use ``owner``'s weights and biases (the same Parameter objects: export writes them once) and,
        at every forward, its batchnorm state."""
        owner = owner.shares or owner
        if owner.conv.weight.shape != self.conv.weight.shape:  # pragma: no cover - the builder checks this
            raise RuntimeError(f"darkconv bug: shared weights {tuple(owner.conv.weight.shape)} for a "
                               f"{tuple(self.conv.weight.shape)} convolution")
        self.conv.weight, self.conv.bias = owner.conv.weight, owner.conv.bias
        self._owner = (owner,)

    def darknet_tensors(self):
        if self._owner:  # load_weights_upto / save_weights skip a layer with share_layer: nothing in the file
            return []
        t = [("biases", self.conv.bias)]
        if self.bn:
            t += [("scales", self.scales), ("rolling_mean", self.rolling_mean),
                  ("rolling_variance", self.rolling_variance)]
        return t + [("weights", self.conv.weight)]

    @torch.no_grad()
    def fuse(self):
        if self._owner:  # fuse_conv_batchnorm: a sharing layer only drops its BN; the owner folds the arrays
            self._owner[0].fuse()
            return
        if not self.bn:
            return
        k = self.scales / torch.sqrt(self.rolling_variance + BN_EPS)
        self.conv.weight.mul_(k.view(-1, 1, 1, 1))
        self.conv.bias.copy_(self.conv.bias - self.rolling_mean * k)
        self.bn = False
        for name in ("scales", "rolling_mean", "rolling_variance"):
            delattr(self, name)

    def forward(self, x):
        src = self._owner[0] if self._owner else self  # whose batchnorm state (a sharer has none of its own)
        if src.bn:
            y = F.conv2d(x, self.conv.weight, None, self.conv.stride, self.conv.padding,
                         self.conv.dilation, self.conv.groups)
            y = (y - src.rolling_mean.view(1, -1, 1, 1)) / torch.sqrt(src.rolling_variance.view(1, -1, 1, 1) + BN_EPS)
            y = y * src.scales.view(1, -1, 1, 1) + self.conv.bias.view(1, -1, 1, 1)
        else:
            y = self.conv(x)
        y = self.act(y)
        if self.blur is not None:
            kernel, stride, pad = self.blur
            y = F.conv2d(y, kernel.to(y.dtype), None, stride, pad, 1, y.shape[1])
        return y


def _blur_kernel(n: int, antialiasing: int) -> torch.Tensor:
    if antialiasing == 2:  # 2x2 mean
        k = torch.full((2, 2), 0.25)
    else:  # [1,2,1] x [1,2,1] / 16
        v = torch.tensor([1.0, 2.0, 1.0])
        k = torch.outer(v, v) / 16
    return k.expand(n, 1, *k.shape).contiguous()


def _blur(n: int, antialiasing: int, stride: tuple[int, int], h: int, w: int):
    """The depthwise blur Darknet appends for ``antialiasing`` (make_convolutional_layer /
    make_maxpool_layer): 3x3 [1,2,1]x[1,2,1]/16 with padding 1, or for antialiasing=2 a 2x2 mean with
    padding 0, carrying the layer's stride. Returns a factory of (kernel, stride, pad) (the kernel is
    allocated only when the module is made) and the blurred (h, w)."""
    size, pad = (2, 0) if antialiasing == 2 else (3, 1)
    sy, sx = stride
    return (lambda: (_blur_kernel(n, antialiasing), (sy, sx), pad)), ((h + 2 * pad - size) // sy + 1,
                                                                       (w + 2 * pad - size) // sx + 1)


def _check_strides(s, sx: int, sy: int) -> None:
    """Pooling strides must be positive; one that fell back to ``stride`` names ``stride`` in the error."""
    for key, value in (("stride_x", sx), ("stride_y", sy)):
        if value < 1:
            key = key if s.has(key) else "stride"
            raise s.error(f"{key}={value} must be at least 1", key)


@register("convolutional")
def build_convolutional(s, ctx: BuildContext) -> Built:
    c, h, w = ctx.prev
    n = s.int("filters", 1, lo=1)
    size = s.int("size", 1, lo=1)
    groups = s.int("groups", 1, lo=1)
    sx, sy = s.int("stride_x", -1), s.int("stride_y", -1)
    stride = s.int("stride", 1) if sx < 1 or sy < 1 else 1  # parse_convolutional: stride only as fallback
    if sx < 1 or sy < 1:
        if stride < 1:
            raise s.error(f"stride={stride} must be at least 1", "stride")
        sx = stride if sx < 1 else sx
        sy = stride if sy < 1 else sy
    dilation = s.int("dilation", 1)
    if size == 1:
        dilation = 1
    elif dilation < 1:
        raise s.error(f"dilation={dilation} must be at least 1", "dilation")
    padding = size // 2 if s.int("pad", 0) else s.int("padding", 0, lo=0)
    antialiasing = s.int("antialiasing", 0)
    bn = bool(s.int("batch_normalize", 0) or s.int("cbn", 0))
    share = _share_target(s, ctx, c, n, size, groups, bn)
    for key in ("binary", "xnor", "sway", "rotate", "stretch", "stretch_sway"):
        if s.int(key, 0):
            raise s.error(f"option {key} is not supported by darkconv", key)
    if s.int("coordconv", 0):  # forward_convolutional_layer_gpu overwrites channels with coordinates
        raise s.error("option coordconv (GPU-only coordinate channels) is not supported by darkconv", "coordconv")
    if c % groups or n % groups:
        raise s.error(f"groups={groups} must divide the input channels ({c}) and filters ({n})", "groups")
    if antialiasing:
        stride_conv = (1, 1)
    else:
        stride_conv = (sy, sx)
    if size == 1 and stride_conv[1] == 1 and (padding or stride_conv[0] != 1):
        # forward_convolutional_layer feeds the input straight to the GEMM when size, l.stride (= stride_x)
        # and dilation are 1, ignoring padding and stride_y: Darknet's output would be garbage.
        raise s.error(f"size=1 with padding={padding}, stride_x=1, stride_y={stride_conv[0]}: Darknet ignores "
                      "padding and stride_y here (it reads past its buffer); use padding=0 and equal strides")
    oh = (h + 2 * padding - size) // stride_conv[0] + 1  # convolutional_out_height
    ow = (w + 2 * padding - size) // stride_conv[1] + 1
    th = (h + 2 * padding * dilation - dilation * (size - 1) - 1) // stride_conv[0] + 1
    tw = (w + 2 * padding * dilation - dilation * (size - 1) - 1) // stride_conv[1] + 1
    if (oh, ow) != (th, tw) or oh < 1 or ow < 1:
        raise s.error(f"size={size} padding={padding} dilation={dilation} gives an invalid output "
                      f"for a {w}x{h} input")
    blur = None
    # im2col buffer (get_workspace_size32); with antialiasing also the stride-1 output the blur reads
    workspace = c // groups * size * size * oh * ow + (n * oh * ow if antialiasing else 0)
    if antialiasing:
        blur, (oh, ow) = _blur(n, antialiasing, (sy, sx), oh, ow)
        if oh < 1 or ow < 1:
            raise s.error(f"antialiasing={antialiasing} with stride {sx}x{sy} gives an empty output", "antialiasing")
    act = activation(s, default="logistic")
    flipped = bool(s.int("flipped", 0))
    params = 0 if share is not None else n * (1 + 3 * bn) + n * (c // groups) * size * size

    def make(init: bool):
        mod = Convolutional(c, n, size, stride_conv, padding, dilation, groups, bn, act,
                            blur() if blur else None, init=init, shared=share is not None)
        mod.flipped = flipped
        return mod

    info = {"c": c, "n": n, "size": size, "groups": groups, "bn": bn, "owner": ctx.index if share is None else share}
    return Built(make, (n, oh, ow), params=params, workspace=workspace, key=("filters", "size", "groups"),
                 share=share, info=info)




def _share_target(s, ctx: BuildContext, c: int, n: int, size: int, groups: int, bn: bool) -> int | None:
    """share_index (parse_convolutional): the earlier [convolutional] whose weights, biases and batchnorm
    this layer uses (>= 0 absolute, < 0 relative to this layer); returns the layer owning them (a chain
    of sharers ends at it), or None. make_convolutional_layer requires equal size, channels, filters and
    weight count; darkconv also requires the same batch_normalize (with a BN only on the owner, Darknet's
    result depends on whether fuse_conv_batchnorm ran; with one only on the sharer it reads NULL arrays)."""
    if not s.has("share_index"):
        return None
    raw = s.int("share_index")
    if raw == SHARE_NONE:
        return None
    idx = raw if raw >= 0 else ctx.index + raw
    if not 0 <= idx < ctx.index:
        raise s.error(f"share_index={raw} points to layer {idx}, but only layers 0..{ctx.index - 1} come "
                      "before this one", "share_index")
    info = ctx.built[idx].info
    if "owner" not in info:
        raise s.error(f"share_index={raw} points to layer {idx}, which is not a [convolutional] layer",
                      "share_index")
    mine = {"size": size, "channels": c, "filters": n, "weights": n * (c // groups) * size * size}
    theirs = {"size": info["size"], "channels": info["c"], "filters": info["n"],
              "weights": info["n"] * (info["c"] // info["groups"]) * info["size"] ** 2}
    diff = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
    if diff:
        raise s.error(f"share_index={raw}: layer {idx} has another shape ({', '.join(diff)}); Darknet: "
                      "\"Layer size, nweights, channels or filters don't match for the share_layer\"", "share_index")
    if bn != info["bn"]:
        raise s.error(f"share_index={raw}: batch_normalize={int(bn)} here but {int(info['bn'])} in layer {idx}: "
                      "give both the same batch_normalize", "share_index")
    return info["owner"]


# -- pooling ---------------------------------------------------------------------
def _replicate_pad(x, lo: int, hi: int):
    """Edge-replicate ``lo`` cells before and ``hi`` after, on H and W (ONNX: Slice + Concat, no Pad op)."""
    x = torch.cat([x[:, :, :1]] * lo + [x] + [x[:, :, -1:]] * hi, 2)
    return torch.cat([x[:, :, :, :1]] * lo + [x] + [x[:, :, :, -1:]] * hi, 3)


FLT_MAX = 3.4028234663852886e38  # Darknet's value for padded cells (a window of padding only yields -FLT_MAX)


class MaxPool(DarknetModule):
    """[maxpool]: padded cells never win (edge padding == Darknet's -FLT_MAX for any window with a real cell).

    ``blur`` (antialiasing): Darknet pools at stride 1, then applies the fixed depthwise blur with the stride.
    """

    #: emulate Darknet's CPU build with AVX (``forward_maxpool_layer_avx``, src/gemm.c); see
    #: :func:`set_darknet_cpu_avx_maxpool`. Off: the GPU / non-AVX semantics the weights were trained with.
    cpu_avx = False

    def __init__(self, size, stride, padding, depth_out: int = 0, blur=None):
        super().__init__()
        self.size, self.stride, self.padding, self.depth_out = size, stride, padding, depth_out
        self.blur = blur

    def forward(self, x):
        if self.depth_out:  # maxpool_depth: output channel g = max over channels g, g+out_c, ...
            return torch.stack([x[:, g::self.depth_out].amax(1) for g in range(self.depth_out)], 1)
        y = self._pool(x)
        if self.cpu_avx:
            y = self._avx_blocks(x, y)
        if self.blur is not None:
            kernel, stride, pad = self.blur
            y = F.conv2d(y, kernel.to(y.dtype), None, stride, pad, 1, y.shape[1])
        return y

    def _avx_blocks(self, x, y):
        """Replace the output columns that ``forward_maxpool_layer_avx`` computes differently."""
        k, pad = self.size, self.padding
        pl = pad // 2
        plan = avx_maxpool_blocks(k, self.stride, pad, x.shape[-1], y.shape[-1])
        if not plan:
            return y
        parts, at = [], 0
        for j0, n, m_lo, m_hi in plan:
            if m_lo >= m_hi:                               # every tap skipped: -FLT_MAX stays
                blk = torch.full_like(y[..., j0:j0 + n], -FLT_MAX)
            else:                                          # stride 1: the taps lane 0 keeps
                xs = F.pad(x[..., j0 - pl + m_lo:j0 - pl + m_hi + 7], (0, 0, pl, pad - pl), value=-FLT_MAX)
                blk = F.max_pool2d(xs, (k, m_hi - m_lo), 1)
            parts += [y[..., at:j0], blk]
            at = j0 + n
        return torch.cat(parts + [y[..., at:]], -1)

    def _pool(self, x):
        p = self.padding
        pl, pr = p // 2, p - p // 2
        h, w = x.shape[-2:]
        (sy, sx), k = self.stride, self.size
        if pl == 0 and (h + pr - k) // sy == (h - k) // sy and (w + pr - k) // sx == (w - k) // sx:
            p = 0  # the right/bottom padding is never reached by a window: skip it (cleaner graph)
        if p:
            if pr < self.size and pl < self.size:  # edge replication: Slice+Concat in ONNX, no Pad op
                x = _replicate_pad(x, pl, pr)
            else:
                x = F.pad(x, (pl, pr, pl, pr), value=-FLT_MAX)
        return F.max_pool2d(x, self.size, self.stride)


def avx_maxpool_blocks(size: int, stride, padding: int, w: int, out_w: int) -> list[tuple[int, int, int, int]]:
    """Where ``forward_maxpool_layer_avx`` (src/gemm.c) differs from the plain maxpool loop.

    stride 1: blocks of 8 output columns ``j0 = 0, 8, ...`` while ``j0 < out_w - 8 - (size-1)``;
    tap (n, m) is skipped for all 8 lanes when lane 0's column ``j0 - pad/2 + m`` is outside the
    row, so lanes 1..7 of the first block lose their leftmost in-image columns. size 2, stride 2:
    blocks of 4 while ``j0 < out_w - 4``, tap m=0 only, the same lane-0 test (it fails only with
    ``padding >= 2``: the block stays -FLT_MAX). The row test is shared by all lanes, hence exact;
    other strides run the plain loop. Returns ``(j0, lanes, m_lo, m_hi)`` per differing block, the
    block being the max over taps ``m_lo <= m < m_hi``; a ValueError where the AVX loop would read
    past the row (odd geometries only), which darkconv does not emulate.
    """
    (sy, sx), pl = tuple(stride), padding // 2
    out = []
    if (sy, sx) == (1, 1):
        for j0 in range(0, out_w - 8 - (size - 1), 8):
            m_lo, m_hi = max(0, pl - j0), min(size, w + pl - j0)   # the taps lane 0 keeps
            if m_lo < m_hi and j0 - pl + m_hi + 7 > w:
                raise ValueError(f"maxpool size={size} padding={padding}: Darknet's AVX loop reads past the row")
            if (m_lo, m_hi) != (0, size):
                out.append((j0, 8, m_lo, m_hi))
    elif (sy, sx) == (2, 2) and size == 2:
        for j0 in range(0, out_w - 4, 4):
            c0 = 2 * j0 - pl
            if 0 <= c0 < w:
                if c0 + 8 > w:
                    raise ValueError(f"maxpool size=2 stride=2 padding={padding}: Darknet's AVX loop reads past the row")
                continue                                   # the same two columns as the plain loop
            out.append((j0, 4, 0, 0))
    return out


def set_darknet_cpu_avx_maxpool(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every [maxpool] of ``model`` compute what Darknet's CPU build with AVX computes
    (``forward_maxpool_layer_avx`` in src/gemm.c, used when ``stride_x == stride_y`` at inference):
    for comparisons with such a build only. The default (off) is the GPU and non-AVX result.
    A geometry the emulation does not cover is a CfgError naming the layer (DarknetModel)."""
    sections = getattr(model, "sections", None)
    shapes = getattr(model, "shapes", None)
    for i, m in enumerate(model.layers if sections is not None else model.modules()):
        if not isinstance(m, MaxPool):
            continue
        if enabled and sections is not None and not m.depth_out:
            w_in = shapes[i - 1][2] if i > 0 else model.spec.width
            w_out = (w_in + m.padding - m.size) // m.stride[1] + 1
            try:
                avx_maxpool_blocks(m.size, m.stride, m.padding, w_in, w_out)
            except ValueError as e:
                raise sections[i].error(f"{e}; darkconv does not emulate that (drop darknet_cpu_avx_maxpool)")
        m.cpu_avx = bool(enabled)
    return model


def _pool_geometry(s) -> tuple[int, int, int, int]:
    """parse_maxpool / parse_local_avgpool: (size, stride_x, stride_y, padding); size defaults to stride,
    padding to size-1. Each must be usable; an error names the key that gave the bad value."""
    stride = s.int("stride", 1)
    sx, sy = s.int("stride_x", stride), s.int("stride_y", stride)
    _check_strides(s, sx, sy)
    size = s.int("size", stride)
    if size < 1:
        key = "size" if s.has("size") else "stride"
        raise s.error(f"{key}={size} must be at least 1", key)
    padding = s.int("padding", size - 1, lo=0)
    return size, sx, sy, padding


@register("maxpool")
def build_maxpool(s, ctx: BuildContext) -> Built:
    c, h, w = ctx.prev
    size, sx, sy, padding = _pool_geometry(s)
    antialiasing = s.int("antialiasing", 0)
    if s.int("maxpool_zero_nonmax", 0):  # forward_maxpool_layer_gpu zeroes the non-max inputs in place
        raise s.error("option maxpool_zero_nonmax (GPU-only) is not supported by darkconv", "maxpool_zero_nonmax")
    if s.int("maxpool_depth", 0):
        out_c = s.int("out_channels", 1)
        if not 1 <= out_c <= c:
            raise s.error(f"out_channels={out_c} must be between 1 and the input channels {c}", "out_channels")
        if antialiasing:
            raise s.error("maxpool_depth with antialiasing is not supported by darkconv", "antialiasing")
        return Built(MaxPool(size, (1, 1), 0, out_c), (out_c, h, w))
    pool_stride = (1, 1) if antialiasing else (sy, sx)  # the blur carries the stride
    oh, ow = (h + padding - size) // pool_stride[0] + 1, (w + padding - size) // pool_stride[1] + 1
    if oh < 1 or ow < 1:
        raise s.error(f"size={size} is larger than the {w}x{h} input", "size")
    # MaxPool.forward materialises the padded input (and, with antialiasing, the stride-1 output)
    workspace = c * (h + padding) * (w + padding) if padding else 0
    blur = None
    if antialiasing:
        workspace += c * oh * ow
        blur, (oh, ow) = _blur(c, antialiasing, (sy, sx), oh, ow)
        if oh < 1 or ow < 1:
            raise s.error(f"antialiasing={antialiasing} with stride {sx}x{sy} gives an empty output", "antialiasing")
    if blur is None:
        return Built(MaxPool(size, pool_stride, padding, 0), (c, oh, ow), workspace=workspace)
    return Built(lambda init: MaxPool(size, pool_stride, padding, 0, blur()), (c, oh, ow), workspace=workspace)


class LocalAvgPool(DarknetModule):
    """[local_avgpool]: maxpool geometry, average over the in-image cells of each window."""

    def __init__(self, size, stride, padding):
        super().__init__()
        self.size, self.stride, self.padding = size, stride, padding

    def forward(self, x):
        p = self.padding
        pads = (p // 2, p - p // 2, p // 2, p - p // 2)
        ones = torch.ones_like(x[:1, :1])
        total = F.avg_pool2d(F.pad(x, pads), self.size, self.stride)
        count = F.avg_pool2d(F.pad(ones, pads), self.size, self.stride)
        return total / count


@register("local_avgpool")
def build_local_avgpool(s, ctx: BuildContext) -> Built:
    c, h, w = ctx.prev
    size, sx, sy, padding = _pool_geometry(s)
    oh, ow = (h + padding - size) // sy + 1, (w + padding - size) // sx + 1
    if oh < 1 or ow < 1 or padding // 2 >= size or (ow - 1) * sx - padding // 2 >= w \
            or (oh - 1) * sy - padding // 2 >= h:
        raise s.error(f"size={size} padding={padding} gives windows without any input cell for a {w}x{h} "
                      "input (Darknet divides by zero there)", "size")
    # LocalAvgPool.forward pads the input and a ones plane
    return Built(LocalAvgPool(size, (sy, sx), padding), (c, oh, ow), workspace=(c + 1) * (h + padding) * (w + padding))


class GlobalAvgPool(DarknetModule):
    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


@register("avgpool")
def build_avgpool(s, ctx: BuildContext) -> Built:
    return Built(GlobalAvgPool(), (ctx.prev[0], 1, 1))


# -- resampling ------------------------------------------------------------------
class Upsample(DarknetModule):
    """[upsample]: nearest ×stride times ``scale``; negative stride = sum-downsample (upsample_cpu reverse)."""

    def __init__(self, stride: int, scale: float):
        super().__init__()
        self.stride, self.scale = stride, scale

    def forward(self, x):
        if self.stride > 0:
            y = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        else:
            s = -self.stride
            y = F.avg_pool2d(x, s, s) * (s * s)
        return y * self.scale if self.scale != 1 else y


@register("upsample")
def build_upsample(s, ctx: BuildContext) -> Built:
    c, h, w = ctx.prev
    stride = s.int("stride", 2)
    scale = s.float("scale", 1.0)
    if stride == 0:
        raise s.error("stride=0 is not valid", "stride")
    if stride > 0:
        return Built(Upsample(stride, scale), (c, h * stride, w * stride))
    if -stride > min(h, w):
        raise s.error(f"stride={stride} (downsampling by {-stride}) is larger than the {w}x{h} input", "stride")
    return Built(Upsample(stride, scale), (c, h // -stride, w // -stride))


class Reorg(DarknetModule):
    """[reorg]: Darknet's old reorg (reorg_old_layer.c -> reorg_cpu(input, w, h, c, stride, forward=0)).

    It reads the input buffer as if it were (c/s², h·s, w·s) and gathers it into
    (c, h, w) order, then the flat result is the (c·s², h/s, w/s) output.
    """

    def __init__(self, stride: int, shape):
        super().__init__()
        self.stride, self.shape = stride, tuple(shape)  # static (c, h, w): no Shape ops in ONNX

    def forward(self, x):
        c, h, w = self.shape
        s = self.stride
        y = x.reshape(-1, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(-1, c * s * s, h // s, w // s)


class Reorg3d(DarknetModule):
    """[reorg3d]: reorg_layer.c -> reorg_cpu(input, out_w, out_h, out_c, stride, forward=0): space-to-depth,
    output channel ``off*c + k`` holds input channel k at offset (off // s, off % s)."""

    def __init__(self, stride: int, shape):
        super().__init__()
        self.stride, self.shape = stride, tuple(shape)

    def forward(self, x):
        c, h, w = self.shape
        s = self.stride
        y = x.reshape(-1, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(-1, c * s * s, h // s, w // s)


def _reorg(s, ctx, cls):
    c, h, w = ctx.prev
    stride = s.int("stride", 1)
    if s.int("reverse", 0) or s.int("flatten", 0) or s.int("extra", 0):
        raise s.error("reorg reverse/flatten/extra are not supported by darkconv")
    if stride < 1 or h % stride or w % stride or (cls is Reorg and c % (stride * stride)):
        raise s.error(f"stride={stride} must divide the {w}x{h} input" +
                      (f" and its channels/stride² ({c})" if cls is Reorg else ""), "stride")
    return Built(cls(stride, ctx.prev), (c * stride * stride, h // stride, w // stride))


@register("reorg")
def build_reorg(s, ctx):
    return _reorg(s, ctx, Reorg)


@register("reorg3d")
def build_reorg3d(s, ctx):
    return _reorg(s, ctx, Reorg3d)


# -- joins -----------------------------------------------------------------------
class Route(DarknetModule):
    """[route]: each input sliced to its group_id-th of ``groups`` channel chunks, then concatenated."""

    def __init__(self, groups: int, group_id: int, channels: tuple[int, ...]):
        super().__init__()
        self.groups, self.group_id = groups, group_id
        # static channel range of each input's group: no Shape arithmetic in the exported graph
        self.ranges = [(c // groups * group_id, c // groups * (group_id + 1)) for c in channels]

    def forward(self, *xs):
        if self.groups > 1:
            xs = [x[:, lo:hi] for x, (lo, hi) in zip(xs, self.ranges)]
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


@register("route")
def build_route(s, ctx: BuildContext) -> Built:
    raw = s.ints("layers")
    if not raw:
        raise s.error("route needs layers=", "layers")
    groups, group_id = s.int("groups", 1), s.int("group_id", 0)
    if groups < 1 or not 0 <= group_id < groups:
        raise s.error(f"group_id={group_id} must be in 0..groups-1 (groups={groups})", "group_id")
    idx = tuple(ctx.resolve(s, "layers", r) for r in raw)
    shapes = [ctx.shape_of(i) for i in idx]
    c = 0
    for i, (ci, hi, wi) in zip(idx, shapes):
        if (hi, wi) != shapes[0][1:]:
            raise s.error(f"layers {idx[0]} ({shapes[0][2]}x{shapes[0][1]}) and {i} ({wi}x{hi}) have different "
                          "sizes and cannot be concatenated", "layers")
        if ci % groups:
            raise s.error(f"layer {i} has {ci} channels, not divisible by groups={groups}", "groups")
        c += ci // groups
    return Built(Route(groups, group_id, tuple(sh[0] for sh in shapes)), (c, shapes[0][1], shapes[0][2]),
                 inputs=idx)


# activate_array / activate_array_ongpu (activate() and the CUDA activate_kernel) have no case for these and
# write 0: only forward_convolutional_layer calls their dedicated kernels ([shortcut] too for swish and mish)
_CONV_ONLY_ACTIVATIONS = ("swish", "mish", "hard_mish", "normalize_channels", "normalize_channels_softmax",
                          "normalize_channels_softmax_maxval")


def _elementwise_activation(s, default: str = "linear", supported: tuple[str, ...] = ()) -> Activation:
    """Activation of a non-convolutional layer; refuses those for which Darknet outputs zeros there."""
    act = activation(s, default=default)
    if act.name in _CONV_ONLY_ACTIVATIONS and act.name not in supported:
        raise s.error(f"activation={act.name} is only computed by Darknet in [convolutional] layers"
                      f"{' and [shortcut]' if act.name in ('swish', 'mish') else ''} "
                      f"(in [{s.name}] its activate_array writes zeros)", "activation")
    return act


class Shortcut(DarknetModule):
    """[shortcut]: previous + Σ from-layers (shortcut_multilayer_cpu), optional weights, activation last.

    An input with other channel counts adds to the leading channels only.
    """

    def __init__(self, n_from, channels, weights_type, normalization, act, from_channels):
        super().__init__()
        self.weights_type, self.normalization, self.act = weights_type, normalization, act
        # static channel counts (Python ints): tracing emits constant Slices, no Shape/Gather in ONNX
        self.channels = channels
        self.from_channels = tuple(from_channels)
        if weights_type == "per_feature":
            self.weights = nn.Parameter(torch.ones(n_from + 1, 1))
        elif weights_type == "per_channel":
            self.weights = nn.Parameter(torch.ones(n_from + 1, channels))
        else:
            self.weights = None

    def darknet_tensors(self):
        return [] if self.weights is None else [("weights", self.weights)]

    def _norm_weights(self):
        w = self.weights  # (n+1, 1 or c)
        if self.normalization == "relu":
            # Darknet's inference path (fuse_conv_batchnorm, called by `detector test`/`demo`/`map` and the
            # library's load_network_custom) normalizes with lrelu = max(w, 0.001), not relu (the unfused
            # shortcut_multilayer_cpu): the two differ only for weights below 0.001.
            r = torch.clamp(w, min=0.001)
            return r / (r.sum(0, keepdim=True) + 1e-4)
        if self.normalization == "softmax":
            e = torch.exp(w - w.amax(0, keepdim=True))
            return e / (e.sum(0, keepdim=True) + 1e-4)
        return w

    def forward(self, x, *adds):
        c = self.channels
        w = None if self.weights is None else self._norm_weights().to(x.dtype).view(-1, 1, self.weights.shape[1], 1, 1)[:, :, :c]
        out = x if w is None else x * w[0]
        for i, (a, c_from) in enumerate(zip(adds, self.from_channels)):
            ca = min(c, c_from)
            a = a if ca == c_from else a[:, :ca]
            term = a if w is None else a * w[i + 1][:, :ca]
            out = out + term if ca == c else torch.cat([out[:, :ca] + term, out[:, ca:]], 1)
        return self.act(out)


@register("shortcut")
def build_shortcut(s, ctx: BuildContext) -> Built:
    raw = s.ints("from")
    if not raw:
        raise s.error("shortcut needs from=", "from")
    idx = tuple(ctx.resolve(s, "from", r) for r in raw)
    c, h, w = ctx.prev
    for i in idx:
        _, hi, wi = ctx.shape_of(i)
        if (hi, wi) != (h, w):
            raise s.error(f"from layer {i} is {wi}x{hi} but the previous layer is {w}x{h}", "from")
    wt = s.str("weights_type", "none")
    wn = s.str("weights_normalization", "none")
    wt = {"per_layer": "per_feature"}.get(wt, wt)  # parse_shortcut's aliases
    wn = {"avg_relu": "relu"}.get(wn, wn)
    if wt not in ("none", "per_feature", "per_channel"):
        raise s.error(f"weights_type={wt!r}: expected none, per_feature or per_channel", "weights_type")
    if wn not in ("none", "relu", "softmax"):
        raise s.error(f"weights_normalization={wn!r}: expected none, relu or softmax", "weights_normalization")
    if wt == "none":
        wn = "none"  # no weights, nothing to normalize
    act = _elementwise_activation(s, supported=("swish", "mish"))
    params = {"none": 0, "per_feature": len(idx) + 1, "per_channel": (len(idx) + 1) * c}[wt]
    from_channels = tuple(ctx.shape_of(i)[0] for i in idx)
    return Built(lambda init: Shortcut(len(idx), c, wt, wn, act, from_channels), (c, h, w),
                 inputs=(ctx.index - 1,) + idx,
                 params=params, key="weights_type")


class Sam(DarknetModule):
    """[sam]: previous × from (forward_sam_layer), then activation."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x, other):
        return self.act(x * other)


@register("sam")
def build_sam(s, ctx: BuildContext) -> Built:
    if not s.has("from"):
        raise s.error("sam needs from=", "from")
    i = ctx.resolve(s, "from", s.int("from"))
    if ctx.shape_of(i) != ctx.prev:
        raise s.error(f"from layer {i} has shape {ctx.shape_of(i)}, the previous layer {ctx.prev}: must be equal",
                      "from")
    return Built(Sam(_elementwise_activation(s)), ctx.prev, inputs=(ctx.index - 1, i))


class ScaleChannels(DarknetModule):
    """[scale_channels]: from × previous, previous being C×1×1 (or 1×H×W with scale_wh)."""

    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x, other):
        return self.act(other * x)


@register("scale_channels")
def build_scale_channels(s, ctx: BuildContext) -> Built:
    if not s.has("from"):
        raise s.error("scale_channels needs from=", "from")
    i = ctx.resolve(s, "from", s.int("from"))
    c, h, w = ctx.shape_of(i)
    pc, ph, pw = ctx.prev
    if s.int("scale_wh", 0):
        if (pc, ph, pw) != (1, h, w):
            raise s.error(f"scale_wh expects the previous layer to be 1x{h}x{w}, it is {pc}x{ph}x{pw}")
    elif (pc, ph, pw) != (c, 1, 1):
        raise s.error(f"expects the previous layer to be {c}x1x1 (channels of layer {i}), it is {pc}x{ph}x{pw}")
    return Built(ScaleChannels(_elementwise_activation(s)), (c, h, w), inputs=(ctx.index - 1, i))


# -- misc ------------------------------------------------------------------------
class Identity(DarknetModule):
    def forward(self, x):
        return x


@register("dropout", "empty", "silence")
def build_identity(s, ctx: BuildContext) -> Built:
    return Built(Identity(), ctx.prev)  # dropout is the identity at inference (Darknet scales during training)


class ActivationLayer(DarknetModule):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x)


@register("activation")
def build_activation(s, ctx: BuildContext) -> Built:
    return Built(ActivationLayer(_elementwise_activation(s)), ctx.prev)


class BatchNorm(DarknetModule):
    """[batchnorm]: file order biases, scales, rolling mean, rolling variance."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("biases", torch.zeros(c))
        self.register_buffer("scales", torch.ones(c))
        self.register_buffer("rolling_mean", torch.zeros(c))
        self.register_buffer("rolling_variance", torch.ones(c))

    def darknet_tensors(self):
        return [("biases", self.biases), ("scales", self.scales), ("rolling_mean", self.rolling_mean),
                ("rolling_variance", self.rolling_variance)]

    def forward(self, x):
        v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
        return (x - v(self.rolling_mean)) / torch.sqrt(v(self.rolling_variance) + BN_EPS) * v(self.scales) + v(self.biases)


@register("batchnorm")
def build_batchnorm(s, ctx: BuildContext) -> Built:
    c = ctx.prev[0]
    return Built(lambda init: BatchNorm(c), ctx.prev, params=4 * c)


class Connected(DarknetModule):
    """[connected]: file order biases, weights (outputs × inputs), then BN scales/mean/variance."""

    def __init__(self, inputs, outputs, bn, act, init=True):
        super().__init__()
        self.fc = (nn.Linear if init else _NoInitLinear)(inputs, outputs)
        self.bn = bn
        if bn:
            self.register_buffer("scales", torch.ones(outputs))
            self.register_buffer("rolling_mean", torch.zeros(outputs))
            self.register_buffer("rolling_variance", torch.ones(outputs))
        self.act = act

    def darknet_tensors(self):
        t = [("biases", self.fc.bias), ("weights", self.fc.weight)]
        if self.bn:
            t += [("scales", self.scales), ("rolling_mean", self.rolling_mean), ("rolling_variance", self.rolling_variance)]
        return t

    def forward(self, x):
        if self.bn:
            y = F.linear(x.flatten(1), self.fc.weight)
            y = (y - self.rolling_mean) / torch.sqrt(self.rolling_variance + BN_EPS) * self.scales + self.fc.bias
        else:
            y = self.fc(x.flatten(1))
        return self.act(y)[:, :, None, None]


@register("connected")
def build_connected(s, ctx: BuildContext) -> Built:
    c, h, w = ctx.prev
    out = s.int("output", 1, lo=1)
    bn = bool(s.int("batch_normalize", 0))
    act = _elementwise_activation(s, "logistic")
    params = out * (1 + 3 * bn) + out * c * h * w
    return Built(lambda init: Connected(c * h * w, out, bn, act, init=init), (out, 1, 1), params=params,
                 key="output")


class Softmax(DarknetModule):
    """[softmax]: softmax over each of ``groups`` contiguous chunks of the flattened input, with temperature."""

    def __init__(self, groups, temperature):
        super().__init__()
        self.groups, self.temperature = groups, temperature

    def forward(self, x):
        n = x.shape[0]
        y = torch.softmax(x.reshape(n, self.groups, -1) / self.temperature, -1)
        return y.reshape(x.shape)


@register("softmax")
def build_softmax(s, ctx: BuildContext) -> Built:
    c, h, w = ctx.prev
    groups = s.int("groups", 1)
    if groups < 1 or (c * h * w) % groups:
        raise s.error(f"groups={groups} must divide the {c * h * w} inputs", "groups")
    if s.has("tree"):
        raise s.error("[softmax] tree= (hierarchical softmax) is not supported by darkconv", "tree")
    # temperature 0 divides by zero (NaN outputs); Darknet's softmax() overflows for negative ones
    return Built(Softmax(groups, s.float("temperature", 1.0, positive=True)), ctx.prev)


# -- heads -----------------------------------------------------------------------
class Head(DarknetModule):
    """[yolo]/[region] in the graph: the identity. Decoding lives in darkconv.postprocess."""

    def forward(self, x):
        return x


@register("yolo")
def build_yolo(s, ctx: BuildContext) -> Built:
    return Built(Head(), ctx.prev, head=yolo_head(s, ctx.prev))  # options and checks: darknet/shapes.py


@register("region")
def build_region(s, ctx: BuildContext) -> Built:
    return Built(Head(), ctx.prev, head=region_head(s, ctx.prev))


def he_scale(fan_in: int) -> float:
    return math.sqrt(2.0 / max(fan_in, 1))
