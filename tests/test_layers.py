"""Every layer builder against a direct numpy transcription of Darknet's C forward loop.

The references below transcribe (not copy) AlexeyAB/darknet ``src/``: im2col_cpu_ext + gemm and
forward_convolutional_layer (with the antialiasing blur layer of make_convolutional_layer),
forward_maxpool_layer / forward_local_avgpool_layer (maxpool_layer.c), forward_avgpool_layer,
upsample_cpu, reorg_cpu, forward_route_layer, shortcut_multilayer_cpu with the weight normalization that
fuse_conv_batchnorm folds in at inference, forward_sam_layer, forward_scale_channels_layer,
forward_connected_layer, softmax_cpu, forward_batchnorm_layer, and activations.h/.c.

Each test writes a tiny cfg, generates the parameters in Darknet's .weights order, writes them to a
.weights file that darkconv loads (so the file layout is checked too), runs the model in float64 on a
batch of two, and compares every layer output with the loop computed in float64 from the same values.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from darkconv.errors import CfgError
from darkconv.graph.model import build_model

FLT_MAX = float(np.finfo(np.float32).max)
RTOL, ATOL = 1e-9, 1e-12  # both sides compute in float64 from the same float32 parameters

# every cfg ends with this head so that darkconv accepts it: a 1x1 linear conv to 6 channels + [yolo]
HEAD = """
[convolutional]
filters=6
size=1
stride=1
activation=linear

[yolo]
mask=0
anchors=10,14
classes=1
num=1
"""


def f32(a):
    return np.asarray(a, np.float32)


def cfg(c: int, h: int, w: int, body: str) -> str:
    return f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n{body}\n{HEAD}"


def write_weights(path, arrays, major=0, minor=2, revision=0, seen=0) -> None:
    """A Darknet .weights file: int32 major, minor, revision, seen (uint64 if major*10+minor >= 2), floats."""
    head = np.array([major, minor, revision], "<i4").tobytes()
    head += np.array([seen], "<u8" if major * 10 + minor >= 2 else "<u4").tobytes()
    body = b"".join(np.ascontiguousarray(a, "<f4").tobytes() for a in arrays)
    path.write_bytes(head + body)


class Net:
    """A darkconv model for a test cfg, loaded from a .weights file the test wrote, run in float64."""

    def __init__(self, tmp_path, text: str, params=(), head_seed: int = 99):
        self.model = build_model(tmp_path / "t.cfg", text=text)
        head_c = self.model.shapes[-3][0]
        rng = np.random.default_rng(head_seed)
        self.head = [f32(rng.normal(0, 0.5, 6)), f32(rng.normal(0, 0.5, (6, head_c)))]
        path = tmp_path / "t.weights"
        write_weights(path, list(params) + self.head)
        self.model.load_weights(path)
        self.model.double()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """Every layer's output (the head layers included), as float64 numpy arrays."""
        outs = {-1: torch.from_numpy(np.asarray(x, np.float64))}
        with torch.no_grad():
            for i, layer in enumerate(self.model.layers):
                outs[i] = layer(*[outs[j] for j in self.model.inputs[i]])
        return [outs[i].numpy() for i in range(len(self.model.layers))]


def check(got, ref):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def per_sample(fn, *xs):
    return np.stack([fn(*[x[b] for x in xs]) for b in range(xs[0].shape[0])])


# == activations.h / activations.c ============================================================
def _logistic(x):
    return 1.0 / (1.0 + math.exp(-x))


def _tanh_activate(x):
    return 2.0 / (1.0 + math.exp(-2.0 * x)) - 1.0


def _softplus(x, threshold):
    if x > threshold:
        return x
    if x < -threshold:
        return math.exp(x)
    return math.log(math.exp(x) + 1.0)


def act_scalar(x: float, a: str) -> float:
    if a == "linear":
        return x
    if a == "logistic":
        return _logistic(x)
    if a == "loggy":
        return 2.0 / (1.0 + math.exp(-x)) - 1.0
    if a == "relu":
        return x * (x > 0)
    if a == "relu6":  # the CUDA kernel's clamp (the CPU activate() has no RELU6 case and writes 0)
        return min(max(x, 0.0), 6.0)
    if a == "elu":
        return (x >= 0) * x + (x < 0) * (math.exp(x) - 1)
    if a == "selu":
        return (x >= 0) * 1.0507 * x + (x < 0) * 1.0507 * 1.6732 * (math.exp(x) - 1)
    if a == "gelu":
        return 0.5 * x * (1 + math.tanh(0.797885 * x + 0.035677 * x ** 3))
    if a == "relie":
        return x if x > 0 else 0.01 * x
    if a == "ramp":
        return x * (x > 0) + 0.1 * x
    if a in ("leaky", "revleaky"):
        return x if x > 0 else 0.1 * x
    if a == "tanh":
        return _tanh_activate(x)
    if a == "plse":
        if x < -4:
            return 0.01 * (x + 4)
        if x > 4:
            return 0.01 * (x - 4) + 1
        return 0.125 * x + 0.5
    if a == "stair":
        n = math.floor(x)
        if math.fmod(n, 2) == 0:  # C: int n % 2 == 0 (negative odd n gives -1, i.e. "odd")
            return math.floor(x / 2)
        return (x - n) + math.floor(x / 2)
    if a == "hardtan":
        return -1.0 if x < -1 else 1.0 if x > 1 else x
    if a == "lhtan":
        if x < 0:
            return 0.001 * x
        if x > 1:
            return 0.001 * (x - 1) + 1
        return x
    if a == "swish":
        return x * _logistic(x)
    if a == "mish":
        return x * _tanh_activate(_softplus(x, 20.0))
    if a == "hard_mish":
        if x > 0:
            return x
        if x > -2:
            return x * x / 2 + x
        return 0.0
    raise KeyError(a)


def np_activate(y: np.ndarray, a: str) -> np.ndarray:
    """Activation of one sample (c, h, w); the normalize_channels* ones work across channels per pixel."""
    if a.startswith("normalize_channels"):
        c = y.shape[0]
        flat = y.reshape(c, -1)
        out = np.zeros_like(flat)
        for p in range(flat.shape[1]):
            v = flat[:, p]
            if a == "normalize_channels":
                s = 0.0001 + sum(val for val in v if val > 0)
                out[:, p] = [val / s if val > 0 else 0.0 for val in v]
            else:
                mx = max(v) if a.endswith("maxval") else 0.0
                s = 0.0001 + sum(math.exp(val - mx) for val in v)
                out[:, p] = [math.exp(val - mx) / s for val in v]
        return out.reshape(y.shape)
    return np.vectorize(lambda v: act_scalar(float(v), a), otypes=[np.float64])(y)


# == convolutional_layer.c ====================================================================
class ConvP:
    """Parameters of one [convolutional] in .weights order: biases, (scales, mean, variance), weights."""

    def __init__(self, rng, n, c, size, groups=1, bn=True, wscale=0.5):
        self.n, self.bn = n, bn
        self.biases = f32(rng.normal(0, 0.5, n))
        if bn:
            self.scales = f32(rng.uniform(0.5, 1.5, n))
            self.mean = f32(rng.normal(0, 0.3, n))
            self.var = f32(rng.uniform(0.3, 2.0, n))
        self.weights = f32(rng.normal(0, wscale, (n, c // groups * size * size)))

    def file(self):
        return [self.biases] + ([self.scales, self.mean, self.var] if self.bn else []) + [self.weights]


def im2col(im, channels, height, width, ksize, pad, stride_y, stride_x, dilation):
    """im2col_cpu_ext: rows (channel, kernel_row, kernel_col), columns output pixels; zero outside."""
    oh = (height + 2 * pad - (dilation * (ksize - 1) + 1)) // stride_y + 1
    ow = (width + 2 * pad - (dilation * (ksize - 1) + 1)) // stride_x + 1
    col = np.zeros((channels * ksize * ksize, oh * ow))
    for r in range(channels * ksize * ksize):
        kc, kr, ch = r % ksize, (r // ksize) % ksize, r // ksize // ksize
        for y in range(oh):
            for x in range(ow):
                iy = -pad + kr * dilation + y * stride_y
                ix = -pad + kc * dilation + x * stride_x
                if 0 <= iy < height and 0 <= ix < width:
                    col[r, y * ow + x] = im[ch, iy, ix]
    return col, oh, ow


def np_conv_core(x, weights, size, sx, sy, pad, dilation, groups):
    """The GEMM part of forward_convolutional_layer for one sample: per group, weights x im2col."""
    c, h, w = x.shape
    n = weights.shape[0]
    out_h = (h + 2 * pad - size) // sy + 1  # convolutional_out_height (no dilation term)
    out_w = (w + 2 * pad - size) // sx + 1
    out = np.zeros((n, out_h * out_w))
    cg, m = c // groups, n // groups
    for g in range(groups):
        col, oh, ow = im2col(x[g * cg:(g + 1) * cg], cg, h, w, size, pad * dilation, sy, sx, dilation)
        assert (oh, ow) == (out_h, out_w), "Darknet would read past its buffers"
        out[g * m:(g + 1) * m] = weights[g * m:(g + 1) * m].astype(np.float64) @ col
    return out.reshape(n, out_h, out_w)


def blur_weights(n, antialiasing):
    k = np.full(4, 1 / 4.0) if antialiasing == 2 else np.array([1, 2, 1, 2, 4, 2, 1, 2, 1]) / 16.0
    return np.tile(k, (n, 1))


def np_blur(y, antialiasing, sx, sy):
    """The blur layer make_convolutional_layer/make_maxpool_layer append: depthwise, linear, bias 0."""
    size, pad = (2, 0) if antialiasing == 2 else (3, 1)
    return np_conv_core(y, blur_weights(y.shape[0], antialiasing), size, sx, sy, pad, 1, y.shape[0])


def np_conv(x, p: ConvP, size, sx=1, sy=1, pad=0, dilation=1, groups=1, act="logistic", antialiasing=0):
    """forward_convolutional_layer for one sample; ``pad`` is the layer's padding (parse_convolutional)."""
    bsx, bsy = sx, sy
    if antialiasing:
        sx = sy = 1
    y = np_conv_core(x, p.weights, size, sx, sy, pad, dilation, groups)
    v = lambda a: np.asarray(a, np.float64)[:, None, None]  # noqa: E731
    if p.bn:
        y = (y - v(p.mean)) / np.sqrt(v(p.var) + 0.00001) * v(p.scales) + v(p.biases)
    else:
        y = y + v(p.biases)
    y = np_activate(y, act)
    if antialiasing:
        y = np_blur(y, antialiasing, bsx, bsy)
    return y


def conv_cfg(filters, size, act=None, **opts):
    lines = ["[convolutional]", f"filters={filters}", f"size={size}"]
    lines += [f"{k}={v}" for k, v in opts.items()]
    if act is not None:
        lines.append(f"activation={act}")
    return "\n".join(lines) + "\n"


CONV_CASES = {
    # id: (c, h, w, cfg options, reference kwargs)
    "3x3-pad-bn": (3, 7, 9, dict(stride=1, pad=1, batch_normalize=1), dict(pad=1)),
    "stride2-odd": (3, 7, 9, dict(stride=2, pad=1, batch_normalize=1), dict(sx=2, sy=2, pad=1)),
    "stride_x-only": (3, 7, 9, dict(stride_x=2, pad=1), dict(sx=2, sy=1, pad=1)),
    "stride_x-stride_y": (3, 7, 9, dict(stride_x=1, stride_y=2, stride=3, pad=1), dict(sx=1, sy=2, pad=1)),
    "groups": (4, 6, 5, dict(groups=2, pad=1, batch_normalize=1), dict(pad=1, groups=2)),
    "depthwise": (4, 6, 5, dict(groups=4, pad=1, batch_normalize=1), dict(pad=1, groups=4)),
    "dilation2": (3, 9, 8, dict(dilation=2, pad=1, batch_normalize=1), dict(pad=1, dilation=2)),
    "dilation2-stride2": (3, 9, 8, dict(dilation=2, stride=2, pad=1), dict(sx=2, sy=2, pad=1, dilation=2)),
    "padding-no-pad": (3, 6, 7, dict(padding=2), dict(pad=2)),
    "no-padding": (3, 6, 7, dict(), dict(pad=0)),
    "pad-wins-over-padding": (3, 6, 7, dict(pad=1, padding=3), dict(pad=1)),
    "even-size-pad": (3, 6, 7, dict(pad=1, stride=2), dict(pad=1, sx=2, sy=2)),
    "antialiasing1-stride2": (3, 8, 7, dict(stride=2, pad=1, antialiasing=1, batch_normalize=1),
                              dict(sx=2, sy=2, pad=1, antialiasing=1)),
    "antialiasing1-stride1": (3, 6, 5, dict(pad=1, antialiasing=1), dict(pad=1, antialiasing=1)),
    "antialiasing2-stride2": (3, 8, 7, dict(stride=2, pad=1, antialiasing=2, batch_normalize=1),
                              dict(sx=2, sy=2, pad=1, antialiasing=2)),
    "antialiasing2-stride_xy": (3, 8, 7, dict(stride_x=2, stride_y=1, pad=1, antialiasing=2),
                                dict(sx=2, sy=1, pad=1, antialiasing=2)),
}
CONV_SIZES = {"even-size-pad": 2, "dilation2-stride2": 3}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_convolutional(tmp_path, case):
    c, h, w, opts, ref = CONV_CASES[case]
    size, n = CONV_SIZES.get(case, 3), 6 if opts.get("groups") == 2 else 4
    groups = opts.get("groups", 1)
    rng = np.random.default_rng(1)
    p = ConvP(rng, n, c, size, groups, bn=bool(opts.get("batch_normalize")))
    net = Net(tmp_path, cfg(c, h, w, conv_cfg(n, size, "leaky", **opts)), p.file())
    x = rng.normal(0, 1, (2, c, h, w))
    outs = net.run(x)
    check(outs[0], per_sample(lambda s: np_conv(s, p, size, act="leaky", **ref), x))
    assert net.model.shapes[0] == outs[0].shape[1:]


def test_convolutional_default_activation_is_logistic(tmp_path):
    rng = np.random.default_rng(2)
    p = ConvP(rng, 3, 2, 1, bn=False)
    net = Net(tmp_path, cfg(2, 3, 4, "[convolutional]\nfilters=3\nsize=1\n"), p.file())
    x = rng.normal(0, 2, (2, 2, 3, 4))
    check(net.run(x)[0], per_sample(lambda s: np_conv(s, p, 1, act="logistic"), x))


def test_size1_forces_dilation_1(tmp_path):
    rng = np.random.default_rng(3)
    p = ConvP(rng, 3, 2, 1)
    net = Net(tmp_path, cfg(2, 5, 4, conv_cfg(3, 1, "linear", dilation=3, stride=2, batch_normalize=1)), p.file())
    x = rng.normal(0, 1, (2, 2, 5, 4))
    check(net.run(x)[0], per_sample(lambda s: np_conv(s, p, 1, sx=2, sy=2, act="linear"), x))


ACTIVATIONS = ["linear", "logistic", "loggy", "relu", "relu6", "elu", "selu", "gelu", "relie", "ramp", "leaky",
               "revleaky", "tanh", "plse", "stair", "hardtan", "lhtan", "swish", "mish", "hard_mish",
               "normalize_channels", "normalize_channels_softmax", "normalize_channels_softmax_maxval"]
# pre-activation values around every branch point of the formulas (mish/softplus threshold 20, plse ±4, ...)
SPECIAL = [-25, -20.5, -20, -19.5, -6, -4.5, -4, -3.5, -2.5, -2, -1.5, -1, -0.999, -0.5, -0.001, 0, 0.0005,
           0.5, 0.999, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5.999, 6, 6.5, 19.5, 20, 20.5, 25]


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation(tmp_path, act):
    """A 1x1 identity convolution feeds chosen values straight into the activation."""
    c, h, w = 3, 4, 6
    vals = np.array(SPECIAL + list(np.linspace(-7.3, 7.9, 2 * c * h * w - len(SPECIAL))))
    x = vals.reshape(2, c, h, w)
    if act.startswith("normalize_channels"):
        x = x / 4  # keep exp() of the softmax variants finite and varied
    p = ConvP(np.random.default_rng(0), c, c, 1, bn=False)
    p.biases[:] = 0
    p.weights[:] = np.eye(c, dtype=np.float32)
    net = Net(tmp_path, cfg(c, h, w, conv_cfg(c, 1, act)), p.file())
    got = net.run(x)[0]
    check(got, per_sample(lambda s: np_activate(s, act), x))


ELEMENTWISE = [a for a in ACTIVATIONS if a not in ("swish", "mish", "hard_mish") and not a.startswith("normalize")]


@pytest.mark.parametrize("act", ELEMENTWISE)
def test_activation_layer(tmp_path, act):
    x = np.random.default_rng(4).normal(0, 5, (2, 3, 4, 5))
    net = Net(tmp_path, cfg(3, 4, 5, f"[activation]\nactivation={act}\n"))
    check(net.run(x)[0], per_sample(lambda s: np_activate(s, act), x))


def test_unknown_activation_is_an_error(tmp_path):
    with pytest.raises(CfgError, match=r"t.cfg:9: layer 0 \[convolutional\]: unknown activation 'leakyy'"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 4, 4, conv_cfg(6, 1, "leakyy")))


CONV_ONLY = ["swish", "mish", "hard_mish", "normalize_channels", "normalize_channels_softmax",
             "normalize_channels_softmax_maxval"]


@pytest.mark.parametrize("layer", ["[shortcut]\nfrom=-1", "[activation]", "[scale_channels]\nfrom=-1",
                                   "[sam]\nfrom=-1", "[connected]\noutput=3"])
@pytest.mark.parametrize("act", CONV_ONLY)
def test_conv_only_activations_refused_elsewhere(tmp_path, layer, act):
    """activate_array (CPU activate(), CUDA activate_kernel) has no case for them and writes zeros; only
    forward_convolutional_layer calls their kernels, and forward_shortcut_layer those of swish and mish."""
    body = conv_cfg(4, 1, "linear") + "\n[avgpool]\n" * ("scale" in layer) + f"\n{layer}\nactivation={act}\n"
    if layer.startswith("[shortcut]") and act in ("swish", "mish"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 4, 4, body))
        return
    with pytest.raises(CfgError, match=rf"activation={act} is only computed by Darknet in \[convolutional\]"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 4, 4, body))


def test_convolutional_refuses_what_darknet_cannot_compute(tmp_path):
    with pytest.raises(CfgError, match="size=1 with padding=1"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 4, 4, conv_cfg(3, 1, padding=1)))
    with pytest.raises(CfgError, match="invalid output"):  # dilated kernel disagrees with Darknet's out size
        build_model(tmp_path / "t.cfg", text=cfg(3, 8, 8, conv_cfg(3, 3, dilation=2)))


# == maxpool_layer.c ==========================================================================
def np_maxpool(x, size, sx, sy, pad):
    """forward_maxpool_layer: window origin -pad/2, cells outside the input count as -FLT_MAX."""
    c, h, w = x.shape
    oh, ow = (h + pad - size) // sy + 1, (w + pad - size) // sx + 1
    off = -(pad // 2)
    out = np.zeros((c, oh, ow))
    for k in range(c):
        for i in range(oh):
            for j in range(ow):
                best = -FLT_MAX
                for n in range(size):
                    for m in range(size):
                        cy, cx = off + i * sy + n, off + j * sx + m
                        val = x[k, cy, cx] if 0 <= cy < h and 0 <= cx < w else -FLT_MAX
                        best = val if val > best else best
                out[k, i, j] = best
    return out


def np_maxpool_depth(x, out_c):
    c, h, w = x.shape
    out = np.zeros((out_c, h, w))
    for i in range(h):
        for j in range(w):
            for g in range(out_c):
                best = -FLT_MAX
                for k in range(g, c, out_c):
                    best = x[k, i, j] if x[k, i, j] > best else best
                out[g, i, j] = best
    return out


def np_local_avgpool(x, size, sx, sy, pad):
    c, h, w = x.shape
    oh, ow = (h + pad - size) // sy + 1, (w + pad - size) // sx + 1
    off = -(pad // 2)
    out = np.zeros((c, oh, ow))
    for k in range(c):
        for i in range(oh):
            for j in range(ow):
                total, counter = 0.0, 0
                for n in range(size):
                    for m in range(size):
                        cy, cx = off + i * sy + n, off + j * sx + m
                        if 0 <= cy < h and 0 <= cx < w:
                            counter += 1
                            total += x[k, cy, cx]
                out[k, i, j] = total / counter
    return out


MAXPOOL_CASES = {
    # id: (h, w, cfg options, reference (size, sx, sy, pad))
    "size2-stride1": (5, 6, "size=2\nstride=1", (2, 1, 1, 1)),
    "size2-stride2-odd": (5, 7, "size=2\nstride=2", (2, 2, 2, 1)),
    "size3-stride2": (7, 6, "size=3\nstride=2", (3, 2, 2, 2)),
    "size5-stride1-spp": (6, 5, "size=5\nstride=1", (5, 1, 1, 4)),
    "size-defaults-to-stride": (6, 7, "stride=2", (2, 2, 2, 1)),
    "padding0": (7, 6, "size=3\nstride=2\npadding=0", (3, 2, 2, 0)),
    "padding-beyond-size": (4, 5, "size=2\nstride=1\npadding=4", (2, 1, 1, 4)),  # all-padding windows
    "stride_x-stride_y": (7, 8, "size=3\nstride=1\nstride_x=2\nstride_y=3", (3, 2, 3, 2)),
}


@pytest.mark.parametrize("case", list(MAXPOOL_CASES))
def test_maxpool(tmp_path, case):
    h, w, opts, (size, sx, sy, pad) = MAXPOOL_CASES[case]
    x = np.random.default_rng(5).normal(0, 1, (2, 3, h, w))
    x[0, 0] = -2.0  # ties and all-negative windows
    net = Net(tmp_path, cfg(3, h, w, f"[maxpool]\n{opts}\n"))
    check(net.run(x)[0], per_sample(lambda s: np_maxpool(s, size, sx, sy, pad), x))


def test_maxpool_depth(tmp_path):
    x = np.random.default_rng(6).normal(0, 1, (2, 6, 3, 4))
    net = Net(tmp_path, cfg(6, 3, 4, "[maxpool]\nmaxpool_depth=1\nout_channels=2\nsize=2\nstride=2\n"))
    out = net.run(x)[0]
    check(out, per_sample(lambda s: np_maxpool_depth(s, 2), x))


@pytest.mark.parametrize("aa,stride", [(1, 2), (2, 2), (1, 1)])
def test_maxpool_antialiasing(tmp_path, aa, stride):
    x = np.random.default_rng(7).normal(0, 1, (2, 3, 8, 7))
    net = Net(tmp_path, cfg(3, 8, 7, f"[maxpool]\nsize=2\nstride={stride}\nantialiasing={aa}\n"))
    ref = per_sample(lambda s: np_blur(np_maxpool(s, 2, 1, 1, 1), aa, stride, stride), x)
    check(net.run(x)[0], ref)


def _mm256_max_ps(a, b):
    return [x if x > y else y for x, y in zip(a, b)]            # MAXPS: the second operand unless a > b


def _mm256_permute_ps(v, imm):                                   # within each 128-bit half
    return [v[4 * (i // 4) + ((imm >> (2 * (i % 4))) & 3)] for i in range(8)]


def _mm_shuffle_ps(a, b, imm):
    return [a[imm & 3], a[(imm >> 2) & 3], b[(imm >> 4) & 3], b[(imm >> 6) & 3]]


def np_maxpool_avx(x, size, stride, pad):
    """forward_maxpool_layer_avx (src/gemm.c, the AVX build) on one sample, on flat memory: 8-lane
    (stride 1) and 4-lane (size 2, stride 2) blocks whose tap test looks at lane 0 only, then the
    plain loop for the remaining columns of the row."""
    c, h, w = x.shape
    out_h, out_w = (h + pad - size) // stride + 1, (w + pad - size) // stride + 1
    src = list(x.ravel()) + [np.nan] * 8                         # a read past the end shows as NaN
    dst = np.zeros(c * out_h * out_w)
    off = -(pad // 2)
    for k in range(c):
        for i in range(out_h):
            j = 0
            if stride == 1:
                while j < out_w - 8 - (size - 1):
                    out_index = j + out_w * (i + out_h * k)
                    max256 = [-FLT_MAX] * 8
                    for n in range(size):
                        for m in range(size):
                            cur_h, cur_w = off + i * stride + n, off + j * stride + m
                            index = cur_w + w * (cur_h + h * k)
                            if not (0 <= cur_h < h and 0 <= cur_w < w):
                                continue
                            max256 = _mm256_max_ps(src[index:index + 8], max256)
                    dst[out_index:out_index + 8] = max256
                    j += 8
            elif size == 2 and stride == 2:
                while j < out_w - 4:
                    out_index = j + out_w * (i + out_h * k)
                    max128 = [-FLT_MAX] * 4
                    for n in range(size):
                        m = 0
                        cur_h, cur_w = off + i * stride + n, off + j * stride + m
                        index = cur_w + w * (cur_h + h * k)
                        if not (0 <= cur_h < h and 0 <= cur_w < w):
                            continue
                        src256 = src[index:index + 8]
                        max256 = _mm256_max_ps(src256, _mm256_permute_ps(src256, (1 << 0) | (3 << 4)))
                        src128 = _mm_shuffle_ps(max256[:4], max256[4:], (2 << 2) | (2 << 6))
                        max128 = [a if a > b else b for a, b in zip(src128, max128)]
                    dst[out_index:out_index + 4] = max128
                    j += 4
            while j < out_w:
                out_index = j + out_w * (i + out_h * k)
                best = -FLT_MAX
                for n in range(size):
                    for m in range(size):
                        cur_h, cur_w = off + i * stride + n, off + j * stride + m
                        index = cur_w + w * (cur_h + h * k)
                        val = src[index] if 0 <= cur_h < h and 0 <= cur_w < w else -FLT_MAX
                        best = val if val > best else best
                dst[out_index] = best
                j += 1
    return dst.reshape(c, out_h, out_w)


AVX_CASES = {   # (h, w, options, (size, stride, pad), the AVX build differs from the GPU build)
    "spp5-13x13": (13, 13, "size=5\nstride=1", (5, 1, 4), True),      # yolov3-spp at 416
    "spp9-19x19": (19, 19, "size=9\nstride=1", (9, 1, 8), True),      # yolov4 at 608
    "spp13-19x19": (19, 19, "size=13\nstride=1", (13, 1, 12), False),  # out_w too narrow for a block
    "spp5-6x30": (6, 30, "size=5\nstride=1", (5, 1, 4), True),        # several blocks per row
    "size2-stride1": (9, 21, "size=2\nstride=1", (2, 1, 1), False),   # pad/2 = 0: lane 0 never in padding
    "size3-padding0": (7, 20, "size=3\nstride=1\npadding=0", (3, 1, 0), False),
    "size2-stride2": (8, 22, "size=2\nstride=2", (2, 2, 1), False),
    "size2-stride2-padding2": (8, 22, "size=2\nstride=2\npadding=2", (2, 2, 2), True),
    "size3-stride2": (9, 23, "size=3\nstride=2", (3, 2, 2), False),   # plain loop in both builds
}


@pytest.mark.parametrize("case", list(AVX_CASES))
def test_maxpool_darknet_cpu_avx_emulation(tmp_path, case):
    from darkconv.graph.layers import set_darknet_cpu_avx_maxpool

    h, w, opts, (size, stride, pad), differs = AVX_CASES[case]
    x = np.random.default_rng(11).normal(0, 1, (2, 3, h, w))
    net = Net(tmp_path, cfg(3, h, w, f"[maxpool]\n{opts}\n"))
    plain = per_sample(lambda s: np_maxpool(s, size, stride, stride, pad), x)
    avx = per_sample(lambda s: np_maxpool_avx(s, size, stride, pad), x)
    assert (not np.array_equal(avx, plain)) == differs
    check(net.run(x)[0], plain)                                  # default: GPU / non-AVX semantics
    set_darknet_cpu_avx_maxpool(net.model)
    check(net.run(x)[0], avx)
    set_darknet_cpu_avx_maxpool(net.model, False)
    check(net.run(x)[0], plain)


def test_maxpool_darknet_cpu_avx_emulation_antialiasing_and_load(tmp_path):
    """antialiasing pools at stride 1 (make_maxpool_layer), so the AVX build's stride-1 loop runs
    there too; darkconv.load(..., darknet_cpu_avx_maxpool=True) switches every maxpool."""
    import darkconv

    x = np.random.default_rng(12).normal(0, 1, (2, 3, 8, 20))
    net = Net(tmp_path, cfg(3, 8, 20, "[maxpool]\nsize=3\nstride=2\nantialiasing=1\n"))
    from darkconv.graph.layers import set_darknet_cpu_avx_maxpool
    set_darknet_cpu_avx_maxpool(net.model)
    ref = per_sample(lambda s: np_blur(np_maxpool_avx(s, 3, 1, 2), 1, 2, 2), x)
    assert not np.allclose(ref, per_sample(lambda s: np_blur(np_maxpool(s, 3, 1, 1, 2), 1, 2, 2), x))
    check(net.run(x)[0], ref)
    (tmp_path / "t.cfg").write_text(cfg(3, 8, 20, "[maxpool]\nsize=3\nstride=2\nantialiasing=1\n"))
    m = darkconv.load(tmp_path / "t.cfg", tmp_path / "t.weights", darknet_cpu_avx_maxpool=True)
    assert [l.cpu_avx for l in m.layers if hasattr(l, "cpu_avx")] == [True]


def test_maxpool_darknet_cpu_avx_emulation_refuses_reads_past_the_row(tmp_path):
    from darkconv.graph.layers import set_darknet_cpu_avx_maxpool

    net = Net(tmp_path, cfg(3, 5, 34, "[maxpool]\nsize=3\nstride=1\npadding=12\n"))
    x = np.arange(3 * 5 * 34, dtype=np.float64).reshape(3, 5, 34)   # increasing: the next row wins
    assert (np_maxpool_avx(x, 3, 1, 12) > np_maxpool(x, 3, 1, 1, 12)).any()   # the C loop reads the next row
    with pytest.raises(CfgError, match=r"t\.cfg:\d+: layer 0 \[maxpool\].*reads past the row"):
        set_darknet_cpu_avx_maxpool(net.model)


LOCAL_AVG_CASES = {
    "size3-stride2": (7, 6, "size=3\nstride=2", (3, 2, 2, 2)),
    "size2-stride1": (5, 6, "size=2\nstride=1", (2, 1, 1, 1)),
    "size3-padding1": (6, 7, "size=3\nstride=1\npadding=1", (3, 1, 1, 1)),
    "size-defaults-to-stride": (6, 7, "stride=2", (2, 2, 2, 1)),
}


@pytest.mark.parametrize("case", list(LOCAL_AVG_CASES))
def test_local_avgpool(tmp_path, case):
    """Averages divide by the number of in-image cells of the window, not by size²."""
    h, w, opts, (size, sx, sy, pad) = LOCAL_AVG_CASES[case]
    x = np.random.default_rng(8).normal(0, 1, (2, 3, h, w))
    net = Net(tmp_path, cfg(3, h, w, f"[local_avg]\n{opts}\n"))
    check(net.run(x)[0], per_sample(lambda s: np_local_avgpool(s, size, sx, sy, pad), x))


def test_local_avgpool_refuses_empty_windows(tmp_path):
    with pytest.raises(CfgError, match="without any input cell"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 6, 6, "[local_avgpool]\nsize=2\nstride=1\npadding=4\n"))


def test_avgpool(tmp_path):
    x = np.random.default_rng(9).normal(0, 1, (2, 4, 3, 5))
    net = Net(tmp_path, cfg(4, 3, 5, "[avgpool]\n"))

    def ref(s):
        c = s.shape[0]
        out = np.zeros((c, 1, 1))
        for k in range(c):
            total = 0.0
            for i in range(s.shape[1] * s.shape[2]):
                total += s[k].reshape(-1)[i]
            out[k, 0, 0] = total / (s.shape[1] * s.shape[2])
        return out
    check(net.run(x)[0], per_sample(ref, x))


# == upsample_layer.c / blas.c upsample_cpu ===================================================
def np_upsample(x, stride, scale):
    c, h, w = x.shape
    if stride > 0:  # upsample_cpu(in, w, h, c, 1, stride, forward=1, scale, out)
        out = np.zeros(c * h * stride * w * stride)
        flat = x.reshape(-1)
        for k in range(c):
            for j in range(h * stride):
                for i in range(w * stride):
                    in_index = k * w * h + (j // stride) * w + i // stride
                    out_index = k * w * h * stride * stride + j * w * stride + i
                    out[out_index] = scale * flat[in_index]
        return out.reshape(c, h * stride, w * stride)
    s = -stride  # reverse: upsample_cpu(out, out_w, out_h, c, 1, s, forward=0, scale, in): out += scale*in
    ow, oh = w // s, h // s
    out = np.zeros(c * oh * ow)
    flat = x.reshape(-1)
    for k in range(c):
        for j in range(oh * s):
            for i in range(ow * s):
                small = k * ow * oh + (j // s) * ow + i // s
                big = k * ow * oh * s * s + j * ow * s + i
                out[small] += scale * flat[big]
    return out.reshape(c, oh, ow)


@pytest.mark.parametrize("stride,scale,h,w", [(2, 1, 3, 4), (3, 0.5, 2, 3), (-2, 1, 6, 8), (-2, 1.5, 4, 6),
                                              (-3, 2, 6, 9)])
def test_upsample(tmp_path, stride, scale, h, w):
    x = np.random.default_rng(10).normal(0, 1, (2, 3, h, w))
    net = Net(tmp_path, cfg(3, h, w, f"[upsample]\nstride={stride}\nscale={scale}\n"))
    check(net.run(x)[0], per_sample(lambda s: np_upsample(s, stride, scale), x))


def test_upsample_default_stride_is_2(tmp_path):
    x = np.random.default_rng(11).normal(0, 1, (2, 2, 3, 2))
    net = Net(tmp_path, cfg(2, 3, 2, "[upsample]\n"))
    check(net.run(x)[0], per_sample(lambda s: np_upsample(s, 2, 1.0), x))


# == blas.c reorg_cpu: [reorg] (reorg_old_layer.c) and [reorg3d] (reorg_layer.c) ===============
def reorg_cpu(x, w, h, c, batch, stride, forward):
    flat = x.reshape(-1)
    out = np.zeros_like(flat)
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    if forward:
                        out[out_index] = flat[in_index]
                    else:
                        out[in_index] = flat[out_index]
    return out


def test_reorg_old(tmp_path):
    """[reorg] = forward_reorg_old_layer: reorg_cpu(input, l.w, l.h, l.c, batch, stride, 0)."""
    c, h, w, s = 8, 4, 6, 2
    x = np.random.default_rng(12).normal(0, 1, (2, c, h, w))
    out = Net(tmp_path, cfg(c, h, w, f"[reorg]\nstride={s}\n")).run(x)[0]
    ref = reorg_cpu(x, w, h, c, 2, s, 0).reshape(2, c * s * s, h // s, w // s)
    check(out, ref)


def test_reorg3d(tmp_path):
    """[reorg3d] = forward_reorg_layer: reorg_cpu(input, l.out_w, l.out_h, l.out_c, batch, stride, 0)."""
    c, h, w, s = 3, 4, 6, 2
    x = np.random.default_rng(13).normal(0, 1, (2, c, h, w))
    out = Net(tmp_path, cfg(c, h, w, f"[reorg3d]\nstride={s}\n")).run(x)[0]
    ref = reorg_cpu(x, w // s, h // s, c * s * s, 2, s, 0).reshape(2, c * s * s, h // s, w // s)
    check(out, ref)


def test_reorg_and_reorg3d_differ_from_pixel_unshuffle(tmp_path):
    c, h, w = 4, 4, 4
    x = np.random.default_rng(14).normal(0, 1, (1, c, h, w))
    old = Net(tmp_path, cfg(c, h, w, "[reorg]\nstride=2\n")).run(x)[0]
    new = Net(tmp_path, cfg(c, h, w, "[reorg3d]\nstride=2\n")).run(x)[0]
    unshuffle = torch.nn.functional.pixel_unshuffle(torch.from_numpy(x), 2).numpy()
    assert not np.allclose(old, new) and not np.allclose(old, unshuffle) and not np.allclose(new, unshuffle)


# == route_layer.c ============================================================================
def np_route(inputs, groups, group_id):
    """forward_route_layer: from each input copy the group_id-th of ``groups`` flat parts, in order."""
    parts = []
    for inp in inputs:
        flat = inp.reshape(-1)
        part = flat.size // groups
        parts.append(flat[part * group_id: part * (group_id + 1)])
    out = np.concatenate(parts)
    h, w = inputs[0].shape[1:]
    return out.reshape(-1, h, w)


@pytest.mark.parametrize("layers,groups,group_id", [("-1,-3", 1, 0), ("0, 2,-2", 1, 0), ("-1,-3", 2, 1),
                                                    ("-2", 2, 0), ("-1,0", 4, 3)])
def test_route(tmp_path, layers, groups, group_id):
    rng = np.random.default_rng(15)
    ps = [ConvP(rng, 4, 3, 1, bn=False), ConvP(rng, 8, 4, 1, bn=False), ConvP(rng, 4, 8, 1, bn=False)]
    body = conv_cfg(4, 1, "linear") + conv_cfg(8, 1, "linear") + conv_cfg(4, 1, "linear")
    body += f"\n[route]\nlayers={layers}\ngroups={groups}\ngroup_id={group_id}\n"
    net = Net(tmp_path, cfg(3, 3, 5, body), [a for p in ps for a in p.file()])
    x = rng.normal(0, 1, (2, 3, 3, 5))
    outs = net.run(x)
    idx = [int(v) if int(v) >= 0 else 3 + int(v) for v in layers.split(",")]
    check(outs[3], per_sample(lambda *ins: np_route(ins, groups, group_id), *[outs[i] for i in idx]))


# == shortcut_layer.c / blas.c shortcut_multilayer_cpu / network.c fuse_conv_batchnorm ==========
def fuse_shortcut_weights(weights, n, normalization):
    """fuse_conv_batchnorm folds the normalization into the weights: relu uses lrelu = max(w, 0.001)."""
    w = np.asarray(weights, np.float64).copy()
    if normalization == "none":
        return w
    layer_step = w.size // (n + 1)
    lrelu = lambda v: v if v > 0.001 else 0.001  # noqa: E731
    for chan in range(layer_step):
        idx = [chan + i * layer_step for i in range(n + 1)]
        max_val = max(w[i] for i in idx) if normalization == "softmax" else -FLT_MAX
        total = 0.0001
        for i in idx:
            total += lrelu(w[i]) if normalization == "relu" else math.exp(w[i] - max_val)
        for i in idx:
            w[i] = (lrelu(w[i]) if normalization == "relu" else math.exp(w[i] - max_val)) / total
    return w


def np_shortcut(inp, adds, weights, act):
    """shortcut_multilayer_cpu for one sample (normalization already folded in), then the activation."""
    src = inp.reshape(-1)
    out = np.zeros_like(src)
    n = len(adds)
    nweights = 0 if weights is None else weights.size
    layer_step = nweights // (n + 1)
    step = src.size // layer_step if nweights else 0
    for i in range(src.size):
        out[i] = src[i] * weights[i // step] if nweights else src[i]
        for k, add in enumerate(adds):
            a = add.reshape(-1)
            if i < a.size:
                out[i] += a[i] * (weights[i // step + (k + 1) * layer_step] if nweights else 1.0)
    return np_activate(out.reshape(inp.shape), act)


SHORTCUT_WEIGHTS = [("none", "none"), ("per_feature", "none"), ("per_feature", "relu"), ("per_feature", "softmax"),
                    ("per_channel", "none"), ("per_channel", "relu"), ("per_channel", "softmax")]


@pytest.mark.parametrize("wt,wn", SHORTCUT_WEIGHTS)
@pytest.mark.parametrize("from_c", [4, 2, 6])  # same channels, fewer, more than the previous layer
def test_shortcut(tmp_path, wt, wn, from_c):
    rng = np.random.default_rng(16)
    c = 4
    ps = [ConvP(rng, from_c, 3, 1, bn=False), ConvP(rng, 3, from_c, 1, bn=False), ConvP(rng, c, 3, 1, bn=False)]
    body = conv_cfg(from_c, 1, "linear") + conv_cfg(3, 1, "leaky") + conv_cfg(c, 1, "linear")
    act = "mish" if from_c == 6 else "swish" if from_c == 2 else "leaky"  # [shortcut] computes swish and mish
    body += f"\n[shortcut]\nfrom=0,-3,1\nactivation={act}\nweights_type={wt}\nweights_normalization={wn}\n"
    count = {"none": 0, "per_feature": 4, "per_channel": 4 * c}[wt]
    # negative, tiny (< 0.001) and ordinary weights: relu normalization clamps at 0.001 (lrelu)
    sw = f32(rng.choice([-0.7, -0.01, 0.0, 0.0004, 0.3, 0.9, 1.6], count))
    params = [a for p in ps for a in p.file()] + ([sw] if count else [])
    net = Net(tmp_path, cfg(3, 3, 4, body), params)
    x = rng.normal(0, 1, (2, 3, 3, 4))
    outs = net.run(x)
    fused = fuse_shortcut_weights(sw, 3, wn) if count else None
    # from=0,-3,1 at layer 3 resolves to layers 0, 0, 1 (from_c and 3 channels); the previous layer has 4
    ref = per_sample(lambda prev, a0, a1, a2: np_shortcut(prev, [a0, a1, a2], fused, act),
                     outs[2], outs[0], outs[0], outs[1])
    check(outs[3], ref)


def test_shortcut_relu_normalization_is_lrelu(tmp_path):
    """A weight below 0.001 counts as 0.001 (fuse_conv_batchnorm), not 0 (unfused shortcut_multilayer_cpu)."""
    rng = np.random.default_rng(17)
    ps = [ConvP(rng, 2, 2, 1, bn=False), ConvP(rng, 2, 2, 1, bn=False)]
    body = conv_cfg(2, 1, "linear") + conv_cfg(2, 1, "linear")
    body += "\n[shortcut]\nfrom=-2\nweights_type=per_feature\nweights_normalization=relu\n"
    sw = f32([-1.0, 1.0])  # [previous layer, from layer]
    net = Net(tmp_path, cfg(2, 2, 2, body), ps[0].file() + ps[1].file() + [sw])
    outs = net.run(rng.normal(0, 1, (1, 2, 2, 2)))
    check(outs[2], outs[1] * (0.001 / 1.0011) + outs[0] * (1.0 / 1.0011))


def test_shortcut_refuses_different_spatial_sizes(tmp_path):
    body = conv_cfg(3, 1, "linear") + conv_cfg(3, 3, "linear", stride=2, pad=1) + "\n[shortcut]\nfrom=0\n"
    with pytest.raises(CfgError, match="from layer 0 is 4x4 but the previous layer is 2x2"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 4, 4, body))


# == sam_layer.c / scale_channels_layer.c =====================================================
def test_sam(tmp_path):
    rng = np.random.default_rng(18)
    ps = [ConvP(rng, 4, 3, 1, bn=False), ConvP(rng, 4, 4, 1, bn=False)]
    body = conv_cfg(4, 1, "linear") + conv_cfg(4, 1, "logistic") + "\n[sam]\nfrom=-2\nactivation=leaky\n"
    net = Net(tmp_path, cfg(3, 3, 4, body), ps[0].file() + ps[1].file())
    x = rng.normal(0, 1, (2, 3, 3, 4))
    outs = net.run(x)

    def ref(inp, frm):  # forward_sam_layer: output[i] = input[i] * from[i], then activate_array
        a, b = inp.reshape(-1), frm.reshape(-1)
        return np_activate(np.array([a[i] * b[i] for i in range(a.size)]).reshape(inp.shape), "leaky")
    check(outs[2], per_sample(ref, outs[1], outs[0]))


@pytest.mark.parametrize("scale_wh", [0, 1])
def test_scale_channels(tmp_path, scale_wh):
    rng = np.random.default_rng(19)
    c, h, w = 4, 3, 5
    if scale_wh:  # previous layer 1 x h x w scales every channel of the from layer per pixel
        ps = [ConvP(rng, c, 3, 1, bn=False), ConvP(rng, 1, c, 1, bn=False)]
        body = conv_cfg(c, 1, "linear") + conv_cfg(1, 1, "logistic")
    else:  # previous layer c x 1 x 1 scales each channel
        ps = [ConvP(rng, c, 3, 1, bn=False), ConvP(rng, c, c, 1, bn=False)]
        body = conv_cfg(c, 1, "linear") + "\n[avgpool]\n" + conv_cfg(c, 1, "logistic")
    body += f"\n[scale_channels]\nfrom={'-2' if scale_wh else '-3'}\nscale_wh={scale_wh}\nactivation=linear\n"
    net = Net(tmp_path, cfg(3, h, w, body), ps[0].file() + ps[1].file())
    x = rng.normal(0, 1, (2, 3, h, w))
    outs = net.run(x)

    def ref(inp, frm):  # forward_scale_channels_layer
        a, f = inp.reshape(-1), frm.reshape(-1)
        channel_size, batch_size = h * w, c * h * w
        out = np.zeros(batch_size)
        for i in range(batch_size):
            if scale_wh:
                out[i] = a[i % channel_size + (i // batch_size) * channel_size] * f[i]
            else:
                out[i] = a[i // channel_size] * f[i]
        return out.reshape(c, h, w)
    check(outs[-3], per_sample(ref, outs[-4], outs[0]))


def test_scale_channels_checks_shapes(tmp_path):
    body = conv_cfg(4, 1, "linear") + conv_cfg(4, 1, "linear") + "\n[scale_channels]\nfrom=-2\n"
    with pytest.raises(CfgError, match="expects the previous layer to be 4x1x1"):
        build_model(tmp_path / "t.cfg", text=cfg(3, 3, 3, body))


# == dropout / batchnorm / connected / softmax ================================================
def test_dropout_is_identity_at_inference(tmp_path):
    x = np.random.default_rng(20).normal(0, 1, (2, 3, 4, 4))
    net = Net(tmp_path, cfg(3, 4, 4, "[dropout]\nprobability=0.5\n\n[empty]\n\n[silence]\n"))
    outs = net.run(x)
    for o in outs[:3]:
        check(o, x)


def test_batchnorm_layer(tmp_path):
    rng = np.random.default_rng(21)
    c = 3
    biases, scales, mean, var = (f32(rng.normal(0, 1, c)), f32(rng.uniform(0.5, 2, c)), f32(rng.normal(0, 1, c)),
                                 f32(rng.uniform(0.2, 3, c)))
    net = Net(tmp_path, cfg(c, 3, 4, "[batchnorm]\n"), [biases, scales, mean, var])  # load_batchnorm_weights order
    x = rng.normal(0, 2, (2, c, 3, 4))

    def ref(s):  # forward_batchnorm_layer: normalize_cpu, scale_bias, add_bias
        v = lambda a: np.asarray(a, np.float64)[:, None, None]  # noqa: E731
        return (s - v(mean)) / np.sqrt(v(var) + 0.00001) * v(scales) + v(biases)
    check(net.run(x)[0], per_sample(ref, x))


@pytest.mark.parametrize("bn", [0, 1])
@pytest.mark.parametrize("act", [None, "leaky"])
def test_connected(tmp_path, bn, act):
    rng = np.random.default_rng(22)
    c, h, w, out = 3, 2, 4, 5
    inputs = c * h * w
    biases, weights = f32(rng.normal(0, 0.5, out)), f32(rng.normal(0, 0.3, (out, inputs)))
    bnp = [f32(rng.uniform(0.5, 1.5, out)), f32(rng.normal(0, 0.3, out)), f32(rng.uniform(0.3, 2, out))]
    text = f"[connected]\noutput={out}\nbatch_normalize={bn}\n" + (f"activation={act}\n" if act else "")
    # load_connected_weights order: biases, weights (outputs x inputs), then scales, mean, variance
    net = Net(tmp_path, cfg(c, h, w, text), [biases, weights] + (bnp if bn else []))
    x = rng.normal(0, 1, (2, c, h, w))

    def ref(s):  # forward_connected_layer: gemm(0,1,...) = x . W^T, BN, + biases, activate_array
        flat = s.reshape(-1)
        y = np.array([sum(flat[k] * float(weights[o, k]) for k in range(inputs)) for o in range(out)])
        if bn:
            y = (y - bnp[1]) / np.sqrt(bnp[2].astype(np.float64) + 0.00001) * bnp[0]
        y = y + biases
        return np_activate(y.reshape(out, 1, 1), act or "logistic")
    check(net.run(x)[0], per_sample(ref, x))


@pytest.mark.parametrize("groups,temperature", [(1, 1.0), (3, 1.0), (2, 0.5), (6, 2.5)])
def test_softmax(tmp_path, groups, temperature):
    x = np.random.default_rng(23).normal(0, 2, (2, 3, 2, 4))
    net = Net(tmp_path, cfg(3, 2, 4, f"[softmax]\ngroups={groups}\ntemperature={temperature}\n"))

    def ref(s):  # softmax_cpu(input, inputs/groups, batch, inputs, groups, inputs/groups, 1, temp, output)
        flat = s.reshape(-1)
        n = flat.size // groups
        out = np.zeros_like(flat)
        for g in range(groups):
            part = flat[g * n:(g + 1) * n]
            largest = max(part)
            e = [math.exp(v / temperature - largest / temperature) for v in part]
            out[g * n:(g + 1) * n] = np.array(e) / sum(e)
        return out.reshape(s.shape)
    check(net.run(x)[0], per_sample(ref, x))


# == heads and wiring =========================================================================
def test_forward_returns_the_tensor_fed_to_each_head(tmp_path):
    rng = np.random.default_rng(24)
    p = ConvP(rng, 4, 3, 3)
    net = Net(tmp_path, cfg(3, 5, 6, conv_cfg(4, 3, "leaky", pad=1, batch_normalize=1)), p.file())
    x = rng.normal(0, 1, (2, 3, 5, 6))
    outs = net.run(x)
    with torch.no_grad():
        heads = net.model(torch.from_numpy(x))
    assert len(heads) == 1
    check(heads[0].numpy(), outs[1])
    bias, weights = net.head
    ref = per_sample(lambda s: np.einsum("oc,chw->ohw", weights.astype(np.float64), s) + bias[:, None, None], outs[0])
    check(outs[1], ref)
    check(outs[2], outs[1])  # [yolo] itself is the identity in the graph


def test_yolo_head_shape_and_spec(tmp_path):
    text = """[net]
width=64
height=32
channels=3

[convolutional]
filters=21
size=3
stride=2
pad=1
activation=linear

[yolo]
mask=3,4,5
anchors=1,2, 3,4, 5,6, 7,8, 9,10, 11,12
classes=2
num=6
scale_x_y=1.1
new_coords=1
nms_kind=diounms
beta_nms=0.7
"""
    m = build_model(tmp_path / "t.cfg", text=text)
    (hd,) = m.spec.heads
    assert (hd.kind, hd.layer, hd.classes, hd.grid, hd.mask) == ("yolo", 1, 2, (16, 32), (3, 4, 5))
    assert hd.anchors == ((7, 8), (9, 10), (11, 12))
    assert (hd.scale_x_y, hd.new_coords, hd.nms_kind, hd.beta_nms) == (pytest.approx(1.1), 1, "diounms", 0.7)
    out = m(torch.zeros(1, 3, 32, 64))
    assert [tuple(o.shape) for o in out] == [(1, 21, 16, 32)]


def test_region_head_shape_and_spec(tmp_path):
    text = """[net]
width=32
height=32
channels=3

[convolutional]
filters=35
size=1
activation=linear

[region]
anchors=0.5,0.6, 1,2, 3,4, 5,6, 7,8
classes=2
coords=4
num=5
softmax=1
nms_kind=diounms
"""
    m = build_model(tmp_path / "t.cfg", text=text)
    (hd,) = m.spec.heads
    assert (hd.kind, hd.classes, hd.grid, hd.num_anchors, hd.softmax) == ("region", 2, (32, 32), 5, True)
    assert hd.anchors[0] == (0.5, 0.6)
    assert hd.nms_kind == "default"  # parse_region does not read nms_kind
    assert [tuple(o.shape) for o in m(torch.zeros(2, 3, 32, 32))] == [(2, 35, 32, 32)]


REGION_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
filters=35
size=1
activation=linear

[region]
anchors=0.5,0.6, 1,2, 3,4, 5,6, 7,8
classes=2
num=5
{extra}
"""


def test_region_keys_follow_parse_region(tmp_path):
    """parse_region (src/parser.c): softmax defaults to 0, coords to 4; classfix=-1 is the one training
    key that acts at inference (get_region_boxes); map= is a training-only class map; background is not
    read by AlexeyAB's parser at all (an unknown key)."""
    import warnings

    from darkconv.darknet.keys import UnknownKeyWarning
    from darkconv.darknet.spec import ModelSpec
    from darkconv.postprocess import decode

    m = build_model(tmp_path / "t.cfg", text=REGION_CFG.format(extra=""))
    (hd,) = m.spec.heads
    assert (hd.softmax, hd.classfix) == (False, 0)
    # a spec without the keys (e.g. written by hand) means what the cfg defaults mean
    d = m.spec.to_dict()
    for key in ("softmax", "classfix"):
        del d["heads"][0][key]
    assert ModelSpec.from_dict(d).heads[0] == hd
    # softmax=0: the class values go into prob = objectness * class unchanged (Darknet: > 1 possible)
    raw = np.zeros((1, 35, 32, 32), np.float32)
    raw[0, 5:7] = 3.0
    probs = decode([raw], m.spec, [(32, 32)], thresh=0.25)[0][2]
    assert np.allclose(probs, 1.5)                        # logistic(0) * 3
    m1 = build_model(tmp_path / "t1.cfg", text=REGION_CFG.format(extra="softmax=1\nclassfix=-1\nmap=none.map"))
    assert (m1.spec.heads[0].softmax, m1.spec.heads[0].classfix) == (True, -1)
    raw[0, 4::7] = -0.1                                   # objectness logistic(-0.1) = 0.475 < .5
    m2 = build_model(tmp_path / "t2.cfg", text=REGION_CFG.format(extra="softmax=1"))
    assert (decode([raw], m2.spec, [(32, 32)], thresh=0.2)[0][2] > 0).sum() == 2 * 5 * 32 * 32
    assert (decode([raw], m1.spec, [(32, 32)], thresh=0.2)[0][2] > 0).sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownKeyWarning)
        with pytest.raises(UnknownKeyWarning, match="background"):
            build_model(tmp_path / "t2.cfg", text=REGION_CFG.format(extra="background=1"))
    for extra, key in (("coords=5", "coords"), ("tree=data/9k.tree", "tree")):
        text = REGION_CFG.format(extra=extra).replace("filters=35", "filters=40" if key == "coords" else "filters=35")
        with pytest.raises(CfgError, match=key) as e:
            build_model(tmp_path / "t3.cfg", text=text)
        assert "t3.cfg:15: layer 1 [region]" in str(e.value)   # the key's line
